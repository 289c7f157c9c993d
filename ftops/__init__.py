"""ftops: memory-efficient fine-tuning methods with C++/CUDA kernels for PyTorch.

Methods: :class:`MeZO` (zeroth-order SGD), :class:`GaLoreAdamW` (low-rank projected Adam) with
:func:`layerwise` (per-parameter optimizers stepped during backward), :class:`OwLore`
(outlier-weighted layerwise block sampling, with :func:`outlier_ratios`), :mod:`ftops.s2ft`
(structured sparse fine-tuning: ``select``/``apply``/``export``/``merge``/``load``), :class:`SaRA`
(sparse fine-tuning of the smallest weights, with the :func:`sddmm` gradient kernel). Each method
lives in its own module (``ftops.mezo``, ``ftops.galore``, ``ftops.owlore``, ``ftops.s2ft``,
``ftops.sara``); the kernels are registered as ``torch.ops.ftops.*``.
"""
from . import _ops  # noqa: F401  (loads the kernels)
from ._build import build_info
from . import mezo
from .mezo import MeZO
from . import galore
from .galore import GaLoreAdamW, layerwise
from . import owlore
from .owlore import OwLore, outlier_ratios
from . import s2ft
from . import sara
from .sara import SaRA
from ._ops import sddmm, sddmm_csr

__version__ = "0.1.0"
__all__ = ["MeZO", "GaLoreAdamW", "OwLore", "SaRA", "build_info", "galore", "layerwise", "mezo",
           "outlier_ratios", "owlore", "s2ft", "sara", "sddmm", "sddmm_csr", "__version__"]
