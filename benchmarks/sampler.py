"""Decode throughput (new tokens/s) of forgetjax's sampler vs HF `generate` (torch) on SmolLM2-135M, float32.

Greedy decoding of exactly `--new-tokens` tokens (stop tokens disabled on both sides) from the same chat prompt
repeated `batch` times, for each batch size. Each peer runs in its own process per round (rounds alternate the
order) and the best of N is kept (the compile is done once before timing); the measured f32 matmul peak of each
framework is printed beside the numbers, and so is the decode floor: the tokens/s a decoder would reach if each step
cost only its weight matmuls at that batch (`common.jax_decode_matmul_floor`), the physical limit a ratio is judged by.
Throughput counts generated tokens only: batch x new_tokens / wall time (prefill included in the wall time).
HF runs with each torch thread count given (default 1 and 2) and is credited with the best of them.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

from common import (  # noqa: E402
    alternate_processes, best_time, export_embedded_for_torch, jax_decode_matmul_floor, jax_matmul_peak,
    torch_matmul_peak)

PROMPT = "Write a short story about a robot who learns to paint, in the style of a fairy tale."
NEVER_STOP = (-1,)  # a token id no model emits: decoding runs for the whole budget


def forgetjax_runner(sampler, prompt_ids: list[int], batch: int, new_tokens: int):
    """A callable that decodes `new_tokens` greedy tokens for `batch` copies of the prompt with forgetjax."""
    from forgetjax.sampling.sampler import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, stop_token_ids=NEVER_STOP)
    prompts = [prompt_ids] * batch

    def run():
        out = sampler.generate_tokens(prompts, params)
        if not np.all(out.lengths == new_tokens):
            raise RuntimeError(f"forgetjax generated {out.lengths.tolist()} tokens, expected {new_tokens}")

    return run


def torch_runner(torch_model, prompt_ids: list[int], batch: int, new_tokens: int, pad_id: int, threads: int):
    """A callable that decodes `new_tokens` greedy tokens for `batch` copies of the prompt with HF generate."""
    import torch
    from transformers import GenerationConfig

    ids = torch.tensor([prompt_ids] * batch, dtype=torch.long)
    mask = torch.ones_like(ids)
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=pad_id)

    def run():
        torch.set_num_threads(threads)
        with torch.no_grad():
            out = torch_model.generate(ids, attention_mask=mask, generation_config=config)
        if out.shape[1] - ids.shape[1] != new_tokens:
            raise RuntimeError(f"HF generated {out.shape[1] - ids.shape[1]} tokens, expected {new_tokens}")

    return run


def run_side(args) -> None:
    """One peer in this process: for each batch size, warm up then time `--repeats` runs; the peak measured too."""
    from forgetjax.io import write_json_atomic
    from forgetjax.sampling.sampler import Sampler

    if args.side == "forgetjax":
        import jax

        import forgetjax

        model, tokenizer = forgetjax.load("smollm2-135m-instruct")
        sampler = Sampler(model, tokenizer)
        prompt_ids = sampler.encode_chat([{"role": "user", "content": PROMPT}])
        peers = {"forgetjax": lambda batch: forgetjax_runner(sampler, prompt_ids, batch, args.new_tokens)}
        result = {"peak": jax_matmul_peak(), "devices": jax.device_count(), "prompt_tokens": len(prompt_ids),
                  "floor_seconds": {str(batch): jax_decode_matmul_floor(model.config, batch)
                                    for batch in args.batch_sizes},
                  "floor_flops": {str(batch): batch * model.config.flops_per_token(0) for batch in args.batch_sizes}}
    else:
        model, tokenizer, torch_model = export_embedded_for_torch()
        prompt_ids = Sampler(model, tokenizer).encode_chat([{"role": "user", "content": PROMPT}])
        del model
        peers = {f"hf_torch_t{threads}": (lambda batch, t=threads: torch_runner(
            torch_model, prompt_ids, batch, args.new_tokens, tokenizer.pad_token_id, t))
            for threads in args.torch_threads}
        result = {"peak": torch_matmul_peak()}
    result["seconds"] = {}
    for batch in args.batch_sizes:
        for name, make in peers.items():
            run = make(batch)
            run()  # compile / warm up outside the timing
            result["seconds"][f"{name}/{batch}"] = best_time(run, args.repeats)
    write_json_atomic(args.side_out, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternating rounds, one process per peer per round (best of N)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per batch size and process")
    parser.add_argument("--torch-threads", type=int, nargs="+", default=[1, 2],
                        help="torch intra-op thread counts to try; HF is credited with its best (default 1 2: on a "
                             "loaded 2-core machine torch's 2-thread matmuls can be several times slower than 1)")
    parser.add_argument("--side", choices=("forgetjax", "hf_torch"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--side-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side is not None:
        run_side(args)
        return

    rounds = alternate_processes(__file__, sys.argv[1:], ["forgetjax", "hf_torch"], args.rounds)
    seconds: dict[str, float] = {}
    for results in rounds.values():
        for result in results:
            for key, value in result["seconds"].items():
                seconds[key] = min(seconds.get(key, float("inf")), value)
    ours = rounds["forgetjax"][0]
    jax_peak = max(r["peak"] for r in rounds["forgetjax"])
    floor_seconds = {batch: min(r["floor_seconds"][str(batch)] for r in rounds["forgetjax"])
                     for batch in args.batch_sizes}
    torch_peak = max(r["peak"] for r in rounds["hf_torch"])
    print(f"SmolLM2-135M greedy decode, prompt {ours['prompt_tokens']} tokens, {args.new_tokens} new tokens, "
          f"float32, {ours['devices']} JAX device(s); best of {args.rounds} alternating rounds, one process per peer")
    print(f"matmul peak GFLOP/s: forgetjax {jax_peak / 1e9:.1f}, hf_torch {torch_peak / 1e9:.1f}")
    threads_header = " ".join(f"{f'hf t={t} tok/s':>14}" for t in args.torch_threads)
    print(f"{'batch':>5} {'forgetjax tok/s':>16} {threads_header} {'ratio':>6} {'floor tok/s':>12} "
          f"{'floor GFLOP/s':>14} {'floor / HF':>11}")
    for batch in args.batch_sizes:
        tokens = batch * args.new_tokens
        ours_rate = tokens / seconds[f"forgetjax/{batch}"]
        hf_rates = [tokens / seconds[f"hf_torch_t{t}/{batch}"] for t in args.torch_threads]
        hf_cells = " ".join(f"{rate:>14.1f}" for rate in hf_rates)
        floor_rate = batch / floor_seconds[batch]
        floor_gflops = ours['floor_flops'][str(batch)] / floor_seconds[batch] / 1e9
        print(f"{batch:>5} {ours_rate:>16.1f} {hf_cells} {ours_rate / max(hf_rates):>5.2f}x {floor_rate:>12.1f} "
              f"{floor_gflops:>14.1f} {floor_rate / max(hf_rates):>10.2f}x", flush=True)
    print("ratio: forgetjax / best HF. floor: tokens/s if a decode step cost only its weight matmuls at that batch "
          "(no attention, norms, sampling or prefill), measured with XLA in the forgetjax process; floor / HF is the "
          "largest ratio any JAX decoder could reach here.")


if __name__ == "__main__":
    main()
