"""infini-mlx: Infini-attention (arXiv 2404.07143) for MLX and mlx-lm."""

from . import malloc, openblas  # noqa: F401  before MLX loads: on Linux, its BLAS; malloc keeps buffers
from .attention import InfiniAttention
from .cache import InfiniCache
from .config import InfiniConfig
from .reading import InputError
from .session import InfiniSession, UntrainedMemoryWarning
from .state import StateFileError, load_state, model_fingerprint, save_state
from .streaming import prefill
from .upcycle import SUPPORTED_MODEL_TYPES, upcycle
from .utils import ModelNotFoundError, load, save

__version__ = "0.1.0"

__all__ = [
    "InfiniAttention",
    "InfiniCache",
    "InfiniConfig",
    "InfiniSession",
    "InputError",
    "ModelNotFoundError",
    "StateFileError",
    "SUPPORTED_MODEL_TYPES",
    "UntrainedMemoryWarning",
    "load",
    "load_state",
    "model_fingerprint",
    "prefill",
    "save",
    "save_state",
    "upcycle",
]
