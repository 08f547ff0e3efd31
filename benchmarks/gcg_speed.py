"""GCG steps per second on whatever backend JAX sees, beside the FLOP floor of one step.

One step = the suffix gradient over `--behaviours` rows (forward + backward, ~3x a forward) and the losses of
`--candidates` candidate suffixes (one forward of candidates x behaviours rows), `forgetjax.eval.attacks.gcg`. The
floor is that step's model FLOPs (`gcg_step_flops`, from ModelConfig like every FLOPs count of the project) at the
JAX matmul peak measured in the same run and dtype; the ratio step time / floor says how far the attack is from
compute-bound. Default: the embedded SmolLM2-135M in float32 (CPU); on a GPU e.g. `--model qwen2.5-1.5b --dtype
bfloat16 --candidates 512 --candidate-block 128 --suffix-length 20`. No peer: no other JAX GCG runs on this model.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

from common import (  # noqa: E402
    accelerator_matmul_peak, add_model_arguments, describe_backend, hf_dir_for, load_forgetjax)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--behaviours", type=int, default=1, help="rows attacked together (universal mode)")
    parser.add_argument("--suffix-length", type=int, default=20)
    parser.add_argument("--top-k", type=int, default=256)
    parser.add_argument("--candidates", type=int, default=64)
    parser.add_argument("--candidate-block", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the first (compile) step")
    args = parser.parse_args()

    from forgetjax.eval.attacks.gcg import GCGConfig, build_layout, gcg_step_flops, run_gcg

    model, tokenizer = load_forgetjax(hf_dir_for(args.model, Path(args.work_dir)), args.dtype)
    behaviours = [f"Explain step {i} of making a paper plane." for i in range(args.behaviours)]
    targets = ["Sure, here is"] * args.behaviours
    config = GCGConfig(steps=1, suffix_length=args.suffix_length, top_k=args.top_k, candidates=args.candidates,
                       candidate_block=args.candidate_block, early_stop=False)
    start = time.perf_counter()
    run_gcg(model, tokenizer, behaviours, targets, config)
    first = time.perf_counter() - start
    start = time.perf_counter()
    run_gcg(model, tokenizer, behaviours, targets, GCGConfig(**{**config.__dict__, "steps": args.steps}))
    per_step = (time.perf_counter() - start) / args.steps
    layout = build_layout(tokenizer, behaviours, targets, args.suffix_length)
    length = int(layout.input_ids.shape[1])
    flops = gcg_step_flops(model.config, args.behaviours, length, args.candidates)
    peak = accelerator_matmul_peak(args.dtype)
    floor = flops / peak
    print(f"backend: {describe_backend()}; model {args.model} ({args.dtype}), {args.behaviours} behaviour row(s) of "
          f"{length} tokens, suffix {args.suffix_length}, {args.candidates} candidates")
    print(f"first step (compile + run): {first:.2f} s")
    print(f"GCG: {1 / per_step:.3f} steps/s ({per_step:.3f} s/step); step FLOPs {flops:.3e}; matmul peak "
          f"{peak / 1e12:.2f} TFLOP/s; floor {floor * 1e3:.1f} ms/step; step / floor {per_step / floor:.1f}x")


if __name__ == "__main__":
    main()
