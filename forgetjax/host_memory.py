"""Host memory between the phases of a long job (a study's stages, training, evaluation, analysis).

A phase's arrays often die inside reference cycles (modules, traced closures), which Python frees only at its next
full collection, and glibc keeps freed heap pages mapped. On a CPU backend device buffers are host memory, so a study
that trains and then evaluates in one process would carry the dead training state into its evaluation."""
from __future__ import annotations

import ctypes
import gc
import sys


def release_host_memory() -> None:
    """Free unreachable objects now (and the device buffers they hold) and return free heap pages to the OS
    (`malloc_trim`, on glibc)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
