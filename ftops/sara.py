"""SaRA: progressive sparse low-rank adaptation (Hu et al. 2024) with gradients only where it trains.

SaRA fine-tunes the entries of the pretrained weights whose magnitude is below a threshold (the
"ineffective" parameters), with a nuclear-norm penalty that keeps the learned sparse update low
rank, and re-selects the trainable set once, half way through training.

How ftops stores and trains it (per managed weight ``W`` of shape (m, n), or a conv kernel seen as
(out_channels, rest)):

* the trainable set in a row-compressed layout: ``row_ptr`` (m + 1, int64) and the column of each
  entry, int16 when n < 2**15 (int32, int64 beyond): 2 bytes per trainable entry instead of 4 or
  8 for flat indices. The flat row-major indices (:meth:`SaRA.indices`, :meth:`SaRA.delta`) are
  decoded from it when needed.
* ``values``: the trainable parameter (what the optimizer's ``param_groups`` hold), the *delta*
  from the pretrained weight at those positions, zero at the start; float32 for float16/bfloat16
  weights (a master copy: small updates of a half-precision delta would round away).
* ``W`` itself keeps the pretrained weights while the layer is managed (frozen,
  ``requires_grad=False``), like the base weights under LoRA: the module's forward (and the
  backward's input gradient) first writes ``W[indices] = W0[indices] + values`` in place (summed
  in the values' dtype, rounded once to W's dtype -- exactly what :func:`load` computes), runs the
  plain op, and writes the pretrained entries back, so no copy of the pretrained entries is kept
  between calls (only the layer's own, one layer at a time) and no dense ``W0 + scatter(values)``
  is built. :meth:`SaRA.merge` (or :meth:`SaRA.unwrap`) writes the update in for good and makes the
  model plain; :meth:`SaRA.delta` + :func:`load` reproduce the fine-tuned model bit for bit.
  Training the delta (rather than the absolute entries) also makes AdamW's weight decay pull
  towards the pretrained weights, and makes the nuclear norm act on the update, which is zero
  (rank 0) at the start.
* Adam moments sized like ``values`` (float32, float64 for float64 weights), updated by the shared
  fused AdamW kernel (``torch.ops.ftops.adamw_``) in one call for all weights.

Memory per trainable entry: 4 (values) + 8 (moments) + 2 (column) bytes, plus ``row_ptr`` (8
bytes per row): about LoRA's 12 bytes per trainable parameter, and no activations of its own.

Gradients: Linear layers run through an autograd function whose backward computes ``dL/dx`` as
usual and ``dL/dvalues = (dy^T x)[rows, cols]`` with the SDDMM kernel on the row-compressed set
(``ftops.sddmm_csr``, no synchronization on a GPU), so the dense (m, n) weight gradient is never
formed. Conv layers compute the dense weight gradient
(``aten.convolution_backward``), gather it at the indices and free it at once. No ``.grad`` is
ever kept for a managed weight; every other parameter of the model is frozen too (SaRA trains only
the selected entries; :func:`unwrap` restores the original ``requires_grad`` flags).

Nuclear norm: each step, one eligible matrix (a managed 2-D weight with min(m, n) > 64, picked
uniformly at random by the optimizer's own generator) contributes ``lambda_rank * ||D||_*`` where
``D`` is the sparse *delta* matrix: ``D[indices] = values``, zero elsewhere -- the paper's
``W ⊙ M`` for the trainable part of the weight when that part is parameterized as an update of
the pretrained weight. Its (sub)gradient ``U_r V_r^T`` (singular vectors of the nonzero singular
values; zero for ``D = 0``) gathered at the indices is added to ``values.grad`` inside
:meth:`SaRA.step`, before the Adam update, so it reaches the trainable values (in the reference
code the rank loss does not). The dense ``D`` and its SVD exist only during that step, for one
matrix.

Progressive reselection (``progressive_iter``): after that many steps the active set of every
weight becomes ``{|W_now| < threshold} ∩ current set`` (the current set is the initial one: the
reselection happens once). Entries that leave the set keep their trained value for good: it is
written into ``W`` then, and remembered (flat index and delta) as the frozen part of the delta. Adam state of the surviving entries is *carried*, not
reset: the moments are per-coordinate statistics of the same loss along the same coordinates, and
dropping other coordinates does not make them stale; resetting would restart the bias correction
and give every survivor an update of size ~lr in the first steps after the switch (a jolt in the
middle of training) for no benefit. The step counts are kept too.
"""
from __future__ import annotations

import logging
import math
import types
import warnings
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # a torch built without distributed
    DTensor, Shard = (), None

from . import _ops
from ._adamw import fused_adamw, moment_dtype

__all__ = ["SaRA", "load", "unwrap", "paper_lr", "values_dtype", "nuclear_norm_grad", "sddmm"]

sddmm = _ops.sddmm

logger = logging.getLogger(__name__)

_FLOAT_TYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ATTR = "_ftops_sara"
_IDX_KEY = ".sara_indices"
_VAL_KEY = ".sara_values"


def paper_lr(threshold: float) -> float:
    """The paper's learning-rate rule for a threshold: ``1e-3 * exp(-350 * threshold)``."""
    return 1e-3 * math.exp(-350.0 * threshold)


# --- autograd functions ----------------------------------------------------------------------------

class _Swapped:
    """``with _Swapped(mg):`` the managed weight holds ``W0 + values`` at the trainable entries
    (exactly as :func:`load` computes them), and the pretrained entries again afterwards, also
    when the body raises. Only this layer's pretrained entries are held meanwhile."""

    def __init__(self, mg: "_Managed"):
        self.mg = mg

    def __enter__(self):
        mg = self.mg
        with torch.no_grad():
            w = mg.weight.view(-1)
            self.flat = mg.flat_indices()
            self.keep = w[self.flat]
            w[self.flat] = (self.keep + mg.values.detach()).to(w.dtype)
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            self.mg.weight.view(-1)[self.flat] = self.keep
        del self.flat, self.keep
        return False


class _SparseLinear(torch.autograd.Function):
    """y = x (W0 + D)^T + b with D the sparse delta (the values at the trainable entries); grads
    for x, b and the values (SDDMM on the row-compressed set)."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, mg):
        ctx.save_for_backward(x, mg.row_ptr, mg.cols)
        ctx.mg = mg
        ctx.has_bias = bias is not None
        ctx.values_dtype = values.dtype
        with _Swapped(mg):
            return F.linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, row_ptr, cols = ctx.saved_tensors
        mg = ctx.mg
        weight = mg.weight
        m, n = weight.shape
        gx = gb = gv = None
        gy2 = gy.reshape(-1, m)
        if ctx.needs_input_grad[0]:
            with _Swapped(mg):
                gx = (gy2 @ weight.to(gy.dtype)).reshape(*gy.shape[:-1], n).to(x.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy2.sum(0)
        if ctx.needs_input_grad[3]:
            gv = _ops.sddmm_csr(gy2, x.reshape(-1, n).to(gy.dtype), row_ptr, cols)
            gv = gv.to(ctx.values_dtype)
        return gx, None, gb, gv, None


class _SparseConv(torch.autograd.Function):
    """torch.convolution with W0 + D; the weight gradient is computed dense, gathered at the
    trainable entries and freed at once."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, mg, stride, padding, dilation, groups):
        ctx.save_for_backward(x)
        ctx.mg = mg
        ctx.conf = (stride, padding, dilation, groups)
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        ctx.values_dtype = values.dtype
        zeros = [0] * len(stride)
        with _Swapped(mg):
            return torch.convolution(x, weight, bias, stride, padding, dilation, False, zeros,
                                     groups)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, = ctx.saved_tensors
        mg = ctx.mg
        weight = mg.weight
        stride, padding, dilation, groups = ctx.conf
        need_x, need_b, need_v = (ctx.needs_input_grad[0], ctx.needs_input_grad[2],
                                  ctx.needs_input_grad[3])
        if not (need_x or need_b or need_v):
            return (None,) * 9
        with _Swapped(mg):  # the input gradient needs the fine-tuned weight
            gx, gw, gb = torch.ops.aten.convolution_backward(
                gy, x, weight, ctx.bias_sizes, stride, padding, dilation, False,
                [0] * len(stride), groups, [need_x, need_v, need_b and ctx.bias_sizes is not None])
        gv = None
        if need_v:
            gv = gw.reshape(-1)[mg.flat_indices()].to(ctx.values_dtype)
        del gw  # the dense weight gradient lives only for this gather
        return gx, None, gb, gv, None, None, None, None, None


def _linear_forward(self, input):
    st = getattr(self, _ATTR)
    return _SparseLinear.apply(input, self.weight, self.bias, st.values, st)


def _conv_forward(self, input):
    st = getattr(self, _ATTR)
    d = len(self.kernel_size)
    unbatched = input.dim() == d + 1
    if unbatched:
        input = input.unsqueeze(0)
    if self.padding_mode != "zeros":
        input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        padding = [0] * d
    elif isinstance(self.padding, str):  # 'same' / 'valid': explicit symmetric padding
        if self.padding == "valid":
            padding = [0] * d
        else:
            pads = self._reversed_padding_repeated_twice  # (left, right) per dim, last dim first
            lefts = [pads[2 * (d - 1 - i)] for i in range(d)]
            rights = [pads[2 * (d - 1 - i) + 1] for i in range(d)]
            if lefts != rights:
                input = F.pad(input, pads)
                padding = [0] * d
            else:
                padding = lefts
    else:
        padding = list(self.padding)
    out = _SparseConv.apply(input, self.weight, self.bias, st.values, st,
                            list(self.stride), padding, list(self.dilation), self.groups)
    return out.squeeze(0) if unbatched else out


# --- per-weight bookkeeping ---------------------------------------------------------------------

class _Managed:
    """One SaRA-managed weight: the module, its weight (pretrained entries at the trainable
    positions while managed), the trainable set (row-compressed) and the trainable values."""

    def __init__(self, name, module, kind, indices, values, select_threshold, inclusive):
        self.name = name  # the weight's parameter name in the model, e.g. "layers.0.q.weight"
        self.module = module
        self.kind = kind  # "linear" or "conv"
        w = module.weight
        self.rows = w.shape[0]
        self.row_len = w.numel() // max(w.shape[0], 1)
        self.set_indices(indices)
        self.values = values
        self.select_threshold = select_threshold
        self.inclusive = inclusive  # fraction mode: |w| <= threshold stays selected
        self.frozen_indices = indices.new_empty((0,))  # entries dropped by reselection
        self.frozen_values = values.detach().new_empty((0,))

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    def set_indices(self, flat: torch.Tensor) -> None:
        """Store a sorted set of flat row-major indices in the row-compressed layout."""
        self.row_ptr, self.cols = _to_csr(flat, self.rows, self.row_len)

    def flat_indices(self) -> torch.Tensor:
        """The sorted flat row-major indices (int32 when the weight has < 2**31 entries), decoded
        from the row-compressed layout (a new tensor)."""
        return _from_csr(self.row_ptr, self.cols, self.row_len, self.weight.numel())

    def merge_(self) -> None:
        """W.flatten()[indices] += values for good (summed in the values' dtype, rounded once to
        W's dtype, as :func:`load` does); the values must not be applied again afterwards."""
        with torch.no_grad():
            w = self.weight
            flat = self.flat_indices()
            if isinstance(w, DTensor):  # sharded by FSDP2: this rank's rows
                w, pos, mine = _local_entries(w, flat)
                w[pos] = (w[pos] + self.values.detach()[mine]).to(w.dtype)
                return
            w = w.view(-1)
            w[flat] = (w[flat] + self.values.detach()).to(w.dtype)


def _col_dtype(row_len: int) -> torch.dtype:
    if row_len <= 2**15:
        return torch.int16
    return torch.int32 if row_len <= 2**31 else torch.int64


def _to_csr(flat: torch.Tensor, rows: int, row_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_ptr, cols) of sorted flat row-major indices of a (rows, row_len) matrix."""
    r = torch.div(flat, row_len, rounding_mode="floor")
    cols = (flat - r * row_len).to(_col_dtype(row_len))
    row_ptr = torch.zeros(rows + 1, dtype=torch.int64, device=flat.device)
    torch.cumsum(torch.bincount(r.long(), minlength=rows), 0, out=row_ptr[1:])
    return row_ptr, cols


def _from_csr(row_ptr: torch.Tensor, cols: torch.Tensor, row_len: int, numel: int) -> torch.Tensor:
    itype = _index_dtype(numel)
    rows = torch.repeat_interleave(torch.arange(row_ptr.numel() - 1, dtype=itype,
                                                device=cols.device),
                                   row_ptr.diff(), output_size=cols.numel())
    return rows * row_len + cols.to(itype)


def values_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the trainable delta values for a weight dtype: float32 for float16/bfloat16
    weights (a master copy of the delta, so that small updates are not lost to rounding), else the
    weight dtype."""
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype


# --- registration (for torch.distributed) ---------------------------------------------------------
# The values are registered on their module as the parameter ``sara_values``, so that
# ``model.parameters()`` yields exactly what the optimizer steps on: DistributedDataParallel's
# buckets cover what it finds there, and would not see values held only by the optimizer. They are
# left out of the module's ``state_dict`` (the weight already holds ``base + values``, and the
# values' state belongs to the optimizer's ``state_dict``), so model checkpoints keep the plain
# model's keys and load whatever the current size of the trainable set.

_VALUES_NAME = "sara_values"


def _drop_values_on_save(module, state_dict, prefix, local_metadata):
    state_dict.pop(prefix + _VALUES_NAME, None)


def _keep_values_on_load(module, state_dict, prefix, local_metadata, strict, missing_keys,
                         unexpected_keys, error_msgs):
    # not in a model state_dict: load the current values onto themselves (no "missing key")
    values = module._parameters.get(_VALUES_NAME)
    if values is not None:
        state_dict.setdefault(prefix + _VALUES_NAME, values.detach())


def _register_values(mg: "_Managed") -> None:
    mod = mg.module
    mod.register_parameter(_VALUES_NAME, mg.values)
    mg.hooks = [mod.register_state_dict_post_hook(_drop_values_on_save),
                mod.register_load_state_dict_pre_hook(_keep_values_on_load)]


def _unregister_values(mg: "_Managed") -> None:
    mg.module._parameters.pop(_VALUES_NAME, None)
    for h in getattr(mg, "hooks", ()):
        h.remove()
    mg.hooks = []


# --- FSDP2 ---------------------------------------------------------------------------------------
# Under fully_shard the managed weights are DTensors sharded by rows (Shard(0)); the values stay
# whole on every rank (not registered, or in fully_shard's ignored_params), SaRA averages their
# gradients itself, every rank takes the same AdamW step, and each rank writes base + values into
# its own rows of the weights. Exact: the same arithmetic as one process on the whole batch.

def _row_shard(w: "DTensor") -> tuple[torch.Tensor, int]:
    """(local shard, first global row) of a weight sharded by rows on a 1-D mesh."""
    if w.device_mesh.ndim != 1 or tuple(w.placements) != (Shard(0),):
        raise ValueError(f"ftops.SaRA: a managed weight is a DTensor with placements "
                         f"{tuple(w.placements)} on a {w.device_mesh.ndim}-D mesh; SaRA supports "
                         "weights sharded by rows (Shard(0), FSDP2's default) on a 1-D mesh")
    local = w.to_local()
    rows, ws = w.shape[0], w.device_mesh.size()
    chunk = -(-rows // ws)  # torch.chunk sizes, as FSDP2 shards
    start = min(w.device_mesh.get_local_rank() * chunk, rows)
    if local.shape[0] != max(0, min(rows - start, chunk)):
        raise ValueError("ftops.SaRA: unexpected row sharding of a managed weight "
                         f"({local.shape[0]} local rows of {rows})")
    return local, start


def _local_entries(w: "DTensor", indices: torch.Tensor):
    """(this rank's shard of w flattened, the local positions of those flat ``indices`` of the
    full w that fall in its rows, the mask of those indices)."""
    local, start = _row_shard(w)
    n = w.numel() // max(w.shape[0], 1)
    lo, hi = start * n, (start + local.shape[0]) * n
    mine = (indices >= lo) & (indices < hi)
    return local.view(-1), (indices[mine] - lo).long(), mine


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def _select(w: torch.Tensor, threshold: Optional[float], fraction: Optional[float]):
    """(sorted flat indices, the magnitude bound used for reselection, inclusive?)"""
    flat = w.detach().reshape(-1)
    itype = _index_dtype(flat.numel())
    if fraction is not None:
        k = max(1, int(round(fraction * flat.numel())))
        mag = flat.abs()
        if k >= flat.numel():
            idx = torch.arange(flat.numel(), device=flat.device)
        else:
            idx = torch.topk(mag, k, largest=False, sorted=False).indices.sort().values
        bound = mag[idx].max().item()
        del mag
        return idx.to(itype), bound, True
    idx = (flat.abs() < threshold).nonzero().squeeze(1)
    return idx.to(itype), threshold, False


def _resolve_modules(model: nn.Module, modules) -> list[tuple[str, nn.Module]]:
    named = list(model.named_modules())
    supported = [(n, m) for n, m in named if isinstance(m, (nn.Linear,) + _CONV_TYPES)]
    if modules is None:
        return supported
    if callable(modules):
        return [(n, m) for n, m in supported if modules(n, m)]
    if isinstance(modules, str):
        modules = [modules]
    by_name = dict(named)
    out = []
    for n in modules:
        if n not in by_name:
            raise ValueError(f"ftops.SaRA: modules names {n!r}, which is not a module of the model")
        m = by_name[n]
        if not isinstance(m, (nn.Linear,) + _CONV_TYPES):
            raise TypeError(f"ftops.SaRA: module {n!r} is a {type(m).__name__}; SaRA applies to "
                            "nn.Linear and nn.Conv1d/2d/3d weights")
        out.append((n, m))
    return out


# --- the optimizer ------------------------------------------------------------------------------

class SaRA(torch.optim.Optimizer):
    """SaRA fine-tuning of ``model``: AdamW on the smallest-magnitude entries of its weights.

    Args:
        model: the model to fine-tune, already on its device; it is modified in place (managed
            layers get a sparse-gradient forward, every parameter is frozen except the trainable
            values, which live in this optimizer).
        threshold: entries with ``|w| < threshold`` are trainable (one global threshold, as in the
            paper). Also the bound for progressive reselection, and the input of the lr rule.
        fraction: instead of the threshold, the smallest ``fraction`` of each weight's entries by
            magnitude, in (0, 1] (reselection then keeps ``|w|`` at most the largest selected
            magnitude of that weight); ``threshold`` then only feeds the ``lr=None`` rule.
        lr: learning rate; ``None`` uses the paper's rule ``1e-3 * exp(-350 * threshold)``.
        lambda_rank: weight of the nuclear-norm penalty on one random eligible delta matrix per
            step (0 disables it).
        progressive_iter: step count after which the trainable set is re-selected (once);
            ``None`` never.
        betas, eps, weight_decay: AdamW hyper-parameters (decoupled weight decay on the delta,
            i.e. towards the pretrained weights).
        modules: which layers: ``None`` for every ``nn.Linear`` and ``nn.Conv1d/2d/3d``, a
            callable ``(name, module) -> bool`` filtering those, or a list of module names.
        seed: seed of the generator that picks the nuclear-norm matrix each step.
        max_grad_norm: if set, ``step()`` first clips the values' gradients to this total norm
            (``torch.nn.utils.clip_grad_norm_``; before the nuclear-norm term is added). The
            values are not parameters of the model, so clipping ``model.parameters()`` (as
            ``transformers.Trainer``'s ``max_grad_norm`` does) does not reach them.
        register_values: register each weight's values on its module as the parameter
            ``sara_values`` (left out of the module's ``state_dict``), so that
            ``model.parameters()`` yields what the optimizer steps on and a
            ``DistributedDataParallel`` wrapper built afterwards averages their gradients.
            ``None`` (default): when ``torch.distributed`` is initialized.

    The training loop is unchanged: ``loss.backward(); opt.step(); opt.zero_grad()``.
    ``step()`` consumes the values' gradients (sets them to None), so a loop that clears
    gradients with ``model.zero_grad()`` (``transformers.Trainer`` does) cannot accumulate stale
    ones into the next step: the values are not model parameters.
    ``param_groups[0]["params"]`` are the trainable value vectors (one per managed weight, in
    :attr:`names` order). :meth:`delta` returns the exact sparse update, :func:`load` applies it
    to a fresh pretrained model, :meth:`merge` / :meth:`unwrap` (or :func:`unwrap`) writes the
    update into the weights and makes the model plain again. Until then the managed weights hold
    the pretrained values (the managed layers add the update in their forward), as the base
    weights do under LoRA: save the model's ``state_dict`` together with this optimizer's.
    """

    def __init__(self, model: nn.Module, threshold: Optional[float] = 2e-3,
                 fraction: Optional[float] = None, lr: Optional[float] = None,
                 lambda_rank: float = 5e-4, progressive_iter: Optional[int] = None,
                 betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                 eps: float = 1e-8,
                 modules: Union[None, Callable[[str, nn.Module], bool], Sequence[str]] = None,
                 seed: int = 0, max_grad_norm: Optional[float] = None,
                 register_values: Optional[bool] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"ftops.SaRA: model must be an nn.Module, got {type(model).__name__}")
        if fraction is not None:
            if (not isinstance(fraction, (int, float)) or isinstance(fraction, bool)
                    or not (0.0 < fraction <= 1.0)):
                raise ValueError(f"ftops.SaRA: fraction must be in (0, 1], got {fraction!r}")
        if threshold is not None or fraction is None:
            if (not isinstance(threshold, (int, float)) or isinstance(threshold, bool)
                    or not math.isfinite(threshold) or threshold <= 0):
                raise ValueError(f"ftops.SaRA: threshold must be a finite number > 0, got "
                                 f"{threshold!r}")
        if lr is None:
            lr = paper_lr(threshold if threshold is not None else 2e-3)
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"ftops.SaRA: lr must be a finite number >= 0, got {lr!r}")
        if not (math.isfinite(lambda_rank) and lambda_rank >= 0):
            raise ValueError(f"ftops.SaRA: lambda_rank must be finite and >= 0, got {lambda_rank!r}")
        if progressive_iter is not None and (not isinstance(progressive_iter, int)
                                             or progressive_iter < 1):
            raise ValueError(f"ftops.SaRA: progressive_iter must be an int >= 1 or None, got "
                             f"{progressive_iter!r}")
        b1, b2 = betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"ftops.SaRA: betas must be in [0, 1), got {betas!r}")
        if not (eps >= 0 and math.isfinite(eps)):
            raise ValueError(f"ftops.SaRA: eps must be finite and >= 0, got {eps!r}")
        if not math.isfinite(weight_decay):
            raise ValueError(f"ftops.SaRA: weight_decay must be finite, got {weight_decay!r}")
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float))
                                              and max_grad_norm > 0):
            raise ValueError(f"ftops.SaRA: max_grad_norm must be a number > 0 or None, got "
                             f"{max_grad_norm!r}")
        self.max_grad_norm = max_grad_norm

        candidates = _resolve_modules(model, modules)
        if not candidates:
            raise ValueError("ftops.SaRA: the model has no eligible layers (nn.Linear or "
                             "nn.Conv1d/2d/3d" + (" passing the modules filter" if modules is not
                                                   None else "") + ")")
        for mname, mod in candidates:
            if getattr(mod, _ATTR, None) is not None:
                raise ValueError(f"ftops.SaRA: module {mname!r} is already managed by a SaRA "
                                 "optimizer (unwrap it first)")
            if register_values is not False and hasattr(mod, _VALUES_NAME):
                raise ValueError(f"ftops.SaRA: module {mname!r} already has an attribute "
                                 f"{_VALUES_NAME!r} (SaRA registers the trainable values there)")
            w = mod.weight
            if not isinstance(w, torch.Tensor) or w.dtype not in _FLOAT_TYPES:
                raise TypeError(f"ftops.SaRA: {mname}.weight has dtype "
                                f"{getattr(w, 'dtype', type(w).__name__)}; SaRA needs float32, "
                                "float64, float16 or bfloat16 weights")
        # A weight shared with another module (tied embeddings) would get gradients through a
        # path SaRA does not see.
        uses: dict[int, int] = {}
        for _, p in model.named_parameters(remove_duplicate=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
        for mname, mod in candidates:
            if uses.get(id(mod.weight), 0) > 1:
                raise ValueError(f"ftops.SaRA: {mname}.weight is shared with another module (tied "
                                 "weights); exclude it with modules=")

        selected = []
        for mname, mod in candidates:
            idx, bound, inclusive = _select(mod.weight, None if fraction is not None else
                                            threshold, fraction)
            if idx.numel() > 0:
                selected.append((mname, mod, idx, bound, inclusive))
        if not selected:
            smallest = min(mod.weight.detach().abs().min().item() for _, mod in candidates)
            raise ValueError(f"ftops.SaRA: threshold={threshold} selects no weight entry in any of "
                             f"the {len(candidates)} eligible layers (the smallest |w| is "
                             f"{smallest:.3g}); raise the threshold or pass fraction=")

        # Nothing has been touched so far: now wrap.
        self._frozen_flags = {id(p): (p, p.requires_grad) for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        managed = []
        for mname, mod, idx, bound, inclusive in selected:
            if not mod.weight.is_contiguous():
                mod.weight.data = mod.weight.data.contiguous()
            w = mod.weight
            values = nn.Parameter(torch.zeros(idx.shape, dtype=values_dtype(w.dtype),
                                               device=w.device))
            kind = "linear" if isinstance(mod, nn.Linear) else "conv"
            mg = _Managed(mname + ".weight" if mname else "weight", mod, kind, idx, values,
                          bound, inclusive)
            setattr(mod, _ATTR, mg)
            mod.forward = types.MethodType(_linear_forward if kind == "linear" else _conv_forward,
                                           mod)
            managed.append(mg)
        self._managed = managed
        self._model = model
        self._gen = torch.Generator().manual_seed(int(seed))
        self._gen_synced = False
        defaults = dict(lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay,
                        lambda_rank=lambda_rank, progressive_iter=progressive_iter,
                        sara_step=0)
        super().__init__([mg.values for mg in managed], defaults)
        for mg in managed:
            self._init_state(mg)
        if register_values is None:
            register_values = dist.is_available() and dist.is_initialized()
        if register_values:
            for mg in managed:
                _register_values(mg)

    # -- info -----------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Names of the managed weights, in ``param_groups[0]["params"]`` order."""
        return [mg.name for mg in self._managed]

    def num_trainable(self) -> int:
        """The number of trainable entries now."""
        return sum(mg.values.numel() for mg in self._managed)

    def indices(self) -> dict[str, torch.Tensor]:
        """The active flat row-major indices of each managed weight, sorted (int32 when the weight
        has < 2**31 entries; decoded from the row-compressed layout, so new tensors)."""
        return {mg.name: mg.flat_indices() for mg in self._managed}

    def _init_state(self, mg: _Managed) -> None:
        st = self.state[mg.values]
        md = moment_dtype(mg.values.dtype)
        st["step"] = torch.tensor(0.0)
        st["exp_avg"] = torch.zeros(mg.values.shape, dtype=md, device=mg.values.device)
        st["exp_avg_sq"] = torch.zeros(mg.values.shape, dtype=md, device=mg.values.device)

    def _check_open(self) -> None:
        if self._managed is None:
            raise RuntimeError("ftops.SaRA: this optimizer was unwrapped; the model is plain again")

    # -- the step -------------------------------------------------------------------------------

    def _eligible_for_rank(self) -> list[_Managed]:
        return [mg for mg in self._managed
                if mg.weight.dim() == 2 and min(mg.weight.shape) > 64 and mg.values.numel() > 0]

    def _add_nuclear_grad(self, lam: float) -> Optional[str]:
        eligible = self._eligible_for_rank()
        if lam == 0 or not eligible:
            return None
        k = int(torch.randint(len(eligible), (1,), generator=self._gen).item())
        mg = eligible[k]
        g = nuclear_norm_grad(mg.values.detach(), mg.flat_indices(), tuple(mg.weight.shape))
        if g is not None:
            g.mul_(lam)
            if mg.values.grad is None:
                mg.values.grad = g.to(mg.values.dtype)
            else:
                mg.values.grad.add_(g.to(mg.values.dtype))
        return mg.name

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step on the trainable values (plus the nuclear-norm gradient); at
        ``progressive_iter`` the trainable set is re-selected."""
        self._check_open()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        if any(isinstance(mg.weight, DTensor) for mg in self._managed):
            self._average_grads_fsdp()
        if self.max_grad_norm is not None:
            grads = [mg.values for mg in self._managed if mg.values.grad is not None]
            if grads:
                torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm)
        self._sync_generator()
        self._last_rank_matrix = self._add_nuclear_grad(float(group["lambda_rank"]))
        params, grads, m1, m2, steps, touched = [], [], [], [], [], []
        for mg in self._managed:
            p = mg.values
            if p.grad is None or p.numel() == 0:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("ftops.SaRA: sparse gradients are not supported")
            st = self.state[p]
            params.append(p)
            grads.append(p.grad if p.grad.is_contiguous() else p.grad.contiguous())
            m1.append(st["exp_avg"])
            m2.append(st["exp_avg_sq"])
            steps.append(int(st["step"].item()) + 1)
            touched.append(mg)
        b1, b2 = group["betas"]
        fused_adamw(params, grads, m1, m2, lr=group["lr"], beta1=b1, beta2=b2, eps=group["eps"],
                    weight_decay=group["weight_decay"], step=steps)
        for mg, s in zip(touched, steps):
            self.state[mg.values]["step"].fill_(float(s))
        for mg in self._managed:
            mg.values.grad = None  # consumed; see the class docstring
        group["sara_step"] += 1
        pit = group["progressive_iter"]
        if pit is not None and group["sara_step"] == pit:
            self.reselect()
        return loss

    def _sync_generator(self) -> None:
        """Under torch.distributed, take rank 0's generator state once (and after a load): every
        rank then picks the same nuclear-norm matrix, whatever seed each was given."""
        if getattr(self, "_gen_synced", True) or not (dist.is_available() and dist.is_initialized()):
            return
        device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")
        buf = self._gen.get_state().to(device)
        dist.broadcast(buf, src=0)
        self._gen.set_state(buf.cpu())
        self._gen_synced = True

    def _average_grads_fsdp(self) -> None:
        """FSDP2 does not reduce the values (they are not sharded): average their gradients."""
        for mg in self._managed:
            if mg.module._parameters.get(_VALUES_NAME, mg.values) is not mg.values:
                raise ValueError(
                    f"ftops.SaRA: fully_shard sharded the values of {mg.name}; keep them whole: "
                    "fully_shard(..., ignored_params=set(opt.param_groups[0]['params'])), or "
                    "build SaRA with register_values=False")
        grads = [mg.values.grad for mg in self._managed if mg.values.grad is not None]
        if grads and dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat.div_(dist.get_world_size())
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))

    def reselect(self) -> None:
        """Progressive reselection (normally called by :meth:`step` at ``progressive_iter``):
        the active set of each weight becomes ``|W_now| < threshold`` (``<=`` in fraction mode)
        intersected with the current set. Dropped entries keep their trained values for good
        (written into the weight, and kept as the frozen part of :meth:`delta`); the survivors
        keep their values, Adam moments and step counts."""
        self._check_open()
        before = self.num_trainable()
        resized_registered = False
        with torch.no_grad():
            for mg in self._managed:
                p = mg.values
                w = mg.weight
                sharded = isinstance(w, DTensor)
                full = w.full_tensor() if sharded else w  # (a collective, once per weight)
                flat = mg.flat_indices()
                w_now = (full.reshape(-1)[flat] + p.detach()).to(w.dtype)  # fine-tuned entries
                del full
                mag = w_now.abs()
                keep = mag <= mg.select_threshold if mg.inclusive else mag < mg.select_threshold
                del mag
                if bool(keep.all()):
                    continue
                drop = ~keep
                if sharded:  # their update, for good
                    local, pos, mine = _local_entries(w, flat[drop])
                    local[pos] = w_now[drop][mine]
                else:
                    w.view(-1)[flat[drop]] = w_now[drop]
                fi = torch.cat([mg.frozen_indices, flat[drop]])
                fv = torch.cat([mg.frozen_values, p.detach()[drop]])
                order = fi.argsort()
                mg.frozen_indices, mg.frozen_values = fi[order], fv[order]
                st = self.state[p]
                st["exp_avg"] = st["exp_avg"][keep].contiguous()
                st["exp_avg_sq"] = st["exp_avg_sq"][keep].contiguous()
                mg.set_indices(flat[keep])
                self._resize_values(mg, p.detach()[keep].contiguous())
                resized_registered = resized_registered or \
                    mg.module._parameters.get(_VALUES_NAME) is mg.values
        logger.info("SaRA: progressive reselection keeps %d of %d trainable entries",
                    self.num_trainable(), before)
        if resized_registered:
            # DDP keeps a gradient hook per parameter it was built with: the new values need a
            # new wrapper, and forgetting it fails later with DDP's unhelpful reduction error.
            warnings.warn("ftops.SaRA: progressive reselection replaced the trainable value "
                          "parameters registered on the model (sara_values): wrap the model in "
                          "DistributedDataParallel again before the next forward",
                          stacklevel=2)

    def _resize_values(self, mg: _Managed, data: torch.Tensor) -> None:
        """Give ``mg`` trainable values of another size as a *new* Parameter (param_groups, state
        and the module registration follow). Resizing the old Parameter in place would break a
        DistributedDataParallel wrapper, which keeps each parameter's gradient accumulator with
        the size it had; with a new Parameter the model is simply wrapped again."""
        old = mg.values
        new = nn.Parameter(data, requires_grad=old.requires_grad)
        params = self.param_groups[0]["params"]
        params[next(i for i, q in enumerate(params) if q is old)] = new
        if old in self.state:
            self.state[new] = self.state.pop(old)
        mg.values = new
        if mg.module._parameters.get(_VALUES_NAME) is old:
            mg.module._parameters[_VALUES_NAME] = new

    # -- save / load / unwrap -------------------------------------------------------------------

    def delta(self) -> dict[str, torch.Tensor]:
        """The exact sparse update as a plain dict of tensors (safe for ``torch.save`` with
        ``weights_only`` loading, and for safetensors): for each managed weight ``name``,
        ``name + ".sara_indices"`` (sorted flat row-major indices, int32 or int64) and
        ``name + ".sara_values"`` (the deltas: the weight's dtype, float32 for float16/bfloat16
        weights). Apply with :func:`load`."""
        self._check_open()
        out = {}
        for mg in self._managed:
            idx = torch.cat([mg.frozen_indices, mg.flat_indices()])
            val = torch.cat([mg.frozen_values, mg.values.detach()])
            if mg.frozen_indices.numel():
                order = idx.argsort()
                idx, val = idx[order], val[order]
            out[mg.name + _IDX_KEY] = idx.clone()
            out[mg.name + _VAL_KEY] = val.clone()
        return out

    def state_dict(self):
        sd = super().state_dict()
        for i, mg in enumerate(self._managed or []):
            st = sd["state"].setdefault(i, {})
            st["indices"] = mg.flat_indices()
            st["values"] = mg.values.detach()
            st["frozen_indices"] = mg.frozen_indices
            st["frozen_values"] = mg.frozen_values
        sd["sara_rng"] = self._gen.get_state()
        return sd

    def load_state_dict(self, state_dict):
        """Restores moments, steps, the trainable sets and the values. The model's weights are
        not touched: load the model's own ``state_dict`` too (as with any optimizer; it holds the
        pretrained weights plus the entries frozen by a reselection)."""
        self._check_open()
        rng = state_dict.get("sara_rng")
        extra = {}
        sd_state = {}
        for k, st in state_dict["state"].items():
            st = dict(st)
            extra[int(k)] = {key: st.pop(key) for key in
                             ("indices", "values", "frozen_indices", "frozen_values")
                             if key in st}
            sd_state[k] = st
        if len(extra) != len(self._managed) or any(len(e) != 4 for e in extra.values()):
            raise ValueError("ftops.SaRA.load_state_dict: the state dict does not hold the "
                             f"indices/values of {len(self._managed)} managed weights")
        # Sizes change with the trainable sets: resize the values before the base class checks.
        for i, mg in enumerate(self._managed):
            e = extra[i]
            idx = e["indices"]
            # Validated here, once: the CUDA SDDMM kernel trusts the layout built from it.
            if (idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64)
                    or idx.shape != e["values"].shape):
                raise ValueError(f"ftops.SaRA.load_state_dict: the indices of {mg.name} must be a "
                                 "1-D int32/int64 tensor as long as its values")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= mg.weight.numel()
                                or not bool((idx[1:] > idx[:-1]).all())):
                raise ValueError(f"ftops.SaRA.load_state_dict: the indices of {mg.name} must be "
                                 f"sorted, distinct and in [0, {mg.weight.numel()})")
            mg.values.grad = None
            v = e["values"].to(mg.values.dtype, copy=True).to(mg.values.device)
            if v.shape == mg.values.shape:
                mg.values.data = v
            else:
                self._resize_values(mg, v)
        super().load_state_dict({"state": sd_state, "param_groups": state_dict["param_groups"]})
        if rng is not None:
            self._gen.set_state(rng)
            self._gen_synced = False
        for i, mg in enumerate(self._managed):
            e = extra[i]
            dev = mg.values.device
            mg.set_indices(e["indices"].to(device=dev, dtype=_index_dtype(mg.weight.numel())))
            mg.frozen_indices = e["frozen_indices"].to(dev, copy=True)
            mg.frozen_values = e["frozen_values"].to(device=dev, dtype=mg.values.dtype, copy=True)
            st = self.state[mg.values]
            md = moment_dtype(mg.values.dtype)
            for key in ("exp_avg", "exp_avg_sq"):  # torch casts floating state to the param dtype
                st[key] = st[key].to(md).contiguous()
            st["step"] = torch.as_tensor(st["step"], dtype=torch.float32).cpu()

    def unwrap(self) -> nn.Module:
        """Write the update into the weights (``W[indices] = W0[indices] + values``, exactly as
        :func:`load` does) and make the model plain again: restores the layers' forward methods
        and the parameters' ``requires_grad`` flags. The optimizer cannot step afterwards;
        :meth:`delta` must be taken before. Also available as :meth:`merge`."""
        if self._managed is None:
            return self._model
        for mg in self._managed:
            mod = mg.module
            if "forward" in mod.__dict__:
                del mod.forward
            if getattr(mod, _ATTR, None) is mg:
                mg.merge_()
                delattr(mod, _ATTR)
            _unregister_values(mg)
        for p, flag in self._frozen_flags.values():
            p.requires_grad_(flag)
        self._managed = None
        self.state.clear()
        return self._model

    merge = unwrap


def nuclear_norm_grad(values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int]):
    """Gradient of ``||D||_*`` w.r.t. the entries of the sparse matrix ``D`` (``D[indices] =
    values``, zero elsewhere), gathered at the indices: ``(U_r V_r^T)[indices]`` over the singular
    triplets with nonzero singular value (the minimum-norm subgradient); ``None`` when ``D = 0``.
    Computed in float32 (float64 for float64 values)."""
    if values.numel() == 0 or not bool(values.any()):
        return None
    m, n = shape
    dt = torch.float64 if values.dtype == torch.float64 else torch.float32
    D = torch.zeros(m * n, dtype=dt, device=values.device)
    D[indices] = values.to(dt)
    U, S, Vh = torch.linalg.svd(D.view(m, n), full_matrices=False)
    del D
    tol = S[0] * max(m, n) * torch.finfo(dt).eps
    r = int((S > tol).sum().item())
    G = U[:, :r] @ Vh[:r]
    return G.view(-1)[indices].clone()


def unwrap(model: nn.Module) -> nn.Module:
    """Make a model that a :class:`SaRA` optimizer manages plain again, the update written into
    its weights (see :meth:`SaRA.unwrap`). Does not restore ``requires_grad`` flags (only the
    optimizer knows them)."""
    for mod in model.modules():
        mg = getattr(mod, _ATTR, None)
        if mg is not None:
            if "forward" in mod.__dict__:
                del mod.forward
            mg.merge_()
            delattr(mod, _ATTR)
            _unregister_values(mg)
    return model


def load(base_model: nn.Module, delta: dict[str, torch.Tensor]) -> nn.Module:
    """Apply a :meth:`SaRA.delta` to a freshly loaded pretrained model, in place, and return it.

    For every weight in the delta, ``W.flatten()[indices] = W.flatten()[indices] + values``
    (summed in the values' dtype, rounded once to W's dtype), computed exactly as during training,
    so the result equals the fine-tuned model bit for bit.
    Everything is checked before any weight is written."""
    params = dict(base_model.named_parameters())
    plan = []
    names = sorted({k[:-len(_IDX_KEY)] for k in delta if k.endswith(_IDX_KEY)} |
                   {k[:-len(_VAL_KEY)] for k in delta if k.endswith(_VAL_KEY)})
    unknown = [k for k in delta if not (k.endswith(_IDX_KEY) or k.endswith(_VAL_KEY))]
    if unknown:
        raise ValueError(f"ftops.sara.load: unexpected keys in the delta: {unknown[:5]}")
    for name in names:
        ik, vk = name + _IDX_KEY, name + _VAL_KEY
        if ik not in delta or vk not in delta:
            raise ValueError(f"ftops.sara.load: the delta has only one of {ik!r} / {vk!r}")
        if name not in params:
            raise ValueError(f"ftops.sara.load: the model has no parameter {name!r}")
        w = params[name]
        idx, val = delta[ik], delta[vk]
        if idx.dtype not in (torch.int32, torch.int64) or idx.dim() != 1:
            raise TypeError(f"ftops.sara.load: {ik} must be a 1-D int32/int64 tensor")
        if val.shape != idx.shape:
            raise ValueError(f"ftops.sara.load: {vk} has shape {list(val.shape)} but {ik} has "
                             f"{list(idx.shape)}")
        if val.dtype != values_dtype(w.dtype):
            raise TypeError(f"ftops.sara.load: {vk} has dtype {val.dtype} but the deltas of "
                            f"{w.dtype} weight {name} are {values_dtype(w.dtype)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= w.numel()):
            raise ValueError(f"ftops.sara.load: {ik} has entries outside [0, {w.numel()})")
        if not w.is_contiguous():
            raise ValueError(f"ftops.sara.load: {name} is not contiguous")
        plan.append((w, idx.to(w.device), val.to(w.device)))
    with torch.no_grad():
        for w, idx, val in plan:
            flat = w.view(-1)
            flat[idx] = (flat[idx] + val).to(w.dtype)
    return base_model
