"""SFT train-step throughput (tokens/s) of forgetjax vs HF transformers (torch), on whatever backend each sees.

Both peers run the same full training step on the same fixed batch: forward, masked token-level cross-entropy,
backward, global-norm clipping (1.0) and an AdamW update (same lr, betas, eps, no weight decay), with float32 master
weights and compute in `--dtype` (torch: autocast on the GPU). The batch is `--batch` rows of `--seq` tokens cut from
concatenated GSM8K train texts when the model has a tokenizer (`--synthetic` or a random-weight size: random ids),
so the two computations are identical: the first-step losses are printed side by side as a check. forgetjax runs its
own compiled step with the SFT loss every method trains with; torch runs eager PyTorch (fused AdamW on the GPU).

Default: the embedded SmolLM2-135M, batch 8 x 256, float32 (the README's CPU figures). On a GPU, e.g.
`--model qwen2.5-0.5b --dtype bfloat16 --batch 4 --seq 2048 --remat full --moments-dtype bfloat16`. forgetjax's
loss is the shipped SFT loss (`forgetjax.losses.token.sft_loss`), which projects the vocabulary `--logit-chunk`
tokens at a time, forming each chunk's gradient in the same pass (`models.vocab.vocab_loss`), and so never holds the
[B, T, V] float32 logits.
Each peer runs in its own process per round; rounds alternate the order and the best step is kept. Printed:
tokens/s, the ratio forgetjax / HF, the first call (compile + step), each process's peak device memory (peak RSS
on CPU) and model-FLOPs utilisation against the matmul peak measured in the same run (training FLOPs = 3 x forward
FLOPs, `ModelConfig.flops_per_token`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

from forgetjax.models.vocab import DEFAULT_CHUNK  # noqa: E402

from common import (  # noqa: E402
    accelerator_matmul_peak, add_model_arguments, add_round_arguments, best_time, describe_backend, gib, hf_dir_for,
    jax_peak_bytes, load_forgetjax, load_torch, peer_rounds, random_forgetjax, random_size_config, sync_torch,
    torch_matmul_peak, torch_peak_bytes)

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def gsm8k_rows(tokenizer, data_dir: Path, batch: int, seq: int) -> np.ndarray:
    """[batch, seq + 1] token ids from GSM8K train question + answer texts, concatenated with EOS between them."""
    stream: list[int] = []
    with open(data_dir / "gsm8k" / "train.jsonl") as handle:
        for line in handle:
            row = json.loads(line)
            stream += tokenizer(row["question"] + "\n" + row["answer"], add_special_tokens=False)["input_ids"]
            stream.append(tokenizer.eos_token_id)
            if len(stream) >= batch * (seq + 1):
                break
    return np.asarray(stream[:batch * (seq + 1)], np.int32).reshape(batch, seq + 1)


def make_batch(rows: np.ndarray) -> dict[str, np.ndarray]:
    """The SFT batch contract for full rows: inputs, next-token targets, every position learned."""
    batch, width = rows.shape[0], rows.shape[1] - 1
    return {"input_ids": rows[:, :-1], "targets": rows[:, 1:], "loss_mask": np.ones((batch, width), np.float32),
            "attention_mask": np.ones((batch, width), bool),
            "positions": np.tile(np.arange(width, dtype=np.int32), (batch, 1)),
            "segment_ids": np.ones((batch, width), np.int32)}


def forgetjax_runner(model, batch: dict, lr: float, moments_dtype: str | None, logit_chunk: int):
    """(run one step, first-step loss, first-call seconds) with forgetjax's compiled train step and the SFT loss
    every method trains with; the state is updated in place."""
    import jax
    import jax.numpy as jnp

    from forgetjax.losses.token import sft_loss
    from forgetjax.models.vocab import set_logit_chunk
    from forgetjax.training.optim import OptimizerConfig, make_optimizer
    from forgetjax.training.step import make_train_step, split_model

    set_logit_chunk(model, logit_chunk)
    graphdef, trainable, frozen = split_model(model, lora=False)
    tx = make_optimizer(OptimizerConfig(lr=lr, schedule="constant", max_grad_norm=1.0, weight_decay=0.0,
                                        moments_dtype=moments_dtype))
    step = jax.jit(make_train_step(graphdef, lambda m, b, rng: sft_loss(m, b), tx), donate_argnums=(0, 2))
    device_batch = jax.device_put(batch)
    state = {"trainable": trainable, "opt": tx.init(trainable)}
    key, rate = jax.random.key(0), jnp.float32(lr)

    def run():
        state["trainable"], state["opt"], metrics = step(state["trainable"], frozen, state["opt"], device_batch, key,
                                                         rate)
        return metrics

    start = time.perf_counter()
    compiled = step.lower(state["trainable"], frozen, state["opt"], device_batch, key, rate).compile()
    analysis = compiled.memory_analysis()
    compiled_bytes = None if analysis is None else (
        analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes)
    step = compiled
    metrics = jax.block_until_ready(run())
    first_call = time.perf_counter() - start
    first_loss = float(metrics["loss"][0] / metrics["loss"][1])
    return (lambda: jax.block_until_ready(run())), first_loss, first_call, compiled_bytes


def torch_runner(torch_model, batch: dict, lr: float, dtype: str):
    """(run one step, first-step loss, first-call seconds) of the same SFT step in eager PyTorch: float32 master
    weights, autocast to `dtype` on the GPU, AdamW (fused on the GPU), clip 1.0."""
    import torch

    device = torch_model.device
    torch_model.train()
    optimizer = torch.optim.AdamW(torch_model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                  fused=device.type == "cuda")
    tensors = {name: torch.tensor(value).to(device) for name, value in batch.items()}
    autocast = device.type == "cuda" and dtype != "float32"

    def run():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=getattr(torch, dtype), enabled=autocast):
            logits = torch_model(tensors["input_ids"].long(), attention_mask=tensors["attention_mask"].long(),
                                 position_ids=tensors["positions"].long()).logits.float()
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tensors["targets"].long().flatten(),
                                                reduction="none")
        loss = (nll * tensors["loss_mask"].flatten()).sum() / tensors["loss_mask"].sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 1.0)
        optimizer.step()
        sync_torch()
        return float(loss)

    start = time.perf_counter()
    first_loss = run()
    return run, first_loss, time.perf_counter() - start


def run_side(args) -> None:
    """One peer in this process: build the batch, compile/warm up, time `--repeats` steps, measure the peaks."""
    from forgetjax.io import write_json_atomic
    from forgetjax.models.config import load_config

    direct = random_size_config(args.model) if args.skip_torch else None
    hf_dir = None if direct is not None else hf_dir_for(args.model, args.work_dir)
    config = direct or load_config(hf_dir)
    tokenizer = None
    if hf_dir is not None and not args.synthetic and (args.data_dir / "gsm8k" / "train.jsonl").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(hf_dir) if (hf_dir / "tokenizer.json").is_file() else None
    if tokenizer is None:
        rows = np.random.default_rng(0).integers(0, config.vocab_size, size=(args.batch, args.seq + 1),
                                                 dtype=np.int32)
        source = "synthetic ids"
    else:
        rows = gsm8k_rows(tokenizer, args.data_dir, args.batch, args.seq)
        source = "GSM8K train text"
    batch = make_batch(rows)
    result = {"source": source, "flops_per_token": 3.0 * config.flops_per_token(args.seq)}
    if args.side == "forgetjax":
        import jax

        from forgetjax.training.memory import DTYPE_BYTES, device_memory_bytes, estimate

        result["backend"] = describe_backend()
        result["plan_bytes"] = estimate(
            config, 1, 1, 1, global_batch=args.batch, seq_len=args.seq, param_bytes=4,
            compute_bytes=DTYPE_BYTES[args.dtype], remat=args.remat,
            moments_bytes=DTYPE_BYTES[args.moments_dtype or "float32"], logit_chunk=args.logit_chunk,
            backend=jax.default_backend()).total
        limit = device_memory_bytes()
        if result["plan_bytes"] > limit and not args.run_anyway:
            result["skipped"] = (f"`forgetjax plan` estimates {gib(result['plan_bytes'])}, more than the "
                                 f"{gib(limit)} this device allows; not run (--run-anyway to try)")
            write_json_atomic(args.side_out, result)
            return
        if direct is not None:
            model = random_forgetjax(direct, args.dtype, "float32", args.remat)
        else:
            model, _ = load_forgetjax(hf_dir, args.dtype, param_dtype="float32", remat=args.remat)
        run, result["first_loss"], result["first_call"], result["compiled_bytes"] = forgetjax_runner(
            model, batch, args.lr, args.moments_dtype, args.logit_chunk)
        result["seconds"] = best_time(run, args.repeats)
        result["peak_bytes"] = jax_peak_bytes()
        result["peak"] = accelerator_matmul_peak(args.dtype)
    else:
        torch_model = load_torch(hf_dir, "float32")
        run, result["first_loss"], result["first_call"] = torch_runner(torch_model, batch, args.lr, args.dtype)
        result["seconds"] = best_time(run, args.repeats)
        result["peak_bytes"] = torch_peak_bytes()
        result["peak"] = torch_matmul_peak() if torch_model.device.type == "cpu" else float("nan")
    write_json_atomic(args.side_out, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    add_round_arguments(parser, 2, "timed steps per process after the warm-up step")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--remat", choices=("none", "dots", "full"), default="none", help="forgetjax remat policy")
    parser.add_argument("--logit-chunk", type=int, default=DEFAULT_CHUNK,
                        help="tokens per vocabulary chunk of forgetjax's loss (0: the whole [B, T, V] logits at once)")
    parser.add_argument("--moments-dtype", choices=("float32", "bfloat16"), default=None,
                        help="forgetjax Adam moments dtype (default: as the float32 master weights)")
    parser.add_argument("--synthetic", action="store_true", help="random token ids instead of GSM8K text")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("FORGETJAX_DATA_DIR", DEFAULT_DATA)))
    parser.add_argument("--skip-torch", action="store_true", help="time forgetjax only")
    parser.add_argument("--run-anyway", action="store_true",
                        help="run forgetjax's step even where its `forgetjax plan` estimate exceeds the device")
    args = parser.parse_args()
    sides = ["forgetjax"] + ([] if args.skip_torch else ["hf_torch"])
    rounds = peer_rounds(__file__, args, run_side, sides, shared_weights=not args.skip_torch)
    if rounds is None:
        return
    ours = rounds["forgetjax"][0]
    if "skipped" in ours:
        print(f"{args.model} SFT train step, batch {args.batch} x seq {args.seq}, compute {args.dtype}, "
              f"{ours['backend']}; forgetjax remat {args.remat}, moments {args.moments_dtype or 'float32'}: "
              f"{ours['skipped']}")
        return
    best = {side: min(r["seconds"] for r in results) for side, results in rounds.items()}
    flops_per_token, tokens = ours["flops_per_token"], args.batch * args.seq
    print(f"{args.model} SFT train step (fwd + bwd + clip + AdamW, float32 master weights), batch {args.batch} x seq "
          f"{args.seq}, compute {args.dtype}, {ours['source']}, {ours['backend']}; forgetjax remat {args.remat}, "
          f"logit chunk {args.logit_chunk}, "
          f"moments {args.moments_dtype or 'float32'}; best of {args.rounds} alternating rounds x {args.repeats} "
          f"steps, one process per peer")
    print("first-step loss: " + ", ".join(f"{side} {results[0]['first_loss']:.5f}" for side, results in rounds.items()))
    print(f"{'peer':<10} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'first call':>11} {'peak memory':>12}")
    for name, seconds in best.items():
        achieved = flops_per_token * tokens / seconds
        peak = max(r["peak"] for r in rounds[name])
        mfu = "n/a" if peak != peak else f"{achieved / peak:.1%}"
        print(f"{name:<10} {tokens / seconds:>10.0f} {achieved / 1e12:>8.3f} {mfu:>6} "
              f"{rounds[name][0]['first_call']:>10.1f}s {gib(max(r['peak_bytes'] or 0 for r in rounds[name])):>12}")
    if "hf_torch" in best:
        print(f"ratio forgetjax / hf_torch: {best['hf_torch'] / best['forgetjax']:.2f}x")
    measured = max(r["peak_bytes"] or 0 for r in rounds["forgetjax"])
    print(f"forgetjax memory: measured peak {gib(measured)}, compiled step (args + outputs + temp) "
          f"{gib(ours['compiled_bytes'])}, `forgetjax plan` estimate {gib(ours['plan_bytes'])} "
          f"({ours['plan_bytes'] / measured - 1:+.0%} vs measured)")
    print(f"JAX matmul peak {max(r['peak'] for r in rounds['forgetjax']) / 1e12:.2f} TFLOP/s ({args.dtype})")


if __name__ == "__main__":
    main()
