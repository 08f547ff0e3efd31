"""Shared benchmark helpers: best-of-N timing, peers alternated in separate processes, the measured matmul peak."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np


def best_time(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def alternate(peers: dict[str, Callable[[], object]], rounds: int, repeats: int = 1) -> dict[str, float]:
    """Best wall time of each peer, running them in alternation so drift on a shared machine hits all alike."""
    best = {name: float("inf") for name in peers}
    for _ in range(rounds):
        for name, fn in peers.items():
            best[name] = min(best[name], best_time(fn, repeats))
    return best


def alternate_processes(script: str, argv: list[str], sides: list[str], rounds: int) -> dict[str, list[dict]]:
    """Run `script argv --side S --side-out F` once per side per round, swapping the order every round, and return
    each side's JSON results by round. One process per peer keeps JAX's and torch's thread pools and memory from
    competing (in one process the idle pool of one framework measurably slows the other on a 2-core machine)."""
    results: dict[str, list[dict]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(rounds):
            for side in sides if round_index % 2 == 0 else sides[::-1]:
                side_out = Path(tmp) / f"{side}-{round_index}.json"
                subprocess.run([sys.executable, script, *argv, "--side", side, "--side-out", str(side_out)],
                               check=True)
                results[side].append(json.loads(side_out.read_text()))
    return results


def jax_matmul_peak(n: int = 2048, dtype="float32", rounds: int = 5) -> float:
    """Measured FLOP/s of a square jnp matmul (the physical limit model-FLOPs utilisation is judged against)."""
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
    b = jnp.asarray(np.random.default_rng(1).normal(size=(n, n)), dtype)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    seconds = best_time(lambda: mm(a, b).block_until_ready(), rounds)
    return 2 * n**3 / seconds


def torch_matmul_peak(n: int = 2048, rounds: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    seconds = best_time(lambda: torch.matmul(a, b), rounds)
    return 2 * n**3 / seconds


def export_embedded_for_torch(name: str = "smollm2-135m-instruct"):
    """(forgetjax model, tokenizer, torch model) of the embedded model, float32, the same weights on both sides."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    import forgetjax

    model, tokenizer = forgetjax.load(name)
    with tempfile.TemporaryDirectory() as tmp:
        forgetjax.export_hf(model, tokenizer, tmp)
        torch_model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    return model, tokenizer, torch_model
