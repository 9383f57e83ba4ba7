"""Import PyTorch / Hugging Face checkpoints into infini-mlx, safely and exactly.

``convert(src, dst)`` reads plain Hugging Face models and the public Infini
checkpoints (Beomi InfiniTransformer, gemma-2B-10M, jlamprou's Qwen-MoE,
nanotron) without torch and without executing anything from the files.
"""

from .checkpoint import Checkpoint
from .convert import ConversionSummary, convert
from .errors import ConversionError
from .formats import FORMATS, detect
from .torch_zip import TensorRef, TorchZip

__all__ = [
    "Checkpoint",
    "ConversionError",
    "ConversionSummary",
    "FORMATS",
    "TensorRef",
    "TorchZip",
    "convert",
    "detect",
]
