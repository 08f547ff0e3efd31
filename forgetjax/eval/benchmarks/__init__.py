"""Benchmark registry: importing this package registers every benchmark.

`get_benchmark(name)`, `list_benchmarks()`, `register(benchmark)`; see `base.py` for the Benchmark interface.
"""
from forgetjax.eval.benchmarks.base import (
    FAMILIES,
    FORMATS,
    KINDS,
    Benchmark,
    GenerationSettings,
    Item,
    MultipleChoiceBenchmark,
    MultipleChoiceOutput,
    ScoringContext,
    score_options,
    true_mass,
)
from forgetjax.eval.benchmarks.registry import get_benchmark, list_benchmarks, register
from forgetjax.eval.benchmarks import code, commonsense, ifeval, jailbreak, math  # noqa: E402,F401  (registration)
from forgetjax.eval.benchmarks import multiple_choice, qa, safety  # noqa: E402,F401  (registration)
from forgetjax.eval.benchmarks import protocol, robustness, safety_domains, style  # noqa: E402,F401  (registration)

__all__ = [
    "FAMILIES",
    "FORMATS",
    "KINDS",
    "Benchmark",
    "GenerationSettings",
    "Item",
    "MultipleChoiceBenchmark",
    "MultipleChoiceOutput",
    "ScoringContext",
    "get_benchmark",
    "list_benchmarks",
    "register",
    "score_options",
    "true_mass",
]
