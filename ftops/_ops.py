"""Loads the compiled kernels (`_C.so`), registers fake implementations, and wraps each op.

The ops themselves are declared in csrc/ops.cpp (``TORCH_LIBRARY(ftops, ...)``) and reachable as
``torch.ops.ftops.<name>``; the wrappers here only give them typed signatures and docstrings.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))


def _torch_minor(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def _load_library() -> None:
    lib = os.path.join(_HERE, "_C.so")
    if not os.path.exists(lib):
        raise ImportError(
            f"ftops: the compiled kernels ({lib}) are missing. This looks like a source checkout: "
            "install with `pip install --no-build-isolation .` (see README)."
        )
    from . import _build_info

    built, running = _build_info.TORCH_VERSION, torch.__version__
    if _torch_minor(built) != _torch_minor(running):
        raise ImportError(
            f"ftops was compiled against torch {built} but torch {running} is installed; the C++ "
            "ABI differs between torch minor versions. Reinstall ftops against this torch: "
            "`pip install --no-build-isolation --force-reinstall --no-deps ftops` (or from source)."
        )
    torch.ops.load_library(lib)


_load_library()


# --- fake (meta) implementations -----------------------------------------------------------------
#
# Besides shapes, each one checks that all tensors share one device. The dispatcher sends a call
# to the Meta kernel (these functions) as soon as one tensor of it is a meta tensor, so without
# this check a list mixing CPU (or CUDA) tensors with meta tensors would be accepted and update
# nothing.

def _one_device(op: str, **lists) -> None:
    first = None
    for name, tensors in lists.items():
        if isinstance(tensors, torch.Tensor):
            tensors, single = [tensors], True
        else:
            single = False
        for k, t in enumerate(tensors):
            label = name if single else f"{name}[{k}]"
            if first is None:
                first = (label, t.device)
            elif t.device != first[1]:
                raise RuntimeError(f"{op}: {label} is on {t.device} but {first[0]} is on "
                                   f"{first[1]}; all tensors must be on one device")


@torch.library.register_fake("ftops::zo_axpby_")
def _(params, seeds, ids, coeffs, decay, offsets=()):
    _one_device("ftops.zo_axpby_", params=params)
    return None


@torch.library.register_fake("ftops::zo_undo_axpby_")
def _(params, undo_seed, undo_coeffs, seeds, ids, coeffs, decay, invertible=False, offsets=()):
    _one_device("ftops.zo_undo_axpby_", params=params)
    return None


@torch.library.register_fake("ftops::zo_noise")
def _(like, seed, index, offset=0):
    return torch.empty(like.shape, dtype=torch.float32, device=like.device)


@torch.library.register_fake("ftops::zo_noise_bits")
def _(like, seed, index, offset=0):
    return torch.empty((like.numel(),), dtype=torch.int64, device=like.device)


@torch.library.register_fake("ftops::adamw_")
def _(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, step,
      maximize=False, bias_correction=True):
    _one_device("ftops.adamw_", params=params, grads=grads, exp_avgs=exp_avgs,
                exp_avg_sqs=exp_avg_sqs)
    return None


@torch.library.register_fake("ftops::adam_direction_")
def _(grads, exp_avgs, exp_avg_sqs, out, beta1, beta2, eps, step, bias_correction=True):
    _one_device("ftops.adam_direction_", grads=grads, exp_avgs=exp_avgs,
                exp_avg_sqs=exp_avg_sqs, out=out)
    return None


@torch.library.register_fake("ftops::sddmm")
def _(dy, x, rows, cols):
    _one_device("ftops.sddmm", dy=dy, x=x, rows=rows, cols=cols)
    torch._check(dy.dim() == 2 and x.dim() == 2, lambda: "ftops.sddmm: dy and x must be 2-D")
    torch._check(rows.dim() == 1 and cols.dim() == 1, lambda: "ftops.sddmm: rows/cols must be 1-D")
    return dy.new_empty((rows.shape[0],))


@torch.library.register_fake("ftops::sddmm_csr")
def _(dy, x, row_ptr, cols):
    _one_device("ftops.sddmm_csr", dy=dy, x=x, row_ptr=row_ptr, cols=cols)
    torch._check(dy.dim() == 2 and x.dim() == 2, lambda: "ftops.sddmm_csr: dy and x must be 2-D")
    torch._check(row_ptr.dim() == 1 and cols.dim() == 1,
                 lambda: "ftops.sddmm_csr: row_ptr/cols must be 1-D")
    return dy.new_empty((cols.shape[0],))


# --- typed wrappers --------------------------------------------------------------------------------

MAX_SEEDS_PER_CALL = 8  # csrc/common/zo_args.h: kMaxSeedsPerCall


def zo_axpby_(
    params: Sequence[torch.Tensor],
    seeds: Sequence[int],
    ids: Sequence[int],
    coeffs: Sequence[float],
    decay: Sequence[float],
    offsets: Sequence[int] | None = None,
) -> None:
    """In place, for every k: ``params[k] += sum_s coeffs[s*K + k] * z(seeds[s], ids[k]) - decay[k] * params[k]``.

    ``z(seed, id)`` is the counter-based normal noise (see :func:`zo_noise`). All tensors must be
    dense, contiguous, on one device, and float32/float64/float16/bfloat16; half types are
    computed in float32 and rounded once. One pass over all tensors; at most 8 seeds per call.
    ``offsets[k]`` (default all 0): ``params[k]`` holds elements ``[offsets[k], offsets[k] +
    numel)`` of a larger tensor, e.g. a shard, and gets exactly the noise and the rounding of
    those elements, bit for bit.
    """
    params, seeds, ids = list(params), list(seeds), list(ids)
    coeffs, decay = list(coeffs), list(decay)
    offsets = [] if offsets is None else [int(o) for o in offsets]
    op = "ftops.zo_axpby_"
    if not params:
        # Nothing to update, but the dispatcher cannot pick a kernel for an empty tensor list:
        # check the other arguments as the kernels would, then return.
        for name, arg in (("ids", ids), ("decay", decay), ("coeffs", coeffs), ("offsets", offsets)):
            if arg:
                raise RuntimeError(f"{op}: {name} has {len(arg)} entries but params is empty")
        if not 1 <= len(seeds) <= MAX_SEEDS_PER_CALL:
            raise RuntimeError(
                f"{op}: seeds must have 1 to {MAX_SEEDS_PER_CALL} entries, got {len(seeds)}"
            )
        return
    # A sparse tensor would send the whole call to a Sparse dispatch key that has no kernel
    # (NotImplementedError naming no argument): reject it here, before anything is written.
    for k, p in enumerate(params):
        if isinstance(p, torch.Tensor) and p.layout != torch.strided:
            raise RuntimeError(
                f"{op}: params[{k}] must be a dense (strided) tensor, got layout {p.layout}"
            )
    torch.ops.ftops.zo_axpby_(params, seeds, ids, coeffs, decay, offsets)


def zo_undo_axpby_(
    params: Sequence[torch.Tensor],
    undo_seed: int,
    undo_coeffs: Sequence[float],
    seeds: Sequence[int],
    ids: Sequence[int],
    coeffs: Sequence[float],
    decay: Sequence[float],
    invertible: bool = False,
    offsets: Sequence[int] | None = None,
) -> None:
    """Undo the previous perturbation exactly, then apply a :func:`zo_axpby_` step, in one pass.

    For every k, with ``a = undo_coeffs[k] * z(undo_seed, ids[k])``:

    1. ``t`` = the value that the perturbation ``F(t) = round_up_ties(t + a)`` maps to
       ``params[k]`` (``round_up_ties``: the exact sum rounded to nearest, ties toward +inf),
       i.e. the unperturbed value, bit for bit wherever F is injective; where rounding merged
       several values (a perturbation into a coarser binade, ``|a| >> |t|``) the simplest of
       them: +0 if 0 is one, else the one with the most trailing zero bits;
    2. ``params[k] = round(t + (sum_s coeffs[s*K + k] * z(seeds[s], ids[k]) - decay[k] * t))``,
       in float32 (float64 for float64), rounded once: to nearest even as :func:`zo_axpby_`, or,
       when ``invertible`` (a perturbation that a later call undoes), the exact sum of ``t`` and
       the float32 increment with ties toward +inf.

    ``undo_coeffs[k] = 0`` undoes nothing (t = params[k] as is). 0 to 8 ``seeds``; a seed equal to ``undo_seed`` reuses
    the undo noise, so undo-and-reperturb with the same seed costs one noise generation. Same
    tensor rules and ``offsets`` as :func:`zo_axpby_`. See csrc/common/zo_undo.h.
    """
    params, seeds, ids = list(params), list(seeds), list(ids)
    undo_coeffs, coeffs, decay = list(undo_coeffs), list(coeffs), list(decay)
    offsets = [] if offsets is None else [int(o) for o in offsets]
    op = "ftops.zo_undo_axpby_"
    if not params:
        for name, arg in (("undo_coeffs", undo_coeffs), ("ids", ids), ("decay", decay),
                          ("coeffs", coeffs), ("offsets", offsets)):
            if arg:
                raise RuntimeError(f"{op}: {name} has {len(arg)} entries but params is empty")
        if len(seeds) > MAX_SEEDS_PER_CALL:
            raise RuntimeError(
                f"{op}: seeds must have 0 to {MAX_SEEDS_PER_CALL} entries, got {len(seeds)}"
            )
        return
    for k, p in enumerate(params):
        if isinstance(p, torch.Tensor) and p.layout != torch.strided:
            raise RuntimeError(
                f"{op}: params[{k}] must be a dense (strided) tensor, got layout {p.layout}"
            )
    torch.ops.ftops.zo_undo_axpby_(params, int(undo_seed), undo_coeffs, seeds, ids, coeffs, decay,
                                   bool(invertible), offsets)


def zo_noise(like: torch.Tensor, seed: int, index: int, offset: int = 0) -> torch.Tensor:
    """The float32 noise ``z(seed, index)`` of elements ``[offset, offset + like.numel())``,
    shaped like ``like``, on its device."""
    return torch.ops.ftops.zo_noise(like, seed, index, offset)


def zo_noise_bits(like: torch.Tensor, seed: int, index: int, offset: int = 0) -> torch.Tensor:
    """The raw Philox uint32 words behind :func:`zo_noise`, flattened, as int64."""
    return torch.ops.ftops.zo_noise_bits(like, seed, index, offset)


def adamw_(
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
    step: int,
    maximize: bool = False,
    bias_correction: bool = True,
) -> None:
    """One fused ``torch.optim.AdamW`` step on lists of tensors, in place, in one pass.

    For every k (``g`` negated when ``maximize``)::

        p *= 1 - lr * weight_decay
        m  = beta1 * m + (1 - beta1) * g
        v  = beta2 * v + (1 - beta2) * g * g
        p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)

    with ``bc_i = 1 - beta_i ** step`` (1 when ``bias_correction`` is False); ``step`` is the count
    after incrementing (>= 1). ``params`` are float32/float64/float16/bfloat16, ``grads[k]`` has
    the dtype and shape of ``params[k]``, the moments ``exp_avgs[k]``/``exp_avg_sqs[k]`` are float32
    (float64 for float64 params). Math in float32 (float64 for float64), params rounded once.
    All tensors dense, contiguous, on one device; every argument is checked before anything is
    written. The lists must not be empty (use :func:`ftops._adamw.fused_adamw`, which skips
    empty lists and groups by device and step).
    """
    torch.ops.ftops.adamw_(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs),
                           float(lr), float(beta1), float(beta2), float(eps),
                           float(weight_decay), int(step), bool(maximize), bool(bias_correction))


def adam_direction_(
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    out: Sequence[torch.Tensor],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
    bias_correction: bool = True,
) -> None:
    """Updates the Adam moments in place and writes the normalized direction to ``out``.

    For every k::

        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        out = (m / (sqrt(v) / sqrt(bc2) + eps)) / bc1

    with ``bc_i = 1 - beta_i ** step`` (1 when ``bias_correction`` is False), so ``-lr * out`` is
    the torch.optim.Adam update. With ``bias_correction=False`` this is exactly galore_torch's
    ``N = m / (sqrt(v) + eps)``; GaLore then projects N back and applies it with
    ``step_size = lr * sqrt(bc2) / bc1`` (eps outside the bias correction) -- use that form to
    match galore_torch. ``grads`` are float32/float64/float16/bfloat16, moments float32 (float64
    for float64 grads), ``out[k]`` in the grad dtype or the moment dtype, all the same shape, dense,
    contiguous, on one device; everything is checked before anything is written.
    """
    torch.ops.ftops.adam_direction_(list(grads), list(exp_avgs), list(exp_avg_sqs), list(out),
                                    float(beta1), float(beta2), float(eps), int(step),
                                    bool(bias_correction))


def sddmm(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Sampled dense-dense matmul: ``out[k] = sum_t dy[t, rows[k]] * x[t, cols[k]]``.

    ``dy`` is (T, m) and ``x`` is (T, n), one float dtype (float32/float64/float16/bfloat16), any
    strides; ``rows`` and ``cols`` are 1-D index vectors of one dtype (int32 or int64) and equal
    length nnz, on the same device. Returns the nnz entries of ``dy.T @ x`` at ``(rows, cols)`` in
    ``dy``'s dtype, without forming the (m, n) product; sums accumulate in float32 (float64 for
    float64). Indices outside ``[0, m)`` / ``[0, n)`` raise. No autograd formula: this is the
    weight-gradient kernel that SaRA's backward calls.
    """
    return torch.ops.ftops.sddmm(dy, x, rows, cols)


def sddmm_csr(dy: torch.Tensor, x: torch.Tensor, row_ptr: torch.Tensor,
              cols: torch.Tensor) -> torch.Tensor:
    """:func:`sddmm` on a row-compressed index set: the outputs ``row_ptr[r] <= k < row_ptr[r+1]``
    belong to row ``r``, ``out[k] = sum_t dy[t, r] * x[t, cols[k]]``.

    ``row_ptr`` is int64 of length ``m + 1`` (``m = dy.shape[1]``), non-decreasing from 0 to
    ``nnz``; ``cols`` is int16, int32 or int64 of length nnz, in any order within a row. The CPU
    kernel checks the layout and raises on bad input; the CUDA kernel trusts it (it never
    synchronizes) and writes NaN for an output whose column lies outside ``[0, n)``: build the
    layout once, validated, as :class:`ftops.SaRA` does.
    """
    return torch.ops.ftops.sddmm_csr(dy, x, row_ptr, cols)
