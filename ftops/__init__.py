"""ftops: memory-efficient fine-tuning methods with C++/CUDA kernels for PyTorch."""
from . import _ops  # noqa: F401  (loads the kernels)
from ._build import build_info
from . import mezo

__version__ = "0.1.0"
__all__ = ["build_info", "mezo", "__version__"]
