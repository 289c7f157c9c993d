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
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Optional

import torch

__all__ = ["real", "integer", "betas", "check_groups", "distinct_params", "scalar_loss",
           "boolean", "add_param_group", "check_state_dict", "state_tensor"]


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
        _check_group(where, i, group, rules)


def _check_group(where: str, i: int, group: dict, rules: dict) -> None:
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


def boolean(where: str, name: str, value: Any) -> bool:
    """``value`` checked to be a bool (``True``/``False``, not 0/1 or a string)."""
    if not isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def add_param_group(where: str, optimizer, param_group: Any, add: Callable[[dict], None],
                    **rules: dict) -> None:
    """``add(param_group)`` (``torch.optim.Optimizer.add_param_group``) with the checks of every
    ftops optimizer: a dict whose parameters are tensors, none of them twice (in the group or
    already in the optimizer), and, once the defaults are filled in, the group's hyperparameters
    against ``rules`` (as :func:`check_groups`). On failure the optimizer is left as it was."""
    if not isinstance(param_group, Mapping):
        raise TypeError(f"{where}: a param group must be a dict, got {type(param_group).__name__}")
    params = param_group.get("params")
    if isinstance(params, torch.Tensor):
        params = [params]
    elif isinstance(params, (set, frozenset)) or params is None:
        raise TypeError(f"{where}: a param group's 'params' must be a tensor or an ordered "
                        f"iterable of tensors (not a set), got {type(params).__name__}")
    else:
        params = list(params)
    for k, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{where}: params[{k}] of a param group is {type(p).__name__}, not a "
                            "tensor")
    param_group["params"] = params
    distinct_params(where, [*optimizer.param_groups, param_group])
    n = len(optimizer.param_groups)
    add(param_group)
    try:
        for i in range(n, len(optimizer.param_groups)):
            _check_group(where, i, optimizer.param_groups[i], rules)
    except Exception:
        del optimizer.param_groups[n:]
        raise


def check_state_dict(where: str, state_dict: Any, param_groups: list, *,
                     group_keys: Iterable[str] = (), **rules: dict) -> dict:
    """Check the ``torch.optim`` part of a state dict before loading it into an optimizer with
    ``param_groups``: a mapping with ``"state"`` and ``"param_groups"``; as many groups, each with
    as many parameters (given as int ids) as the optimizer's; every group has the keys
    ``group_keys`` and valid hyperparameters (``rules`` as :func:`check_groups`); ``state`` is
    keyed by those ids. Returns ``{id: parameter}`` (the parameter each saved id will map to).
    Nothing is changed; a mismatch raises naming what differs."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{where}: state_dict must be a dict, got {type(state_dict).__name__}")
    for key in ("state", "param_groups"):
        if key not in state_dict:
            raise ValueError(f"{where}: state_dict has no {key!r} entry (keys: "
                             f"{sorted(map(str, state_dict))}); not an optimizer state dict")
    saved_groups, state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(saved_groups, (list, tuple)) or not all(
            isinstance(g, Mapping) for g in saved_groups):
        raise TypeError(f"{where}: state_dict['param_groups'] must be a list of dicts")
    if not isinstance(state, Mapping):
        raise TypeError(f"{where}: state_dict['state'] must be a dict, got "
                        f"{type(state).__name__}")
    if len(saved_groups) != len(param_groups):
        raise ValueError(f"{where}: state_dict has {len(saved_groups)} param groups but the "
                         f"optimizer has {len(param_groups)}")
    id_map: dict = {}
    for i, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        ids = saved.get("params")
        if not isinstance(ids, (list, tuple)) or not all(
                isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in ids):
            raise TypeError(f"{where}: state_dict['param_groups'][{i}]['params'] must be a list "
                            "of int parameter ids")
        if len(ids) != len(group["params"]):
            raise ValueError(f"{where}: state_dict['param_groups'][{i}] has {len(ids)} parameters "
                             f"but the optimizer's param_groups[{i}] has {len(group['params'])}")
        for x, p in zip(ids, group["params"]):
            if x in id_map:
                raise ValueError(f"{where}: parameter id {x} appears twice in "
                                 "state_dict['param_groups']")
            id_map[x] = p
        missing = [k for k in group_keys if k not in saved]
        if missing:
            raise ValueError(f"{where}: state_dict['param_groups'][{i}] lacks {missing}; it was "
                             "not saved by this kind of optimizer")
    check_groups(where + " (state_dict)", saved_groups, **rules)
    for key in state:
        if key not in id_map:
            raise ValueError(f"{where}: state_dict['state'] has an entry for parameter id "
                             f"{key!r}, which no param group lists")
        if not isinstance(state[key], Mapping):
            raise TypeError(f"{where}: state_dict['state'][{key!r}] must be a dict, got "
                            f"{type(state[key]).__name__}")
    return id_map


def state_tensor(where: str, name: str, value: Any, shape: Optional[tuple] = None) -> torch.Tensor:
    """``value`` checked to be a dense floating-point tensor (of ``shape`` when given): an
    optimizer state entry such as a moment."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a tensor, got {type(value).__name__}")
    if value.layout != torch.strided or not value.is_floating_point():
        raise TypeError(f"{where}: {name} must be a dense floating-point tensor, got "
                        f"{value.dtype} ({value.layout})")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{where}: {name} has shape {list(value.shape)} but must have shape "
                         f"{list(shape)}")
    return value
