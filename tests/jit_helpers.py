"""Test helper: run pure JAX functions under `jax.jit` with their Python-scalar arguments static."""
from __future__ import annotations

import functools

import jax


@functools.lru_cache(maxsize=None)
def _compiled(fn, static_argnums: tuple[int, ...], kwargs: tuple):
    return jax.jit(functools.partial(fn, **dict(kwargs)), static_argnums=static_argnums)


def jit_call(fn):
    """Run ``fn`` under jax.jit (eager op-by-op dispatch is ~10x slower to compile); Python scalars stay static."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        static = tuple(i for i, a in enumerate(args) if isinstance(a, (bool, int, float, str)))
        return _compiled(fn, static, tuple(sorted(kwargs.items())))(*args)

    return wrapper
