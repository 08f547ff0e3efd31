"""Decode throughput (new tokens/s) of forgetjax's sampler vs HF `generate` (torch) on SmolLM2-135M, float32.

Greedy decoding of exactly `--new-tokens` tokens (stop tokens disabled on both sides) from the same chat prompt
repeated `batch` times, for each batch size. Runs alternate between the two peers and the best of N is kept (the
compile is done once before timing); the measured f32 matmul peak of each framework is printed beside the numbers.
Throughput counts generated tokens only: batch x new_tokens / wall time (prefill included in the wall time).
HF runs with each torch thread count given (default 1 and 2) and is credited with the best of them.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

from common import alternate, export_embedded_for_torch, jax_matmul_peak, torch_matmul_peak  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per batch size (best of N)")
    parser.add_argument("--torch-threads", type=int, nargs="+", default=[1, 2],
                        help="torch intra-op thread counts to try; HF is credited with its best (default 1 2: on a "
                             "loaded 2-core machine torch's 2-thread matmuls can be several times slower than 1)")
    args = parser.parse_args()

    import jax

    from forgetjax.sampling.sampler import Sampler

    model, tokenizer, torch_model = export_embedded_for_torch()
    sampler = Sampler(model, tokenizer)
    prompt_ids = sampler.encode_chat([{"role": "user", "content": PROMPT}])
    jax_peak, torch_peak = jax_matmul_peak(), torch_matmul_peak()
    print(f"SmolLM2-135M greedy decode, prompt {len(prompt_ids)} tokens, {args.new_tokens} new tokens, float32, "
          f"{jax.device_count()} JAX device(s); best of {args.rounds} alternating rounds")
    print(f"matmul peak GFLOP/s: forgetjax {jax_peak / 1e9:.1f}, hf_torch {torch_peak / 1e9:.1f}")
    threads_header = " ".join(f"{f'hf t={t} tok/s':>14}" for t in args.torch_threads)
    print(f"{'batch':>5} {'forgetjax tok/s':>16} {threads_header} {'ratio':>6}  (ratio: forgetjax / best HF)")
    for batch in args.batch_sizes:
        peers = {"forgetjax": forgetjax_runner(sampler, prompt_ids, batch, args.new_tokens)}
        for threads in args.torch_threads:
            peers[f"hf_torch_t{threads}"] = torch_runner(torch_model, prompt_ids, batch, args.new_tokens,
                                                         tokenizer.pad_token_id, threads)
        for run in peers.values():
            run()  # compile / warm up outside the timing
        best = alternate(peers, rounds=args.rounds)
        tokens = batch * args.new_tokens
        rates = {name: tokens / seconds for name, seconds in best.items()}
        hf_best = max(rate for name, rate in rates.items() if name != "forgetjax")
        hf_cells = " ".join(f"{rates[f'hf_torch_t{t}']:>14.1f}" for t in args.torch_threads)
        print(f"{batch:>5} {rates['forgetjax']:>16.1f} {hf_cells} {rates['forgetjax'] / hf_best:>5.2f}x", flush=True)


if __name__ == "__main__":
    main()
