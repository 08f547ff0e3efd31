"""The benchmark registry: name -> Benchmark instance."""
from __future__ import annotations

from forgetjax.eval.benchmarks.base import FAMILIES, KINDS, Benchmark

_REGISTRY: dict[str, Benchmark] = {}


def register(benchmark: Benchmark) -> Benchmark:
    """Add a benchmark instance; names are unique and families/kinds must be known."""
    if not isinstance(benchmark, Benchmark):
        raise TypeError(f"register expects a Benchmark instance, got {type(benchmark)}")
    if not benchmark.name:
        raise ValueError(f"{type(benchmark).__name__}: benchmark name is empty")
    if benchmark.name in _REGISTRY:
        raise ValueError(f"benchmark {benchmark.name!r} is already registered")
    if benchmark.category not in FAMILIES:
        raise ValueError(f"benchmark {benchmark.name!r}: category {benchmark.category!r} not in {FAMILIES}")
    if benchmark.kind not in KINDS:
        raise ValueError(f"benchmark {benchmark.name!r}: kind {benchmark.kind!r} not in {KINDS}")
    _REGISTRY[benchmark.name] = benchmark
    return benchmark


def get_benchmark(name: str) -> Benchmark:
    """The registered benchmark called `name` (a clear error listing the known names otherwise)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def list_benchmarks() -> list[str]:
    """All registered benchmark names, sorted."""
    return sorted(_REGISTRY)
