"""Attacks optimised against the model under test (GCG), run in JAX on the accelerator that holds the model."""
from forgetjax.eval.attacks.gcg import GCGConfig, GCGResult, run_gcg

__all__ = ["GCGConfig", "GCGResult", "run_gcg"]
