"""Argument checks shared by every method: one wording, one place.

Each check raises ``ValueError`` (``TypeError`` for a value of the wrong kind) with a message
``"<where>: <name> must be ..., got <value>"``, so the user sees which call and which argument.
Optimizers call :func:`check_groups` at the top of ``step()``, before any parameter is written:
a group hyperparameter changed after construction (by hand or by a scheduler) is checked too,
and an invalid later group cannot leave earlier groups already updated.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Optional

import torch

__all__ = ["real", "integer", "betas", "check_groups", "distinct_params", "scalar_loss"]


def _as_number(where: str, name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{where}: {name} must be a real number, got a tensor of shape "
                            f"{list(value.shape)} and dtype {value.dtype}")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be a real number, got {type(value).__name__} "
                        f"{value!r}")
    return float(value)


def real(where: str, name: str, value: Any, *, low: Optional[float] = None,
         low_open: bool = False, high: Optional[float] = None, high_open: bool = False,
         finite: bool = True) -> float:
    """``value`` as a float, checked to be a finite real number (a Python number or a one-element
    tensor) within ``[low, high]`` (``(low`` / ``high)`` with ``low_open`` / ``high_open``)."""
    x = _as_number(where, name, value)
    bad = math.isnan(x) or (finite and math.isinf(x))
    if low is not None and (x <= low if low_open else x < low):
        bad = True
    if high is not None and (x >= high if high_open else x > high):
        bad = True
    if bad:
        parts = ["finite"] if finite else []
        if low is not None:
            parts.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            parts.append(f"{'<' if high_open else '<='} {high:g}")
        raise ValueError(f"{where}: {name} must be {' and '.join(parts) or 'a number'}, "
                         f"got {value!r}")
    return x


def integer(where: str, name: str, value: Any, *, low: Optional[int] = None,
            high: Optional[int] = None) -> int:
    """``value`` as an int, checked to be an integer (not a bool) within ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__} {value!r}")
    v = int(value)
    if (low is not None and v < low) or (high is not None and v > high):
        rng = " and ".join(([f">= {low}"] if low is not None else []) +
                           ([f"<= {high}"] if high is not None else []))
        raise ValueError(f"{where}: {name} must be {rng}, got {value!r}")
    return v


def betas(where: str, value: Any, name: str = "betas") -> tuple[float, float]:
    """A pair ``(beta1, beta2)``, each in [0, 1)."""
    try:
        b1, b2 = value
    except (TypeError, ValueError):
        raise TypeError(f"{where}: {name} must be a pair (beta1, beta2), got {value!r}") from None
    return (real(where, f"{name}[0]", b1, low=0.0, high=1.0, high_open=True),
            real(where, f"{name}[1]", b2, low=0.0, high=1.0, high_open=True))


def check_groups(where: str, param_groups: Iterable[dict], **rules: dict) -> None:
    """Check every group's hyperparameters against ``rules`` (key -> keyword arguments of
    :func:`real`, or ``"betas"`` -> ``{}``), naming the group: ``param_groups[1]['lr']``.
    Keys a group lacks are skipped."""
    for i, group in enumerate(param_groups):
        for key, rule in rules.items():
            if key not in group:
                continue
            label = f"param_groups[{i}][{key!r}]"
            if key == "betas":
                betas(where, group[key], label)
            else:
                real(where, label, group[key], **rule)


def distinct_params(where: str, param_groups: Iterable[dict]) -> None:
    """Refuse a parameter that appears twice (in one group or in two): torch.optim only warns,
    and an optimizer that steps it twice (moments updated twice, a perturbation applied twice)
    silently computes something else."""
    seen: dict[int, int] = {}
    for i, group in enumerate(param_groups):
        for p in group["params"]:
            if id(p) in seen:
                j = seen[id(p)]
                where_first = "the same group" if i == j else f"param_groups[{j}]"
                raise ValueError(f"{where}: a parameter of shape {list(p.shape)} appears twice "
                                 f"(param_groups[{i}] and {where_first}); pass each parameter "
                                 "once")
            seen[id(p)] = i


def scalar_loss(where: str, loss: Any) -> float:
    """A closure's loss as a Python float: a real number or a one-element real tensor (a string,
    a bool, a complex number or a tensor of several elements is refused)."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1 or loss.is_complex() or loss.dtype == torch.bool:
            raise TypeError(f"{where}: the closure must return a scalar loss (a number or a "
                            f"one-element real tensor), got a tensor of shape {list(loss.shape)} "
                            f"and dtype {loss.dtype}")
        return float(loss.detach().item())
    if isinstance(loss, bool) or not isinstance(loss, numbers.Real):
        raise TypeError(f"{where}: the closure must return a scalar loss (a number or a "
                        f"one-element real tensor), got {type(loss).__name__} {loss!r}")
    return float(loss)
