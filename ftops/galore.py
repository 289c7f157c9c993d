"""GaLore: Adam with gradients projected onto a low-rank subspace (Zhao et al. 2024).

:class:`GaLoreAdamW` is a drop-in replacement for ``galore_torch.GaLoreAdamW``: the same
constructor and the same parameter-group convention. Groups carrying ``rank`` are projected
(keys ``rank``, ``update_proj_gap``, ``scale``, ``proj_type``; ftops adds ``projector``); every
other group, and every parameter that is not 2-D, gets plain (galore_torch-style) AdamW.

For a projected ``m x n`` parameter with gradient ``G`` and basis ``P``:

* refresh ``P`` at step 0 and every ``update_proj_gap`` steps (the step count before it is
  incremented, as galore_torch), by an exact float32 ``torch.linalg.svd`` (``projector="svd"``,
  the default; identical to galore_torch) or by a randomized range finder warm-started from the
  previous basis (``projector="randomized"``, see :func:`randomized_basis`);
* ``R = P^T G`` (left, ``r x n``) or ``R = G P^T`` (right, ``m x r``) or ``A^T G B^T`` (full);
* the Adam moments live in the shape of ``R`` and are updated by the shared fused kernel
  (``torch.ops.ftops.adam_direction_``), which writes ``N = m / (sqrt(v) + eps)``;
* the update goes straight into the weight with one GEMM,
  ``p.addmm_(P, N, beta=1 - lr*wd, alpha=-step_size*scale*(1 - lr*wd))`` (or ``(N, P)``), where
  ``step_size = lr * sqrt(bc2) / bc1``. ``beta`` applies galore_torch's decoupled weight decay
  *after* the update (``p -= step_size*scale*P N; p -= lr*wd*p``) inside the same GEMM, so no
  full-size update tensor and no extra pass over the weight. ``proj_type="full"`` needs two
  GEMMs, ``T = A N`` (``m x r``, low-rank sized) then ``p.addmm_(T, B, ...)``: still no
  full-size temporary. (galore_torch allocates two full-size tensors per parameter per step for
  ``project_back`` and the ``scale`` multiply, then makes two more passes over the weight.)

Differences from galore_torch, all deliberate:

* ``proj_type="reverse_std"``: galore_torch's ``project_back`` guesses the side from the shape
  of the projected tensor, and guesses wrong when that tensor is square (a wide ``m < n`` matrix
  with ``rank >= m``): it multiplies on the wrong side and raises a shape error. ftops records
  the side chosen at the refresh (the state holds ``proj_left`` or ``proj_right``), so every
  proj_type works for every shape. For all other cases the results are the same.
* Adam moments are float32 (float64 for float64 parameters) whatever the parameter dtype
  (galore_torch keeps them in the gradient dtype, e.g. bfloat16). The basis is kept in the
  parameter dtype, as galore_torch does.
* Non-finite gradients: on a refresh step the gradient is checked before the SVD (galore_torch
  crashes inside the SVD or installs a NaN basis). If it is not finite, the refresh is skipped,
  the previous basis is kept, and **that parameter's whole update for the step is skipped**
  (weights, moments and step count unchanged, so the refresh is retried on the next step); a
  warning is issued once per optimizer. On other steps gradients are not inspected (that would
  cost a device sync every step); as with ``torch.optim.AdamW``, use a GradScaler or clipping.
* ``rank`` larger than ``min(m, n)`` works as in galore_torch (the basis has ``min(m, n)``
  vectors), with a one-time warning; ``rank < 1`` is a ``ValueError``.
* The optimizer state is plain: per parameter ``step`` (int), ``exp_avg``, ``exp_avg_sq`` and
  ``proj_left`` (``m x r``) and/or ``proj_right`` (``r x n``) tensors, so ``state_dict`` loads
  with ``torch.load(weights_only=True)``. ``load_state_dict`` checks every group and every
  parameter's state (keys, shapes for the saved rank and proj_type) before loading anything,
  refuses another optimizer's state (``torch.optim.AdamW``'s lacks ``correct_bias``), and keeps
  the moments in float32 (torch would cast them to a bfloat16 parameter's dtype). Deleting
  ``optimizer.state[p]`` frees everything the optimizer holds for ``p``; the parameter then
  starts afresh (step 0, refresh at its next step).
* Checked before anything is written, at every step: the group hyperparameters (a NaN, infinite
  or negative ``lr``/``eps``/``weight_decay`` or ``betas`` outside [0, 1), set by hand or by a
  scheduler, and the projection keys), every gradient and the state it meets; on a refresh step
  all new bases are computed before the first update. A parameter listed twice is refused.

Distributed: under DistributedDataParallel every rank refreshes the projector from the same
averaged gradient (the randomized projector is seeded per group ``seed``, parameter and step, not
by the global RNG), so the ranks stay identical. Under FSDP2 a sharded (DTensor) parameter in a
projected group is refused when the optimizer is built (projecting each shard on its own basis is
a different algorithm); groups without ``rank`` run AdamW on the local shards.

Layerwise training (:func:`layerwise`) steps one optimizer per parameter from
``register_post_accumulate_grad_hook`` and frees each gradient as soon as it has been used; a
backward pass that raises drops its window's gradients and training goes on.
"""
from __future__ import annotations

import logging
import math
import warnings
import weakref
from collections.abc import Mapping, MutableMapping
from typing import Callable, Iterable, Iterator

import torch

from . import _adamw, _checks

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed
    DTensor = ()

logger = logging.getLogger(__name__)

__all__ = ["GaLoreAdamW", "layerwise", "Layerwise", "svd_basis", "randomized_basis"]

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
PROJECTORS = ("svd", "randomized")
# Projected gradients (and their directions) are batched into one fused call until they reach
# this many elements, so the temporaries stay small next to the optimizer state.
_FLUSH_NUMEL = 1 << 24
_GROUP_DEFAULTS = dict(update_proj_gap=200, scale=1.0, proj_type="std", projector="svd",
                       oversample=None, power_iters=4, warm_power_iters=2, seed=0)


def _side(proj_type: str, shape: torch.Size) -> str:
    """'left' (P is m x r, R = P^T G), 'right' (P is r x n, R = G P^T) or 'full'."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type


# --- bases ----------------------------------------------------------------------------------------

def svd_basis(grad: torch.Tensor, rank: int, side: str):
    """galore_torch's refresh: ``torch.linalg.svd`` of ``grad`` in float32.

    Returns ``(left, right)``: ``left = U[:, :rank]`` (``m x r``) for sides 'left' and 'full',
    ``right = Vh[:rank]`` (``r x n``) for 'right' and 'full' (None otherwise), in the dtype of
    ``grad``, contiguous (so the full ``U``/``Vh`` are freed).
    """
    _check_basis_args("svd_basis", grad, rank, side)
    U, _, Vh = torch.linalg.svd(grad.float(), full_matrices=False)
    left = U[:, :rank].to(grad.dtype).contiguous() if side in ("left", "full") else None
    right = Vh[:rank].to(grad.dtype).contiguous() if side in ("right", "full") else None
    return left, right


def _check_basis_args(where: str, grad, rank, side) -> None:
    if not isinstance(grad, torch.Tensor) or grad.dim() != 2 or grad.layout != torch.strided \
            or not grad.is_floating_point():
        raise TypeError(f"{where}: grad must be a dense 2-D floating-point tensor, got "
                        f"{_describe_tensor(grad)}")
    _checks.integer(where, "rank", rank, low=1)
    if side not in ("left", "right", "full"):
        raise ValueError(f"{where}: side must be 'left', 'right' or 'full', got {side!r}")


def _orth(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x).Q


def randomized_basis(grad: torch.Tensor, rank: int, side: str, prev_left=None, prev_right=None, *,
                     oversample: int | None = None, power_iters: int = 4, warm_power_iters: int = 2,
                     generator: torch.Generator | None = None):
    """Top-``rank`` singular subspace(s) of ``grad`` by randomized subspace iteration, in float32.

    Works on ``A = grad`` (side 'left' or 'full') or ``A = grad^T`` (side 'right'), ``a x b``, with
    ``l = min(rank + oversample, a, b)`` columns (``oversample`` defaults to ``max(8, rank // 2)``).
    Start: the previous basis (warm start, when its shape fits) completed with ``l - rank`` random
    Gaussian directions, then ``warm_power_iters`` iterations; or, cold, the range of ``A Omega``
    for a Gaussian ``Omega`` (``b x l``) followed by ``power_iters`` iterations. One iteration is
    ``Q = orth(A orth(A^T Q))`` (Householder QR each time, so decaying spectra do not lose
    precision). Finally Rayleigh-Ritz: ``A^T Q = Q_w R_w``, ``svd(R_w^T) = U_r S V_r^T``, and the
    basis is ``Q U_r[:, :rank]`` (and ``Q_w V_r[:, :rank]`` for the other side). Cost: ``2 + 2 *
    iters`` GEMMs of ``a x b x l`` (one fewer when warm) and QRs of tall ``l``-column matrices,
    instead of a full SVD. Basis vectors are sign-aligned with the previous basis so that the
    Adam moments' coordinates keep their orientation across refreshes.

    Returns ``(left, right)`` as :func:`svd_basis` does.
    """
    where = "randomized_basis"
    _check_basis_args(where, grad, rank, side)
    if oversample is not None:
        _checks.integer(where, "oversample", oversample, low=0)
    _checks.integer(where, "power_iters", power_iters, low=0)
    _checks.integer(where, "warm_power_iters", warm_power_iters, low=0)
    for name, prev in (("prev_left", prev_left), ("prev_right", prev_right)):
        if prev is not None and not (isinstance(prev, torch.Tensor) and prev.dim() == 2):
            raise TypeError(f"{where}: {name} must be None or a 2-D tensor, got "
                            f"{_describe_tensor(prev)}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{where}: generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")
    g = grad.float()
    A = g.t() if side == "right" else g
    prev = (prev_right.t() if prev_right is not None else None) if side == "right" else prev_left
    a, b = A.shape
    r = min(rank, a, b)
    p = max(8, r // 2) if oversample is None else int(oversample)
    l = min(r + p, a, b)
    kw = dict(device=A.device, dtype=A.dtype, generator=generator)
    if prev is not None and tuple(prev.shape) == (a, r):
        X = prev.float()
        if l > r:
            X = torch.cat([X, torch.randn(a, l - r, **kw)], dim=1)
        Q = _orth(X)
        iters = warm_power_iters
    else:
        prev = None
        Q = _orth(A @ torch.randn(b, l, **kw))
        iters = power_iters
    for _ in range(iters):
        Q = _orth(A @ _orth(A.t() @ Q))
    Qw, Rw = torch.linalg.qr(A.t() @ Q)
    Ur, _, Vrh = torch.linalg.svd(Rw.t())
    basis = Q @ Ur[:, :r]                      # a x r: left singular vectors of A
    other = Qw @ Vrh[:r].t() if side == "full" else None  # b x r: right singular vectors of A
    if prev is not None:
        sign = torch.sign((prev.float() * basis).sum(0))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        basis = basis * sign
        if other is not None:
            other = other * sign
    dt = grad.dtype
    if side == "left":
        return basis.to(dt).contiguous(), None
    if side == "right":
        return None, basis.t().to(dt).contiguous()
    return basis.to(dt).contiguous(), other.t().to(dt).contiguous()


# --- the optimizer --------------------------------------------------------------------------------

def _describe_tensor(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {t.dtype} tensor of shape {list(t.shape)} on {t.device}"
    return f"{type(t).__name__} {t!r}"[:120]


def _sharded_projection_error(shape) -> ValueError:
    return ValueError(
        f"GaLoreAdamW: a parameter of shape {tuple(shape)} in a projected group (one with 'rank') "
        "is a DTensor (sharded, e.g. by FSDP2's fully_shard). GaLore projects the gradient of the "
        "whole matrix: its top singular subspace cannot be computed from one shard, and projecting "
        "each shard on its own basis is a different algorithm, so this is not supported. Train "
        "the model under DistributedDataParallel, or put the parameter in a group without 'rank' "
        "(plain AdamW works on DTensors).")


# Hyperparameters of every group, checked at construction, by add_param_group, at the top of every
# step (a scheduler or the user may have changed them) and in a loaded state dict.
_HYPER = dict(lr=dict(low=0.0), eps=dict(low=0.0), weight_decay=dict(low=0.0), betas={})
_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "correct_bias")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_projection(where: str, label: str, group: dict) -> None:
    """The projection keys of a group with ``rank`` (defaults filled in), and correct_bias."""
    _checks.boolean(where, f"{label}['correct_bias']", group["correct_bias"])
    if "rank" not in group:
        return
    missing = [k for k in _GROUP_DEFAULTS if k not in group]
    if missing:
        raise ValueError(f"{where}: {label} has 'rank' but lacks {missing}")
    _checks.integer(where, f"{label}['rank']", group["rank"], low=1)
    _checks.integer(where, f"{label}['update_proj_gap']", group["update_proj_gap"], low=1)
    if group["proj_type"] not in PROJ_TYPES:
        raise ValueError(f"{where}: {label}['proj_type'] must be one of {PROJ_TYPES}, "
                         f"got {group['proj_type']!r}")
    if group["projector"] not in PROJECTORS:
        raise ValueError(f"{where}: {label}['projector'] must be one of {PROJECTORS}, "
                         f"got {group['projector']!r}")
    _checks.real(where, f"{label}['scale']", group["scale"], low=0.0)
    if group["oversample"] is not None:
        _checks.integer(where, f"{label}['oversample']", group["oversample"], low=0)
    for k in ("power_iters", "warm_power_iters"):
        _checks.integer(where, f"{label}[{k!r}]", group[k], low=0)
    _checks.integer(where, f"{label}['seed']", group["seed"], low=0)


def _check_all_groups(where: str, groups) -> None:
    _checks.check_groups(where, groups, **_HYPER)
    for i, group in enumerate(groups):
        _check_projection(where, f"param_groups[{i}]", group)


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore gradient projection; drop-in for ``galore_torch.GaLoreAdamW``.

    Args:
        params: parameters or param groups. A group with ``rank`` is projected; its other keys:
            ``update_proj_gap`` (default 200), ``scale`` (1.0), ``proj_type`` (``"std"``,
            ``"reverse_std"``, ``"left"``, ``"right"``, ``"full"``), and ftops's ``projector``
            (``"svd"``, default, or ``"randomized"``; for the latter ``oversample`` (default
            ``max(8, rank // 2)``), ``power_iters`` (4, cold start), ``warm_power_iters`` (2)
            and ``seed`` (0)). Non-2-D parameters of a projected group get plain AdamW.
        lr, betas, eps, weight_decay, correct_bias: as galore_torch (HF ``AdamW``): eps is added
            to ``sqrt(v)`` before bias correction, ``step_size = lr * sqrt(bc2) / bc1``, and
            weight decay ``p -= lr * wd * p`` is applied after the update. Defaults eps 1e-6,
            weight_decay 0, correct_bias True.
        no_deprecation_warning: accepted for compatibility; ignored.

    See the module docstring for the update, the state layout and the differences from
    galore_torch (reverse_std fix, non-finite gradients, rank handling).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True,
                 no_deprecation_warning: bool = False):
        where = "GaLoreAdamW"
        lr = _checks.real(where, "lr", lr, **_HYPER["lr"])
        betas = _checks.betas(where, betas)
        eps = _checks.real(where, "eps", eps, **_HYPER["eps"])
        weight_decay = _checks.real(where, "weight_decay", weight_decay, **_HYPER["weight_decay"])
        _checks.boolean(where, "correct_bias", correct_bias)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        correct_bias=correct_bias)
        self._warned_rank = False
        self._warned_nonfinite = False
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer.add_param_group``, refusing a parameter that is already in
        the optimizer (or twice in the group: its moments would be stepped twice), invalid
        hyperparameters or projection keys, and sharded (DTensor) matrices in a projected group."""
        where = "GaLoreAdamW"
        if isinstance(param_group, dict) and "rank" in param_group:
            for k, v in _GROUP_DEFAULTS.items():
                param_group.setdefault(k, v)
        _checks.add_param_group(where, self, param_group, super().add_param_group, **_HYPER)
        try:
            group = self.param_groups[-1]
            _check_projection(where, f"param_groups[{len(self.param_groups) - 1}]", group)
            if "rank" in group:
                sharded = [p for p in group["params"] if isinstance(p, DTensor) and p.dim() == 2]
                if sharded:
                    raise _sharded_projection_error(sharded[0].shape)
        except Exception:
            self.param_groups.pop()
            raise

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_warned_rank", False)
        self.__dict__.setdefault("_warned_nonfinite", False)

    # -- refresh -----------------------------------------------------------------------------------

    def _param_seed(self, group, index: int, step: int, shape) -> int:
        h = (int(group["seed"]) * 1_000_003 + index) * 1_000_033 + step
        h = h * 1_000_037 + shape[0] * 65_537 + shape[1]
        return h % (2**63 - 1)

    def _refresh(self, group, p, grad, state, side, rank, index):
        if not bool(torch.isfinite(grad).all()):
            if not self._warned_nonfinite:
                self._warned_nonfinite = True
                warnings.warn(
                    "GaLoreAdamW: non-finite gradient on a projector refresh step; the refresh and "
                    "this parameter's update were skipped (basis, moments and step count kept; the "
                    "refresh is retried on the next step). Warned once per optimizer.",
                    RuntimeWarning, stacklevel=3)
            return None
        logger.debug("GaLoreAdamW: projector refresh of parameter %d %s (rank %d, %s, %s side)",
                     index, tuple(grad.shape), rank, group["projector"], side)
        if group["projector"] == "svd":
            return svd_basis(grad, rank, side)
        gen = torch.Generator(device=grad.device)
        gen.manual_seed(self._param_seed(group, index, state.get("step", 0), grad.shape))
        return randomized_basis(grad, rank, side, state.get("proj_left"), state.get("proj_right"),
                                oversample=group["oversample"], power_iters=int(group["power_iters"]),
                                warm_power_iters=int(group["warm_power_iters"]), generator=gen)

    # -- step --------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """One optimization step; ``closure`` (optional) re-evaluates the model, returns the loss.

        Everything is checked before any parameter is written: the group hyperparameters and
        projection keys, every gradient (dtype, shape, device) and the state it meets; and on a
        refresh step all new bases are computed before the first update. So an invalid value or
        a failing SVD raises with the parameters, moments and bases as they were.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        where = "GaLoreAdamW.step"
        self._validate(where)

        # Pass 1: per parameter, its side and rank, and on refresh steps its new basis (computed
        # here, installed in pass 2 with the update). Nothing is written yet.
        work: list[list[tuple]] = []
        index = -1
        for group in self.param_groups:
            items = []
            proj = "rank" in group
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                state = self.state[p]
                step = state.setdefault("step", 0)
                if not (proj and p.dim() == 2):
                    items.append((p, None))
                    continue
                side = _side(group["proj_type"], p.shape)
                rank = min(int(group["rank"]), p.shape[0], p.shape[1])
                if rank < group["rank"] and not self._warned_rank:
                    self._warned_rank = True
                    warnings.warn(
                        f"GaLoreAdamW: rank {group['rank']} is larger than min(m, n) = {rank} for "
                        f"a parameter of shape {tuple(p.shape)}; as galore_torch, its projection "
                        f"uses {rank} basis vectors (a full-rank rotation). Warned once per "
                        "optimizer.", UserWarning, stacklevel=2)
                left, right = state.get("proj_left"), state.get("proj_right")
                have = (left is not None) if side == "left" else (right is not None) \
                    if side == "right" else (left is not None and right is not None)
                refreshed = False
                if not have or step % group["update_proj_gap"] == 0:
                    pending = self._refresh(group, p, p.grad, state, side, rank, index)
                    if pending is None:   # non-finite gradient: skip this parameter
                        continue
                    left, right = pending
                    refreshed = True
                items.append((p, (side, left, right, refreshed)))
            work.append(items)

        # Pass 2: the updates, group by group.
        for group, items in zip(self.param_groups, work):
            self._apply_group(group, items)
        return loss

    def _validate(self, where: str) -> None:
        """Every check of :meth:`step` that can fail, before anything is written."""
        _check_all_groups(where, self.param_groups)
        index = -1
        for group in self.param_groups:
            proj = "rank" in group
            for p in group["params"]:
                index += 1
                grad = p.grad
                if grad is None:
                    continue
                label = f"parameter {index} (shape {list(p.shape)})"
                if grad.is_sparse:
                    raise RuntimeError("GaLoreAdamW does not support sparse gradients")
                if isinstance(p, DTensor) and (
                        not isinstance(grad, DTensor) or grad.placements != p.placements):
                    raise RuntimeError(
                        f"GaLoreAdamW: the gradient of a DTensor parameter (placements "
                        f"{p.placements}) must be a DTensor with the same placements, got "
                        f"{getattr(grad, 'placements', type(grad).__name__)}")
                if p.dtype not in _FLOAT_DTYPES:
                    raise TypeError(f"{where}: {label} has dtype {p.dtype}; supported: float32, "
                                    "float64, float16, bfloat16")
                if grad.dtype != p.dtype or grad.shape != p.shape or grad.device != p.device \
                        or grad.layout != torch.strided:
                    raise ValueError(f"{where}: the gradient of {label} has dtype {grad.dtype}, "
                                     f"shape {list(grad.shape)}, device {grad.device}, layout "
                                     f"{grad.layout}; it must match the parameter ({p.dtype}, "
                                     f"{p.device}, dense)")
                local = p.to_local() if isinstance(p, DTensor) else p
                projected = proj and p.dim() == 2
                if not projected and not local.is_contiguous():
                    raise ValueError(f"{where}: {label} is not contiguous (strides "
                                     f"{list(local.stride())}); the fused AdamW update needs "
                                     "contiguous parameters")
                state = self.state.get(p)
                if state:
                    self._check_live_state(where, label, local, state, projected)

    @staticmethod
    def _check_live_state(where: str, label: str, p: torch.Tensor, state: dict,
                          projected: bool) -> None:
        """The state a parameter meets in a step: on its device, moments in the moment dtype
        (of the parameter's shape for plain AdamW), bases in the parameter dtype."""
        step = state.get("step", 0)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{where}: the state of {label} has step {step!r}; it must be an "
                             "int >= 0")
        md = _adamw.moment_dtype(p.dtype)
        for name in ("exp_avg", "exp_avg_sq", "proj_left", "proj_right"):
            t = state.get(name)
            if t is None:
                continue
            want = md if name.startswith("exp") else p.dtype
            if not isinstance(t, torch.Tensor) or t.device != p.device or t.dtype != want \
                    or (name.startswith("exp") and not projected and t.shape != p.shape):
                raise ValueError(
                    f"{where}: the state of {label} has {name} = "
                    f"{_describe_tensor(t)}; expected a {want} tensor on {p.device}"
                    + ("" if projected or not name.startswith("exp") else
                       f" of shape {list(p.shape)}")
                    + " (was the model moved or converted after the optimizer was built? "
                      "save the state dict and load it again)")

    def _apply_group(self, group: dict, items: list) -> None:
        beta1, beta2 = group["betas"]
        lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
        # low-rank (projected) and plain parameters of this group
        lr_p, lr_g, lr_m, lr_v, lr_n, lr_steps, lr_pending = [], [], [], [], [], [], []
        pl_p, pl_g, pl_m, pl_v, pl_steps, pl_states = [], [], [], [], [], []
        pending_numel = 0

        def flush():
            """Projected parameters so far: fused moment update -> N, then one GEMM each."""
            _adamw.fused_adam_direction(lr_g, lr_m, lr_v, lr_n, beta1=beta1, beta2=beta2,
                                        eps=eps, step=lr_steps, bias_correction=False)
            for p, N, s, (side, left, right, refreshed) in zip(lr_p, lr_n, lr_steps, lr_pending):
                state = self.state[p]
                if refreshed:
                    if left is not None:
                        state["proj_left"] = left
                    if right is not None:
                        state["proj_right"] = right
                state["step"] = s
                step_size = self._step_size(group, lr, beta1, beta2, s)
                decay = 1.0 - lr * wd
                alpha = -step_size * float(group["scale"]) * decay
                if side == "left":
                    p.addmm_(left, N, beta=decay, alpha=alpha)
                elif side == "right":
                    p.addmm_(N, right, beta=decay, alpha=alpha)
                else:
                    p.addmm_(torch.mm(left, N), right, beta=decay, alpha=alpha)
            for lst in (lr_p, lr_g, lr_m, lr_v, lr_n, lr_steps, lr_pending):
                lst.clear()

        for p, plan in items:
            grad = p.grad
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0
            if plan is not None:
                side, left, right, _ = plan
                if side == "left":
                    R = torch.mm(left.t(), grad)
                elif side == "right":
                    R = torch.mm(grad, right.t())
                else:
                    R = torch.mm(torch.mm(left.t(), grad), right.t())
                if "exp_avg" not in state or state["exp_avg"].shape != R.shape:
                    state["exp_avg"] = _adamw.zeros_moment(R)
                    state["exp_avg_sq"] = _adamw.zeros_moment(R)
                lr_p.append(p)
                lr_g.append(R)
                lr_m.append(state["exp_avg"])
                lr_v.append(state["exp_avg_sq"])
                lr_n.append(torch.empty_like(R))
                lr_steps.append(state["step"] + 1)
                lr_pending.append(plan)
                pending_numel += R.numel()
                if pending_numel >= _FLUSH_NUMEL:  # bound the projected-gradient temporaries
                    flush()
                    pending_numel = 0
            else:
                if isinstance(p, DTensor):
                    # AdamW is elementwise: exact on the local shard (FSDP2 shards the gradient
                    # as the parameter), and the moments are local too.
                    p, grad = p.to_local(), grad.to_local()
                if "exp_avg" not in state:
                    state["exp_avg"] = _adamw.zeros_moment(p)
                    state["exp_avg_sq"] = _adamw.zeros_moment(p)
                pl_states.append(state)
                pl_p.append(p)
                pl_g.append(grad if grad.is_contiguous() else grad.contiguous())
                pl_m.append(state["exp_avg"])
                pl_v.append(state["exp_avg_sq"])
                pl_steps.append(state["step"] + 1)

        flush()

        # Plain parameters: galore_torch's AdamW (eps before bias correction, decay after).
        buckets: dict[int, list[int]] = {}
        for k, s in enumerate(pl_steps):
            buckets.setdefault(s, []).append(k)
        for s, idx in buckets.items():
            step_size = self._step_size(group, lr, beta1, beta2, s)
            decay = 1.0 - lr * wd
            # (p - step_size*N) * decay == p*decay - (step_size*decay)*N: the fused op's
            # p *= 1 - lr'*wd'; p -= lr'*N with lr' = step_size*decay, wd' = (1 - decay)/lr'.
            fused = wd == 0.0 or (step_size * decay != 0.0 and decay > 0.0)
            lr1 = step_size * decay if fused else step_size
            wd1 = 0.0 if (wd == 0.0 or not fused) else (1.0 - decay) / lr1
            _adamw.fused_adamw([pl_p[k] for k in idx], [pl_g[k] for k in idx],
                               [pl_m[k] for k in idx], [pl_v[k] for k in idx], lr=lr1,
                               beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd1, step=s,
                               bias_correction=False)
            for k in idx:
                if not fused:
                    pl_p[k].add_(pl_p[k], alpha=-lr * wd)
                pl_states[k]["step"] = s

    @staticmethod
    def _step_size(group, lr, beta1, beta2, step):
        if group["correct_bias"]:
            return lr * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)
        return lr

    # -- state dict --------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, checked first, with the state in the
        dtypes a step uses.

        Checked before anything changes: the group count and sizes; every group's
        hyperparameters and projection keys (a state dict of ``torch.optim.AdamW`` lacks
        ``correct_bias`` and is refused; a group saved with ``rank`` cannot be loaded into one
        without, or the reverse); and every parameter's state: only ``step``, ``exp_avg``,
        ``exp_avg_sq``, ``proj_left``, ``proj_right``, of the shapes the saved group's rank and
        proj_type give for the parameter. On a mismatch nothing is loaded.

        Moments are put in the moment dtype (float32; float64 for float64 parameters) and bases
        in the parameter dtype, on the parameter's device (torch would cast float32 moments to a
        bfloat16 parameter's dtype).
        """
        where = "GaLoreAdamW.load_state_dict"
        id_map = self._check_state_dict(where, state_dict)
        # the saved tensors themselves: torch's loader casts them to the parameter dtype first
        saved = {id_map[k]: {name: v for name, v in st.items() if torch.is_tensor(v)}
                 for k, st in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        for p, tensors in saved.items():
            state = self.state[p]
            local = p.to_local() if isinstance(p, DTensor) else p
            state["step"] = int(_plain_number(state.get("step", 0)))
            for name, v in tensors.items():
                if name == "step":
                    continue
                dtype = _adamw.moment_dtype(local.dtype) if name.startswith("exp") \
                    else local.dtype
                state[name] = v.to(device=local.device, dtype=dtype)

    def _check_state_dict(self, where: str, state_dict) -> dict:
        """Every check of :meth:`load_state_dict`; raises on a mismatch, changes nothing.
        Returns ``{saved id: parameter}``."""
        id_map = _checks.check_state_dict(where, state_dict, self.param_groups,
                                          group_keys=_GROUP_KEYS, **_HYPER)
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            label = f"state_dict['param_groups'][{i}]"
            if ("rank" in saved) != ("rank" in group):
                raise ValueError(f"{where}: {label} is {'' if 'rank' in saved else 'not '}"
                                 f"projected (has 'rank') but the optimizer's param_groups[{i}] is "
                                 f"{'' if 'rank' in group else 'not'}")
            _check_projection(where, label, {**_GROUP_DEFAULTS, **saved} if "rank" in saved
                              else saved)
            for pid, p in zip(saved["params"], group["params"]):
                if pid in saved_state:
                    self._check_saved_state(where, pid, p, saved_state[pid],
                                            saved if "rank" in saved else None)
        return id_map

    @staticmethod
    def _check_saved_state(where: str, pid, p: torch.Tensor, st: dict, proj: dict | None) -> None:
        label = f"state_dict['state'][{pid!r}] (parameter of shape {list(p.shape)})"
        extra = sorted(set(map(str, st)) - {"step", "exp_avg", "exp_avg_sq", "proj_left",
                                             "proj_right"})
        if extra:
            raise ValueError(f"{where}: {label} has entries {extra} that GaLoreAdamW does not "
                             "keep; it was saved by another optimizer")
        if "step" in st:
            _checks.integer(where, f"{label}['step']", _plain_number(st["step"]), low=0)
        if ("exp_avg" in st) != ("exp_avg_sq" in st):
            raise ValueError(f"{where}: {label} has only one of exp_avg and exp_avg_sq")
        local = p.to_local() if isinstance(p, DTensor) else p
        if proj is None or p.dim() != 2:
            for name in ("proj_left", "proj_right"):
                if name in st:
                    raise ValueError(f"{where}: {label} has {name}, but the parameter is not "
                                     "projected (its group has no 'rank', or it is not 2-D)")
            for name in ("exp_avg", "exp_avg_sq"):
                if name in st:
                    _checks.state_tensor(where, f"{label}[{name!r}]", st[name], local.shape)
            return
        m, n = p.shape
        side = _side(proj["proj_type"], p.shape)
        r = min(int(proj["rank"]), m, n)
        wanted = {"proj_left": (m, r) if side in ("left", "full") else None,
                  "proj_right": (r, n) if side in ("right", "full") else None}
        for name, shape in wanted.items():
            if name in st:
                if shape is None:
                    raise ValueError(f"{where}: {label} has {name}, but proj_type "
                                     f"{proj['proj_type']!r} projects this shape on the {side}")
                _checks.state_tensor(where, f"{label}[{name!r}]", st[name], shape)
        moment = {"left": (r, n), "right": (m, r), "full": (r, r)}[side]
        for name in ("exp_avg", "exp_avg_sq"):
            if name in st:
                _checks.state_tensor(where, f"{label}[{name!r}]", st[name], moment)


def _plain_number(value):
    """A one-element tensor as a Python number (torch optimizers keep ``step`` as a tensor)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
        return int(value) if float(value).is_integer() else value
    return value


# --- layerwise ------------------------------------------------------------------------------------

class _MergedState(MutableMapping):
    """``param -> state dict`` over the per-parameter optimizers (live view)."""

    def __init__(self, owner: "Layerwise"):
        self._owner = owner

    def _opt(self, p):
        try:
            return self._owner._optimizer_of[p]
        except KeyError:
            raise KeyError(p) from None

    def __getitem__(self, p):
        opt = self._opt(p)
        if p not in opt.state:
            raise KeyError(p)
        return opt.state[p]

    def __setitem__(self, p, value):
        self._opt(p).state[p] = value

    def __delitem__(self, p):
        del self._opt(p).state[p]

    def __iter__(self) -> Iterator:
        for opt in self._owner.optimizers:
            yield from list(opt.state.keys())

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._owner.optimizers)


class _EndOfBackward:
    """The callback queued on a backward pass: runs :meth:`Layerwise._end_of_backward` when the
    pass completes. When a pass raises, autograd drops its queued callbacks without running them;
    this object is then freed uncalled, and its finalizer tells the optimizer."""

    def __init__(self, owner: "Layerwise"):
        self._owner = owner
        self._done = [False]
        weakref.finalize(self, _EndOfBackward._dropped, owner, self._done)

    def __call__(self) -> None:
        self._done[0] = True
        self._owner._end_of_backward()

    @staticmethod
    def _dropped(owner: "Layerwise", done: list) -> None:
        if not done[0]:
            owner._backward_failed()


class Layerwise(torch.optim.Optimizer):
    """Per-parameter optimizers stepped during backward; built by :func:`layerwise`.

    It is a ``torch.optim.Optimizer`` whose ``param_groups`` are the inner optimizers' groups
    (the same dicts), so a torch LR scheduler built on it drives every inner optimizer, and whose
    ``state`` is a live view of the inner states (``del lw.state[p]`` frees ``p``'s state).
    ``step()`` updates nothing (the hooks do); it is there so schedulers and training loops can
    call it. Attributes: ``optimizers`` (in parameter order), ``schedulers`` (when
    ``make_scheduler`` was given), ``accumulation_steps``, ``num_steps`` (optimizer steps done),
    ``failed_backwards`` (backward passes that raised, see below).

    A backward pass that raises (out of memory, an error in a hook or in an inner optimizer's
    step) is noticed as soon as autograd drops it: the gradients accumulated in its window are
    dropped and the window restarts, with a warning, so the next backward pass trains normally.
    Parameters already stepped during the failed pass (possible in the last micro-batch of a
    window, where each parameter steps as soon as its gradient is complete) keep their update.
    """

    def __init__(self, params, make_optimizer: Callable[[torch.nn.Parameter], torch.optim.Optimizer],
                 accumulation_steps: int = 1, make_scheduler: Callable | None = None):
        where = "layerwise"
        accumulation_steps = _checks.integer(where, "accumulation_steps", accumulation_steps,
                                             low=1)
        if not callable(make_optimizer):
            raise TypeError(f"{where}: make_optimizer must be callable, got "
                            f"{type(make_optimizer).__name__}")
        if make_scheduler is not None and not callable(make_scheduler):
            raise TypeError(f"{where}: make_scheduler must be callable or None, got "
                            f"{type(make_scheduler).__name__}")
        if isinstance(params, torch.nn.Module):
            params = [p for p in params.parameters() if p.requires_grad]
        elif isinstance(params, torch.Tensor):
            params = [params]
        else:
            params = list(params)
        if not params:
            raise ValueError(f"{where}: no parameters given")
        seen: dict = {}
        for k, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{where}: params[{k}] is {type(p).__name__}, not a tensor")
            if not (p.is_leaf and p.requires_grad):
                raise ValueError(f"{where}: params[{k}] (shape {list(p.shape)}) must be a leaf "
                                 "tensor with requires_grad=True (its gradient hook steps it)")
            if id(p) in seen:
                raise ValueError(f"{where}: params[{k}] (shape {list(p.shape)}) is the same "
                                 f"tensor as params[{seen[id(p)]}]; pass each parameter once")
            seen[id(p)] = k
        self.params = list(params)
        self.accumulation_steps = accumulation_steps
        self.optimizers: list[torch.optim.Optimizer] = []
        self._optimizer_of: dict = {}
        self.schedulers: list | None = [] if make_scheduler is not None else None
        self._scheduler_of: dict = {}
        for p in self.params:
            opt = make_optimizer(p)
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"{where}: make_optimizer must return a torch.optim.Optimizer, "
                                f"got {type(opt).__name__}")
            owned = [q for g in opt.param_groups for q in g["params"]]
            if len(owned) != 1 or owned[0] is not p:
                raise ValueError(f"{where}: make_optimizer(p) must return an optimizer over "
                                 "exactly [p]")
            self.optimizers.append(opt)
            self._optimizer_of[p] = opt
            if make_scheduler is not None:
                sched = make_scheduler(opt)
                if not (callable(getattr(sched, "step", None))
                        and callable(getattr(sched, "state_dict", None))):
                    raise TypeError(f"{where}: make_scheduler must return an LR scheduler (with "
                                    f"step() and state_dict()), got {type(sched).__name__}")
                self.schedulers.append(sched)
                self._scheduler_of[p] = sched
        # torch.optim.Optimizer plumbing (hooks, step patching), then share the inner groups.
        super().__init__([{"params": [p]} for p in self.params], {})
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]
        self.state = _MergedState(self)
        self.num_steps = 0
        self.failed_backwards = 0
        self._micro = 0              # completed backward passes in the current window
        self._in_backward = False
        self._stepped_in_pass = 0    # parameters stepped during the current backward pass
        self._pending: set = set()   # params with a gradient accumulated in this window
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]

    # -- hooks -------------------------------------------------------------------------------------

    def _hook(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        if not self._in_backward:
            self._in_backward = True
            self._stepped_in_pass = 0
            torch.autograd.Variable._execution_engine.queue_callback(_EndOfBackward(self))
        if self._micro + 1 == self.accumulation_steps:
            self._step_param(p)
            self._stepped_in_pass += 1
        else:
            self._pending.add(p)

    def _step_param(self, p: torch.Tensor) -> None:
        self._optimizer_of[p].step()
        p.grad = None
        self._pending.discard(p)
        sched = self._scheduler_of.get(p)
        if sched is not None:
            sched.step()

    def _end_of_backward(self) -> None:
        self._in_backward = False
        self._micro += 1
        if self._micro == self.accumulation_steps:
            # parameters that received gradients earlier in the window but none in its last
            # micro-batch are stepped now with what they accumulated
            for p in [q for q in self.params if q in self._pending]:
                self._step_param(p)
            self._micro = 0
            self.num_steps += 1

    def _backward_failed(self) -> None:
        """The backward pass whose end-of-backward callback was queued was dropped by autograd
        without running it: it raised. Drop the window's gradients and restart the window."""
        stepped = self._stepped_in_pass
        for p in self.params:
            p.grad = None
        self._pending.clear()
        self._micro = 0
        self._in_backward = False
        self._stepped_in_pass = 0
        self.failed_backwards += 1
        warnings.warn(
            "layerwise: a backward pass raised; the gradients accumulated in its window were "
            "dropped and the window restarts"
            + (f" ({stepped} parameter(s) had already been stepped during that pass and keep "
               "their update)" if stepped else ""), RuntimeWarning, stacklevel=2)

    # -- Optimizer API -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """Updates nothing (the parameters were stepped during backward); runs ``closure`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drops gradients accumulated in the current window (and restarts the window)."""
        for p in self.params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()
        self._pending.clear()
        self._micro = 0
        self._in_backward = False  # (in case a backward pass raised before its end)

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_handles", None) is not None:
            raise RuntimeError("Layerwise: add parameters by building a new layerwise optimizer")
        super().add_param_group(param_group)

    def remove_hooks(self) -> None:
        """Unregisters the gradient hooks (the parameters are no longer stepped during backward)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def optimizer_for(self, p: torch.Tensor) -> torch.optim.Optimizer:
        return self._optimizer_of[p]

    def scheduler_for(self, p: torch.Tensor):
        return self._scheduler_of.get(p)

    def state_dict(self) -> dict:
        out = {"optimizers": [opt.state_dict() for opt in self.optimizers],
               "num_steps": self.num_steps, "micro": self._micro}
        if self.schedulers is not None:
            out["schedulers"] = [s.state_dict() for s in self.schedulers]
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads what :meth:`state_dict` saved. The structure, counts and counters are checked
        first, and an inner optimizer that refuses its state (e.g. a :class:`GaLoreAdamW` whose
        saved shapes differ) makes every inner optimizer and scheduler go back to the state it
        had: on failure nothing changes."""
        where = "Layerwise.load_state_dict"
        if not isinstance(state_dict, Mapping) or "optimizers" not in state_dict:
            raise ValueError(f"{where}: expected the dict of Layerwise.state_dict() (with "
                             "'optimizers'), got "
                             + (f"keys {sorted(map(str, state_dict))}"
                                if isinstance(state_dict, Mapping) else type(state_dict).__name__))
        opts = state_dict["optimizers"]
        if not isinstance(opts, (list, tuple)) or not all(isinstance(o, Mapping) for o in opts):
            raise TypeError(f"{where}: state_dict['optimizers'] must be a list of optimizer "
                            "state dicts")
        if len(opts) != len(self.optimizers):
            raise ValueError(f"{where}: {len(opts)} optimizer states for "
                             f"{len(self.optimizers)} parameters")
        scheds = state_dict.get("schedulers")
        if self.schedulers is not None and scheds is not None:
            if not isinstance(scheds, (list, tuple)) or len(scheds) != len(self.schedulers) \
                    or not all(isinstance(d, Mapping) for d in scheds):
                raise ValueError(f"{where}: state_dict['schedulers'] must be a list of "
                                 f"{len(self.schedulers)} scheduler state dicts")
        num_steps = _checks.integer(where, "state_dict['num_steps']",
                                    state_dict.get("num_steps", 0), low=0)
        micro = _checks.integer(where, "state_dict['micro']", state_dict.get("micro", 0), low=0,
                                high=self.accumulation_steps - 1)
        for k, (opt, sd) in enumerate(zip(self.optimizers, opts)):
            if isinstance(opt, GaLoreAdamW):  # checked without loading
                opt._check_state_dict(f"{where}: optimizers[{k}]", sd)
        # load, undoing the loaded ones if one refuses (the old state dicts only reference the
        # old tensors, which loading replaces without writing to them)
        before = [opt.state_dict() for opt in self.optimizers]
        sched_before = [sch.state_dict() for sch in self.schedulers or []]
        done = 0
        try:
            for opt, sd in zip(self.optimizers, opts):
                opt.load_state_dict(sd)
                done += 1
            if self.schedulers is not None and scheds is not None:
                for sch, sd in zip(self.schedulers, scheds):
                    sch.load_state_dict(sd)
        except Exception:
            for opt, sd in zip(self.optimizers[:done], before):
                opt.load_state_dict(sd)
            for sch, sd in zip(self.schedulers or [], sched_before):
                sch.load_state_dict(sd)
            raise
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]
        self.num_steps = num_steps
        self._micro = micro

    def __repr__(self) -> str:
        return (f"Layerwise({len(self.optimizers)} per-parameter optimizers, "
                f"accumulation_steps={self.accumulation_steps})")


def layerwise(params_or_model, make_optimizer: Callable[[torch.nn.Parameter], torch.optim.Optimizer],
              accumulation_steps: int = 1, make_scheduler: Callable | None = None) -> Layerwise:
    """Steps one optimizer per parameter from ``register_post_accumulate_grad_hook``.

    ``make_optimizer(p)`` builds the optimizer of parameter ``p`` (e.g. a :class:`GaLoreAdamW`
    with a projected group for 2-D weights, a plain one otherwise). During ``loss.backward()`` each
    parameter is updated as soon as its gradient is complete and its gradient is freed right away,
    so the gradients of the whole model never coexist (GaLore's layerwise mode).

    Gradient accumulation: with ``accumulation_steps=k`` the parameters are stepped during the k-th
    backward pass of each window only, with the gradient summed over the window (scale the loss by
    1/k as usual); earlier backward passes just accumulate into ``.grad`` (those gradients do
    coexist: accumulation needs them). Backward passes are counted once each, at the end of the
    pass, not per parameter; a parameter that got gradients earlier in the window but none in its
    last backward pass is stepped at the end of that pass.

    LR schedulers, either (not both):

    * per optimizer: ``make_scheduler(opt)`` returns a scheduler for each inner optimizer; it is
      stepped right after that optimizer, once per optimizer step (so once per window, never per
      micro-batch); or
    * combined: the returned :class:`Layerwise` is a ``torch.optim.Optimizer`` whose
      ``param_groups`` are the inner groups, so ``sched = torch.optim.lr_scheduler.X(lw, ...)``
      works; call ``lw.step()`` (a no-op) and ``sched.step()`` once per window after the last
      backward, as in a normal training loop.

    Accepts a model (its parameters with ``requires_grad``) or an iterable of parameters.
    """
    return Layerwise(params_or_model, make_optimizer, accumulation_steps, make_scheduler)
