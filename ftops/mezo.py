"""MeZO: zeroth-order SGD (Malladi et al. 2023) with in-place counter-based noise."""
from __future__ import annotations

import torch

from . import _ops


def noise_like(tensor: torch.Tensor, seed: int, index: int) -> torch.Tensor:
    """The noise MeZO adds to parameter number ``index`` in a step with seed ``seed``.

    ``index`` is the parameter's position in the optimizer's parameter list (over all groups).
    The noise is standard normal, computed in float32 (the precision the kernels use for every
    parameter dtype) and returned as float32 with ``tensor``'s shape, on its device. It is a pure
    function of ``(seed, index, element index)``: the same for any thread count and on CPU and CUDA.
    """
    return _ops.zo_noise(tensor, seed, index)
