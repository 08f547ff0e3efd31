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
    competing (in one process the idle pool of one framework measurably slows the other on a 2-core machine). A side
    whose result says "skipped" (it cannot run here) ends the comparison: the results so far are returned."""
    results: dict[str, list[dict]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(rounds):
            for side in sides if round_index % 2 == 0 else sides[::-1]:
                side_out = Path(tmp) / f"{side}-{round_index}.json"
                subprocess.run([sys.executable, script, *argv, "--side", side, "--side-out", str(side_out)],
                               check=True)
                results[side].append(json.loads(side_out.read_text()))
                if "skipped" in results[side][-1]:
                    return results
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


# ------------------------------------------------------------------------------------------------ models and devices

REPO = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16", "float16")


def add_model_arguments(parser, dtype: str = "float32") -> None:
    """--model / --dtype / --work-dir, shared by every benchmark."""
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="an embedded model name, an HF directory, or a size in configs/models (e.g. qwen2.5-1.5b: "
                             "random weights built from its config, written once as an HF directory both peers load)")
    parser.add_argument("--dtype", choices=DTYPES, default=dtype, help="compute dtype of both peers")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "forgetjax-bench",
                        help="where exported / random-weight HF directories are kept between runs")


def add_round_arguments(parser, repeats: int, repeats_help: str) -> None:
    """--rounds / --repeats and the hidden --side / --side-out a peer's own process is started with."""
    import argparse

    parser.add_argument("--rounds", type=int, default=2,
                        help="alternating rounds, one process per peer per round (best of N)")
    parser.add_argument("--repeats", type=int, default=repeats, help=repeats_help)
    parser.add_argument("--side", choices=("forgetjax", "hf_torch"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--side-out", default=None, help=argparse.SUPPRESS)


def peer_rounds(script: str, args, run_side, sides=("forgetjax", "hf_torch"), shared_weights: bool = True):
    """In a peer's own process (`--side`): run that side and return None. Otherwise create the weights both peers
    load once (unless `shared_weights` is off) and return `alternate_processes`' results for `sides`."""
    if args.side is not None:
        run_side(args)
        return None
    if shared_weights:
        hf_dir_for(args.model, args.work_dir)
    return alternate_processes(script, sys.argv[1:], list(sides), args.rounds)


def hf_dir_for(spec: str, work_dir: Path) -> Path:
    """An HF directory holding `spec`'s weights (the one both peers load), created once in `work_dir`."""
    if Path(spec).is_dir():
        return Path(spec)
    from forgetjax.assets import embedded_name

    target = work_dir / spec.replace("/", "_")
    if (target / "config.json").is_file():
        return target
    sizes = REPO / "configs" / "models" / f"{spec}.yaml"
    if embedded_name(spec) is None and sizes.is_file():
        _random_hf_dir(sizes, target)
    else:
        import forgetjax

        model, tokenizer = forgetjax.load(spec)
        forgetjax.export_hf(model, tokenizer, target)
    return target


def _random_hf_dir(config_yaml: Path, target: Path) -> None:
    """Random bf16 weights (HF's own initialiser) in the architecture of a configs/models entry, saved as HF."""
    import torch
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = yaml.safe_load(config_yaml.read_text())["hf_config"]
    config = AutoConfig.for_model(**spec)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(target)


def load_forgetjax(hf_dir: Path, dtype: str, param_dtype: str | None = None, remat: str = "none"):
    import forgetjax

    return forgetjax.load(hf_dir, dtype=dtype, param_dtype=param_dtype or dtype, remat=remat)


def random_size_config(spec: str):
    """The ModelConfig of a configs/models size (e.g. qwen2.5-7b), or None when `spec` is not one."""
    from forgetjax.assets import embedded_name
    from forgetjax.models.config import config_from_hf

    path = REPO / "configs" / "models" / f"{spec}.yaml"
    if embedded_name(spec) is not None or not path.is_file():
        return None
    import yaml

    return config_from_hf(yaml.safe_load(path.read_text())["hf_config"], where=str(path))


def random_forgetjax(config, dtype: str, param_dtype: str, remat: str):
    """A randomly initialised forgetjax model created directly on the default device (no HF directory: for
    forgetjax-only runs at sizes too large to write out quickly)."""
    import jax
    from flax import nnx

    from forgetjax.models.decoder import CausalLM

    create = nnx.jit(lambda: CausalLM(config, param_dtype=param_dtype, dtype=dtype, remat=remat, rngs=nnx.Rngs(0)))
    model = create()
    jax.block_until_ready(nnx.state(model))
    return model


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_torch(hf_dir: Path, dtype: str):
    """The HF model on the GPU when there is one (sdpa attention), else the CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    return model.to(torch_device()).eval()


def sync_torch() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def jax_peak_bytes() -> int | None:
    """Peak device memory of this process (accelerators), or the process's peak RSS on CPU."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use") or _peak_rss()


def torch_peak_bytes() -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else _peak_rss()


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def jax_copy_bandwidth(nbytes: int = 1 << 30, rounds: int = 5) -> float:
    """Measured bytes/s of an elementwise pass over `nbytes` (read + write counted): the memory ceiling."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 4,), jnp.float32)
    bump = jax.jit(lambda a: a + 1.0)
    bump(x).block_until_ready()
    seconds = best_time(lambda: bump(x).block_until_ready(), rounds)
    return 2 * nbytes / seconds


def accelerator_matmul_peak(dtype: str) -> float:
    """The JAX matmul peak in the benchmark's dtype: 8192^3 on accelerators, 2048^3 on CPU."""
    import jax

    return jax_matmul_peak(n=2048 if jax.default_backend() == "cpu" else 8192, dtype=dtype)


def describe_backend() -> str:
    import jax

    device = jax.local_devices()[0]
    return f"{jax.default_backend()} ({getattr(device, 'device_kind', device.platform)}) x {jax.device_count()}"


def rate(bytes_per_second: float) -> str:
    return f"{bytes_per_second / 1e9:.1f} GB/s"


def gib(nbytes) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**30:.1f} GiB"
