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


def jax_decode_matmul_floor(config, batch: int, rounds: int = 5) -> float:
    """Measured seconds of one decode step's weight matmuls alone (q, k, v, o, gate, up, down in every layer, then
    the LM head) at M = `batch` rows, float32, layers in a `lax.scan` as in the model. No attention, norms or
    sampling: a decoder at this batch cannot step faster than this on this machine. Its FLOPs are
    `batch * config.flops_per_token(0)`."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    hidden, inner, layers = config.hidden_size, config.intermediate_size, config.num_layers
    q_width, kv_width = config.q_size, config.kv_size
    shapes = {"q": (hidden, q_width), "k": (hidden, kv_width), "v": (hidden, kv_width), "o": (q_width, hidden),
              "gate": (hidden, inner), "up": (hidden, inner), "down": (inner, hidden)}
    weights = {name: jnp.asarray(rng.normal(size=(layers, *shape)) * 0.02, jnp.float32)
               for name, shape in shapes.items()}
    head = jnp.asarray(rng.normal(size=(hidden, config.vocab_size)) * 0.02, jnp.float32)

    def layer(x, w):
        q, k, v = x @ w["q"], x @ w["k"], x @ w["v"]
        attended = q + jnp.tile(k + v, (1, q_width // kv_width))
        x = x + attended @ w["o"]
        return x + (jax.nn.silu(x @ w["gate"]) * (x @ w["up"])) @ w["down"], None

    @jax.jit
    def step(x):
        x, _ = jax.lax.scan(layer, x, weights)
        return x @ head

    x = jnp.asarray(rng.normal(size=(batch, hidden)), jnp.float32)
    step(x).block_until_ready()
    return best_time(lambda: step(x).block_until_ready(), rounds)


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
