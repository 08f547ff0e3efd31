"""Forward throughput (tokens/s) of forgetjax vs HF transformers (torch) on SmolLM2-135M, float32.

Batch 8 x 256 tokens by default. Runs alternate between the two peers and the best of N is kept; the measured
f32 matmul peak of each framework is printed so model-FLOPs utilisation (MFU) can be judged against it.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

from common import alternate, export_embedded_for_torch, jax_matmul_peak, torch_matmul_peak  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (best of N)")
    args = parser.parse_args()

    import jax
    import torch

    model, _, torch_model = export_embedded_for_torch()
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(args.batch, args.seq), dtype=np.int32)
    jax_ids = jax.device_put(ids)
    forward = jax.jit(lambda m, x: m(x))
    forward(model, jax_ids).block_until_ready()
    torch_ids = torch.tensor(ids, dtype=torch.long)

    def run_torch():
        with torch.no_grad():
            torch_model(torch_ids)

    run_torch()
    best = alternate({"forgetjax": lambda: forward(model, jax_ids).block_until_ready(), "hf_torch": run_torch},
                     rounds=args.rounds)
    tokens = args.batch * args.seq
    flops = model.config.flops_per_token(args.seq) * tokens
    jax_peak, torch_peak = jax_matmul_peak(), torch_matmul_peak()
    print(f"SmolLM2-135M forward, batch {args.batch} x seq {args.seq}, float32, {jax.device_count()} device(s)")
    print(f"{'peer':<10} {'tokens/s':>10} {'GFLOP/s':>9} {'MFU':>6}  (matmul peak GFLOP/s)")
    for name, seconds, peak in (("forgetjax", best["forgetjax"], jax_peak), ("hf_torch", best["hf_torch"], torch_peak)):
        print(f"{name:<10} {tokens / seconds:>10.0f} {flops / seconds / 1e9:>9.1f} {flops / seconds / peak:>6.1%}"
              f"  ({peak / 1e9:.1f})")
    print(f"ratio forgetjax / hf_torch: {best['hf_torch'] / best['forgetjax']:.2f}x")


if __name__ == "__main__":
    main()
