"""Wall time of one GRPO step (rollout + reward + update) of forgetjax vs TRL's GRPOTrainer (torch), float32 on CPU.

Both sides train the embedded SmolLM2-135M-Instruct (the same weights: forgetjax's model exported to an HF directory
for TRL) on the same GSM8K training prompts in the same order, with the same group size, completion budget,
temperature, KL weight (so both keep a reference model), clip range, optimiser and learning rate, and the same
math verifier (forgetjax's RewardPool; TRL calls it synchronously inside its reward function). A step is timed from
the start of one step to the start of the next (forgetjax: between consecutive batch requests of the trainer; TRL:
on_step_begin -> on_step_end callbacks), the first `--warmup` steps (compilation / allocator warm-up) are dropped,
and the best and median of the rest are reported with the ratio and forgetjax's time split. The floor printed
beside them is the step's model FLOPs (sampling, reference and update passes over the real tokens) at the JAX matmul
peak measured in the same run: TRL's median over that floor bounds the speed-up any JAX implementation can reach.
Completion lengths differ between samples, so generated tokens per step are reported beside the times, and so do
row widths (multiples of 64): a width not seen before compiles forgetjax's programs inside a timed step. Those XLA
compile seconds are counted from jax's compile events and reported, with the median step and ratio without them.
Each framework runs in its own process (separate memory and thread pools); TRL runs offline on the CPU.

    .venv/bin/python benchmarks/grpo_step.py --steps 4 --warmup 1 --out runs/bench/grpo_step.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))

from common import alternate_processes, jax_matmul_peak, torch_matmul_peak  # noqa: E402

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax's duration event for each XLA compile


def gsm8k_problems(count: int, data_dir: str | None):
    from forgetjax.envs import load_problems

    return load_problems("math", "gsm8k", data_dir, "train", limit=count, seed=0)


def run_forgetjax(args, problems_path: Path, out_dir: Path) -> dict:
    """Per-step wall times and the logged time split of forgetjax's GRPO."""
    import jax

    import forgetjax
    from forgetjax.methods.registry import build_method
    from forgetjax.training.budget import FLOP_COMPONENTS, BudgetConfig
    from forgetjax.training.optim import OptimizerConfig
    from forgetjax.methods.run import DomainConfig
    from forgetjax.training.trainer import CheckpointConfig, LogConfig, TrainConfig, Trainer

    method_args = {"group_size": args.group_size, "max_new_tokens": args.max_new_tokens, "temperature": 1.0,
                   "beta": args.beta, "clip_low": 0.2, "clip_high": 0.2}
    domain = DomainConfig(name="math", source=str(problems_path), split="train")
    method = build_method("on_rl_grpo", method_args, domain)
    model, tokenizer = forgetjax.load("smollm2-135m-instruct")
    cfg = TrainConfig(batch_size=args.prompts * args.group_size, micro_batches=args.micro_batches,
                      max_length=args.max_prompt_tokens + args.max_new_tokens,
                      optimizer=OptimizerConfig(lr=args.lr, schedule="constant", max_grad_norm=1.0),
                      budget=BudgetConfig("steps", args.steps), checkpoint=CheckpointConfig(every=10_000, keep=1),
                      log=LogConfig(progress=False, tensorboard=False, peak_flops=1e12), seed=0,
                      out_dir=str(out_dir))
    trainer = Trainer(cfg, model, tokenizer, method)
    stamps: list[float] = []
    compile_s: dict[int, float] = {}

    def count_compile(event: str, seconds: float, **_) -> None:
        if event == BACKEND_COMPILE_EVENT and stamps:
            compile_s[len(stamps) - 1] = compile_s.get(len(stamps) - 1, 0.0) + seconds

    jax.monitoring.register_event_duration_secs_listener(count_compile)
    build_source = method.batch_source

    def timed_source(trainer_):
        source = build_source(trainer_)
        fetch = source.next_batch

        def next_batch(context):
            stamps.append(time.perf_counter())
            return fetch(context)

        source.next_batch = next_batch
        return source

    method.batch_source = timed_source
    trainer.fit()
    end = time.perf_counter()
    steps = [b - a for a, b in zip(stamps, stamps[1:] + [end])]
    logged = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    split = [{"rollout_s": m["rollout_s"], "reward_wait_s": m["reward_wait_s"], "reward_s": m["reward_s"],
              "reference_s": m["reference_s"], "update_s": m["step_seconds"],
              "generated_tokens": m["response_length"] * cfg.batch_size, "reward_mean": m["reward_mean"],
              "model_flops": sum(m.get(f"{name}_flops", 0.0) for name in FLOP_COMPONENTS),
              "compile_s": compile_s.get(index, 0.0)}
             for index, m in enumerate(logged)]
    return {"step_s": steps, "split": split}


class _StepTimer:
    """TrainerCallback timing every optimiser step (generation, reward, update) of the HF/TRL trainer."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def __init__(self):
                self.steps: list[float] = []
                self._start = 0.0

            def on_step_begin(self, args, state, control, **kwargs):
                self._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                self.steps.append(time.perf_counter() - self._start)

        return Timer()


def run_trl(args, problems, hf_dir: Path, out_dir: Path) -> dict:
    """Per-step wall times of TRL's GRPOTrainer with the same settings."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from forgetjax.verifiers.rewards import RewardPool

    torch.manual_seed(0)
    pool = RewardPool(2)
    completion_tokens: list[int] = []
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))

    def math_reward(completions, answer, **kwargs):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        completion_tokens.append(sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts))
        return pool.score([("math", text, ref) for text, ref in zip(texts, answer)])

    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p.prompt}], "answer": p.reference}
                                 for p in problems])
    rows = args.prompts * args.group_size
    config = GRPOConfig(output_dir=str(out_dir), per_device_train_batch_size=rows // args.micro_batches,
                        gradient_accumulation_steps=args.micro_batches, num_generations=args.group_size,
                        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, beta=args.beta,
                        epsilon=0.2, loss_type="grpo", learning_rate=args.lr, lr_scheduler_type="constant",
                        max_grad_norm=1.0, max_steps=args.steps, logging_steps=1, save_strategy="no", report_to=[],
                        use_cpu=True, bf16=False, fp16=False, seed=0, shuffle_dataset=False,
                        dataloader_num_workers=0, disable_tqdm=True)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    timer = _StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=[math_reward], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    try:
        trainer.train()
    finally:
        pool.close()
    return {"step_s": timer.steps, "generated_tokens": completion_tokens}


def summarise(values: list[float], warmup: int) -> dict[str, float]:
    kept = values[warmup:] or values
    return {"best_s": min(kept), "median_s": statistics.median(kept), "n": len(kept)}


def merge_rounds(results: list[dict], warmup: int) -> dict:
    """One framework's rounds as one record: each round's warm-up steps dropped, the rest concatenated behind a
    single leading warm-up block (so `summarise` keeps exactly the post-warm-up steps of every round)."""
    merged = dict(results[-1])
    for key in ("step_s", "split", "generated_tokens"):
        if key in merged:
            merged[key] = results[0][key][:warmup] + [v for r in results for v in r[key][warmup:]]
    for key in ("jax_f32_matmul_flops", "torch_f32_matmul_flops"):
        if key in merged:
            merged[key] = max(r[key] for r in results)
    return merged


def run_side(args) -> None:
    """One framework in this process (the parent runs each side in its own process: memory and threads stay
    separate); writes its raw timings as JSON to --side-out."""
    from forgetjax.data.pipeline import derived_seed, shuffled_order
    from forgetjax.io import write_json_atomic

    problems = gsm8k_problems(args.prompts * args.steps, args.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.side == "forgetjax":
            problems_path = tmp / "gsm8k_subset.jsonl"
            problems_path.write_text("".join(json.dumps({"id": p.metadata["item_id"], "question": p.metadata[
                "question"], "answer": p.reference}) + "\n" for p in problems))
            result = run_forgetjax(args, problems_path, tmp / "forgetjax")
            result["jax_f32_matmul_flops"] = jax_matmul_peak()
        else:
            import forgetjax

            # forgetjax visits the file's problems in its seeded epoch order; TRL (no shuffling) gets that order
            visit_order = [problems[i] for i in shuffled_order(len(problems), derived_seed(0, 0, 0))]
            model, tokenizer = forgetjax.load("smollm2-135m-instruct")
            forgetjax.export_hf(model, tokenizer, tmp / "hf")
            del model
            result = run_trl(args, visit_order, tmp / "hf", tmp / "trl")
            result["torch_f32_matmul_flops"] = torch_matmul_peak()
    write_json_atomic(args.side_out, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="training steps per framework (incl. warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="leading steps left out of the timing")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=4, help="completions per prompt (G)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="completion budget")
    parser.add_argument("--micro-batches", type=int, default=2,
                        help="micro-batches per update (TRL: gradient accumulation steps over one generation batch)")
    parser.add_argument("--max-prompt-tokens", type=int, default=384, help="prompt room in forgetjax's max_length")
    parser.add_argument("--beta", type=float, default=0.04, help="KL weight (> 0: both keep a reference model)")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--data-dir", default=None, help="benchmark data directory (default ../shared/data)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--skip-trl", action="store_true", help="time forgetjax only")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternating rounds (one process per framework per round, order swapped each round)")
    parser.add_argument("--side", choices=("forgetjax", "trl"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--side-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    if args.prompts % args.micro_batches:
        parser.error("--micro-batches must divide --prompts (micro-batches hold whole groups)")
    if args.side is not None:
        run_side(args)
        return

    from forgetjax.io import write_json_atomic

    sides = ["forgetjax"] + ([] if args.skip_trl else ["trl"])
    rounds = alternate_processes(__file__, sys.argv[1:], sides, args.rounds)
    raw = {side: merge_rounds(results, args.warmup) for side, results in rounds.items()}
    result = {"settings": vars(args)}
    for side in sides:
        result[side] = {**summarise(raw[side]["step_s"], args.warmup), **raw[side]}
    ours = raw["forgetjax"]
    kept = ours["split"][args.warmup:]
    print(f"GRPO step, SmolLM2-135M f32, {args.prompts} prompts x G={args.group_size}, "
          f"{args.max_new_tokens} new tokens, beta={args.beta}")
    print(f"forgetjax: best {result['forgetjax']['best_s']:.1f} s, median {result['forgetjax']['median_s']:.1f} s")
    for key in ("rollout_s", "reward_wait_s", "reward_s", "reference_s", "update_s", "compile_s",
                "generated_tokens"):
        print(f"  {key:17s} median {statistics.median(s[key] for s in kept):8.2f}")
    steady = [step - split["compile_s"] for step, split in zip(ours["step_s"][args.warmup:], kept)]
    result["forgetjax"]["steady_median_s"] = statistics.median(steady)
    print(f"  timed steps compiled for {sum(s['compile_s'] for s in kept):.1f} s in all (a new row "
          f"width compiles the step once); median step without it {result['forgetjax']['steady_median_s']:.1f} s")
    print(f"  jax f32 matmul peak {ours['jax_f32_matmul_flops'] / 1e9:.0f} GFLOP/s")
    floor_s = statistics.median(s["model_flops"] for s in kept) / ours["jax_f32_matmul_flops"]
    result["floor_s"] = floor_s
    print(f"  floor {floor_s:.1f} s: the step's model FLOPs (sampling, reference and update passes) at that peak")
    if "trl" in result:
        theirs = raw["trl"]
        result["speedup_median"] = result["trl"]["median_s"] / result["forgetjax"]["median_s"]
        result["speedup_best"] = result["trl"]["best_s"] / result["forgetjax"]["best_s"]
        print(f"TRL:       best {result['trl']['best_s']:.1f} s, median {result['trl']['median_s']:.1f} s, "
              f"generated tokens/step median {statistics.median(theirs['generated_tokens'][args.warmup:] or [0])}")
        print(f"  torch f32 matmul peak {theirs['torch_f32_matmul_flops'] / 1e9:.0f} GFLOP/s")
        print(f"speed-up (TRL / forgetjax): median {result['speedup_median']:.2f}x, best {result['speedup_best']:.2f}x")
        result["speedup_steady_median"] = result["trl"]["median_s"] / result["forgetjax"]["steady_median_s"]
        print(f"  without forgetjax's compile time in timed steps: median {result['speedup_steady_median']:.2f}x")
        print(f"TRL median / floor: {result['trl']['median_s'] / floor_s:.2f}x, the largest speed-up any JAX "
              f"implementation could reach on this machine (decoding at small batch is memory-bound, so the true "
              f"limit is lower)")
    if args.out:
        write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
