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
  with ``torch.load(weights_only=True)``, and ``load_state_dict`` keeps the saved dtypes (torch
  would cast float32 moments to a bfloat16 parameter's dtype). Deleting ``optimizer.state[p]``
  frees everything the optimizer holds for ``p``; the parameter then starts afresh (step 0,
  refresh at its next step).

Distributed: under DistributedDataParallel every rank refreshes the projector from the same
averaged gradient (the randomized projector is seeded per group ``seed``, parameter and step, not
by the global RNG), so the ranks stay identical. Under FSDP2 a sharded (DTensor) parameter in a
projected group is refused when the optimizer is built (projecting each shard on its own basis is
a different algorithm); groups without ``rank`` run AdamW on the local shards.

Layerwise training (:func:`layerwise`) steps one optimizer per parameter from
``register_post_accumulate_grad_hook`` and frees each gradient as soon as it has been used.
"""
from __future__ import annotations

import logging
import math
import warnings
from collections.abc import MutableMapping
from typing import Callable, Iterable, Iterator

import torch

from . import _adamw

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
    U, _, Vh = torch.linalg.svd(grad.float(), full_matrices=False)
    left = U[:, :rank].to(grad.dtype).contiguous() if side in ("left", "full") else None
    right = Vh[:rank].to(grad.dtype).contiguous() if side in ("right", "full") else None
    return left, right


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
    if side not in ("left", "right", "full"):
        raise ValueError(f"side must be 'left', 'right' or 'full', got {side!r}")
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

def _sharded_projection_error(shape) -> ValueError:
    return ValueError(
        f"GaLoreAdamW: a parameter of shape {tuple(shape)} in a projected group (one with 'rank') "
        "is a DTensor (sharded, e.g. by FSDP2's fully_shard). GaLore projects the gradient of the "
        "whole matrix: its top singular subspace cannot be computed from one shard, and projecting "
        "each shard on its own basis is a different algorithm, so this is not supported. Train "
        "the model under DistributedDataParallel, or put the parameter in a group without 'rank' "
        "(plain AdamW works on DTensors).")


def _check_group(group: dict) -> None:
    if "rank" not in group:
        return
    rank = group["rank"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"GaLoreAdamW: param group 'rank' must be an int >= 1, got {rank!r}")
    for k, v in _GROUP_DEFAULTS.items():
        group.setdefault(k, v)
    gap = group["update_proj_gap"]
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
        raise ValueError(f"GaLoreAdamW: param group 'update_proj_gap' must be an int >= 1, got {gap!r}")
    if group["proj_type"] not in PROJ_TYPES:
        raise ValueError(f"GaLoreAdamW: param group 'proj_type' must be one of {PROJ_TYPES}, "
                         f"got {group['proj_type']!r}")
    if group["projector"] not in PROJECTORS:
        raise ValueError(f"GaLoreAdamW: param group 'projector' must be one of {PROJECTORS}, "
                         f"got {group['projector']!r}")
    if not math.isfinite(float(group["scale"])):
        raise ValueError(f"GaLoreAdamW: param group 'scale' must be finite, got {group['scale']!r}")
    if group["oversample"] is not None and int(group["oversample"]) < 0:
        raise ValueError(f"GaLoreAdamW: param group 'oversample' must be >= 0, got {group['oversample']!r}")
    for k in ("power_iters", "warm_power_iters"):
        if int(group[k]) < 0:
            raise ValueError(f"GaLoreAdamW: param group {k!r} must be >= 0, got {group[k]!r}")


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
        if not lr >= 0.0:
            raise ValueError(f"GaLoreAdamW: invalid learning rate lr={lr}, must be >= 0")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"GaLoreAdamW: invalid betas[0]={betas[0]}, must be in [0, 1)")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"GaLoreAdamW: invalid betas[1]={betas[1]}, must be in [0, 1)")
        if not (eps >= 0.0 and math.isfinite(eps)):
            raise ValueError(f"GaLoreAdamW: invalid eps={eps}, must be finite and >= 0")
        if not math.isfinite(weight_decay):
            raise ValueError(f"GaLoreAdamW: invalid weight_decay={weight_decay}, must be finite")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        correct_bias=correct_bias)
        self._warned_rank = False
        self._warned_nonfinite = False
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        _check_group(param_group)
        super().add_param_group(param_group)
        if "rank" in param_group:
            sharded = [p for p in self.param_groups[-1]["params"]
                       if isinstance(p, DTensor) and p.dim() == 2]
            if sharded:
                self.param_groups.pop()
                raise _sharded_projection_error(sharded[0].shape)

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
        gen.manual_seed(self._param_seed(group, index, state["step"], grad.shape))
        return randomized_basis(grad, rank, side, state.get("proj_left"), state.get("proj_right"),
                                oversample=group["oversample"], power_iters=int(group["power_iters"]),
                                warm_power_iters=int(group["warm_power_iters"]), generator=gen)

    # -- step --------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """One optimization step. ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Pass 1: validate every gradient before anything is written.
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError("GaLoreAdamW does not support sparse gradients")
                if isinstance(p, DTensor) and p.grad is not None and (
                        not isinstance(p.grad, DTensor) or p.grad.placements != p.placements):
                    raise RuntimeError(
                        f"GaLoreAdamW: the gradient of a DTensor parameter (placements "
                        f"{p.placements}) must be a DTensor with the same placements, got "
                        f"{getattr(p.grad, 'placements', type(p.grad).__name__)}")

        index = -1
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, eps = float(group["lr"]), float(group["weight_decay"]), float(group["eps"])
            proj = "rank" in group
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

            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                if proj and p.dim() == 2:
                    side = _side(group["proj_type"], p.shape)
                    rank = min(int(group["rank"]), p.shape[0], p.shape[1])
                    if rank < group["rank"] and not self._warned_rank:
                        self._warned_rank = True
                        warnings.warn(
                            f"GaLoreAdamW: rank {group['rank']} is larger than min(m, n) = {rank} for a "
                            f"parameter of shape {tuple(p.shape)}; as galore_torch, its projection uses "
                            f"{rank} basis vectors (a full-rank rotation). Warned once per optimizer.",
                            UserWarning, stacklevel=2)
                    left, right = state.get("proj_left"), state.get("proj_right")
                    pending = None
                    have = (left is not None) if side == "left" else (right is not None) if side == "right" \
                        else (left is not None and right is not None)
                    if not have or state["step"] % group["update_proj_gap"] == 0:
                        pending = self._refresh(group, p, grad, state, side, rank, index)
                        if pending is None:   # non-finite gradient: skip this parameter
                            continue
                        left, right = pending
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
                    lr_pending.append((side, left, right, pending is not None))
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
        return loss

    @staticmethod
    def _step_size(group, lr, beta1, beta2, step):
        if group["correct_bias"]:
            return lr * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)
        return lr

    # -- state dict --------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but tensors keep their saved dtype.

        (torch casts every floating state tensor to its parameter's dtype, which would turn the
        float32 moments of a bfloat16 parameter into bfloat16.) Tensors are moved to the
        parameter's device.
        """
        saved = {k: {name: v for name, v in s.items() if torch.is_tensor(v)}
                 for k, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for k, tensors in saved.items():
            p = params[int(k)]
            for name, v in tensors.items():
                if v.dtype != self.state[p][name].dtype:
                    self.state[p][name] = v.to(device=p.device)


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


class Layerwise(torch.optim.Optimizer):
    """Per-parameter optimizers stepped during backward; built by :func:`layerwise`.

    It is a ``torch.optim.Optimizer`` whose ``param_groups`` are the inner optimizers' groups
    (the same dicts), so a torch LR scheduler built on it drives every inner optimizer, and whose
    ``state`` is a live view of the inner states (``del lw.state[p]`` frees ``p``'s state).
    ``step()`` updates nothing (the hooks do); it is there so schedulers and training loops can
    call it. Attributes: ``optimizers`` (in parameter order), ``schedulers`` (when
    ``make_scheduler`` was given), ``accumulation_steps``, ``num_steps`` (optimizer steps done).
    """

    def __init__(self, params, make_optimizer: Callable[[torch.nn.Parameter], torch.optim.Optimizer],
                 accumulation_steps: int = 1, make_scheduler: Callable | None = None):
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) \
                or accumulation_steps < 1:
            raise ValueError(f"layerwise: accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
        if isinstance(params, torch.nn.Module):
            params = [p for p in params.parameters() if p.requires_grad]
        else:
            params = list(params)
        if not params:
            raise ValueError("layerwise: no parameters given")
        seen = set()
        self.params = []
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"layerwise: params must be tensors, got {type(p).__name__}")
            if p not in seen:
                seen.add(p)
                self.params.append(p)
        self.accumulation_steps = accumulation_steps
        self.optimizers: list[torch.optim.Optimizer] = []
        self._optimizer_of: dict = {}
        self.schedulers: list | None = [] if make_scheduler is not None else None
        self._scheduler_of: dict = {}
        for p in self.params:
            opt = make_optimizer(p)
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"layerwise: make_optimizer must return a torch.optim.Optimizer, "
                                f"got {type(opt).__name__}")
            owned = [q for g in opt.param_groups for q in g["params"]]
            if len(owned) != 1 or owned[0] is not p:
                raise ValueError("layerwise: make_optimizer(p) must return an optimizer over exactly [p]")
            self.optimizers.append(opt)
            self._optimizer_of[p] = opt
            if make_scheduler is not None:
                sched = make_scheduler(opt)
                self.schedulers.append(sched)
                self._scheduler_of[p] = sched
        # torch.optim.Optimizer plumbing (hooks, step patching), then share the inner groups.
        super().__init__([{"params": [p]} for p in self.params], {})
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]
        self.state = _MergedState(self)
        self.num_steps = 0
        self._micro = 0              # completed backward passes in the current window
        self._in_backward = False
        self._pending: set = set()   # params with a gradient accumulated in this window
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]

    # -- hooks -------------------------------------------------------------------------------------

    def _hook(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        if not self._in_backward:
            self._in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        if self._micro + 1 == self.accumulation_steps:
            self._step_param(p)
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
        opts = state_dict["optimizers"]
        if len(opts) != len(self.optimizers):
            raise ValueError(f"Layerwise.load_state_dict: {len(opts)} optimizer states for "
                             f"{len(self.optimizers)} parameters")
        for opt, sd in zip(self.optimizers, opts):
            opt.load_state_dict(sd)
        if self.schedulers is not None and "schedulers" in state_dict:
            for s, sd in zip(self.schedulers, state_dict["schedulers"]):
                s.load_state_dict(sd)
        self.num_steps = int(state_dict.get("num_steps", 0))
        self._micro = int(state_dict.get("micro", 0))

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
