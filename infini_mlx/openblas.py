"""OpenBLAS for MLX's CPU backend on Linux, loaded before MLX is.

The PyPI CPU wheel of MLX links a reference BLAS; Debian's OpenBLAS
(libopenblas0-pthread) makes float32 matmul ~20-30x faster. Loaded with
RTLD_GLOBAL before MLX's library, it is what MLX's BLAS calls bind to, as with
LD_PRELOAD. ``INFINI_OPENBLAS=0`` turns this off; a path names another library.
"""

import ctypes
import os
import platform
import sys

ENV = "INFINI_OPENBLAS"
HINT = "sudo apt-get install libopenblas0-pthread"


def path() -> str:
    return os.environ.get(ENV) or f"/usr/lib/{platform.machine()}-linux-gnu/libopenblas.so.0"


def preload() -> str:
    """Load OpenBLAS if MLX is not loaded yet; say what happened.

    Returns:
        ``"loaded"``, ``"missing"`` (no such library), ``"preloaded"`` (in
        LD_PRELOAD), ``"late"`` (MLX was loaded first) or ``"off"``.
    """
    if sys.platform != "linux" or os.environ.get(ENV) == "0":
        return "off"
    if "openblas" in os.environ.get("LD_PRELOAD", ""):
        return "preloaded"
    if "mlx.core" in sys.modules:
        return "late"
    try:
        ctypes.CDLL(path(), mode=os.RTLD_GLOBAL)
    except OSError:
        return "missing"
    return "loaded"


STATUS = preload()
