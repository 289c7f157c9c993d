"""ftops: memory-efficient fine-tuning methods with C++/CUDA kernels for PyTorch.

Methods: :class:`MeZO` (zeroth-order SGD), :class:`GaLoreAdamW` (low-rank projected Adam) with
:func:`layerwise` (per-parameter optimizers stepped during backward). Each method lives in its own module
(``ftops.mezo``); the kernels are registered as ``torch.ops.ftops.*``.
"""
from . import _ops  # noqa: F401  (loads the kernels)
from ._build import build_info
from . import mezo
from .mezo import MeZO
from . import galore
from .galore import GaLoreAdamW, layerwise

__version__ = "0.1.0"
__all__ = ["MeZO", "GaLoreAdamW", "layerwise", "build_info", "mezo", "galore", "__version__"]
