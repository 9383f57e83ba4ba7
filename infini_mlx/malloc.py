"""glibc's malloc told to keep freed buffers (Linux).

MLX's CPU backend takes every array from malloc. With glibc's defaults, a
buffer above the mmap threshold is mapped fresh and unmapped when freed, and
the top of the heap is given back to the kernel: every op's output then
page-faults anew. On a 2-core Linux VM that made a 4M-element exp 3-4x slower
than computing it. Raising the trim threshold and the mmap threshold (to
glibc's maximum, 32 MiB) keeps freed memory for the next array; peak memory
is unchanged. ``INFINI_MALLOC=0`` turns this off.
"""

import ctypes
import os
import sys

ENV = "INFINI_MALLOC"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def tune() -> bool:
    if sys.platform != "linux" or os.environ.get(ENV) == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, 1 << 30) and mallopt(M_MMAP_THRESHOLD, 32 << 20))


TUNED = tune()
