"""ftops: memory-efficient fine-tuning methods with C++/CUDA kernels for PyTorch.

Methods: :class:`MeZO` (zeroth-order SGD), :class:`SaRA` (sparse fine-tuning of the smallest
weights, with the :func:`sddmm` gradient kernel). Each method lives in its own module
(``ftops.mezo``); the kernels are registered as ``torch.ops.ftops.*``.
"""
from . import _ops  # noqa: F401  (loads the kernels)
from ._build import build_info
from . import mezo
from .mezo import MeZO
from . import sara
from .sara import SaRA
from ._ops import sddmm

__version__ = "0.1.0"
__all__ = ["MeZO", "SaRA", "build_info", "mezo", "sara", "sddmm", "__version__"]
