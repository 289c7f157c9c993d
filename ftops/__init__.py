"""ftops: memory-efficient fine-tuning methods with C++/CUDA kernels for PyTorch.

Methods: :class:`MeZO` (zeroth-order SGD), :class:`OwLore` (outlier-weighted layerwise block
sampling, with :func:`outlier_ratios`). Each method lives in its own module (``ftops.mezo``,
``ftops.owlore``); the kernels are registered as ``torch.ops.ftops.*``.
"""
from . import _ops  # noqa: F401  (loads the kernels)
from ._build import build_info
from . import mezo
from .mezo import MeZO
from . import owlore
from .owlore import OwLore, outlier_ratios

__version__ = "0.1.0"
__all__ = ["MeZO", "OwLore", "build_info", "mezo", "outlier_ratios", "owlore", "__version__"]
