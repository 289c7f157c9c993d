"""One place where optimizers run the fused Adam(W) ops on their parameter lists.

GaLore (low-rank moments), S2FT (slices), SaRA (sparse values) and any plain AdamW path call
:func:`fused_adamw` / :func:`fused_adam_direction` from ``Optimizer.step`` with flat lists; this
module groups the tensors by device (and by step count when it differs between tensors), calls
``torch.ops.ftops.adamw_`` / ``adam_direction_`` once per group, and skips empty lists. Mixed
dtypes share one call (the kernels dispatch per tensor).

When the lists split into several calls, every argument is validated here first, so an error in
a later group cannot leave an earlier group already updated: on error nothing has been written.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from . import _ops  # noqa: F401  (loads the kernels)

__all__ = ["moment_dtype", "zeros_moment", "fused_adamw", "fused_adam_direction"]

_FLOAT_TYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

Steps = Union[int, Sequence[int]]


def moment_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the Adam moments for tensors of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def zeros_moment(t: torch.Tensor) -> torch.Tensor:
    """A zero moment buffer for ``t``: same shape and device, :func:`moment_dtype`, contiguous."""
    return torch.zeros(t.shape, dtype=moment_dtype(t.dtype), device=t.device)


def _steps(step: Steps, n: int, op: str) -> list[int]:
    if isinstance(step, torch.Tensor):
        step = step.tolist()
    if isinstance(step, (int, float)):
        return [int(step)] * n
    steps = [int(s) for s in step]
    if len(steps) != n:
        raise ValueError(f"{op}: step has {len(steps)} entries but there are {n} tensors")
    return steps


def _check_lengths(op: str, ref: str, n: int, **lists: Sequence[torch.Tensor]) -> None:
    for name, lst in lists.items():
        if len(lst) != n:
            raise ValueError(f"{op}: {name} has {len(lst)} tensors but {ref} has {n}")


def _check_hyper(op: str, beta1: float, beta2: float, eps: float, steps: list[int]) -> None:
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"{op}: beta1 must be in [0, 1), got {beta1}")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"{op}: beta2 must be in [0, 1), got {beta2}")
    if not (eps >= 0.0 and eps != float("inf")):
        raise ValueError(f"{op}: eps must be finite and >= 0, got {eps}")
    for k, s in enumerate(steps):
        if s < 1:
            raise ValueError(f"{op}: step[{k}] must be >= 1 (the count after incrementing), got {s}")


def _check_tensor(op: str, name: str, k: int, t: torch.Tensor, ref: torch.Tensor, ref_name: str,
                  dtypes: tuple[torch.dtype, ...], why: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name}[{k}] is {type(t).__name__}, not a Tensor")
    if t.layout != torch.strided:
        raise ValueError(f"{op}: {name}[{k}] must be a dense (strided) tensor, got {t.layout}")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name}[{k}] is on {t.device} but {ref_name}[{k}] is on {ref.device}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name}[{k}] must be contiguous (got sizes {list(t.shape)}, "
                         f"strides {list(t.stride())})")
    if t.shape != ref.shape:
        raise ValueError(f"{op}: {name}[{k}] has shape {list(t.shape)} but {ref_name}[{k}] has "
                         f"shape {list(ref.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{op}: {name}[{k}] has dtype {t.dtype} but must be "
                        f"{' or '.join(map(str, dtypes))} ({why})")


def _groups(devices: list[torch.device], steps: list[int]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for k, (d, s) in enumerate(zip(devices, steps)):
        groups.setdefault((d, s), []).append(k)
    return groups


def fused_adamw(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: Steps,
    maximize: bool = False,
    bias_correction: bool = True,
) -> None:
    """One torch.optim.AdamW step on lists, in place (see :func:`ftops._ops.adamw_` for the math).

    ``step`` is one int for all tensors, or one per tensor (the count after incrementing, >= 1).
    ``lr`` may be a float or a 0-d tensor. Moments: :func:`zeros_moment` of each param.
    """
    op = "ftops.fused_adamw"
    n = len(params)
    _check_lengths(op, "params", n, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    if n == 0:
        return
    steps = _steps(step, n, op)
    lr, weight_decay = float(lr), float(weight_decay)
    beta1, beta2, eps = float(beta1), float(beta2), float(eps)
    groups = _groups([p.device for p in params], steps)
    if len(groups) > 1:
        _check_hyper(op, beta1, beta2, eps, steps)
        for k, p in enumerate(params):
            _check_tensor(op, "params", k, p, p, "params", _FLOAT_TYPES, "supported dtypes")
            _check_tensor(op, "grads", k, grads[k], p, "params", (p.dtype,), "the dtype of params[k]")
            md = (moment_dtype(p.dtype),)
            _check_tensor(op, "exp_avgs", k, exp_avgs[k], p, "params", md, "the moment dtype")
            _check_tensor(op, "exp_avg_sqs", k, exp_avg_sqs[k], p, "params", md, "the moment dtype")
    for (_, s), idx in groups.items():
        torch.ops.ftops.adamw_(
            [params[k] for k in idx], [grads[k] for k in idx], [exp_avgs[k] for k in idx],
            [exp_avg_sqs[k] for k in idx], lr, beta1, beta2, eps, weight_decay, s,
            bool(maximize), bool(bias_correction))


def fused_adam_direction(
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    out: Sequence[torch.Tensor],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    step: Steps,
    bias_correction: bool = True,
) -> None:
    """Adam moments updated in place, normalized direction written to ``out`` (see
    :func:`ftops._ops.adam_direction_`). For galore_torch semantics pass
    ``bias_correction=False`` and apply ``lr * sqrt(bc2) / bc1`` to the projected-back direction.
    """
    op = "ftops.fused_adam_direction"
    n = len(grads)
    _check_lengths(op, "grads", n, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, out=out)
    if n == 0:
        return
    steps = _steps(step, n, op)
    beta1, beta2, eps = float(beta1), float(beta2), float(eps)
    groups = _groups([g.device for g in grads], steps)
    if len(groups) > 1:
        _check_hyper(op, beta1, beta2, eps, steps)
        for k, g in enumerate(grads):
            _check_tensor(op, "grads", k, g, g, "grads", _FLOAT_TYPES, "supported dtypes")
            md = moment_dtype(g.dtype)
            _check_tensor(op, "exp_avgs", k, exp_avgs[k], g, "grads", (md,), "the moment dtype")
            _check_tensor(op, "exp_avg_sqs", k, exp_avg_sqs[k], g, "grads", (md,), "the moment dtype")
            _check_tensor(op, "out", k, out[k], g, "grads", (g.dtype, md),
                          "the grad dtype or the moment dtype")
    for (_, s), idx in groups.items():
        torch.ops.ftops.adam_direction_(
            [grads[k] for k in idx], [exp_avgs[k] for k in idx], [exp_avg_sqs[k] for k in idx],
            [out[k] for k in idx], beta1, beta2, eps, s, bool(bias_correction))
