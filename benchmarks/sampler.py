"""Decode throughput (new tokens/s) of forgetjax's sampler vs HF `generate` (torch), on whatever backend each sees.

Greedy decoding of exactly `--new-tokens` tokens (stop tokens disabled on both sides) from the same prompt repeated
`batch` times, for each batch size: the embedded model's chat prompt, or `--prompt-tokens` random ids for a
random-weight size (`--model qwen2.5-1.5b --dtype bfloat16 --prompt-tokens 128 --new-tokens 256` on a GPU). Each
peer runs in its own process per round (rounds alternate the order) and the best of N is kept; the first call of
each batch bucket (compile + run) is reported separately. Printed beside the numbers, measured in the same run:
- the bandwidth floor: tokens/s if every step only read the weights once and the KV cache up to its mean length,
  at the measured copy bandwidth (the decode limit on accelerators);
- the matmul floor: a step's weight matmuls alone, timed at that batch (`common.jax_decode_matmul_floor`; the
  decode limit on the CPU, where matmuls rather than memory bound a step).
Throughput counts generated tokens only: batch x new_tokens / wall time (prefill included in the wall time).
On CPU, HF runs with each torch thread count given (default 1 and 2) and is credited with the best of them.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

from common import (  # noqa: E402
    accelerator_matmul_peak, add_model_arguments, add_round_arguments, best_time, describe_backend, gib, hf_dir_for,
    jax_copy_bandwidth, jax_decode_matmul_floor, jax_peak_bytes, load_forgetjax, load_torch, peer_rounds, rate,
    sync_torch, torch_matmul_peak, torch_peak_bytes)

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

    ids = torch.tensor([prompt_ids] * batch, dtype=torch.long, device=torch_model.device)
    mask = torch.ones_like(ids)
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=pad_id)

    def run():
        torch.set_num_threads(threads)
        with torch.no_grad():
            out = torch_model.generate(ids, attention_mask=mask, generation_config=config)
        sync_torch()
        if out.shape[1] - ids.shape[1] != new_tokens:
            raise RuntimeError(f"HF generated {out.shape[1] - ids.shape[1]} tokens, expected {new_tokens}")

    return run


def prompt_for(hf_dir, tokenizer, vocab_size: int, prompt_tokens: int | None) -> list[int]:
    if prompt_tokens or tokenizer is None:
        rng = np.random.default_rng(0)
        return rng.integers(0, vocab_size, size=prompt_tokens or 128).tolist()
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def decode_bytes(config, batch: int, context: float, param_bytes: int, cache_bytes: int) -> float:
    """Bytes one decode step must read: every matmul weight once (the LM head included; a tied head is the
    embedding, whose lookup reads only `batch` rows), plus keys and values of `context` cached tokens per row."""
    weights = config.flops_per_token(0) / 2
    kv = 2 * config.num_layers * config.kv_size * context * batch
    return weights * param_bytes + kv * cache_bytes


def profile_decode(args, peers) -> list[str]:
    """One more (compiled) run of the first forgetjax peer per batch size under `jax.profiler.trace`, summarised by
    `trace_summary` per decode step; each trace stays in `--profile-dir/<peer>_b<batch>` (perfetto JSON only)."""
    import jax

    from trace_summary import summarize

    name, make = next(iter(peers.items()))
    lines = []
    for batch in args.batch_sizes:
        run = make(batch)
        trace_dir = Path(args.profile_dir) / f"{name}_b{batch}"
        shutil.rmtree(trace_dir, ignore_errors=True)  # an earlier round's trace
        with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
            run()
        for bulky in trace_dir.rglob("*.pb"):  # the same trace as XPlane protobuf: not needed beside the JSON
            bulky.unlink()
        lines += [f"--- {name}, batch {batch}, {args.new_tokens} decode steps (per unit = one step)"]
        lines += summarize(trace_dir, top=args.profile_top, per=args.new_tokens)
    return lines


def run_side(args) -> None:
    """One peer in this process: for each batch size, a first call (compile) then `--repeats` timed runs."""
    from transformers import AutoTokenizer

    from forgetjax.io import write_json_atomic
    from forgetjax.models.config import load_config

    hf_dir = hf_dir_for(args.model, args.work_dir)
    config = load_config(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir) if (hf_dir / "tokenizer.json").is_file() else None
    prompt_ids = prompt_for(hf_dir, tokenizer, config.vocab_size, args.prompt_tokens)
    result = {"prompt_tokens": len(prompt_ids), "seconds": {}, "first_call": {}}
    if args.side == "forgetjax":
        import jax

        from forgetjax.sampling.sampler import Sampler

        model, _ = load_forgetjax(hf_dir, args.dtype)
        sampler = Sampler(model, tokenizer)
        peers = {}
        for unroll in args.decode_unroll:
            for attention in args.decode_attention:
                def make(batch, unroll=unroll, attention=attention):
                    model.decode_unroll, model.decode_attention = unroll, attention
                    return forgetjax_runner(sampler, prompt_ids, batch, args.new_tokens)
                peers[f"forgetjax_u{unroll}" + ("" if attention == "xla" else f"_{attention}")] = make
        itemsize = jax.numpy.dtype(args.dtype).itemsize
        bandwidth = jax_copy_bandwidth()
        context = len(prompt_ids) + args.new_tokens / 2
        result.update(peak=accelerator_matmul_peak(args.dtype), backend=describe_backend(), bandwidth=bandwidth,
                      bandwidth_floor={str(b): decode_bytes(config, b, context, itemsize, itemsize) / bandwidth
                                       for b in args.batch_sizes})
        if jax.default_backend() == "cpu":
            result["matmul_floor"] = {str(b): jax_decode_matmul_floor(config, b) for b in args.batch_sizes}
    else:
        torch_model = load_torch(hf_dir, args.dtype)
        pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
        threads = args.torch_threads if torch_model.device.type == "cpu" else [0]
        peers = {f"hf_torch_t{t}": (lambda batch, t=t: torch_runner(torch_model, prompt_ids, batch, args.new_tokens,
                                                                    pad_id, t or 1)) for t in threads}
        result["peak"] = torch_matmul_peak() if torch_model.device.type == "cpu" else float("nan")
    result["failed"] = {}
    for batch in args.batch_sizes:
        for name, make in peers.items():
            if name in result["failed"]:
                continue
            try:  # a peer that cannot run here (e.g. a kernel this device rejects) leaves the others' figures
                run = make(batch)
                start = time.perf_counter()
                run()
            except Exception as error:  # noqa: BLE001 - reported in the table's output, not raised
                result["failed"][name] = f"{type(error).__name__}: {error}"[:500]
                continue
            result["first_call"][f"{name}/{batch}"] = time.perf_counter() - start
            result["seconds"][f"{name}/{batch}"] = best_time(run, args.repeats)
    peers = {name: make for name, make in peers.items() if name not in result["failed"]}
    if args.profile_dir and args.side == "forgetjax":
        result["profile"] = profile_decode(args, peers)
    result["peak_bytes"] = jax_peak_bytes() if args.side == "forgetjax" else torch_peak_bytes()
    write_json_atomic(args.side_out, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-tokens", type=int, default=None,
                        help="random prompt of this many tokens (default: the chat prompt, or 128 without a tokenizer)")
    parser.add_argument("--decode-unroll", type=int, nargs="+", default=[1],
                        help="layers unrolled per decode-loop iteration; each value is timed as its own forgetjax peer")
    parser.add_argument("--decode-attention", nargs="+", default=["xla"], choices=("xla", "ragged", "paged"),
                        help="decode-step attention over the cache (`CausalLM.decode_attention`): xla reads every "
                             "slot, ragged (jax's Pallas decode kernel, GPU) and paged (jax's paged-attention kernel "
                             "over a PagedKVCache, TPU) only the written ones; each is its own peer")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--profile-dir", default=None,
                        help="after the timed runs, trace one more forgetjax run per batch size into this directory "
                             "and print where device time went (benchmarks/trace_summary.py)")
    parser.add_argument("--profile-top", type=int, default=12, help="events listed per device timeline")
    add_round_arguments(parser, 1, "timed runs per batch size and process")
    parser.add_argument("--torch-threads", type=int, nargs="+", default=[1, 2],
                        help="torch intra-op thread counts to try; HF is credited with its best (default 1 2: on a "
                             "loaded 2-core machine torch's 2-thread matmuls can be several times slower than 1)")
    args = parser.parse_args()
    rounds = peer_rounds(__file__, args, run_side)
    if rounds is None:
        return
    seconds: dict[str, float] = {}
    for results in rounds.values():
        for result in results:
            for name, error in result.get("failed", {}).items():
                print(f"peer {name} failed and is left out: {error}")
            for key, value in result["seconds"].items():
                seconds[key] = min(seconds.get(key, float("inf")), value)
    ours, theirs = rounds["forgetjax"][0], rounds["hf_torch"][0]
    print(f"{args.model} greedy decode, prompt {ours['prompt_tokens']} tokens, {args.new_tokens} new tokens, "
          f"{args.dtype}, {ours['backend']}; best of {args.rounds} alternating rounds x {args.repeats}, one process "
          f"per peer; copy bandwidth {rate(ours['bandwidth'])}, JAX matmul peak "
          f"{ours['peak'] / 1e12:.2f} TFLOP/s")
    names = sorted({key.split("/")[0] for key in seconds})
    print(f"{'batch':>5} " + " ".join(f"{name + ' tok/s':>20}" for name in names)
          + f" {'ratio':>6} {'bw floor tok/s':>15} {'% of floor':>10} {'first call':>11}"
          + (f" {'matmul floor':>13}" if "matmul_floor" in ours else ""))
    for batch in args.batch_sizes:
        tokens = batch * args.new_tokens
        rates = {name: tokens / seconds[f"{name}/{batch}"] for name in names}
        ours_rate = max(v for k, v in rates.items() if k.startswith("forgetjax"))
        hf_rate = max(v for k, v in rates.items() if k.startswith("hf_torch"))
        floor = batch / min(r["bandwidth_floor"][str(batch)] for r in rounds["forgetjax"])
        first = min(v for k, v in ours["first_call"].items() if k.endswith(f"/{batch}"))
        line = (f"{batch:>5} " + " ".join(f"{rates[name]:>20.1f}" for name in names)
                + f" {ours_rate / hf_rate:>5.2f}x {floor:>15.1f} {ours_rate / floor:>10.1%} {first:>10.1f}s")
        if "matmul_floor" in ours:
            line += f" {batch / min(r['matmul_floor'][str(batch)] for r in rounds['forgetjax']):>13.1f}"
        print(line, flush=True)
    print(f"peak memory: forgetjax {gib(ours['peak_bytes'])}, hf_torch {gib(theirs['peak_bytes'])}. ratio: best "
          "forgetjax / best HF; bw floor: weights read once + the KV cache at its mean length, per step, at the "
          "measured copy bandwidth; first call: compile + run of the forgetjax bucket.")
    for line in ours.get("profile", []):
        print(line)


if __name__ == "__main__":
    main()
