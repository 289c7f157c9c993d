"""S²FT: structured sparse fine-tuning (Yang et al. 2024) with co-permutation and partial backprop.

S²FT trains a few attention heads and feed-forward channels of a transformer and freezes the rest:

* attention: for each selected head, the rows of the value projection that produce it and the
  columns of the output projection that read it;
* feed-forward: for each selected channel, the row of the up projection that produces it and the
  column of the down projection that reads it.

:func:`apply` co-permutes every block so that the selected units come first (the same order on
the query/key/value rows of a head and the output-projection columns that read it; on the
gate/up rows of a channel and the down-projection columns that read it). Permuting heads or
channels consistently does not change what the model computes, and it makes every trainable part
one contiguous slice: the first rows of a row-trained weight, the first columns of a
column-trained one.

The trainable slices are ordinary ``nn.Parameter`` objects that share storage with the frozen
weights, so any torch optimizer updates the weights in place, its state is sized to the slices,
and gradient accumulation is plain autograd accumulation. The row-trained projections (value,
up / BERT intermediate) compute only the selected rows' weight gradient; the column-trained ones
(attention output, down / BERT output) save only the selected input columns for backward and
compute only that slice's gradient; every other projection is a frozen ``nn.Linear`` and
computes no weight gradient. No full-size weight gradient is ever formed.

Grouped-query attention: the unit of selection is a key/value head together with the query heads
that share it (for ordinary multi-head attention, one head). Only whole groups can be made
contiguous by a permutation that keeps the function: query head ``h`` reads key/value head
``h // (num_heads // num_kv_heads)``. A ``heads`` ratio is therefore the fraction of key/value
heads, which equals the fraction of query heads.

Typical use::

    sel = ftops.s2ft.select(model, heads=0.05, channels=0.02, seed=0)
    ftops.s2ft.apply(model, sel)                       # in place; returns model
    opt = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
    ...train...
    adapter = ftops.s2ft.export(model)                 # deltas + selection + permutation
    torch.save(adapter, "adapter.pt")
    model = ftops.s2ft.load(fresh_base_model, torch.load("adapter.pt", weights_only=True))
    plain = ftops.s2ft.merge(model)                    # a plain model in the original order

Supported blocks, found automatically: Llama-style attention (``q_proj``, ``k_proj``, ``v_proj``,
``o_proj`` with a ``head_dim``; grouped-query attention and biases included) and MLPs
(``gate_proj``, ``up_proj``, ``down_proj``), which covers Llama, Mistral, Qwen2/3 and similar
transformers models; BERT-style attention (``self.query/key/value`` + ``output.dense``) and
feed-forward blocks (``intermediate.dense`` + ``output.dense``), with biases.
"""
from __future__ import annotations

import abc
import math
import numbers
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed
    DTensor = ()

__all__ = [
    "Selection",
    "RowSliceLinear",
    "ColumnSliceLinear",
    "select",
    "apply",
    "export",
    "merge",
    "load",
    "unload",
]

ADAPTER_FORMAT = "ftops.s2ft"
ADAPTER_VERSION = 1
STRATEGIES = ("random", "weight_norm")
_STATE_ATTR = "_ftops_s2ft"
# Independent random streams for heads and channels, so that one ratio does not change the
# other's draw.
_CHANNEL_STREAM = 0x5BD1E995


# --------------------------------------------------------------------------------------------------
# Model structure
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _AttnBlock:
    path: str
    q: str
    k: str
    v: str
    o: str
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class _MlpBlock:
    path: str
    gate: str | None
    up: str
    down: str
    channels: int


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _linear_child(module: nn.Module, name: str) -> nn.Linear | None:
    child = getattr(module, name, None)
    return child if isinstance(child, nn.Linear) else None


def _llama_attention(path: str, m: nn.Module) -> _AttnBlock | None:
    q, k, v, o = (_linear_child(m, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    if q is None or k is None or v is None or o is None:
        return None
    head_dim = getattr(m, "head_dim", None)
    if not isinstance(head_dim, int):
        num_heads = getattr(m, "num_heads", None)
        if not isinstance(num_heads, int):
            num_heads = getattr(getattr(m, "config", None), "num_attention_heads", None)
        if not isinstance(num_heads, int) or num_heads <= 0 or q.out_features % num_heads:
            return None
        head_dim = q.out_features // num_heads
    return _checked_attention(path, m, q, k, v, o, head_dim,
                              ("q_proj", "k_proj", "v_proj", "o_proj"))


def _bert_attention(path: str, m: nn.Module) -> _AttnBlock | None:
    sa, out = getattr(m, "self", None), getattr(m, "output", None)
    if not isinstance(sa, nn.Module) or not isinstance(out, nn.Module):
        return None
    q, k, v = (_linear_child(sa, n) for n in ("query", "key", "value"))
    o = _linear_child(out, "dense")
    if q is None or k is None or v is None or o is None:
        return None
    head_dim = getattr(sa, "attention_head_size", None)
    if not isinstance(head_dim, int):
        return None
    return _checked_attention(path, m, q, k, v, o, head_dim,
                              ("self.query", "self.key", "self.value", "output.dense"))


def _checked_attention(path, m, q, k, v, o, head_dim, names) -> _AttnBlock:
    ok = (
        head_dim > 0
        and q.out_features % head_dim == 0
        and k.out_features == v.out_features
        and k.out_features % head_dim == 0
        and o.in_features == q.out_features
        and q.in_features == k.in_features == v.in_features
    )
    if ok:
        num_heads, num_kv = q.out_features // head_dim, k.out_features // head_dim
        ok = num_kv > 0 and num_heads % num_kv == 0
    if not ok:
        raise ValueError(
            f"model: attention module {path or '<root>'} ({type(m).__name__}) has inconsistent "
            f"shapes for head_dim={head_dim}: {names[0]} {tuple(q.weight.shape)}, {names[1]} "
            f"{tuple(k.weight.shape)}, {names[2]} {tuple(v.weight.shape)}, {names[3]} "
            f"{tuple(o.weight.shape)}; S²FT cannot permute its heads"
        )
    q_, k_, v_, o_ = (_join(path, n) for n in names)
    return _AttnBlock(path, q_, k_, v_, o_, num_heads, num_kv, head_dim)


def _llama_mlp(path: str, m: nn.Module) -> _MlpBlock | None:
    gate, up, down = (_linear_child(m, n) for n in ("gate_proj", "up_proj", "down_proj"))
    if gate is None or up is None or down is None:
        return None
    if not (gate.out_features == up.out_features == down.in_features
            and gate.in_features == up.in_features):
        raise ValueError(
            f"model: MLP module {path or '<root>'} ({type(m).__name__}) has inconsistent shapes: "
            f"gate_proj {tuple(gate.weight.shape)}, up_proj {tuple(up.weight.shape)}, down_proj "
            f"{tuple(down.weight.shape)}"
        )
    return _MlpBlock(path, _join(path, "gate_proj"), _join(path, "up_proj"),
                     _join(path, "down_proj"), up.out_features)


def _bert_mlp(path: str, m: nn.Module) -> _MlpBlock | None:
    inter, out = getattr(m, "intermediate", None), getattr(m, "output", None)
    if not isinstance(inter, nn.Module) or not isinstance(out, nn.Module):
        return None
    up, down = _linear_child(inter, "dense"), _linear_child(out, "dense")
    if up is None or down is None or up.out_features != down.in_features:
        return None
    return _MlpBlock(path, None, _join(path, "intermediate.dense"), _join(path, "output.dense"),
                     up.out_features)


def _find_blocks(model: nn.Module) -> tuple[tuple[_AttnBlock, ...], tuple[_MlpBlock, ...]]:
    """The attention and feed-forward blocks S²FT knows how to permute, in module order."""
    attn, mlp = [], []
    for path, m in model.named_modules():
        a = _llama_attention(path, m) or _bert_attention(path, m)
        if a is not None:
            attn.append(a)
        f = _llama_mlp(path, m) or _bert_mlp(path, m)
        if f is not None:
            mlp.append(f)
    return tuple(attn), tuple(mlp)


def _require_blocks(model: nn.Module):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, _STATE_ATTR, None) is not None:
        raise ValueError("model: S²FT is already applied to this model; call "
                         "ftops.s2ft.merge(model) or ftops.s2ft.unload(model) first")
    attn, mlp = _find_blocks(model)
    if not attn and not mlp:
        raise ValueError(
            f"model: no attention or feed-forward blocks that S²FT recognises in "
            f"{type(model).__name__}. Supported: Llama-style blocks (q_proj/k_proj/v_proj/o_proj "
            "with head_dim; gate_proj/up_proj/down_proj) and BERT-style blocks "
            "(attention.self.query/key/value + attention.output.dense; intermediate.dense + "
            "output.dense), all as torch.nn.Linear"
        )
    return attn, mlp


# --------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Selection:
    """Which attention heads and feed-forward channels S²FT trains.

    ``heads`` maps the path of an attention module to the sorted indices of its selected
    key/value heads (each with the query heads that share it); ``channels`` maps the path of a
    feed-forward module to its sorted selected channel indices. Modules with nothing selected are
    absent. ``head_counts`` / ``channel_counts`` give the number of units of every recognised
    module (used to check that a selection fits a model). Indices refer to the model's original
    (unpermuted) order. ``strategy`` and ``seed`` record how it was made.
    """

    heads: Mapping[str, tuple[int, ...]]
    channels: Mapping[str, tuple[int, ...]]
    head_counts: Mapping[str, int]
    channel_counts: Mapping[str, int]
    strategy: str = "random"
    seed: int | None = 0

    @property
    def num_heads(self) -> int:
        """Number of selected key/value heads over all blocks."""
        return sum(len(v) for v in self.heads.values())

    @property
    def num_channels(self) -> int:
        """Number of selected feed-forward channels over all blocks."""
        return sum(len(v) for v in self.channels.values())

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (str, int, list) that ``torch.load(weights_only=True)`` and JSON accept."""
        return {
            "heads": {k: list(v) for k, v in self.heads.items()},
            "channels": {k: list(v) for k, v in self.channels.items()},
            "head_counts": dict(self.head_counts),
            "channel_counts": dict(self.channel_counts),
            "strategy": self.strategy,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Selection":
        """The inverse of :meth:`to_dict`."""
        if not isinstance(d, Mapping):
            raise TypeError(f"selection: expected a dict, got {type(d).__name__}")
        missing = {"heads", "channels", "head_counts", "channel_counts"} - set(d)
        if missing:
            raise ValueError(f"selection: missing keys {sorted(missing)}")
        return cls(
            heads={str(k): tuple(int(i) for i in v) for k, v in d["heads"].items()},
            channels={str(k): tuple(int(i) for i in v) for k, v in d["channels"].items()},
            head_counts={str(k): int(v) for k, v in d["head_counts"].items()},
            channel_counts={str(k): int(v) for k, v in d["channel_counts"].items()},
            strategy=str(d.get("strategy", "random")),
            seed=None if d.get("seed") is None else int(d["seed"]),
        )


def _check_ratio(name: str, value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a float in (0, 1] or None, got {type(value).__name__}")
    value = float(value)
    if not (0.0 < value <= 1.0):  # also rejects nan
        raise ValueError(f"{name}: must be in (0, 1] (or None to train none), got {value}")
    return value


def _count(name: str, ratio: float, total: int, what: str) -> int:
    n = int(math.floor(ratio * total + 0.5))
    if n == 0:
        raise ValueError(
            f"{name}={ratio} selects none of the model's {total} {what}; use at least "
            f"{1.0 / total:.3g} (one unit), or {name}=None to train no {what}"
        )
    return n


def _head_scores(model: nn.Module, a: _AttnBlock) -> torch.Tensor:
    v = model.get_submodule(a.v).weight.detach().double()
    o = model.get_submodule(a.o).weight.detach().double()
    nv = v.reshape(a.num_kv_heads, -1).norm(dim=1)
    no = o.reshape(o.shape[0], a.num_kv_heads, -1).norm(dim=(0, 2))
    return (nv * no).cpu()


def _channel_scores(model: nn.Module, f: _MlpBlock) -> torch.Tensor:
    up = model.get_submodule(f.up).weight.detach().double()
    down = model.get_submodule(f.down).weight.detach().double()
    return (up.norm(dim=1) * down.norm(dim=0)).cpu()


def _pick(blocks, sizes, n, strategy, generator, scores_fn) -> dict[str, tuple[int, ...]]:
    total = sum(sizes)
    if strategy == "random":
        flat = torch.randperm(total, generator=generator)[:n]
    else:
        scores = torch.cat([scores_fn(b) for b in blocks])
        flat = torch.sort(scores, descending=True, stable=True).indices[:n]
    flat = torch.sort(flat).values.tolist()
    out: dict[str, list[int]] = {}
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    bi = 0
    for i in flat:
        while i >= offsets[bi + 1]:
            bi += 1
        out.setdefault(blocks[bi].path, []).append(i - offsets[bi])
    return {k: tuple(v) for k, v in out.items()}


def select(
    model: nn.Module,
    heads: float | None = 0.05,
    channels: float | None = 0.02,
    strategy: str = "random",
    seed: int = 0,
) -> Selection:
    """Choose the attention heads and feed-forward channels to train, globally over all blocks.

    Args:
        model: a plain (not yet S²FT-applied) transformers-style model; see the module docstring
            for the blocks that are recognised.
        heads: fraction in (0, 1] of all key/value heads of all attention blocks to train
            (rounded to the nearest count, which must be at least one), or None for none.
            With grouped-query attention a key/value head comes with the query heads that share
            it, so this is also the fraction of query heads.
        channels: fraction in (0, 1] of all feed-forward channels of all blocks, or None.
        strategy: ``"random"``: uniformly at random without replacement over all blocks together,
            as in the paper (reproducible from ``seed``; heads and channels use independent
            streams). ``"weight_norm"``: data-free and deterministic: the units whose trained
            weights carry the most weight, scored by the product of Frobenius norms of the
            weights the unit would train (value rows x output-projection columns for a head; up
            row x down column for a channel), largest first, over all blocks together.
        seed: non-negative integer for ``"random"``.

    Returns:
        a :class:`Selection` (indices in the model's original order).
    """
    heads = _check_ratio("heads", heads)
    channels = _check_ratio("channels", channels)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: must be one of {STRATEGIES}, got {strategy!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed: must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    if heads is None and channels is None:
        raise ValueError("heads, channels: both are None, so the selection would be empty")
    attn, mlp = _require_blocks(model)
    head_sel: dict[str, tuple[int, ...]] = {}
    chan_sel: dict[str, tuple[int, ...]] = {}
    if heads is not None:
        if not attn:
            raise ValueError(f"heads={heads}: model has no attention blocks that S²FT "
                             "recognises (pass heads=None to train only channels)")
        sizes = [a.num_kv_heads for a in attn]
        n = _count("heads", heads, sum(sizes), "attention (key/value) heads")
        g = torch.Generator().manual_seed(seed)
        head_sel = _pick(attn, sizes, n, strategy, g, lambda a: _head_scores(model, a))
    if channels is not None:
        if not mlp:
            raise ValueError(f"channels={channels}: model has no feed-forward blocks that S²FT "
                             "recognises (pass channels=None to train only heads)")
        sizes = [f.channels for f in mlp]
        n = _count("channels", channels, sum(sizes), "feed-forward channels")
        g = torch.Generator().manual_seed(seed ^ _CHANNEL_STREAM)
        chan_sel = _pick(mlp, sizes, n, strategy, g, lambda f: _channel_scores(model, f))
    return Selection(
        heads=head_sel,
        channels=chan_sel,
        head_counts={a.path: a.num_kv_heads for a in attn},
        channel_counts={f.path: f.channels for f in mlp},
        strategy=strategy,
        seed=seed if strategy == "random" else None,
    )


def _check_selection(sel: Selection, attn, mlp) -> None:
    if not isinstance(sel, Selection):
        raise TypeError(f"selection: expected ftops.s2ft.Selection, got {type(sel).__name__}")
    if sel.num_heads == 0 and sel.num_channels == 0:
        raise ValueError("selection: selects no heads and no channels; nothing would train")
    for kind, chosen, counts, blocks, size in (
        ("heads", sel.heads, sel.head_counts, attn, lambda a: a.num_kv_heads),
        ("channels", sel.channels, sel.channel_counts, mlp, lambda f: f.channels),
    ):
        have = {b.path: size(b) for b in blocks}
        if dict(counts) != have:
            raise ValueError(
                f"selection: its {kind} were chosen for a different model structure "
                f"(selection has {len(counts)} blocks {dict(list(counts.items())[:3])}..., "
                f"model has {len(have)} blocks {dict(list(have.items())[:3])}...)"
            )
        for path, idx in chosen.items():
            if path not in have:
                raise ValueError(f"selection: {kind} for unknown module {path!r}")
            if list(idx) != sorted(set(idx)) or (idx and not 0 <= idx[0] <= idx[-1] < have[path]):
                raise ValueError(
                    f"selection: {kind}[{path!r}] must be sorted, unique indices in "
                    f"[0, {have[path]}), got {list(idx)}"
                )


# --------------------------------------------------------------------------------------------------
# Partial-backprop linear layers
# --------------------------------------------------------------------------------------------------

class _RowSliceFn(torch.autograd.Function):
    """y = x W^T + b where only W[:n] (and b[:n]) receive gradients."""

    @staticmethod
    def forward(ctx, x, weight, bias, weight_slice, bias_slice):
        ctx.rows = weight_slice.shape[0]
        ctx.x_shape = x.shape
        # The selected rows' gradient needs the whole input (dW[:n] = dY[:, :n]^T X); the input
        # of v_proj/up_proj is the normalised hidden state that q/k/gate read as well.
        ctx.save_for_backward(x if ctx.needs_input_grad[3] else None, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        n = ctx.rows
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(dy2, weight.to(dy2.dtype)).view(*ctx.x_shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[3]:
            dw = torch.mm(dy2[:, :n].t(), x.reshape(-1, x.shape[-1]).to(dy2.dtype))
        if ctx.needs_input_grad[4]:
            db = dy2[:, :n].sum(0)
        return dx, None, None, dw, db


class _ColumnSliceFn(torch.autograd.Function):
    """y = x Wt + b (Wt = W^T stored contiguously) where only Wt[:n] = W[:, :n]^T gets gradients."""

    @staticmethod
    def forward(ctx, x, weight_t, bias, weight_slice):
        n = weight_slice.shape[0]
        ctx.x_shape = x.shape
        # Only the selected input columns are needed for the slice's gradient: save a compact
        # copy of them, not x.
        x_sel = x[..., :n].contiguous() if ctx.needs_input_grad[3] else None
        ctx.save_for_backward(x_sel, weight_t)
        return F.linear(x, weight_t.t(), bias)

    @staticmethod
    def backward(ctx, dy):
        x_sel, weight_t = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(dy2, weight_t.t().to(dy2.dtype)).view(*ctx.x_shape[:-1], weight_t.shape[0])
        if ctx.needs_input_grad[3]:
            dw = torch.mm(x_sel.reshape(-1, x_sel.shape[-1]).t().to(dy2.dtype), dy2)
        return dx, None, None, dw


class _SliceLinear(nn.Module, abc.ABC):
    """Shared machinery: trainable slices that are views of frozen buffers."""

    in_features: int
    out_features: int

    @abc.abstractmethod
    def _links(self) -> Iterator[tuple[str, torch.Tensor, int]]:
        """(slice parameter name, buffer it views, leading rows or columns it covers) per slice."""

    def _relink(self) -> None:
        """Make every slice parameter a view of its buffer again.

        ``Module.to``/``cuda``/``half`` convert parameters and buffers separately, and
        ``copy.deepcopy``/pickling copy them separately, which would cut the storage sharing.
        The slice parameter is authoritative for its part: its values are written into the
        buffer and the parameter (same object, so optimizers keep it) becomes a view again.

        A parameter object that this layer did not create is not re-pointed, only copied from:
        FSDP2 (``fully_shard``) replaces the slice with a sharded DTensor between forwards and
        registers its own unsharded parameter (storage it manages) for each forward, so the
        gathered, current values reach the buffer at every forward and FSDP keeps its storage.
        """
        for pname, full, n in self._links():
            p = getattr(self, pname)
            if p is None:
                continue
            own = p is self._own_slices.get(pname)
            if not own and isinstance(p, DTensor):
                continue  # sharded between forwards: copied at the next forward
            view = full.narrow(0, 0, n)
            if (p.data_ptr() != view.data_ptr() or p.device != view.device
                    or p.dtype != view.dtype or p.shape != view.shape):
                with torch.no_grad():
                    view.copy_(p.detach())
                if own:
                    p.data = view

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._relink()
        return self

    def __setstate__(self, state):  # copy.deepcopy and unpickling
        super().__setstate__(state)
        self._relink()

    def _check_links(self) -> None:
        # The data-pointer checks of _relink would break a torch.compile graph; under compile rely
        # on _apply and __setstate__ having relinked (only replacing a tensor by hand cuts the link).
        if not torch.compiler.is_compiling():
            self._relink()

    def _slices_need_grad(self) -> bool:
        return torch.is_grad_enabled() and any(
            getattr(self, pname) is not None and getattr(self, pname).requires_grad
            for pname, _, _ in self._links())


class RowSliceLinear(_SliceLinear):
    """A frozen ``nn.Linear`` whose first ``rows`` output rows are trainable.

    ``weight`` ([out, in]) and ``bias`` are frozen buffers; ``weight_slice`` is
    ``weight[:rows]`` and ``bias_slice`` is ``bias[:rows]`` (when the layer has a bias and
    ``train_bias`` was set), both ``nn.Parameter`` views of the buffers' storage, so an optimizer
    step on them updates the weight in place. Backward computes only the slices' gradients (and
    the input gradient). ``weight_slice_base`` / ``bias_slice_base`` keep the slices' values from
    when the layer was made, for :func:`export` and :func:`unload`.
    """

    def __init__(self, linear: nn.Linear, rows: int, train_bias: bool = True):
        super().__init__()
        self._setup(linear.weight.detach(), None if linear.bias is None else linear.bias.detach(),
                    rows, train_bias)

    @classmethod
    def _from_tensors(cls, weight, bias, rows, train_bias) -> "RowSliceLinear":
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(weight, bias, rows, train_bias)
        return self

    def _setup(self, weight, bias, rows, train_bias):
        out_features, in_features = weight.shape
        if not 0 < rows <= out_features:
            raise ValueError(f"rows: must be in [1, {out_features}], got {rows}")
        self.in_features, self.out_features, self.rows = in_features, out_features, rows
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.weight_slice = nn.Parameter(self.weight.narrow(0, 0, rows))
        self.register_buffer("weight_slice_base", self.weight_slice.detach().clone(), persistent=False)
        self._own_slices = {"weight_slice": self.weight_slice}
        if self.bias is not None and train_bias:
            self.bias_slice = nn.Parameter(self.bias.narrow(0, 0, rows))
            self.register_buffer("bias_slice_base", self.bias_slice.detach().clone(), persistent=False)
            self._own_slices["bias_slice"] = self.bias_slice
        else:
            self.register_parameter("bias_slice", None)
            self.register_buffer("bias_slice_base", None, persistent=False)

    def _links(self):
        yield "weight_slice", self.weight, self.rows
        if self.bias is not None:
            yield "bias_slice", self.bias, self.rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_links()
        if self._slices_need_grad():
            return _RowSliceFn.apply(x, self.weight, self.bias, self.weight_slice, self.bias_slice)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"trainable_rows={self.rows}, bias={self.bias is not None}, "
                f"train_bias={self.bias_slice is not None}")


class ColumnSliceLinear(_SliceLinear):
    """A frozen ``nn.Linear`` whose first ``cols`` input columns are trainable.

    The weight is stored transposed, as the contiguous buffer ``weight_t`` ([in, out]), so that
    the trainable columns ``W[:, :cols]`` are the contiguous rows ``weight_t[:cols]``:
    ``weight_slice`` is that view, an ``nn.Parameter`` of shape [cols, out]. ``weight`` returns
    the usual [out, in] view. The bias (indexed by output) is frozen. Forward saves only
    ``x[..., :cols]`` for backward, which computes only the slice's gradient (and the input
    gradient).
    """

    def __init__(self, linear: nn.Linear, cols: int):
        super().__init__()
        self._setup(linear.weight.detach().t().contiguous(),
                    None if linear.bias is None else linear.bias.detach(), cols)

    @classmethod
    def _from_tensors(cls, weight_t, bias, cols) -> "ColumnSliceLinear":
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(weight_t, bias, cols)
        return self

    def _setup(self, weight_t, bias, cols):
        in_features, out_features = weight_t.shape
        if not 0 < cols <= in_features:
            raise ValueError(f"cols: must be in [1, {in_features}], got {cols}")
        self.in_features, self.out_features, self.cols = in_features, out_features, cols
        self.register_buffer("weight_t", weight_t)
        self.register_buffer("bias", bias)
        self.weight_slice = nn.Parameter(self.weight_t.narrow(0, 0, cols))
        self.register_buffer("weight_slice_base", self.weight_slice.detach().clone(), persistent=False)
        self._own_slices = {"weight_slice": self.weight_slice}

    @property
    def weight(self) -> torch.Tensor:
        """The frozen weight as an [out, in] view of ``weight_t``."""
        return self.weight_t.t()

    def _links(self):
        yield "weight_slice", self.weight_t, self.cols

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_links()
        if self._slices_need_grad():
            return _ColumnSliceFn.apply(x, self.weight_t, self.bias, self.weight_slice)
        return F.linear(x, self.weight_t.t(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"trainable_cols={self.cols}, bias={self.bias is not None}")


# --------------------------------------------------------------------------------------------------
# Plans: what apply does to each block
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Slice:
    name: str         # module path of the trained projection
    mode: str         # "row" or "col"
    index: torch.Tensor  # original row (row mode) / column (col mode) indices of the slice, in order


@dataclass(frozen=True)
class _BlockPlan:
    path: str
    perm: torch.Tensor                                  # new position -> original unit
    moves: tuple[tuple[str, int, torch.Tensor], ...]    # (module, dim, new -> original index)
    slices: tuple[_Slice, ...]


def _units_perm(n: int, chosen: tuple[int, ...]) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[list(chosen)] = False
    return torch.cat([torch.tensor(chosen, dtype=torch.long), torch.nonzero(mask).flatten()])


def _expand(perm: torch.Tensor, width: int) -> torch.Tensor:
    return (perm[:, None] * width + torch.arange(width)).flatten()


def _plans(sel: Selection, attn, mlp) -> list[_BlockPlan]:
    plans = []
    for a in attn:
        chosen = sel.heads.get(a.path, ())
        if not chosen:
            continue
        perm = _units_perm(a.num_kv_heads, chosen)
        q_idx, kv_idx = _expand(perm, a.group * a.head_dim), _expand(perm, a.head_dim)
        k = len(chosen)
        plans.append(_BlockPlan(
            a.path, perm,
            ((a.q, 0, q_idx), (a.k, 0, kv_idx), (a.v, 0, kv_idx), (a.o, 1, q_idx)),
            (_Slice(a.v, "row", kv_idx[: k * a.head_dim]),
             _Slice(a.o, "col", q_idx[: k * a.group * a.head_dim])),
        ))
    for f in mlp:
        chosen = sel.channels.get(f.path, ())
        if not chosen:
            continue
        perm = _units_perm(f.channels, chosen)
        moves = ((f.up, 0, perm), (f.down, 1, perm))
        if f.gate is not None:
            moves = ((f.gate, 0, perm),) + moves
        k = len(chosen)
        plans.append(_BlockPlan(f.path, perm, moves,
                                (_Slice(f.up, "row", perm[:k]), _Slice(f.down, "col", perm[:k]))))
    return plans


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


@torch.no_grad()
def _rearrange(model: nn.Module, old: list[_BlockPlan], new: list[_BlockPlan], train_bias: bool) -> None:
    """Move every projection touched by ``old`` or ``new`` from the ``old`` layout to the ``new``.

    A layout is a permutation of each block's units plus the S²FT layer type of the trained
    projections (no plans: the original model). One pass per weight: the composed permutation
    (undo old, apply new) and the change between [out, in] and transposed storage happen in a
    single ``index_select``. Frozen projections are permuted in place (their Parameter objects
    survive); trained ones get new storage.
    """
    moves: dict[str, list] = {}  # name -> [dim, old index, new index, old slice, new slice]
    for which, plans in ((1, old), (2, new)):
        for plan in plans:
            for name, dim, index in plan.moves:
                moves.setdefault(name, [dim, None, None, None, None])[which] = index
            for sl in plan.slices:
                moves[sl.name][which + 2] = sl
    for name, (dim, i_old, i_new, s_old, s_new) in moves.items():
        mod = model.get_submodule(name)
        n = (i_old if i_old is not None else i_new).numel()
        ident = torch.arange(n)
        idx = (torch.argsort(i_old) if i_old is not None else ident)
        idx = idx[i_new] if i_new is not None else idx  # new[i] = current[idx[i]]
        same_layout = (s_old is None) == (s_new is None) and (
            s_old is None or (s_old.mode == s_new.mode and len(s_old.index) == len(s_new.index)
                              and (s_new.mode == "col" or mod.bias is None
                                   or train_bias == (mod.bias_slice is not None))))
        if torch.equal(idx, ident) and same_layout:
            continue
        if isinstance(mod, ColumnSliceLinear):
            w = mod.weight_t.t()        # [out, in] view
        else:
            w = mod.weight.detach()     # nn.Linear or RowSliceLinear: [out, in]
        bias = None if mod.bias is None else mod.bias.detach()
        index = idx.to(w.device)
        if s_new is None and isinstance(mod, nn.Linear):
            # Frozen projection staying an nn.Linear: permute in place.
            mod.weight.copy_(w.index_select(dim, index))
            if dim == 0 and bias is not None:
                mod.bias.copy_(bias.index_select(0, index))
            continue
        if dim == 0 and bias is not None:
            bias = bias.index_select(0, index)
        if s_new is not None and s_new.mode == "col":
            new_mod = ColumnSliceLinear._from_tensors(w.t().index_select(0, index), bias, len(s_new.index))
        else:
            w = w.index_select(dim, index)  # contiguous [out, in]
            new_mod = (_plain_linear(w, bias) if s_new is None
                       else RowSliceLinear._from_tensors(w, bias, len(s_new.index), train_bias))
        _set_module(model, name, new_mod)


@dataclass
class _State:
    selection: Selection
    attn: tuple[_AttnBlock, ...]
    mlp: tuple[_MlpBlock, ...]
    plans: list[_BlockPlan]
    train_bias: bool
    requires_grad: dict[str, bool]


def _state(model: nn.Module) -> _State | None:
    st = getattr(model, _STATE_ATTR, None)
    return st if isinstance(st, _State) else None


def _require_state(model: nn.Module) -> _State:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    st = _state(model)
    if st is None:
        raise ValueError("model: S²FT is not applied to this model (use ftops.s2ft.apply or "
                         "ftops.s2ft.load first)")
    return st


# --------------------------------------------------------------------------------------------------
# Public API: apply / export / load / merge / unload
# --------------------------------------------------------------------------------------------------

def apply(model: nn.Module, selection: Selection, *, train_bias: bool = True) -> nn.Module:
    """Convert ``model`` in place for S²FT training with ``selection``; returns ``model``.

    Every block with selected units is co-permuted so those units come first (query/key/value
    rows and output-projection columns per key/value head group; gate/up rows and down columns
    per channel), which leaves the model's function unchanged. The value and up (BERT:
    intermediate) projections become :class:`RowSliceLinear`, the attention-output and down
    (BERT: output) projections :class:`ColumnSliceLinear`. Afterwards the parameters with
    ``requires_grad`` are exactly the trainable slices (``...weight_slice``, and
    ``...bias_slice`` of row-trained projections with a bias when ``train_bias``); every other
    parameter is frozen (you may unfreeze e.g. norms or a task head yourself). The permutation is
    recorded on the model for :func:`export`, :func:`merge` and :func:`unload`.

    Raises ValueError when the model is not recognised, is already converted, or the selection
    is empty or was made for a differently shaped model. The model is not modified on error.
    """
    attn, mlp = _require_blocks(model)
    _check_selection(selection, attn, mlp)
    if not isinstance(train_bias, bool):
        raise TypeError(f"train_bias: expected a bool, got {type(train_bias).__name__}")
    plans = _plans(selection, attn, mlp)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    _rearrange(model, [], plans, train_bias)
    setattr(model, _STATE_ATTR, _State(selection, attn, mlp, plans, train_bias, requires_grad))
    return model


def _slice_modules(model: nn.Module, st: _State) -> Iterator[tuple[_Slice, _SliceLinear]]:
    for plan in st.plans:
        for s in plan.slices:
            mod = model.get_submodule(s.name)
            if not isinstance(mod, _SliceLinear):
                raise RuntimeError(f"model: {s.name} is no longer an S²FT layer "
                                   f"({type(mod).__name__}); was it replaced after apply?")
            yield s, mod


def export(model: nn.Module) -> dict[str, Any]:
    """A compact adapter with what training changed, on the CPU.

    The dict holds only str/int/bool/list/dict and tensors, so ``torch.save`` it and read it back
    with ``torch.load(..., weights_only=True)``:

    * ``"format"``: ``"ftops.s2ft"``, ``"version"``: 1, ``"train_bias"``;
    * ``"selection"``: :meth:`Selection.to_dict`;
    * ``"permutations"``: block path -> int64 tensor, new position -> original head/channel;
    * ``"deltas"``: parameter name (``"<module>.weight"`` / ``"<module>.bias"``, as in the
      original model) -> ``{"dim", "index", "delta"}`` in the original orientation and order:
      ``weight.index_add_(dim, index, delta)`` on the original (unpermuted) weight gives the
      trained weight. ``delta`` is always relative to the base model: the slice's current
      value minus its value when :func:`apply` or :func:`load` converted the base model (so
      after :func:`load` it includes the loaded adapter's delta).
    """
    st = _require_state(model)
    deltas: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for s, mod in _slice_modules(model, st):
            d = (mod.weight_slice - mod.weight_slice_base).detach()
            if s.mode == "row":
                deltas[f"{s.name}.weight"] = {"dim": 0, "index": s.index.clone(), "delta": d.cpu().clone()}
                if getattr(mod, "bias_slice", None) is not None:
                    db = (mod.bias_slice - mod.bias_slice_base).detach()
                    deltas[f"{s.name}.bias"] = {"dim": 0, "index": s.index.clone(), "delta": db.cpu().clone()}
            else:
                deltas[f"{s.name}.weight"] = {"dim": 1, "index": s.index.clone(),
                                              "delta": d.t().cpu().contiguous()}
    return {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "train_bias": st.train_bias,
        "selection": st.selection.to_dict(),
        "permutations": {p.path: p.perm.clone() for p in st.plans},
        "deltas": deltas,
    }


@torch.no_grad()
def _reset_slices(model: nn.Module, st: _State) -> None:
    for _, mod in _slice_modules(model, st):
        mod.weight_slice.copy_(mod.weight_slice_base)
        if getattr(mod, "bias_slice", None) is not None:
            mod.bias_slice.copy_(mod.bias_slice_base)


@torch.no_grad()
def _restore_plain(model: nn.Module, st: _State, reset: bool) -> None:
    """Back to plain nn.Linear modules in the original order (reset: base slice values first)."""
    list(_slice_modules(model, st))  # check the layers are intact before changing anything
    if reset:
        _reset_slices(model, st)
    _rearrange(model, st.plans, [], st.train_bias)
    for name, p in model.named_parameters():
        p.requires_grad_(st.requires_grad.get(name, True))
    delattr(model, _STATE_ATTR)


def merge(model: nn.Module) -> nn.Module:
    """Fold the trained slices into plain ``nn.Linear`` layers in the original order, in place.

    Returns ``model``, now a plain model (its state_dict has the original keys and shapes) that
    computes what the S²FT model computed; the ``requires_grad`` flags are restored to what they
    were before :func:`apply`.
    """
    st = _require_state(model)
    _restore_plain(model, st, reset=False)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Undo S²FT in place: discard the training and restore the base model bit-exactly.

    Returns ``model``. Useful to go back to the base model or before applying another
    selection; :func:`load` calls it when switching to an adapter with a different selection.
    """
    st = _require_state(model)
    _restore_plain(model, st, reset=True)
    return model


def _check_adapter(adapter) -> tuple[Selection, bool]:
    if not isinstance(adapter, Mapping):
        raise TypeError(f"adapter: expected the dict from ftops.s2ft.export, got {type(adapter).__name__}")
    if adapter.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"adapter: not an S²FT adapter (format={adapter.get('format')!r}, "
                         f"expected {ADAPTER_FORMAT!r})")
    if adapter.get("version") != ADAPTER_VERSION:
        raise ValueError(f"adapter: unsupported version {adapter.get('version')!r} "
                         f"(this ftops reads version {ADAPTER_VERSION})")
    for key in ("selection", "deltas", "train_bias"):
        if key not in adapter:
            raise ValueError(f"adapter: missing key {key!r}")
    return Selection.from_dict(adapter["selection"]), bool(adapter["train_bias"])


def _expected_deltas(sel: Selection, attn, mlp, train_bias: bool, model: nn.Module):
    """name -> (dim, index, shape) of every delta an adapter for `sel` must carry."""
    out = {}
    for plan in _plans(sel, attn, mlp):
        for s in plan.slices:
            lin = model.get_submodule(s.name)  # nn.Linear, or an S²FT layer when switching
            out_f, in_f, has_bias = lin.out_features, lin.in_features, lin.bias is not None
            n = len(s.index)
            if s.mode == "row":
                out[f"{s.name}.weight"] = (0, s.index, (n, in_f))
                if has_bias and train_bias:
                    out[f"{s.name}.bias"] = (0, s.index, (n,))
            else:
                out[f"{s.name}.weight"] = (1, s.index, (out_f, n))
    return out


def load(base_model: nn.Module, adapter: Mapping[str, Any]) -> nn.Module:
    """Put an adapter from :func:`export` on a model, in place; returns the model.

    On a plain base model this applies the adapter's selection (:func:`apply`, with its
    permutation) and adds the deltas to the trainable slices: the result is the trained model,
    ready to compute with, train further, :func:`export` (deltas relative to the base) or
    :func:`merge`. On a model that already carries an S²FT adapter this switches adapters: with
    the same selection only the slices are rewritten (base + new delta; fast), otherwise the old
    adapter is removed first (:func:`unload`: exact base weights back) and the new one applied.
    The adapter is checked against the model before anything is changed. After a switch to a
    different selection the trainable parameters are new objects: make a new optimizer.
    """
    sel, train_bias = _check_adapter(adapter)
    st = _state(base_model) if isinstance(base_model, nn.Module) else None
    if st is not None:
        attn, mlp = st.attn, st.mlp
        _check_selection(sel, attn, mlp)
    else:
        attn, mlp = _require_blocks(base_model)
        _check_selection(sel, attn, mlp)
    expected = _expected_deltas(sel, attn, mlp, train_bias, base_model)
    deltas = adapter["deltas"]
    if not isinstance(deltas, Mapping) or set(deltas) != set(expected):
        have = set(deltas) if isinstance(deltas, Mapping) else set()
        raise ValueError(
            f"adapter: its deltas do not match its selection on this model (missing "
            f"{sorted(set(expected) - have)[:4]}, unexpected {sorted(have - set(expected))[:4]})"
        )
    for name, (dim, index, shape) in expected.items():
        d = deltas[name]
        if (not isinstance(d, Mapping) or d.get("dim") != dim
                or not isinstance(d.get("index"), torch.Tensor)
                or not torch.equal(d["index"].cpu(), index)
                or not isinstance(d.get("delta"), torch.Tensor)
                or tuple(d["delta"].shape) != shape):
            raise ValueError(f"adapter: delta {name!r} does not fit this model (expected dim={dim}, "
                             f"delta shape {shape} and the index of its selection)")
    if st is None:
        apply(base_model, sel, train_bias=train_bias)
        st = _state(base_model)
    elif st.selection != sel or st.train_bias != train_bias:
        # Switch layouts in one pass per weight: base slices back, then old -> new permutation.
        list(_slice_modules(base_model, st))
        with torch.no_grad():
            _reset_slices(base_model, st)
        plans = _plans(sel, attn, mlp)
        _rearrange(base_model, st.plans, plans, train_bias)
        st = _State(sel, attn, mlp, plans, train_bias, st.requires_grad)
        setattr(base_model, _STATE_ATTR, st)
    with torch.no_grad():
        for s, mod in _slice_modules(base_model, st):
            d = deltas[f"{s.name}.weight"]["delta"]
            d = d if s.mode == "row" else d.t()
            mod.weight_slice.copy_(mod.weight_slice_base + d.to(mod.weight_slice.device,
                                                                 mod.weight_slice.dtype))
            if getattr(mod, "bias_slice", None) is not None:
                db = deltas[f"{s.name}.bias"]["delta"]
                mod.bias_slice.copy_(mod.bias_slice_base + db.to(mod.bias_slice.device,
                                                                 mod.bias_slice.dtype))
    return base_model
