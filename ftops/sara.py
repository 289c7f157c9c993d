"""SaRA: progressive sparse low-rank adaptation (Hu et al. 2024), gradients only where it trains.

SaRA fine-tunes the entries of the pretrained weights whose magnitude is below a threshold (the
"ineffective" parameters), with a nuclear-norm penalty that keeps the learned sparse update low
rank, and re-selects the trainable set once, part way through training. ``docs/sara.md`` has the
API, the design and a table of every place where ftops differs from the reference code
(sjtuplayer/SaRA) with the option that gives the reference's behaviour.

How ftops stores and trains it, per managed weight ``W`` (a conv kernel is seen as
(out_channels, rest), any other parameter as (shape[0], rest)):

* The model holds the fine-tuned weights at every point: each :meth:`SaRA.step` writes
  ``W[idx] = W0[idx] + values`` (summed in the values' dtype and rounded once to W's dtype: exactly
  what :func:`load` computes). ``model.state_dict()``, ``torch.save``, transformers'
  ``save_pretrained`` and Trainer checkpoints therefore hold the fine-tuned model, a plain model
  loaded from them computes what the trained model computes, and the forward is the plain layer.
* The trainable set, row-compressed: ``row_ptr`` (rows + 1, int64) and the column of each entry,
  int16 when a row has at most 2**15 entries (int32, int64 beyond). Flat row-major indices
  (:meth:`SaRA.indices`, :meth:`SaRA.delta`) are decoded from it when needed.
* ``values``: the trainable parameter (what ``param_groups`` hold), the *delta* from the pretrained
  entries, zero at the start; float32 for float16/bfloat16 weights (a master copy: small updates of
  a half-precision delta would round away). Training the delta makes the nuclear norm act on the
  update (rank 0 at the start) and AdamW's weight decay pull towards the pretrained weights.
* ``base``: the pretrained values of the trainable entries only (W's dtype, sized like
  ``values``), so that the delta stays exact and each step can rewrite ``W[idx]`` without a copy
  of the weights.
* Adam moments sized like ``values`` (float32; float64 for float64 weights), updated by the shared
  fused AdamW kernel (``torch.ops.ftops.adamw_``) in one call for all weights.

Memory per trainable entry of a float32 weight: 4 (values) + 4 (base) + 8 (moments) + 2 (column)
bytes, 4 more for the values' gradient between backward and step, and ``row_ptr`` (8 bytes a row).

Gradients: a managed Linear layer computes ``F.linear(x, W, b)`` inside an autograd function whose
backward gives ``dL/dx = dy W`` and ``dL/dvalues = (dy^T x)[rows, cols]`` with the SDDMM kernel on
the row-compressed set (``ftops.sddmm_csr``, no synchronization on a GPU): the dense (m, n) weight
gradient is never formed. Conv layers compute the dense weight gradient
(``aten.convolution_backward``), gather it at the trainable entries and free it at once. Every
other parameter SaRA trains (``scope="all"``: biases, norms, embeddings, tied weights) gets its
ordinary dense gradient, which :meth:`SaRA.step` gathers at the trainable entries and drops.

Nuclear norm: each step, one eligible matrix (a managed 2-D weight with min(m, n) > 64 and a
nonempty trainable set, picked uniformly at random by the optimizer's own generator) contributes
``lambda_rank * ||D||_*``, with ``D`` the sparse delta matrix (``D[idx] = values``, zero elsewhere;
``rank_of="weights"``: the fine-tuned trainable entries, the reference's ``W ⊙ M``). Its
(sub)gradient ``U_r V_r^T`` (singular vectors of the nonzero singular values; zero for ``D = 0``)
gathered at the indices is added to the values' gradient inside :meth:`SaRA.step`, before the Adam
update. The dense ``D`` and its SVD exist only during that step, for one matrix.

Progressive reselection (``progressive_iter``): after that many steps the active set of every
weight becomes ``{|W_now| < threshold} ∩ current set``. Entries that leave the set keep their
trained value for good (the weight already holds it) and stay in :meth:`SaRA.delta` as its frozen
part. The survivors' Adam moments and step counts are carried: they are per-coordinate statistics
of the same loss along the same coordinates, and a reset would restart the bias correction (an
update of about ``lr`` for every survivor right after the switch). ``progressive_reset=True``
resets them, as the reference's optimizer does.

A failing :meth:`SaRA.step` (invalid hyperparameters, a closure that raises, a non-finite
gradient, a model changed under the optimizer) raises before anything is written: the weights,
the values and the optimizer state stay bit-identical.
"""
from __future__ import annotations

import logging
import math
import types
import warnings
from collections.abc import Mapping
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # a torch built without distributed
    DTensor, Shard = (), None

from . import _checks, _ops
from ._adamw import fused_adamw, moment_dtype

__all__ = ["SaRA", "REFERENCE", "load", "unwrap", "paper_lr", "values_dtype", "nuclear_norm_grad",
           "sddmm"]

sddmm = _ops.sddmm

logger = logging.getLogger(__name__)

_FLOAT_TYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAYER_TYPES = (nn.Linear,) + _CONV_TYPES
_ATTR = "_ftops_sara"
_IDX_KEY = ".sara_indices"
_VAL_KEY = ".sara_values"
_SHAPE_KEY = ".sara_shape"
_SCOPES = ("weights", "all")
_DECAY_TOWARDS = ("pretrained", "zero")
_RANK_OF = ("delta", "weights")
# The lr rule's value below which SaRA refuses lr=None: an Adam step moves an entry by about lr,
# so at 1e-8 ten thousand steps move it by 1e-4 at most, and the run would silently not train.
_MIN_RULE_LR = 1e-8
_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "indices", "values", "base", "frozen_indices",
               "frozen_values", "frozen_base", "shape")

#: The reference's released configuration (sjtuplayer/SaRA ``finetune.sh`` with its default
#: optimizer ``optim/adamw.py``): threshold 2e-3, the lr rule, lambda_rank 5e-4, AdamW weight decay
#: 1e-2 on the absolute entries, every parameter below the threshold, the nuclear norm of the
#: trainable weights, Adam state reset at the reselection. Add ``progressive_iter`` (the script
#: re-selects half way: 2500 of 5005 steps): ``ftops.SaRA(model, progressive_iter=n // 2,
#: **ftops.sara.REFERENCE)``. docs/sara.md lists what still differs.
REFERENCE = types.MappingProxyType(dict(
    threshold=2e-3, lr=None, lambda_rank=5e-4, weight_decay=1e-2, decay_towards="zero",
    scope="all", rank_of="weights", progressive_reset=True))


def paper_lr(threshold: float) -> float:
    """The paper's learning-rate rule for a threshold, ``1e-3 * exp(-350 * threshold)`` (what the
    reference uses for ``lr=None``)."""
    t = _checks.real("ftops.sara.paper_lr", "threshold", threshold, low=0.0, low_open=True)
    return 1e-3 * math.exp(-350.0 * t)


def values_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the trainable delta values for a weight dtype: float32 for float16/bfloat16
    weights (a master copy of the delta, so that small updates are not lost to rounding), else the
    weight dtype."""
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype


# --- autograd functions -------------------------------------------------------------------------

class _SparseLinear(torch.autograd.Function):
    """y = F.linear(x, W, b) with W as it is (it holds W0 + delta); gradients for x, b and the
    trainable values (SDDMM on the row-compressed set), never the dense weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, mg):
        ctx.save_for_backward(x, weight, mg.row_ptr, mg.cols)
        ctx.has_bias = bias is not None
        ctx.values_dtype = values.dtype
        return F.linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, weight, row_ptr, cols = ctx.saved_tensors
        m, n = weight.shape
        gx = gb = gv = None
        gy2 = gy.reshape(-1, m)
        if ctx.needs_input_grad[0]:
            gx = (gy2 @ weight.to(gy.dtype)).reshape(*gy.shape[:-1], n).to(x.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy2.sum(0)
        if ctx.needs_input_grad[3]:
            gv = _ops.sddmm_csr(gy2, x.reshape(-1, n).to(gy.dtype), row_ptr, cols)
            gv = gv.to(ctx.values_dtype)
        return gx, None, gb, gv, None


class _SparseConv(torch.autograd.Function):
    """torch.convolution with W as it is; the weight gradient is computed dense, gathered at the
    trainable entries and freed at once."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, mg, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight, mg.row_ptr, mg.cols)
        ctx.row_len = mg.row_len
        ctx.conf = (stride, padding, dilation, groups)
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        ctx.values_dtype = values.dtype
        zeros = [0] * len(stride)
        return torch.convolution(x, weight, bias, stride, padding, dilation, False, zeros, groups)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, weight, row_ptr, cols = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        need_x, need_b, need_v = (ctx.needs_input_grad[0], ctx.needs_input_grad[2],
                                  ctx.needs_input_grad[3])
        if not (need_x or need_b or need_v):
            return (None,) * 9
        gx, gw, gb = torch.ops.aten.convolution_backward(
            gy, x.to(gy.dtype), weight.to(gy.dtype), ctx.bias_sizes, stride, padding, dilation,
            False, [0] * len(stride), groups,
            [need_x, need_v, need_b and ctx.bias_sizes is not None])
        gv = None
        if need_v:
            flat = _from_csr(row_ptr, cols, ctx.row_len, weight.numel())
            gv = gw.reshape(-1)[flat].to(ctx.values_dtype)
        del gw  # the dense weight gradient lives only for this gather
        return gx, None, gb, gv, None, None, None, None, None


def _linear_forward(self, input):
    st = getattr(self, _ATTR)
    if not (torch.is_grad_enabled() and st.values.requires_grad):
        return F.linear(input, self.weight, self.bias)
    return _SparseLinear.apply(input, self.weight, self.bias, st.values, st)


def _conv_forward(self, input):
    st = getattr(self, _ATTR)
    if not (torch.is_grad_enabled() and st.values.requires_grad):
        return type(self).forward(self, input)
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
    """One SaRA-managed parameter: where it lives (``module`` and attribute ``attr``), how its
    gradient is obtained (``kind``: "linear" / "conv", sparse in the layer's backward, or "dense",
    the parameter's own gradient gathered in the step), the trainable set (row-compressed), the
    trainable delta ``values``, the pretrained entries ``base`` and the entries a reselection
    froze (flat index, delta and pretrained value)."""

    def __init__(self, name, module, attr, kind, indices, values, base, select_threshold,
                 inclusive):
        self.name = name  # the parameter's name in the model, e.g. "layers.0.q.weight"
        self.module = module
        self.attr = attr
        self.kind = kind
        w = self.weight
        self.shape = tuple(w.shape)
        self.numel = w.numel()
        self.rows = w.shape[0] if w.dim() else 1
        self.row_len = self.numel // max(self.rows, 1)
        self.set_indices(indices)
        self.values = values
        self.base = base
        self.select_threshold = select_threshold
        self.inclusive = inclusive  # fraction mode: |w| <= bound stays selected
        self.frozen_indices = indices.new_empty((0,))
        self.frozen_values = values.detach().new_empty((0,))
        self.frozen_base = base.new_empty((0,))
        self.hooks = []

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.attr)

    def set_indices(self, flat: torch.Tensor) -> None:
        """Store a sorted set of flat row-major indices in the row-compressed layout."""
        self.row_ptr, self.cols = _to_csr(flat, self.rows, self.row_len)

    def flat_indices(self) -> torch.Tensor:
        """The sorted flat row-major indices (int32 when the weight has < 2**31 entries), decoded
        from the row-compressed layout (a new tensor)."""
        return _from_csr(self.row_ptr, self.cols, self.row_len, self.numel)

    def fine_tuned(self) -> torch.Tensor:
        """The fine-tuned active entries, ``base + values`` rounded once to the weight's dtype."""
        return (self.base + self.values.detach()).to(self.base.dtype)

    def write_(self) -> None:
        """``W[idx] = W0[idx] + values`` at the active entries (in this rank's rows under FSDP2)."""
        flat = _from_csr(self.row_ptr, self.cols, self.row_len, self.numel, torch.int64)
        _write_entries(self.weight, flat, self.fine_tuned())


def _write_entries(w: torch.Tensor, flat: torch.Tensor, vals: torch.Tensor) -> None:
    """``w.flatten()[flat] = vals`` (``flat`` distinct; a scatter, several times faster than an
    index assignment on the CPU)."""
    with torch.no_grad():
        if isinstance(w, DTensor):  # sharded by FSDP2: this rank's rows
            local, pos, mine = _local_entries(w, flat)
            local.scatter_(0, pos, vals[mine])
        else:
            w.view(-1).scatter_(0, flat.long(), vals)


def _col_dtype(row_len: int) -> torch.dtype:
    if row_len <= 2**15:
        return torch.int16
    return torch.int32 if row_len <= 2**31 else torch.int64


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def _to_csr(flat: torch.Tensor, rows: int, row_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_ptr, cols) of sorted flat row-major indices of a (rows, row_len) matrix."""
    r = torch.div(flat, max(row_len, 1), rounding_mode="floor")
    cols = (flat - r * row_len).to(_col_dtype(row_len))
    row_ptr = torch.zeros(rows + 1, dtype=torch.int64, device=flat.device)
    torch.cumsum(torch.bincount(r.long(), minlength=rows), 0, out=row_ptr[1:])
    return row_ptr, cols


def _from_csr(row_ptr: torch.Tensor, cols: torch.Tensor, row_len: int, numel: int,
              itype: Optional[torch.dtype] = None) -> torch.Tensor:
    itype = itype or _index_dtype(numel)
    rows = torch.repeat_interleave(torch.arange(row_ptr.numel() - 1, dtype=itype,
                                                device=cols.device),
                                   row_ptr.diff(), output_size=cols.numel())
    return rows * row_len + cols.to(itype)


# --- registration (for torch.distributed) ---------------------------------------------------------
# The values of the sparse-gradient layers are registered on their module as the parameter
# ``sara_values``, so that ``model.parameters()`` yields exactly what the optimizer steps on:
# DistributedDataParallel's buckets cover what it finds there, and would not see values held only
# by the optimizer. They are left out of the module's ``state_dict`` (the weight already holds
# ``base + values``, and the values' state belongs to the optimizer's ``state_dict``), so model
# checkpoints keep the plain model's keys and load whatever the current size of the trainable set.
# (Parameters with a dense gradient, scope="all", are reduced by DDP as themselves.)

_VALUES_NAME = "sara_values"


def _drop_values_on_save(module, state_dict, prefix, local_metadata):
    state_dict.pop(prefix + _VALUES_NAME, None)


def _keep_values_on_load(module, state_dict, prefix, local_metadata, strict, missing_keys,
                         unexpected_keys, error_msgs):
    # not in a model state_dict: load the current values onto themselves (no "missing key")
    values = module._parameters.get(_VALUES_NAME)
    if values is not None:
        state_dict.setdefault(prefix + _VALUES_NAME, values.detach())


def _register_values(mg: _Managed) -> None:
    mod = mg.module
    mod.register_parameter(_VALUES_NAME, mg.values)
    mg.hooks = [mod.register_state_dict_post_hook(_drop_values_on_save),
                mod.register_load_state_dict_pre_hook(_keep_values_on_load)]


def _unregister_values(mg: _Managed) -> None:
    if mg.kind != "dense":
        mg.module._parameters.pop(_VALUES_NAME, None)
    for h in mg.hooks:
        h.remove()
    mg.hooks = []


def _release(mg: _Managed) -> None:
    """Make ``mg``'s layer plain again (the weight already holds the fine-tuned values)."""
    mod = mg.module
    if mg.kind != "dense":
        if "forward" in mod.__dict__:
            del mod.forward
        if getattr(mod, _ATTR, None) is mg:
            delattr(mod, _ATTR)
    w = mg.weight
    if isinstance(w, torch.Tensor) and getattr(w, _ATTR, None) is mg:
        delattr(w, _ATTR)
    _unregister_values(mg)


# --- FSDP2 ---------------------------------------------------------------------------------------
# Under fully_shard the managed weights are DTensors sharded by rows (Shard(0)); the values and the
# pretrained entries stay whole on every rank (not registered, or in fully_shard's
# ignored_params), SaRA averages the values' gradients itself, every rank takes the same AdamW step,
# and each rank writes base + values into its own rows of the weights. Exact: the same arithmetic
# as one process on the whole batch.

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


# --- selection ------------------------------------------------------------------------------------

def _select(w: torch.Tensor, threshold: Optional[float], fraction: Optional[float]):
    """(sorted flat indices, the magnitude bound used for reselection, inclusive?)"""
    flat = w.detach().reshape(-1)
    itype = _index_dtype(flat.numel())
    if flat.numel() == 0:  # a zero-size layer: nothing to train
        return torch.empty(0, dtype=itype, device=flat.device), 0.0, fraction is not None
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


def _resolve(model: nn.Module, modules, scope: str) -> list[tuple[str, nn.Module, str, str]]:
    """(parameter name, owning module, attribute, kind) of every parameter SaRA would train, in
    the model's order."""
    where = "ftops.SaRA"
    named = list(model.named_modules())
    by_name = dict(named)
    if modules is None:
        chosen = None
    elif callable(modules):
        chosen = [(n, m) for n, m in named
                  if (scope == "all" or isinstance(m, _LAYER_TYPES)) and modules(n, m)]
    else:
        if isinstance(modules, str):
            modules = [modules]
        if not isinstance(modules, (list, tuple, set, frozenset)):
            raise TypeError(f"{where}: modules must be None, a callable (name, module) -> bool or "
                            f"a list of module names, got {type(modules).__name__}")
        chosen, seen = [], set()
        for n in modules:
            if not isinstance(n, str):
                raise TypeError(f"{where}: modules must hold module names (str), got "
                                f"{type(n).__name__} {n!r}")
            if n in seen:
                raise ValueError(f"{where}: modules names {n!r} twice")
            seen.add(n)
            if n not in by_name:
                raise ValueError(f"{where}: modules names {n!r}, which is not a module of the "
                                 "model")
            m = by_name[n]
            if scope == "weights" and not isinstance(m, _LAYER_TYPES):
                raise TypeError(f"{where}: module {n!r} is a {type(m).__name__}; SaRA applies to "
                                "nn.Linear and nn.Conv1d/2d/3d weights (scope='all' trains any "
                                "parameter)")
            chosen.append((n, m))
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1

    def layer_kind(m):
        return "linear" if isinstance(m, nn.Linear) else "conv"

    out = []
    if scope == "weights":
        layers = [(n, m) for n, m in named if isinstance(m, _LAYER_TYPES)] if chosen is None \
            else chosen
        for n, m in layers:
            w = m._parameters.get("weight")
            if w is None:
                continue
            if uses.get(id(w), 0) > 1:
                raise ValueError(f"{where}: {n}.weight is shared with another module (tied "
                                 "weights); exclude it with modules= (scope='all' trains it "
                                 "through its dense gradient)")
            out.append((n + ".weight" if n else "weight", m, "weight", layer_kind(m)))
        return out
    ids = None if chosen is None else {id(p) for _, m in chosen for p in m.parameters()}
    seen_p = set()
    for mname, m in named:
        for attr, p in m._parameters.items():
            if p is None or id(p) in seen_p or (ids is not None and id(p) not in ids):
                continue
            seen_p.add(id(p))
            sparse = attr == "weight" and isinstance(m, _LAYER_TYPES) and uses.get(id(p), 0) == 1
            out.append((f"{mname}.{attr}" if mname else attr, m, attr,
                        layer_kind(m) if sparse else "dense"))
    return out


def _finite_all(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every entry of every tensor is finite. Fast path: the tensors' sums (a NaN or an
    infinity makes its sum non-finite), one host sync per (device, dtype); only when a sum is
    not finite (or a huge finite gradient overflowed it) are the entries checked one by one."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel():
            groups.setdefault((t.device, t.dtype), []).append(t)
    for ts in groups.values():
        if not bool(torch.isfinite(torch.stack([t.sum() for t in ts])).all()):
            if not all(bool(torch.isfinite(t).all()) for t in ts):
                return False
    return True


def _state_indices(where: str, label: str, st: Mapping, key: str, numel: int) -> torch.Tensor:
    """``st[key]`` checked to be sorted, distinct flat indices of a weight of ``numel`` entries."""
    idx = st[key]
    if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{where}: {label}[{key!r}] must be a 1-D int32/int64 tensor, got shape "
                         f"{list(idx.shape)} and dtype {idx.dtype}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel
                        or not bool((idx[1:] > idx[:-1]).all())):
        raise ValueError(f"{where}: {label}[{key!r}] must be sorted, distinct and in [0, {numel})")
    return idx


def _state_floats(where: str, label: str, st: Mapping, key: str, length: int,
                  dtype: Optional[torch.dtype], weight_name: str) -> torch.Tensor:
    """``st[key]`` checked to be a finite 1-D float tensor of ``length`` entries (of ``dtype``)."""
    t = st[key]
    if t.dim() != 1 or t.numel() != length or not t.is_floating_point():
        raise ValueError(f"{where}: {label}[{key!r}] must be a 1-D float tensor of {length} "
                         f"entries, got shape {list(t.shape)} and dtype {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{where}: {label}[{key!r}] has dtype {t.dtype}, but the model's "
                        f"{weight_name} needs {dtype}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{where}: {label}[{key!r}] has NaN or infinite entries")
    return t


# --- the optimizer ------------------------------------------------------------------------------

class SaRA(torch.optim.Optimizer):
    """SaRA fine-tuning of ``model``: AdamW on the smallest-magnitude entries of its weights.

    Args:
        model: the model to fine-tune, already on its device, with its pretrained weights; it is
            modified in place (managed layers get a sparse-gradient forward, every parameter is
            frozen except what SaRA trains). The model holds the fine-tuned weights after every
            step: save it as any model.
        threshold: entries with ``|w| < threshold`` are trainable (one global threshold, as in the
            paper). Also the bound for progressive reselection, and the input of the lr rule.
        fraction: instead of the threshold, the smallest ``fraction`` of each weight's entries by
            magnitude, in (0, 1] (reselection then keeps ``|w|`` at most the largest selected
            magnitude of that weight); ``threshold`` then only feeds the ``lr=None`` rule.
        lr: learning rate; ``None`` uses the paper's rule ``1e-3 * exp(-350 * threshold)``
            (refused where the rule gives less than 1e-8, threshold > 0.033: pass ``lr``).
        lambda_rank: weight of the nuclear-norm penalty on one random eligible matrix per step
            (0 disables it).
        progressive_iter: step count after which the trainable set is re-selected (once);
            ``None`` never (the reference script re-selects half way through training).
        betas, eps, weight_decay: AdamW hyper-parameters (decoupled weight decay).
        modules: which layers: ``None`` for every ``nn.Linear`` and ``nn.Conv1d/2d/3d``, a
            callable ``(name, module) -> bool`` filtering those, or a list of module names.
            With ``scope="all"``: every parameter of the chosen modules (of any type).
        seed: seed of the generator that picks the nuclear-norm matrix each step.
        max_grad_norm: if set, ``step()`` first clips the trainable gradients to this total norm
            (``torch.nn.utils.clip_grad_norm_``; before the nuclear-norm term is added). The
            values are not parameters of the model, so clipping ``model.parameters()`` (as
            ``transformers.Trainer``'s ``max_grad_norm`` does) does not reach them.
        register_values: register each layer's values on its module as the parameter
            ``sara_values`` (left out of the module's ``state_dict``), so that
            ``model.parameters()`` yields what the optimizer steps on and a
            ``DistributedDataParallel`` wrapper built afterwards averages their gradients.
            ``None`` (default): when ``torch.distributed`` is initialized.
        scope: ``"weights"`` (default): the weights of Linear and Conv layers, whose gradients
            SaRA computes only at the trainable entries. ``"all"``: every floating-point
            parameter, as the reference (biases, norms, embeddings; tied weights too): those
            other than Linear/Conv weights get their ordinary dense gradient, gathered in
            ``step()``.
        decay_towards: ``"pretrained"`` (default): the weight decay pulls the delta to zero, i.e.
            the weights towards their pretrained values. ``"zero"``: towards zero, as the
            reference's AdamW on the absolute entries.
        rank_of: the matrix whose nuclear norm is penalized: ``"delta"`` (default), the sparse
            update; ``"weights"``, the fine-tuned trainable entries (the reference's ``W ⊙ M``).
        progressive_reset: reset the Adam moments and step counts at the reselection (the
            reference's optimizer does); by default they are carried.

    The training loop is unchanged: ``loss.backward(); opt.step(); opt.zero_grad()``.
    ``step()`` consumes the gradients (sets them to None), so a loop that clears gradients with
    ``model.zero_grad()`` (``transformers.Trainer`` does) cannot accumulate stale ones into the
    next step: the values are not model parameters.
    ``param_groups[0]["params"]`` are the trainable value vectors (one per managed parameter, in
    :attr:`names` order). :meth:`delta` returns the exact sparse update and :func:`load` applies it
    to a fresh pretrained model; :meth:`merge` / :meth:`unwrap` (or :func:`unwrap`) make the model
    plain again (it already holds the fine-tuned weights). ``state_dict()`` holds everything a
    resume needs, the pretrained values of the trainable entries included; ``load_state_dict``
    checks it all before changing anything, and writes the fine-tuned entries it describes into
    the weights.
    """

    def __init__(self, model: nn.Module, threshold: Optional[float] = 2e-3,
                 fraction: Optional[float] = None, lr: Optional[float] = None,
                 lambda_rank: float = 5e-4, progressive_iter: Optional[int] = None,
                 betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                 eps: float = 1e-8,
                 modules: Union[None, Callable[[str, nn.Module], bool], Sequence[str]] = None,
                 seed: int = 0, max_grad_norm: Optional[float] = None,
                 register_values: Optional[bool] = None, *, scope: str = "weights",
                 decay_towards: str = "pretrained", rank_of: str = "delta",
                 progressive_reset: bool = False):
        where = "ftops.SaRA"
        if not isinstance(model, nn.Module):
            raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
        if fraction is not None:
            fraction = _checks.real(where, "fraction", fraction, low=0.0, low_open=True, high=1.0)
        if threshold is None and fraction is None:
            raise ValueError(f"{where}: pass threshold= (|w| < threshold trains) or fraction=")
        if threshold is not None:
            threshold = _checks.real(where, "threshold", threshold, low=0.0, low_open=True)
        if lr is None:
            rule_threshold = threshold if threshold is not None else 2e-3
            lr = paper_lr(rule_threshold)
            if lr < _MIN_RULE_LR:
                raise ValueError(
                    f"{where}: lr=None applies the paper's rule 1e-3 * exp(-350 * threshold), "
                    f"which gives lr={lr:.3g} for threshold={rule_threshold:g}: too small to "
                    f"train (below {_MIN_RULE_LR:g}; the rule was made for thresholds of about "
                    "1e-3 to 1e-2). Pass lr= explicitly")
        lr = _checks.real(where, "lr", lr, low=0.0)
        lambda_rank = _checks.real(where, "lambda_rank", lambda_rank, low=0.0)
        if progressive_iter is not None:
            progressive_iter = _checks.integer(where, "progressive_iter", progressive_iter, low=1)
        b1, b2 = _checks.betas(where, betas)
        eps = _checks.real(where, "eps", eps, low=0.0)
        weight_decay = _checks.real(where, "weight_decay", weight_decay, low=0.0)
        seed = _checks.integer(where, "seed", seed)
        if max_grad_norm is not None:
            max_grad_norm = _checks.real(where, "max_grad_norm", max_grad_norm, low=0.0,
                                         low_open=True)
        if register_values is not None and not isinstance(register_values, bool):
            raise TypeError(f"{where}: register_values must be None, True or False, got "
                            f"{register_values!r}")
        for arg, value, choices in (("scope", scope, _SCOPES),
                                    ("decay_towards", decay_towards, _DECAY_TOWARDS),
                                    ("rank_of", rank_of, _RANK_OF)):
            if not isinstance(value, str) or value not in choices:
                raise ValueError(f"{where}: {arg} must be one of {', '.join(map(repr, choices))}, "
                                 f"got {value!r}")
        if not isinstance(progressive_reset, bool):
            raise TypeError(f"{where}: progressive_reset must be a bool, got {progressive_reset!r}")

        candidates = _resolve(model, modules, scope)
        if not candidates:
            what = ("nn.Linear or nn.Conv1d/2d/3d" if scope == "weights" else "parameters")
            raise ValueError(f"{where}: the model has no eligible layers ({what}"
                             + (" passing the modules filter" if modules is not None else "")
                             + ")")
        for name, mod, attr, kind in candidates:
            w = getattr(mod, attr)
            if getattr(w, _ATTR, None) is not None or \
                    (kind != "dense" and getattr(mod, _ATTR, None) is not None):
                raise ValueError(f"{where}: {name} is already managed by a SaRA optimizer "
                                 "(unwrap it first)")
            if kind != "dense" and register_values is not False and hasattr(mod, _VALUES_NAME):
                raise ValueError(f"{where}: the module of {name} already has an attribute "
                                 f"{_VALUES_NAME!r} (SaRA registers the trainable values there)")
            if not isinstance(w, torch.Tensor) or w.dtype not in _FLOAT_TYPES:
                raise TypeError(f"{where}: {name} has dtype "
                                f"{getattr(w, 'dtype', type(w).__name__)}; SaRA needs float32, "
                                "float64, float16 or bfloat16 weights" +
                                (" (exclude it with modules=)" if scope == "all" else ""))
            if isinstance(w, DTensor):
                raise ValueError(f"{where}: {name} is a DTensor (already sharded); build SaRA "
                                 "on the whole model first, then shard it (fully_shard)")
            if w.is_meta:
                raise ValueError(f"{where}: {name} is on the meta device; load the pretrained "
                                 "weights first (SaRA selects entries by their values)")
            if w.numel() and not bool(torch.isfinite(w.detach()).all()):
                raise ValueError(f"{where}: {name} has NaN or infinite entries; SaRA selects "
                                 "entries by magnitude and would train on a broken model")

        selected = []
        for name, mod, attr, kind in candidates:
            idx, bound, inclusive = _select(getattr(mod, attr),
                                            None if fraction is not None else threshold, fraction)
            if idx.numel() > 0:
                selected.append((name, mod, attr, kind, idx, bound, inclusive))
        if not selected:
            sizes = [getattr(mod, attr).detach() for _, mod, attr, _ in candidates]
            sizes = [w for w in sizes if w.numel()]
            smallest = (f" (the smallest |w| is {min(w.abs().min().item() for w in sizes):.3g})"
                        if sizes else " (all of them have zero entries)")
            raise ValueError(f"{where}: threshold={threshold} selects no weight entry in any of "
                             f"the {len(candidates)} eligible parameters{smallest}; raise the "
                             "threshold or pass fraction=")

        # Nothing has been touched so far: now wrap.
        self._frozen_flags = {id(p): (p, p.requires_grad) for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        managed = []
        for name, mod, attr, kind, idx, bound, inclusive in selected:
            w = getattr(mod, attr)
            if not w.is_contiguous():
                w.data = w.data.contiguous()
            base = w.detach().reshape(-1)[idx]
            values = nn.Parameter(torch.zeros(idx.shape, dtype=values_dtype(w.dtype),
                                              device=w.device))
            mg = _Managed(name, mod, attr, kind, idx, values, base, bound, inclusive)
            setattr(w, _ATTR, mg)
            if kind == "dense":
                w.requires_grad_(True)
            else:
                setattr(mod, _ATTR, mg)
                mod.forward = types.MethodType(
                    _linear_forward if kind == "linear" else _conv_forward, mod)
            managed.append(mg)
        self._managed = managed
        self._model = model
        self.scope = scope
        self.max_grad_norm = max_grad_norm
        self.decay_towards = decay_towards
        self.rank_of = rank_of
        self.progressive_reset = progressive_reset
        self._gen = torch.Generator().manual_seed(seed)
        self._gen_synced = False
        self._last_rank_matrix = None
        defaults = dict(lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay,
                        lambda_rank=lambda_rank, progressive_iter=progressive_iter,
                        sara_step=0)
        super().__init__([mg.values for mg in managed], defaults)
        self._sealed = True
        for mg in managed:
            self._init_state(mg)
        if register_values is None:
            register_values = dist.is_available() and dist.is_initialized()
        if register_values:
            for mg in managed:
                if mg.kind != "dense":
                    _register_values(mg)

    def add_param_group(self, param_group):
        if getattr(self, "_sealed", False):
            raise TypeError("ftops.SaRA: the optimizer steps only the trainable values of the "
                            "model it was built on; use another optimizer for other parameters")
        super().add_param_group(param_group)

    # -- info -----------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Names of the managed parameters, in ``param_groups[0]["params"]`` order."""
        self._check_open()
        return [mg.name for mg in self._managed]

    def num_trainable(self) -> int:
        """The number of trainable entries now."""
        self._check_open()
        return sum(mg.values.numel() for mg in self._managed)

    def indices(self) -> dict[str, torch.Tensor]:
        """The active flat row-major indices of each managed parameter, sorted (int32 when it has
        < 2**31 entries; decoded from the row-compressed layout, so new tensors)."""
        self._check_open()
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

    def _checked_group(self, where: str) -> dict:
        """The one param group, its hyperparameters checked (they may have been set by hand or by
        a scheduler after construction)."""
        if len(self.param_groups) != 1:
            raise ValueError(f"{where}: SaRA has one param group, found {len(self.param_groups)}")
        _checks.check_groups(where, self.param_groups, lr=dict(low=0.0), eps=dict(low=0.0),
                             weight_decay=dict(low=0.0), lambda_rank=dict(low=0.0), betas={})
        group = self.param_groups[0]
        if group["progressive_iter"] is not None:
            _checks.integer(where, "param_groups[0]['progressive_iter']",
                            group["progressive_iter"], low=1)
        _checks.integer(where, "param_groups[0]['sara_step']", group["sara_step"], low=0)
        params = group["params"]
        if len(params) != len(self._managed) or any(
                p is not mg.values for p, mg in zip(params, self._managed)):
            raise ValueError(f"{where}: param_groups[0]['params'] no longer holds the trainable "
                             "values SaRA manages (it must not be edited)")
        return group

    def _check_model(self, where: str) -> None:
        """The managed parameters are still what SaRA was built on (a model moved, cast or
        reloaded into other tensors after construction would be written wrongly)."""
        for mg in self._managed:
            w = mg.weight
            if not isinstance(w, torch.Tensor):
                raise RuntimeError(f"{where}: {mg.name} is no longer a tensor of the model")
            if tuple(w.shape) != mg.shape or w.dtype != mg.base.dtype:
                raise ValueError(f"{where}: {mg.name} is now {w.dtype} of shape {list(w.shape)}, "
                                 f"but SaRA was built on {mg.base.dtype} of shape "
                                 f"{list(mg.shape)}; build SaRA after converting the model")
            if w.device != mg.values.device:
                raise ValueError(f"{where}: {mg.name} is on {w.device} but its trainable values "
                                 f"are on {mg.values.device}; move the model before building "
                                 "SaRA")
            if isinstance(w, DTensor):
                if mg.kind == "dense":
                    raise ValueError(
                        f"{where}: {mg.name} is sharded by FSDP2 and trains through its dense "
                        "gradient (scope='all'); SaRA under FSDP2 supports the Linear/Conv "
                        "weights (scope='weights') or unsharded parameters (ignored_params)")
            elif not w.is_contiguous():
                raise ValueError(f"{where}: {mg.name} is no longer contiguous")

    def _collect_grads(self) -> list[Optional[torch.Tensor]]:
        """The trainable gradient of every managed parameter (None where there is none): the
        values' gradient, or the dense gradient gathered at the trainable entries. Nothing is
        changed."""
        out = []
        for mg in self._managed:
            g = mg.values.grad
            if g is not None and g.is_sparse:
                raise RuntimeError(f"ftops.SaRA: sparse gradients are not supported "
                                   f"({mg.name})")
            if mg.kind == "dense":
                dense = mg.weight.grad
                if dense is not None:
                    if dense.is_sparse:
                        dense = dense.to_dense()
                    gathered = dense.reshape(-1)[mg.flat_indices()].to(mg.values.dtype)
                    g = gathered if g is None else g + gathered
            if g is not None and not g.is_contiguous():
                g = g.contiguous()
            out.append(g)
        return out

    def _eligible_for_rank(self) -> list[_Managed]:
        return [mg for mg in self._managed
                if len(mg.shape) == 2 and min(mg.shape) > 64 and mg.values.numel() > 0]

    def _rank_grad(self, lam: float):
        """(managed parameter, lambda * nuclear-norm gradient at its entries) for one random
        eligible matrix (the gradient None for a zero matrix), or (None, None) without a draw;
        nothing is changed but the generator."""
        eligible = self._eligible_for_rank()
        if lam == 0 or not eligible:
            return None, None
        k = int(torch.randint(len(eligible), (1,), generator=self._gen).item())
        mg = eligible[k]
        entries = mg.values.detach() if self.rank_of == "delta" else mg.fine_tuned()
        g = _nuclear_grad(entries, mg.flat_indices(), mg.shape,
                          lambda dy, x: _ops.sddmm_csr(dy, x, mg.row_ptr, mg.cols))
        if g is None:
            return mg, None
        return mg, g.mul_(lam).to(mg.values.dtype)

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step on the trainable values (plus the nuclear-norm gradient), then
        ``W[idx] = W0[idx] + values`` in the model; at ``progressive_iter`` the trainable set is
        re-selected. Everything is checked before anything is written: a step that raises
        leaves the weights, the values and the optimizer state as they were."""
        where = "ftops.SaRA.step"
        self._check_open()
        if closure is not None and not callable(closure):
            raise TypeError(f"{where}: closure must be callable or None, got "
                            f"{type(closure).__name__}")
        group = self._checked_group(where)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_model(where)
        if any(isinstance(mg.weight, DTensor) for mg in self._managed):
            self._average_grads_fsdp()
        grads = self._collect_grads()
        if not _finite_all([g for g in grads if g is not None]):
            bad = [mg.name for mg, g in zip(self._managed, grads)
                   if g is not None and not bool(torch.isfinite(g).all())]
            raise ValueError(f"{where}: the gradient of the trainable entries of "
                             f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} has NaN or "
                             "infinite entries; nothing was updated (a diverged loss? lower the "
                             "lr, or scale half-precision losses with torch.amp.GradScaler)")
        self._sync_generator()
        rng = self._gen.get_state()
        try:
            rank_mg, rank_g = self._rank_grad(float(group["lambda_rank"]))
        except BaseException:
            self._gen.set_state(rng)
            raise
        # Everything is checked: from here on the step writes.
        self._last_rank_matrix = None if rank_mg is None else rank_mg.name
        for mg, g in zip(self._managed, grads):
            if mg.kind == "dense":
                mg.weight.grad = None
            mg.values.grad = g
        if self.max_grad_norm is not None:
            with_grad = [mg.values for mg in self._managed if mg.values.grad is not None]
            if with_grad:
                torch.nn.utils.clip_grad_norm_(with_grad, self.max_grad_norm)
        if rank_g is not None:
            if rank_mg.values.grad is None:
                rank_mg.values.grad = rank_g
            else:
                rank_mg.values.grad.add_(rank_g)
        params, pgrads, m1, m2, steps, touched = [], [], [], [], [], []
        for mg in self._managed:
            p = mg.values
            if p.grad is None or p.numel() == 0:
                continue
            st = self.state[p]
            params.append(p)
            pgrads.append(p.grad)
            m1.append(st["exp_avg"])
            m2.append(st["exp_avg_sq"])
            steps.append(int(st["step"].item()) + 1)
            touched.append(mg)
        b1, b2 = group["betas"]
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        fused_adamw(params, pgrads, m1, m2, lr=lr, beta1=b1, beta2=b2, eps=float(group["eps"]),
                    weight_decay=wd, step=steps)
        if self.decay_towards == "zero" and wd != 0.0:
            # AdamW decays the delta d; decaying w = base + d instead adds -lr * wd * base.
            for mg in touched:
                mg.values.sub_(mg.base.to(mg.values.dtype), alpha=lr * wd)
        for mg, s in zip(touched, steps):
            self.state[mg.values]["step"].fill_(float(s))
            mg.write_()
        for mg in self._managed:
            mg.values.grad = None  # consumed; see the class docstring
        group["sara_step"] += 1
        pit = group["progressive_iter"]
        if pit is not None and group["sara_step"] == pit:
            self.reselect()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for mg in self._managed or ():
            if mg.kind == "dense":
                w = mg.weight
                if w.grad is not None:
                    if set_to_none:
                        w.grad = None
                    else:
                        w.grad.zero_()

    def _sync_generator(self) -> None:
        """Under torch.distributed, take rank 0's generator state once (and after a load): every
        rank then picks the same nuclear-norm matrix, whatever seed each was given."""
        if getattr(self, "_gen_synced", True) or not (dist.is_available()
                                                      and dist.is_initialized()):
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
            if mg.kind != "dense" and \
                    mg.module._parameters.get(_VALUES_NAME, mg.values) is not mg.values:
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
        (the weights hold them; :meth:`delta` keeps them as its frozen part); the survivors keep
        their values, and their Adam moments and step counts unless ``progressive_reset``."""
        self._check_open()
        before = self.num_trainable()
        resized_registered = False
        with torch.no_grad():
            for mg in self._managed:
                p = mg.values
                st = self.state[p]
                mag = mg.fine_tuned().abs()
                keep = mag <= mg.select_threshold if mg.inclusive else mag < mg.select_threshold
                del mag
                if self.progressive_reset:
                    st["step"] = torch.tensor(0.0)
                if bool(keep.all()):
                    if self.progressive_reset:
                        st["exp_avg"].zero_()
                        st["exp_avg_sq"].zero_()
                    continue
                drop = ~keep
                flat = mg.flat_indices()
                fi = torch.cat([mg.frozen_indices, flat[drop]])
                fv = torch.cat([mg.frozen_values, p.detach()[drop]])
                fb = torch.cat([mg.frozen_base, mg.base[drop]])
                order = fi.argsort()
                mg.frozen_indices, mg.frozen_values = fi[order], fv[order]
                mg.frozen_base = fb[order]
                if self.progressive_reset:
                    n = int(keep.sum())
                    st["exp_avg"] = st["exp_avg"].new_zeros(n)
                    st["exp_avg_sq"] = st["exp_avg_sq"].new_zeros(n)
                else:
                    st["exp_avg"] = st["exp_avg"][keep].contiguous()
                    st["exp_avg_sq"] = st["exp_avg_sq"][keep].contiguous()
                mg.set_indices(flat[keep])
                mg.base = mg.base[keep].contiguous()
                self._resize_values(mg, p.detach()[keep].contiguous())
                resized_registered = resized_registered or \
                    (mg.kind != "dense" and mg.module._parameters.get(_VALUES_NAME) is mg.values)
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
        if mg.kind != "dense" and mg.module._parameters.get(_VALUES_NAME) is old:
            mg.module._parameters[_VALUES_NAME] = new

    # -- save / load / unwrap -------------------------------------------------------------------

    def delta(self) -> dict[str, torch.Tensor]:
        """The exact sparse update as a plain dict of tensors (safe for ``torch.save`` with
        ``weights_only`` loading, and for safetensors): for each managed parameter ``name``,
        ``name + ".sara_indices"`` (sorted flat row-major indices, int32 or int64),
        ``name + ".sara_values"`` (the deltas: the weight's dtype, float32 for float16/bfloat16
        weights) and ``name + ".sara_shape"`` (the weight's shape, int64; :func:`load` refuses a
        weight of another shape). Apply with :func:`load`."""
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
            out[mg.name + _SHAPE_KEY] = torch.tensor(mg.shape, dtype=torch.int64)
        return out

    def state_dict(self):
        """The optimizer's state (tensors only): per managed parameter the Adam moments and step
        count, the active indices, values and pretrained entries, the entries a reselection froze,
        and the weight's shape; the generator of the nuclear-norm picks as ``sara_rng``."""
        self._check_open()
        sd = super().state_dict()
        for i, mg in enumerate(self._managed):
            st = sd["state"].setdefault(i, {})
            st["indices"] = mg.flat_indices()
            st["values"] = mg.values.detach()
            st["base"] = mg.base
            st["frozen_indices"] = mg.frozen_indices
            st["frozen_values"] = mg.frozen_values
            st["frozen_base"] = mg.frozen_base
            st["shape"] = torch.tensor(mg.shape, dtype=torch.int64)
        sd["sara_rng"] = self._gen.get_state()
        return sd

    def _validated(self, state_dict) -> tuple[dict, list[dict], Optional[torch.Tensor]]:
        """Check a state dict completely; returns (hyperparameters of the group, per managed
        parameter the tensors to install, the generator state). Raises, changing nothing."""
        where = "ftops.SaRA.load_state_dict"
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{where}: state_dict must be a dict, got {type(state_dict).__name__}")
        missing = [k for k in ("state", "param_groups") if k not in state_dict]
        if missing:
            raise ValueError(f"{where}: not an optimizer state dict (no {missing})")
        groups, states = state_dict["param_groups"], state_dict["state"]
        n = len(self._managed)
        if (not isinstance(groups, (list, tuple)) or len(groups) != 1
                or not isinstance(groups[0], Mapping)
                or not isinstance(groups[0].get("params"), (list, tuple))
                or len(groups[0]["params"]) != n):
            raise ValueError(f"{where}: the state dict must hold one param group of {n} "
                             "parameters (one per managed parameter), as SaRA.state_dict() "
                             "writes")
        if not isinstance(states, Mapping):
            raise TypeError(f"{where}: state_dict['state'] must be a dict, got "
                            f"{type(states).__name__}")
        group = groups[0]
        _checks.check_groups(where, [group], lr=dict(low=0.0), eps=dict(low=0.0),
                             weight_decay=dict(low=0.0), lambda_rank=dict(low=0.0), betas={})
        lacking = [k for k in ("lr", "betas", "eps", "weight_decay", "lambda_rank",
                               "progressive_iter", "sara_step") if k not in group]
        if lacking:
            raise ValueError(f"{where}: the param group lacks {lacking}: not a state dict of "
                             "ftops.SaRA")
        if group["progressive_iter"] is not None:
            _checks.integer(where, "param_groups[0]['progressive_iter']",
                            group["progressive_iter"], low=1)
        _checks.integer(where, "param_groups[0]['sara_step']", group["sara_step"], low=0)
        plans = []
        for i, (pid, mg) in enumerate(zip(group["params"], self._managed)):
            st = states.get(pid)
            label = f"state {pid!r} ({mg.name})"
            if not isinstance(st, Mapping):
                raise ValueError(f"{where}: no state for {label}")
            absent = [k for k in _STATE_KEYS if k not in st]
            if absent:
                raise ValueError(f"{where}: {label} lacks {absent}: not a state dict of "
                                 "ftops.SaRA (torch.optim.AdamW's, or one saved by another "
                                 "version?)")
            for k in _STATE_KEYS:
                v = st[k]
                number = isinstance(v, (int, float)) and not isinstance(v, bool)
                if not isinstance(v, torch.Tensor) and not (k == "step" and number):
                    raise TypeError(f"{where}: {label}[{k!r}] must be a tensor, got "
                                    f"{type(v).__name__}")
            shape = st["shape"]
            if shape.dim() != 1 or shape.dtype not in (torch.int32, torch.int64) or \
                    tuple(shape.tolist()) != mg.shape:
                raise ValueError(f"{where}: {label} is for a weight of shape "
                                 f"{shape.tolist() if shape.dim() == 1 else '?'}, but the "
                                 f"model's has shape {list(mg.shape)}")
            step = _checks.real(where, f"{label}['step']", st["step"], low=0.0)
            if step != int(step):
                raise ValueError(f"{where}: {label}['step'] must be a whole number, got {step}")
            w_dtype, v_dtype = mg.base.dtype, mg.values.dtype
            idx = _state_indices(where, label, st, "indices", mg.numel)
            fidx = _state_indices(where, label, st, "frozen_indices", mg.numel)
            k, kf = idx.numel(), fidx.numel()
            if kf and k and bool(torch.isin(fidx, idx).any()):
                raise ValueError(f"{where}: {label}: frozen_indices and indices overlap")

            def floats(key, length, dtype):
                return _state_floats(where, label, st, key, length, dtype, mg.name)

            plan = dict(
                indices=idx, values=floats("values", k, v_dtype), base=floats("base", k, w_dtype),
                exp_avg=floats("exp_avg", k, None), exp_avg_sq=floats("exp_avg_sq", k, None),
                frozen_indices=fidx, frozen_values=floats("frozen_values", kf, v_dtype),
                frozen_base=floats("frozen_base", kf, w_dtype), step=float(step))
            if bool((plan["exp_avg_sq"] < 0).any()):
                raise ValueError(f"{where}: {label}['exp_avg_sq'] has negative entries")
            plans.append(plan)
        rng = state_dict.get("sara_rng")
        if rng is not None:
            if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8:
                raise TypeError(f"{where}: sara_rng must be a uint8 tensor (a generator state)")
            try:
                torch.Generator().set_state(rng)
            except RuntimeError as e:
                raise ValueError(f"{where}: sara_rng is not a generator state ({e})") from None
        hyper = {k: v for k, v in group.items() if k != "params"}
        return hyper, plans, rng

    def load_state_dict(self, state_dict) -> None:
        """Restore moments, steps, the trainable sets, the values and the pretrained entries, and
        write the fine-tuned entries (active and frozen) into the model's weights. Everything is
        checked first (shapes, dtypes, index ranges, a state dict of another optimizer, strings
        in place of tensors): on error nothing changes."""
        self._check_open()
        for hook in getattr(self, "_optimizer_load_state_dict_pre_hooks", {}).values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        hyper, plans, rng = self._validated(state_dict)
        # Converted before anything is installed (a failing copy changes nothing).
        ready = []
        for mg, plan in zip(self._managed, plans):
            dev, md = mg.values.device, moment_dtype(mg.values.dtype)
            itype = _index_dtype(mg.numel)
            ready.append(dict(
                indices=plan["indices"].to(device=dev, dtype=itype),
                values=plan["values"].to(dev, copy=True),
                base=plan["base"].to(dev, copy=True),
                exp_avg=plan["exp_avg"].to(device=dev, dtype=md, copy=True).contiguous(),
                exp_avg_sq=plan["exp_avg_sq"].to(device=dev, dtype=md, copy=True).contiguous(),
                frozen_indices=plan["frozen_indices"].to(device=dev, dtype=itype, copy=True),
                frozen_values=plan["frozen_values"].to(dev, copy=True),
                frozen_base=plan["frozen_base"].to(dev, copy=True),
                step=plan["step"]))
        for mg, r in zip(self._managed, ready):
            mg.values.grad = None
            if r["values"].shape == mg.values.shape:
                mg.values.data = r["values"]
            else:
                self._resize_values(mg, r["values"])
            mg.set_indices(r["indices"])
            mg.base = r["base"]
            mg.frozen_indices = r["frozen_indices"]
            mg.frozen_values = r["frozen_values"]
            mg.frozen_base = r["frozen_base"]
            self.state[mg.values] = {"step": torch.tensor(r["step"]), "exp_avg": r["exp_avg"],
                                     "exp_avg_sq": r["exp_avg_sq"]}
            mg.write_()
            if mg.frozen_indices.numel():
                _write_entries(mg.weight, mg.frozen_indices,
                               (mg.frozen_base + mg.frozen_values).to(mg.base.dtype))
        self.param_groups[0].update(hyper)
        if rng is not None:
            self._gen.set_state(rng)
            self._gen_synced = False
        for hook in getattr(self, "_optimizer_load_state_dict_post_hooks", {}).values():
            hook(self)

    def unwrap(self) -> nn.Module:
        """Make the model plain again: restores the layers' forward methods and the parameters'
        ``requires_grad`` flags (the weights already hold the fine-tuned values). The optimizer
        cannot step afterwards; :meth:`delta` must be taken before. Also available as
        :meth:`merge`."""
        if self._managed is None:
            return self._model
        for mg in self._managed:
            _release(mg)
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
    m, n = shape
    rows = torch.div(indices, n, rounding_mode="floor")
    return _nuclear_grad(values, indices, shape, lambda dy, x: _ops.sddmm(dy, x, rows,
                                                                          indices - rows * n))


def _nuclear_grad(values, flat, shape, gather):
    """:func:`nuclear_norm_grad` with ``gather(dy, x)`` returning ``(dy^T x)`` at the indices (the
    SDDMM kernel on them): the dense ``U_r V_r^T`` is never formed. A wide matrix is decomposed
    as its transpose (``D^T = U' S V'^T``, so ``U_r V_r^T = V'_r U'_r^T``): LAPACK's SVD is
    faster on tall matrices."""
    if values.numel() == 0 or not bool(values.any()):
        return None
    m, n = shape
    dt = torch.float64 if values.dtype == torch.float64 else torch.float32
    D = torch.zeros(m * n, dtype=dt, device=values.device)
    D[flat] = values.to(dt)
    D = D.view(m, n)
    wide = m < n
    U, S, Vh = torch.linalg.svd(D.t() if wide else D, full_matrices=False)
    del D
    tol = S[0] * max(m, n) * torch.finfo(dt).eps
    r = int((S > tol).sum().item())
    if wide:  # G[i, j] = sum_t Vh[t, i] U[j, t]
        return gather(Vh[:r], U[:, :r].t())
    return gather(U[:, :r].t(), Vh[:r])


def unwrap(model: nn.Module) -> nn.Module:
    """Make a model that a :class:`SaRA` optimizer manages plain again (its weights already hold
    the fine-tuned values; see :meth:`SaRA.unwrap`). Does not restore ``requires_grad`` flags
    (only the optimizer knows them)."""
    for mod in model.modules():
        mg = getattr(mod, _ATTR, None)
        if isinstance(mg, _Managed):
            _release(mg)
    for p in model.parameters():
        mg = getattr(p, _ATTR, None)
        if isinstance(mg, _Managed):
            _release(mg)
    return model


def load(base_model: nn.Module, delta: Mapping[str, torch.Tensor]) -> nn.Module:
    """Apply a :meth:`SaRA.delta` to a freshly loaded pretrained model, in place, and return it.

    For every weight in the delta, ``W.flatten()[indices] = W.flatten()[indices] + values``
    (summed in the values' dtype, rounded once to W's dtype), computed exactly as during training,
    so the result equals the fine-tuned model bit for bit. Everything is checked before any weight
    is written: the weight's shape (when the delta records it, as every delta of this version
    does), index ranges, duplicate indices, dtypes, finite values."""
    where = "ftops.sara.load"
    if not isinstance(base_model, nn.Module):
        raise TypeError(f"{where}: base_model must be an nn.Module, got "
                        f"{type(base_model).__name__}")
    if not isinstance(delta, Mapping):
        raise TypeError(f"{where}: delta must be a dict of tensors (SaRA.delta()), got "
                        f"{type(delta).__name__}")
    for k, v in delta.items():
        if not isinstance(k, str):
            raise TypeError(f"{where}: the delta's keys must be strings, got {k!r}")
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{where}: delta[{k!r}] must be a tensor, got {type(v).__name__}")
    suffixes = (_IDX_KEY, _VAL_KEY, _SHAPE_KEY)
    unknown = [k for k in delta if not k.endswith(suffixes)]
    if unknown:
        raise ValueError(f"{where}: unexpected keys in the delta: {unknown[:5]}")
    names = sorted({k[:-len(s)] for k in delta for s in suffixes if k.endswith(s)})
    params = dict(base_model.named_parameters(remove_duplicate=False))
    plan, seen = [], {}
    for name in names:
        ik, vk, sk = name + _IDX_KEY, name + _VAL_KEY, name + _SHAPE_KEY
        if ik not in delta or vk not in delta:
            raise ValueError(f"{where}: the delta of {name!r} needs both {ik!r} and {vk!r}")
        if name not in params:
            raise ValueError(f"{where}: the model has no parameter {name!r}")
        w = params[name]
        if id(w) in seen:
            raise ValueError(f"{where}: {name!r} and {seen[id(w)]!r} are the same (tied) "
                             "parameter; the delta would update it twice")
        seen[id(w)] = name
        if isinstance(w, DTensor) or w.is_meta:
            kind = "DTensor" if isinstance(w, DTensor) else "meta tensor"
            raise ValueError(f"{where}: {name} is a {kind}; "
                             "load the delta into the whole model, with its weights loaded")
        if w.dtype not in _FLOAT_TYPES:
            raise TypeError(f"{where}: {name} has dtype {w.dtype}; SaRA deltas apply to float "
                            "weights")
        idx, val = delta[ik], delta[vk]
        if sk in delta:
            shp = delta[sk]
            if shp.dim() != 1 or shp.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"{where}: {sk} must be a 1-D int64 tensor (the weight's shape)")
            if shp.tolist() != list(w.shape):
                raise ValueError(f"{where}: the delta of {name} is for a weight of shape "
                                 f"{shp.tolist()}, but the model's has shape {list(w.shape)}")
        if idx.dtype not in (torch.int32, torch.int64) or idx.dim() != 1:
            raise TypeError(f"{where}: {ik} must be a 1-D int32/int64 tensor")
        if val.shape != idx.shape:
            raise ValueError(f"{where}: {vk} has shape {list(val.shape)} but {ik} has "
                             f"{list(idx.shape)}")
        if val.dtype != values_dtype(w.dtype):
            raise TypeError(f"{where}: {vk} has dtype {val.dtype} but the deltas of "
                            f"{w.dtype} weight {name} are {values_dtype(w.dtype)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= w.numel()):
            raise ValueError(f"{where}: {ik} has entries outside [0, {w.numel()})")
        if idx.numel() > 1 and torch.unique(idx).numel() != idx.numel():
            raise ValueError(f"{where}: {ik} has duplicate indices")
        if not bool(torch.isfinite(val).all()):
            raise ValueError(f"{where}: {vk} has NaN or infinite entries")
        if not w.is_contiguous():
            raise ValueError(f"{where}: {name} is not contiguous")
        plan.append((w, idx.to(w.device), val.to(w.device)))
    with torch.no_grad():
        for w, idx, val in plan:
            flat = w.view(-1)
            flat[idx] = (flat[idx] + val).to(w.dtype)
    return base_model
