"""release_host_memory frees device buffers held only by reference cycles (on CPU: host memory) at once."""
from __future__ import annotations

import sys

import jax.numpy as jnp
import pytest

from forgetjax.host_memory import release_host_memory


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_buffer_held_by_a_dead_cycle_is_returned_to_the_os():
    import gc

    size = 256 * 2**20
    gc.disable()  # the cycle must survive until the release, as it does between a study's phases
    try:
        before = rss_bytes()
        cycle = {"buffer": jnp.ones(size // 4, dtype=jnp.float32).block_until_ready()}
        cycle["self"] = cycle
        held = rss_bytes()
        del cycle
        assert rss_bytes() - before > 0.8 * size, "the dead cycle should still hold the buffer"
        release_host_memory()
        released = rss_bytes()
    finally:
        gc.enable()
    assert held - before > 0.8 * size
    assert held - released > 0.8 * size
