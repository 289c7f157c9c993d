"""S²FT: structured sparse fine-tuning (Yang et al. 2024) with co-permutation and partial backprop.

S²FT trains a few attention heads and feed-forward channels of a transformer and freezes the rest.
Four independent choices, as in the reference code (Infini-AI-Lab/S2FT), each a ratio of all
units of all blocks together:

* ``o_ratio``: heads whose **output-projection columns** train (the columns that read the head);
* ``d_ratio``: feed-forward channels whose **down-projection columns** train;
* ``v_ratio``: heads whose **value-projection rows** train (the rows that produce the head);
* ``u_ratio``: channels whose **up-projection rows** train.

The default is the paper's setting, the ratios of the released LLaMA-2-7B scripts: ``o_ratio``
0.052, ``d_ratio`` 0.02, ``v_ratio`` = ``u_ratio`` = 0 (:data:`PAPER_RATIOS`).

:func:`apply` co-permutes every block with selected units: the same order on the query/key/value
rows of a head and the output-projection columns that read it, and on the gate/up rows of a
channel and the down-projection columns that read it. That leaves the function unchanged and puts
the units of each block in the order "value only, value and output, output only, the rest"
(likewise "up only, both, down only, the rest"), so every trainable part is one contiguous slice.

The trainable slices are ordinary ``nn.Parameter`` objects, so any torch optimizer trains them,
its state is sized to the slices, and gradient accumulation is plain autograd accumulation. With
float32/float64 weights a slice is a view of the frozen weight (the optimizer updates the weight
in place, no copy). With float16/bfloat16 weights a slice is a float32 master copy, as the
reference's mixed-precision training keeps; it is written into the half-precision weight at every
forward (and by ``state_dict`` and :func:`merge`), so small updates accumulate instead of
rounding away. The column-trained projections save only the selected input columns
for backward; the row-trained ones compute only the selected rows' weight gradient; every other
projection is a frozen ``nn.Linear``. No full-size weight gradient is ever formed.

Grouped-query attention: the unit of selection is a key/value head together with the query heads
that share it (for ordinary multi-head attention, one head). Only whole groups can be made
contiguous by a permutation that keeps the function (query head ``h`` reads key/value head
``h // (num_heads // num_kv_heads)``), so a head ratio is a fraction of key/value heads.

Typical use::

    sel = ftops.s2ft.select(model, seed=0)             # the paper's ratios; or o_ratio=..., ...
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

docs/s2ft.md describes the design and every difference from the reference code.
"""
from __future__ import annotations

import abc
import math
import numbers
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed
    DTensor = ()

__all__ = [
    "PAPER_RATIOS",
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
ADAPTER_VERSION = 2
STRATEGIES = ("random", "weight_norm")
#: The released scripts' ratios for LLaMA-2-7B (Infini-AI-Lab/S2FT,
#: experiments/train_script/finetune_commensense_llama2_s2.sh and finetune_math_llama2_s2.sh:
#: ``--v_ratio 0.0 --o_ratio 0.052 --u_ratio 0.0 --d_ratio 0.02``); :func:`select`'s defaults.
PAPER_RATIOS = {"v_ratio": 0.0, "o_ratio": 0.052, "u_ratio": 0.0, "d_ratio": 0.02}
_STATE_ATTR = "_ftops_s2ft"
_HALF = (torch.float16, torch.bfloat16)
# (Selection field, ratio argument, unit kind), in the reference's drawing order.
_KINDS = (("v_heads", "v_ratio", "head"), ("o_heads", "o_ratio", "head"),
          ("u_channels", "u_ratio", "channel"), ("d_channels", "d_ratio", "channel"))


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


def _require_blocks(where: str, model: Any):
    """The model's blocks, after checking it is a module S²FT can be applied to."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, _STATE_ATTR, None) is not None:
        raise ValueError(f"{where}: model already has S²FT applied; call ftops.s2ft.merge(model) "
                         "or ftops.s2ft.unload(model) first")
    attn, mlp = _find_blocks(model)
    if not attn and not mlp:
        raise ValueError(
            f"{where}: model ({type(model).__name__}) has no attention or feed-forward blocks "
            "that S²FT recognises. Supported: Llama-style blocks (q_proj/k_proj/v_proj/o_proj "
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
    """Which units S²FT trains, per projection.

    ``v_heads`` / ``o_heads`` map the path of an attention module to the sorted indices of the
    key/value heads (each with the query heads that share it) whose value rows / output-projection
    columns train; ``u_channels`` / ``d_channels`` map the path of a feed-forward module to the
    sorted channels whose up rows / down columns train. Modules with nothing selected are absent.
    ``head_counts`` / ``channel_counts`` give the number of units of every recognised module (to
    check that a selection fits a model). Indices refer to the model's original (unpermuted)
    order. ``strategy`` and ``seed`` record how it was made.
    """

    v_heads: Mapping[str, tuple[int, ...]]
    o_heads: Mapping[str, tuple[int, ...]]
    u_channels: Mapping[str, tuple[int, ...]]
    d_channels: Mapping[str, tuple[int, ...]]
    head_counts: Mapping[str, int]
    channel_counts: Mapping[str, int]
    strategy: str = "random"
    seed: int | None = 0

    @property
    def num_v_heads(self) -> int:
        """Selected heads whose value rows train, over all blocks."""
        return sum(len(v) for v in self.v_heads.values())

    @property
    def num_o_heads(self) -> int:
        """Selected heads whose output-projection columns train, over all blocks."""
        return sum(len(v) for v in self.o_heads.values())

    @property
    def num_u_channels(self) -> int:
        """Selected channels whose up-projection rows train, over all blocks."""
        return sum(len(v) for v in self.u_channels.values())

    @property
    def num_d_channels(self) -> int:
        """Selected channels whose down-projection columns train, over all blocks."""
        return sum(len(v) for v in self.d_channels.values())

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (str, int, list) that ``torch.load(weights_only=True)`` and JSON accept."""
        out: dict[str, Any] = {f: {k: list(v) for k, v in getattr(self, f).items()}
                               for f, _, _ in _KINDS}
        out.update(head_counts=dict(self.head_counts), channel_counts=dict(self.channel_counts),
                   strategy=self.strategy, seed=self.seed)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Selection":
        """The inverse of :meth:`to_dict`, with every field checked.

        Also reads the form of ftops' first adapter version (``heads`` / ``channels``, where a
        selected head trained both its value rows and output columns, and a channel its up row
        and down column), which maps exactly onto ``v_heads = o_heads`` and ``u_channels =
        d_channels``.
        """
        where = "ftops.s2ft.Selection.from_dict"
        if not isinstance(d, Mapping):
            raise TypeError(f"{where}: selection must be a dict, got {type(d).__name__}")
        if "heads" in d and "v_heads" not in d:  # the first adapter version
            d = {**d, "v_heads": d["heads"], "o_heads": d["heads"],
                 "u_channels": d.get("channels"), "d_channels": d.get("channels")}
        missing = {f for f, _, _ in _KINDS} | {"head_counts", "channel_counts"}
        missing -= set(d)
        if missing:
            raise ValueError(f"{where}: selection is missing keys {sorted(missing)}")
        units = {f: _units_map(where, f, d[f]) for f, _, _ in _KINDS}
        strategy = d.get("strategy", "random")
        if strategy not in STRATEGIES:
            raise ValueError(f"{where}: selection['strategy'] must be one of {STRATEGIES}, "
                             f"got {strategy!r}")
        seed = d.get("seed")
        if seed is not None:
            seed = _checks.integer(where, "selection['seed']", seed, low=0)
        return cls(**units, head_counts=_counts_map(where, "head_counts", d["head_counts"]),
                   channel_counts=_counts_map(where, "channel_counts", d["channel_counts"]),
                   strategy=strategy, seed=seed)


def _int_list(where: str, name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{where}: {name} must be a list of ints, got {type(value).__name__}")
    for i in value:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"{where}: {name} must be a list of ints, got an element "
                            f"{i!r} ({type(i).__name__})")
    return tuple(int(i) for i in value)


def _path_map(where: str, name: str, value: Any, what: str, parse: Callable) -> dict[str, Any]:
    """A selection field ``{module path: what}``, each value checked by ``parse(where, label, v)``."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{where}: selection[{name!r}] must be a dict (module path -> {what}), "
                        f"got {type(value).__name__}")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str):
            raise TypeError(f"{where}: selection[{name!r}] keys must be module paths (str), "
                            f"got {k!r}")
        out[k] = parse(where, f"selection[{name!r}][{k!r}]", v)
    return out


def _units_map(where: str, name: str, value: Any) -> dict[str, tuple[int, ...]]:
    return _path_map(where, name, value, "list of indices", _int_list)


def _counts_map(where: str, name: str, value: Any) -> dict[str, int]:
    return _path_map(where, name, value, "count",
                     lambda w, label, v: _checks.integer(w, label, v, low=1))


def _count(where: str, name: str, ratio: float, total: int, what: str) -> int:
    """``floor(ratio * total)`` as the reference counts, reading a product within 1e-9 below an
    integer as that integer (0.29 * 100 is 28.999999999999996 in floating point)."""
    x = ratio * total
    n = math.floor(x)
    if x - n > 1.0 - 1e-9:
        n += 1
    if n == 0:
        hint = f"use at least {1.0 / total:.3g} for one unit, or 0" if total else "set it to 0"
        raise ValueError(f"{where}: {name}={ratio} selects none of the model's {total} {what} "
                         f"(the count is floor({name} * {total})); {hint} to train none")
    return n


def _norms(model: nn.Module, name: str, dims, shape=None) -> torch.Tensor:
    w = model.get_submodule(name).weight.detach()
    if w.is_meta:
        raise ValueError("ftops.s2ft.select: strategy='weight_norm' needs the weights, but "
                         f"model.{name} is on the meta device (load the weights first, or use "
                         "strategy='random')")
    w = w.double()
    if shape is not None:
        w = w.reshape(shape(w))
    return w.norm(dim=dims).cpu()


def _unit_scores(model: nn.Module, field: str, block) -> torch.Tensor:
    """weight_norm: the Frobenius norm of what each unit would train, in ``field``'s projection."""
    if field == "v_heads":
        return _norms(model, block.v, 1, lambda w: (block.num_kv_heads, -1))
    if field == "o_heads":
        return _norms(model, block.o, (0, 2), lambda w: (w.shape[0], block.num_kv_heads, -1))
    if field == "u_channels":
        return _norms(model, block.up, 1)
    return _norms(model, block.down, 0)


def select(
    model: nn.Module,
    *,
    v_ratio: float = PAPER_RATIOS["v_ratio"],
    o_ratio: float = PAPER_RATIOS["o_ratio"],
    u_ratio: float = PAPER_RATIOS["u_ratio"],
    d_ratio: float = PAPER_RATIOS["d_ratio"],
    strategy: str = "random",
    seed: int = 0,
    **unexpected: Any,
) -> Selection:
    """Choose the units to train, for each of the four projections independently, over all blocks.

    Args:
        model: a plain (not yet S²FT-applied) transformers-style model; see the module docstring
            for the blocks that are recognised.
        v_ratio: fraction in [0, 1] of all heads (key/value heads: see the module docstring) of
            all attention blocks whose value-projection rows train; 0 trains none.
        o_ratio: the same for output-projection columns (default 0.052, the paper's).
        u_ratio: fraction in [0, 1] of all feed-forward channels of all blocks whose
            up-projection (BERT: intermediate) rows train.
        d_ratio: the same for down-projection (BERT: output) columns (default 0.02, the paper's).
            Each count is ``floor(ratio * total)`` as in the reference; a ratio above 0 must
            select at least one unit.
        strategy: ``"random"``: uniformly at random without replacement over all blocks, drawn as
            the reference draws (Python's ``random.Random(seed).sample`` over the flattened units,
            in the order v, o, u, d), so a multi-head-attention model gets the units of the
            reference's ``finetune.py --seed seed`` (where nothing used Python's ``random``
            before its draw). ``"weight_norm"``: data-free and
            deterministic: per projection, the units whose trainable part has the largest
            Frobenius norm, over all blocks.
        seed: non-negative integer for ``"random"``.

    Returns:
        a :class:`Selection` (indices in the model's original order). Nothing is changed.
    """
    where = "ftops.s2ft.select"
    if unexpected:
        raise TypeError(
            f"{where}: unexpected arguments {sorted(unexpected)}; the units are chosen per "
            "projection with v_ratio, o_ratio, u_ratio, d_ratio (a former heads=h, channels=c "
            "is v_ratio=o_ratio=h, u_ratio=d_ratio=c with independent draws)")
    ratios = {"v_ratio": v_ratio, "o_ratio": o_ratio, "u_ratio": u_ratio, "d_ratio": d_ratio}
    ratios = {k: _checks.real(where, k, v, low=0.0, high=1.0) for k, v in ratios.items()}
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"{where}: strategy must be one of {STRATEGIES}, got {strategy!r}")
    seed = _checks.integer(where, "seed", seed, low=0)
    if not any(ratios.values()):
        raise ValueError(f"{where}: v_ratio, o_ratio, u_ratio and d_ratio are all 0, so nothing "
                         "would train")
    attn, mlp = _require_blocks(where, model)
    rng = random.Random(seed)
    chosen: dict[str, dict[str, tuple[int, ...]]] = {}
    for field, ratio_name, kind in _KINDS:
        ratio = ratios[ratio_name]
        blocks = attn if kind == "head" else mlp
        sizes = [b.num_kv_heads if kind == "head" else b.channels for b in blocks]
        if ratio == 0.0:  # the reference draws none (random.sample(..., 0) uses no randomness)
            chosen[field] = {}
            continue
        if not blocks:
            raise ValueError(f"{where}: {ratio_name}={ratio} but the model has no "
                             f"{'attention' if kind == 'head' else 'feed-forward'} blocks that "
                             f"S²FT recognises (set {ratio_name}=0)")
        what = ("attention (key/value) heads" if kind == "head" else "feed-forward channels")
        n = _count(where, ratio_name, ratio, sum(sizes), what)
        if strategy == "random":
            flat = rng.sample(range(sum(sizes)), n)
        else:
            scores = torch.cat([_unit_scores(model, field, b) for b in blocks])
            if not torch.isfinite(scores).all():
                raise ValueError(f"{where}: strategy='weight_norm' met non-finite weights in the "
                                 f"projections scored for {ratio_name}")
            flat = torch.sort(scores, descending=True, stable=True).indices[:n].tolist()
        chosen[field] = _split(sorted(flat), blocks, sizes)
    return Selection(
        **chosen,
        head_counts={a.path: a.num_kv_heads for a in attn},
        channel_counts={f.path: f.channels for f in mlp},
        strategy=strategy,
        seed=seed if strategy == "random" else None,
    )


def _split(flat: list[int], blocks, sizes) -> dict[str, tuple[int, ...]]:
    """Sorted flat unit indices over all blocks -> block path -> sorted indices in the block."""
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


def _check_selection(where: str, sel: Any, attn, mlp) -> None:
    if not isinstance(sel, Selection):
        hint = " (use ftops.s2ft.Selection.from_dict)" if isinstance(sel, Mapping) else ""
        raise TypeError(f"{where}: selection must be an ftops.s2ft.Selection{hint}, got "
                        f"{type(sel).__name__}")
    for counts, blocks, size, kind in (
        (sel.head_counts, attn, lambda a: a.num_kv_heads, "heads"),
        (sel.channel_counts, mlp, lambda f: f.channels, "channels"),
    ):
        have = {b.path: size(b) for b in blocks}
        if not isinstance(counts, Mapping) or dict(counts) != have:
            got = dict(counts) if isinstance(counts, Mapping) else counts
            raise ValueError(
                f"{where}: selection was made for a different model structure (its {kind} per "
                f"block: {_preview(got)}; the model's: {_preview(have)})"
            )
    total = 0
    for field, _, kind in _KINDS:
        chosen = getattr(sel, field)
        have = dict(sel.head_counts if kind == "head" else sel.channel_counts)
        if not isinstance(chosen, Mapping):
            raise TypeError(f"{where}: selection.{field} must be a dict, got "
                            f"{type(chosen).__name__}")
        for path, idx in chosen.items():
            if path not in have:
                raise ValueError(f"{where}: selection.{field} names {path!r}, which is not a "
                                 f"recognised {'attention' if kind == 'head' else 'feed-forward'}"
                                 " block of the model")
            idx = _int_list(where, f"selection.{field}[{path!r}]", idx)
            if list(idx) != sorted(set(idx)) or (idx and not 0 <= idx[0] <= idx[-1] < have[path]):
                raise ValueError(f"{where}: selection.{field}[{path!r}] must be sorted, unique "
                                 f"indices in [0, {have[path]}), got {list(idx)}")
            total += len(idx)
    if total == 0:
        raise ValueError(f"{where}: selection selects no units; nothing would train")


def _preview(d) -> str:
    if not isinstance(d, Mapping):
        return repr(d)
    items = list(d.items())
    return "{" + ", ".join(f"{k!r}: {v}" for k, v in items[:3]) + (", ..." if len(items) > 3
                                                                   else "") + "}"


# --------------------------------------------------------------------------------------------------
# Partial-backprop linear layers
# --------------------------------------------------------------------------------------------------

class _RowSliceFn(torch.autograd.Function):
    """y = x W^T + b where only W[s:e] (and b[s:e]) receive gradients."""

    @staticmethod
    def forward(ctx, x, weight, bias, weight_slice, bias_slice, start):
        ctx.span = (start, start + weight_slice.shape[0])
        ctx.x_shape = x.shape
        ctx.grad_dtypes = (weight_slice.dtype, None if bias_slice is None else bias_slice.dtype)
        # The selected rows' gradient needs the whole input (dW[s:e] = dY[:, s:e]^T X); the input
        # of v_proj/up_proj is the normalised hidden state that q/k/gate read as well.
        ctx.save_for_backward(x if ctx.needs_input_grad[3] else None, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        s, e = ctx.span
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(dy2, weight.to(dy2.dtype)).view(*ctx.x_shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[3]:
            dw = torch.mm(dy2[:, s:e].t(), x.reshape(-1, x.shape[-1]).to(dy2.dtype))
            dw = dw.to(ctx.grad_dtypes[0])
        if ctx.needs_input_grad[4]:
            db = dy2[:, s:e].sum(0).to(ctx.grad_dtypes[1])
        return dx, None, None, dw, db, None


class _ColumnSliceFn(torch.autograd.Function):
    """y = x Wt + b (Wt = W^T stored contiguously); only Wt[s:e] = W[:, s:e]^T gets gradients."""

    @staticmethod
    def forward(ctx, x, weight_t, bias, weight_slice, start):
        end = start + weight_slice.shape[0]
        ctx.x_shape = x.shape
        ctx.grad_dtype = weight_slice.dtype
        # Only the selected input columns are needed for the slice's gradient: save a compact
        # copy of them, not x.
        x_sel = x[..., start:end].contiguous() if ctx.needs_input_grad[3] else None
        ctx.save_for_backward(x_sel, weight_t)
        return F.linear(x, weight_t.t(), bias)

    @staticmethod
    def backward(ctx, dy):
        x_sel, weight_t = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(dy2, weight_t.t().to(dy2.dtype)).view(*ctx.x_shape[:-1],
                                                                 weight_t.shape[0])
        if ctx.needs_input_grad[3]:
            dw = torch.mm(x_sel.reshape(-1, x_sel.shape[-1]).t().to(dy2.dtype), dy2)
            dw = dw.to(ctx.grad_dtype)
        return dx, None, None, dw, None


def _is_view_of(p: torch.Tensor, view: torch.Tensor) -> bool:
    if p.device != view.device or p.dtype != view.dtype or p.shape != view.shape:
        return False
    if p.is_meta:
        return True  # nothing to keep in sync on the meta device
    return p.data_ptr() == view.data_ptr() and p.stride() == view.stride()


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (not a.is_meta and a.device == b.device
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


class _SliceLinear(nn.Module, abc.ABC):
    """Shared machinery: a frozen weight buffer whose slice ``[start, start + n)`` (rows of the
    stored weight) is a trainable parameter.

    The slice parameter holds the trained values: with float32/float64 weights it is a view of
    the buffer, with float16/bfloat16 weights a float32 master copy that :meth:`_sync` writes
    into the buffer (rounded) before every forward. Whatever replaces or converts tensors
    (``Module.to``/``half``/``to_empty`` with any conversion mode, ``load_state_dict`` with
    ``assign=True``, ``copy.deepcopy``, unpickling) goes through :meth:`_attach`, which restores
    that layout from the slice parameter's values.
    """

    in_features: int
    out_features: int
    start: int

    @abc.abstractmethod
    def _links(self) -> Iterator[tuple[str, str, torch.Tensor | None, int]]:
        """(slice parameter name, base buffer name, frozen buffer it belongs to, slice length)."""

    def _init_slices(self, train_bias: bool) -> None:
        for pname, base_name, full, n in self._links():
            if full is None or (pname == "bias_slice" and not train_bias):
                self.register_parameter(pname, None)
                self.register_buffer(base_name, None)
                continue
            view = full.narrow(0, self.start, n)
            master = full.dtype in _HALF
            self.register_parameter(pname, nn.Parameter(view.float() if master else view))
            # The values at conversion: what export() subtracts and unload() restores. Persistent,
            # so that a model converted on the meta device gets them from load_state_dict.
            self.register_buffer(base_name, view.detach().clone())
        self._base_known = True

    def _attach(self, previous: Mapping[str, torch.Tensor] | None = None) -> None:
        """Give every slice parameter its layout again and write its values into the buffer.

        ``previous``: the slice tensors from before a conversion; when the conversion made them
        half precision, the master keeps the previous (higher precision) values instead.
        """
        for pname, _, full, n in self._links():
            p = getattr(self, pname)
            if p is None or full is None or isinstance(p, DTensor):
                continue  # a DTensor is FSDP's sharded slice: it writes the gathered values back
            view = full.narrow(0, self.start, n)
            old = (previous or {}).get(pname)
            use_old = (old is not None and not old.is_meta and p.dtype in _HALF
                       and old.dtype not in _HALF)
            src = old if use_old else p.detach()
            with torch.no_grad():
                if full.dtype in _HALF:
                    if (use_old or p.dtype != torch.float32 or p.device != full.device
                            or _shares_storage(p, full)):
                        p.data = src.to(device=full.device, dtype=torch.float32, copy=True)
                    view.copy_(p.detach())
                elif not _is_view_of(p, view):
                    view.copy_(src)
                    p.data = view
            if p.grad is not None and (p.grad.dtype != p.dtype or p.grad.device != p.device):
                p.grad = p.grad.to(device=p.device, dtype=p.dtype)

    def _sync(self) -> None:
        """Write slice parameters that are not views of the buffer (float32 masters, or the
        unsharded parameters FSDP2 puts in their place for a forward) into the buffer.

        The write goes through ``.data`` so that it does not bump the buffer's version counter:
        it writes the values the buffer already holds unless the slice changed, and a forward
        whose backward is still pending (gradient accumulation over several forwards) keeps a
        valid saved weight.
        """
        compiling = torch.compiler.is_compiling()
        for pname, _, full, n in self._links():
            p = getattr(self, pname)
            if p is None or full is None:
                continue
            if compiling:
                # The data-pointer checks would break the graph; views stay views under compile
                # (only a conversion re-points them, outside the graph), masters are written.
                if full.dtype in _HALF:
                    with torch.no_grad():
                        full.narrow(0, self.start, n).copy_(p)
                continue
            if isinstance(p, DTensor):
                continue
            view = full.narrow(0, self.start, n)
            if not _is_view_of(p, view):
                view.data.copy_(p.detach())

    def _apply(self, fn, recurse=True):
        previous = {pname: getattr(self, pname).detach() for pname, _, _, _ in self._links()
                    if isinstance(getattr(self, pname), torch.Tensor)
                    and not isinstance(getattr(self, pname), DTensor)}
        base_was_meta = any(b.is_meta for b in self._bases())
        super()._apply(fn, recurse)
        self._attach(previous)
        if base_was_meta and not any(b.is_meta for b in self._bases()):
            self._base_known = False  # materialised (to_empty): load_state_dict must give them
        return self

    def __setstate__(self, state):  # copy.deepcopy and unpickling
        super().__setstate__(state)
        self._attach()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._sync()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if all(prefix + base_name in state_dict for _, base_name, full, _ in self._links()
               if getattr(self, base_name) is not None):
            self._base_known = True
        self._attach()

    def _bases(self) -> Iterator[torch.Tensor]:
        for _, base_name, _, _ in self._links():
            b = getattr(self, base_name)
            if b is not None:
                yield b

    def _slices_need_grad(self) -> bool:
        return torch.is_grad_enabled() and any(
            getattr(self, pname) is not None and getattr(self, pname).requires_grad
            for pname, _, _, _ in self._links())

    @torch.no_grad()
    def _set_slices(self, deltas: Mapping[str, torch.Tensor] | None = None) -> None:
        """Slices := base (+ delta), then into the buffer."""
        for pname, base_name, _, _ in self._links():
            p = getattr(self, pname)
            if p is None:
                continue
            v = getattr(self, base_name).to(p.dtype)
            if deltas is not None:
                v = v + deltas[pname].to(device=p.device, dtype=p.dtype)
            p.copy_(v)
        self._sync()

    @torch.no_grad()
    def _deltas(self) -> dict[str, torch.Tensor]:
        """Slice parameter name -> current value minus base, float32 or finer."""
        out = {}
        for pname, base_name, _, _ in self._links():
            p = getattr(self, pname)
            if p is not None:
                dtype = torch.promote_types(p.dtype, torch.float32)
                out[pname] = p.detach().to(dtype) - getattr(self, base_name).to(dtype)
        return out


def _check_linear(where: str, linear: Any) -> nn.Linear:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{where}: linear must be a torch.nn.Linear, got {type(linear).__name__}")
    if not linear.weight.is_floating_point():
        raise TypeError(f"{where}: linear.weight must be floating point, got {linear.weight.dtype}")
    return linear


class RowSliceLinear(_SliceLinear):
    """A frozen ``nn.Linear`` whose output rows ``[start, start + rows)`` are trainable.

    ``weight`` ([out, in]) and ``bias`` are frozen buffers; ``weight_slice`` holds
    ``weight[start:start + rows]`` (a view of the buffer, or a float32 master copy when the
    weight is float16/bfloat16: see :class:`_SliceLinear`), and ``bias_slice`` likewise
    ``bias[start:start + rows]`` when the layer has a bias and ``train_bias`` is set (off by
    default: the reference never trains biases). Backward computes only the slices' gradients
    (and the input gradient). ``weight_slice_base`` / ``bias_slice_base`` keep the slices'
    values from when the layer was made, for :func:`export` and :func:`unload`. The layer shares
    the storage of ``linear``'s weight.
    """

    def __init__(self, linear: nn.Linear, rows: int, *, start: int = 0, train_bias: bool = False):
        super().__init__()
        where = "ftops.s2ft.RowSliceLinear"
        _check_linear(where, linear)
        start = _checks.integer(where, "start", start, low=0, high=linear.out_features - 1)
        rows = _checks.integer(where, "rows", rows, low=1, high=linear.out_features - start)
        if not isinstance(train_bias, bool):
            raise TypeError(f"{where}: train_bias must be a bool, got {type(train_bias).__name__}")
        self._setup(linear.weight.detach(), None if linear.bias is None else linear.bias.detach(),
                    start, rows, train_bias)

    @classmethod
    def _from_tensors(cls, weight, bias, start, rows, train_bias) -> "RowSliceLinear":
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(weight, bias, start, rows, train_bias)
        return self

    def _setup(self, weight, bias, start, rows, train_bias):
        self.out_features, self.in_features = weight.shape
        self.start, self.rows = start, rows
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self._init_slices(train_bias)

    def _links(self):
        yield "weight_slice", "weight_slice_base", self.weight, self.rows
        yield "bias_slice", "bias_slice_base", self.bias, self.rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._sync()
        if self._slices_need_grad():
            return _RowSliceFn.apply(x, self.weight, self.bias, self.weight_slice,
                                     self.bias_slice, self.start)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"trainable_rows=[{self.start}, {self.start + self.rows}), "
                f"bias={self.bias is not None}, train_bias={self.bias_slice is not None}")


class ColumnSliceLinear(_SliceLinear):
    """A frozen ``nn.Linear`` whose input columns ``[start, start + cols)`` are trainable.

    The weight is stored transposed, as the contiguous buffer ``weight_t`` ([in, out]), so that
    the trainable columns ``W[:, start:start + cols]`` are the contiguous rows of ``weight_t``:
    ``weight_slice`` ([cols, out]) holds them (a view, or a float32 master copy when the weight is
    float16/bfloat16). ``weight`` returns the usual [out, in] view. The bias (indexed by output) is
    frozen. Forward saves only ``x[..., start:start + cols]`` for backward, which computes only
    the slice's gradient (and the input gradient). The layer copies ``linear``'s weight.
    """

    def __init__(self, linear: nn.Linear, cols: int, *, start: int = 0):
        super().__init__()
        where = "ftops.s2ft.ColumnSliceLinear"
        _check_linear(where, linear)
        start = _checks.integer(where, "start", start, low=0, high=linear.in_features - 1)
        cols = _checks.integer(where, "cols", cols, low=1, high=linear.in_features - start)
        self._setup(linear.weight.detach().t().contiguous(),
                    None if linear.bias is None else linear.bias.detach(), start, cols)

    @classmethod
    def _from_tensors(cls, weight_t, bias, start, cols) -> "ColumnSliceLinear":
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(weight_t, bias, start, cols)
        return self

    def _setup(self, weight_t, bias, start, cols):
        self.in_features, self.out_features = weight_t.shape
        self.start, self.cols = start, cols
        self.register_buffer("weight_t", weight_t)
        self.register_buffer("bias", bias)
        self._init_slices(False)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen weight as an [out, in] view of ``weight_t``."""
        return self.weight_t.t()

    def _links(self):
        yield "weight_slice", "weight_slice_base", self.weight_t, self.cols

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._sync()
        if self._slices_need_grad():
            return _ColumnSliceFn.apply(x, self.weight_t, self.bias, self.weight_slice, self.start)
        return F.linear(x, self.weight_t.t(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"trainable_cols=[{self.start}, {self.start + self.cols}), "
                f"bias={self.bias is not None}")


# --------------------------------------------------------------------------------------------------
# Plans: what apply does to each block
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Slice:
    name: str            # module path of the trained projection
    mode: str            # "row" or "col"
    start: int           # first row (row mode) / column (col mode) of the slice, after permuting
    index: torch.Tensor  # original row / column indices of the slice, in order


@dataclass(frozen=True)
class _BlockPlan:
    path: str
    perm: torch.Tensor                                  # new position -> original unit
    moves: tuple[tuple[str, int, torch.Tensor], ...]    # (module, dim, new -> original index)
    slices: tuple[_Slice, ...]


def _units_perm(n: int, first: list[int]) -> torch.Tensor:
    """``first`` in that order, then every other unit in increasing order."""
    mask = torch.ones(n, dtype=torch.bool)
    mask[first] = False
    return torch.cat([torch.tensor(first, dtype=torch.long), torch.nonzero(mask).flatten()])


def _expand(perm: torch.Tensor, width: int) -> torch.Tensor:
    return (perm[:, None] * width + torch.arange(width)).flatten()


def _split_units(rows: tuple[int, ...], cols: tuple[int, ...]):
    """Order "rows only, both, columns only": the row-trained units and the column-trained
    units are then each contiguous (as the reference orders them)."""
    r, c = set(rows), set(cols)
    return sorted(r - c), sorted(r & c), sorted(c - r)


def _plans(sel: Selection, attn, mlp) -> list[_BlockPlan]:
    plans = []
    for a in attn:
        v, o = sel.v_heads.get(a.path, ()), sel.o_heads.get(a.path, ())
        if not v and not o:
            continue
        only_v, both, only_o = _split_units(v, o)
        perm = _units_perm(a.num_kv_heads, only_v + both + only_o)
        qw = a.group * a.head_dim
        q_idx, kv_idx = _expand(perm, qw), _expand(perm, a.head_dim)
        slices = []
        if v:
            slices.append(_Slice(a.v, "row", 0, kv_idx[: len(v) * a.head_dim]))
        if o:
            s = len(only_v) * qw
            slices.append(_Slice(a.o, "col", s, q_idx[s: s + len(o) * qw]))
        plans.append(_BlockPlan(
            a.path, perm, ((a.q, 0, q_idx), (a.k, 0, kv_idx), (a.v, 0, kv_idx), (a.o, 1, q_idx)),
            tuple(slices)))
    for f in mlp:
        u, d = sel.u_channels.get(f.path, ()), sel.d_channels.get(f.path, ())
        if not u and not d:
            continue
        only_u, both, only_d = _split_units(u, d)
        perm = _units_perm(f.channels, only_u + both + only_d)
        moves = ((f.up, 0, perm), (f.down, 1, perm))
        if f.gate is not None:
            moves = ((f.gate, 0, perm),) + moves
        slices = []
        if u:
            slices.append(_Slice(f.up, "row", 0, perm[: len(u)]))
        if d:
            s = len(only_u)
            slices.append(_Slice(f.down, "col", s, perm[s: s + len(d)]))
        plans.append(_BlockPlan(f.path, perm, moves, tuple(slices)))
    return plans


def _check_plans(where: str, model: nn.Module, plans: list[_BlockPlan]) -> None:
    """Refuse projections S²FT cannot permute in place: non-floating weights, and modules or
    weights that are shared with another part of the model (permuting one use would break the
    others)."""
    parents: dict[int, set[int]] = defaultdict(set)
    holders: dict[int, set[int]] = defaultdict(set)
    for _, m in model.named_modules(remove_duplicate=False):
        for child in m._modules.values():
            if child is not None:
                parents[id(child)].add(id(m))
        for p in m._parameters.values():
            if p is not None:
                holders[id(p)].add(id(m))
    for plan in plans:
        for name, _, _ in plan.moves:
            mod = model.get_submodule(name)
            if not mod.weight.is_floating_point():
                raise TypeError(f"{where}: model.{name}.weight has dtype {mod.weight.dtype}; "
                                "S²FT trains floating-point weights")
            params = [p for p in mod._parameters.values() if p is not None]
            if len(parents[id(mod)]) > 1 or any(len(holders[id(p)]) > 1 for p in params):
                raise ValueError(
                    f"{where}: model.{name} (or its weight) is shared with another part of the "
                    "model; S²FT permutes the projections of a selected block in place and "
                    "cannot do that to a shared one")


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


def _same_layout(a: _Slice | None, b: _Slice | None, has_bias: bool, bias_a: bool,
                 bias_b: bool) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return (a.mode == b.mode and a.start == b.start and len(a.index) == len(b.index)
            and (a.mode == "col" or not has_bias or bias_a == bias_b))


@torch.no_grad()
def _rearrange(model: nn.Module, old: list[_BlockPlan], new: list[_BlockPlan], old_bias: bool,
               new_bias: bool) -> None:
    """Move every projection touched by ``old`` or ``new`` from the ``old`` layout to the ``new``.

    A layout is a permutation of each block's units plus the S²FT layer of the trained
    projections (no plans: the original model). One pass per weight: the composed permutation
    (undo old, apply new) and the change between [out, in] and transposed storage happen in a
    single ``index_select``. Frozen projections that stay ``nn.Linear`` are permuted in place
    (their Parameter objects survive); the others get new storage.
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
        if torch.equal(idx, ident) and _same_layout(s_old, s_new, mod.bias is not None,
                                                    old_bias, new_bias):
            continue
        if isinstance(mod, _SliceLinear):
            mod._sync()  # the buffer holds the trained values
        w = mod.weight_t.t() if isinstance(mod, ColumnSliceLinear) else mod.weight.detach()
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
            new_mod = ColumnSliceLinear._from_tensors(w.t().index_select(0, index), bias,
                                                      s_new.start, len(s_new.index))
        else:
            w = w.index_select(dim, index)  # contiguous [out, in]
            new_mod = (_plain_linear(w, bias) if s_new is None else RowSliceLinear._from_tensors(
                w, bias, s_new.start, len(s_new.index), new_bias))
        _set_module(model, name, new_mod)


@dataclass
class _State:
    selection: Selection
    attn: tuple[_AttnBlock, ...]
    mlp: tuple[_MlpBlock, ...]
    plans: list[_BlockPlan]
    train_bias: bool
    requires_grad: dict[str, bool]


def _state(model: Any) -> _State | None:
    st = getattr(model, _STATE_ATTR, None) if isinstance(model, nn.Module) else None
    return st if isinstance(st, _State) else None


def _require_state(where: str, model: Any) -> _State:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be a torch.nn.Module, got {type(model).__name__}")
    st = _state(model)
    if st is None:
        raise ValueError(f"{where}: model does not have S²FT applied (use ftops.s2ft.apply or "
                         "ftops.s2ft.load first)")
    return st


def _slice_modules(where: str, model: nn.Module, st: _State,
                   need_base: bool = False) -> list[tuple[_Slice, _SliceLinear]]:
    """The S²FT layers of every planned slice, checked to be intact (nothing changed yet)."""
    out = []
    for plan in st.plans:
        for s in plan.slices:
            try:
                mod = model.get_submodule(s.name)
            except AttributeError:
                mod = None
            cls = RowSliceLinear if s.mode == "row" else ColumnSliceLinear
            n = len(s.index)
            if (not isinstance(mod, cls) or mod.start != s.start
                    or (mod.rows if s.mode == "row" else mod.cols) != n):
                raise RuntimeError(f"{where}: model.{s.name} is no longer the S²FT layer that "
                                   f"apply made ({type(mod).__name__}); was it replaced?")
            if need_base and not mod._base_known:
                raise RuntimeError(
                    f"{where}: the base values of model.{s.name}'s trainable slice are unknown: "
                    "S²FT was applied on the meta device and the model was materialised "
                    "(to_empty) without loading an S²FT state_dict, which carries them")
            out.append((s, mod))
    return out


# --------------------------------------------------------------------------------------------------
# Public API: apply / export / load / merge / unload
# --------------------------------------------------------------------------------------------------

def apply(model: nn.Module, selection: Selection, *, train_bias: bool = False) -> nn.Module:
    """Convert ``model`` in place for S²FT training with ``selection``; returns ``model``.

    Every block with selected units is co-permuted so that they are contiguous (query/key/value
    rows and output-projection columns per key/value head group; gate/up rows and down columns
    per channel), which leaves the model's function unchanged. Projections with trained columns
    (output, down; BERT: ``attention.output.dense``, ``output.dense``) become
    :class:`ColumnSliceLinear`, those with trained rows (value, up; BERT: ``self.value``,
    ``intermediate.dense``) :class:`RowSliceLinear`; the others stay frozen ``nn.Linear``.
    Afterwards the parameters with ``requires_grad`` are exactly the trainable slices
    (``...weight_slice``, and ``...bias_slice`` of row-trained projections with a bias when
    ``train_bias``; off by default, as the reference never trains biases); every other parameter
    is frozen (you may unfreeze e.g. norms or a task head yourself). The permutation is recorded
    on the model for :func:`export`, :func:`merge` and :func:`unload`.

    Raises TypeError / ValueError naming the argument when the model is not recognised, already
    converted or has shared projections, or the selection is not a :class:`Selection`, is empty
    or was made for a differently shaped model. The model is not modified on error.
    """
    where = "ftops.s2ft.apply"
    attn, mlp = _require_blocks(where, model)
    _check_selection(where, selection, attn, mlp)
    if not isinstance(train_bias, bool):
        raise TypeError(f"{where}: train_bias must be a bool, got {type(train_bias).__name__}")
    plans = _plans(selection, attn, mlp)
    _check_plans(where, model, plans)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    _rearrange(model, [], plans, False, train_bias)
    setattr(model, _STATE_ATTR, _State(selection, attn, mlp, plans, train_bias, requires_grad))
    return model


def export(model: nn.Module) -> dict[str, Any]:
    """A compact adapter with what training changed, on the CPU.

    The dict holds only str/int/bool/list/dict and tensors, so ``torch.save`` it and read it back
    with ``torch.load(..., weights_only=True)``:

    * ``"format"``: ``"ftops.s2ft"``, ``"version"``: 2, ``"train_bias"``;
    * ``"selection"``: :meth:`Selection.to_dict`;
    * ``"permutations"``: block path -> int64 tensor, new position -> original head/channel;
    * ``"deltas"``: parameter name (``"<module>.weight"`` / ``"<module>.bias"``, as in the
      original model) -> ``{"dim", "index", "delta"}`` in the original orientation and order:
      ``weight.index_add_(dim, index, delta)`` on the original (unpermuted) weight gives the
      trained weight. ``delta`` is relative to the base model (the slice's current value minus
      its value when :func:`apply` or :func:`load` converted the base model, so after
      :func:`load` it includes the loaded adapter's delta), in float32 for half-precision weights
      (the master's precision).
    """
    where = "ftops.s2ft.export"
    st = _require_state(where, model)
    deltas: dict[str, dict[str, Any]] = {}
    for s, mod in _slice_modules(where, model, st, need_base=True):
        d = mod._deltas()
        if s.mode == "row":
            deltas[f"{s.name}.weight"] = {"dim": 0, "index": s.index.clone(),
                                          "delta": d["weight_slice"].cpu().clone()}
            if "bias_slice" in d:
                deltas[f"{s.name}.bias"] = {"dim": 0, "index": s.index.clone(),
                                            "delta": d["bias_slice"].cpu().clone()}
        else:
            deltas[f"{s.name}.weight"] = {"dim": 1, "index": s.index.clone(),
                                          "delta": d["weight_slice"].t().cpu().contiguous()}
    return {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "train_bias": st.train_bias,
        "selection": st.selection.to_dict(),
        "permutations": {p.path: p.perm.clone() for p in st.plans},
        "deltas": deltas,
    }


@torch.no_grad()
def _restore_plain(where: str, model: nn.Module, st: _State, reset: bool) -> None:
    """Back to plain nn.Linear modules in the original order (reset: base slice values first)."""
    mods = _slice_modules(where, model, st, need_base=reset)  # all checked before any change
    if reset:
        for _, mod in mods:
            mod._set_slices()
    _rearrange(model, st.plans, [], st.train_bias, False)
    for name, p in model.named_parameters():
        p.requires_grad_(st.requires_grad.get(name, True))
    delattr(model, _STATE_ATTR)


def merge(model: nn.Module) -> nn.Module:
    """Fold the trained slices into plain ``nn.Linear`` layers in the original order, in place.

    Returns ``model``, now a plain model (its state_dict has the original keys and shapes) that
    computes what the S²FT model computed (half-precision weights get the master's values,
    rounded); the ``requires_grad`` flags are restored to what they were before :func:`apply`.
    """
    where = "ftops.s2ft.merge"
    _restore_plain(where, model, _require_state(where, model), reset=False)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Undo S²FT in place: discard the training and restore the base model bit-exactly.

    Returns ``model``. Useful to go back to the base model or before applying another
    selection; :func:`load` does the same when switching to an adapter with another selection.
    """
    where = "ftops.s2ft.unload"
    _restore_plain(where, model, _require_state(where, model), reset=True)
    return model


def _check_adapter(where: str, adapter: Any) -> tuple[Selection, bool]:
    if not isinstance(adapter, Mapping):
        raise TypeError(f"{where}: adapter must be the dict from ftops.s2ft.export, got "
                        f"{type(adapter).__name__}")
    if adapter.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{where}: adapter is not an S²FT adapter (format="
                         f"{adapter.get('format')!r}, expected {ADAPTER_FORMAT!r})")
    version = adapter.get("version")
    if isinstance(version, bool) or version not in (1, ADAPTER_VERSION):
        raise ValueError(f"{where}: adapter has unsupported version {version!r} (this ftops "
                         f"reads versions 1 and {ADAPTER_VERSION})")
    for key in ("selection", "deltas", "train_bias"):
        if key not in adapter:
            raise ValueError(f"{where}: adapter is missing key {key!r}")
    if not isinstance(adapter["train_bias"], bool):
        raise TypeError(f"{where}: adapter['train_bias'] must be a bool, got "
                        f"{type(adapter['train_bias']).__name__}")
    return Selection.from_dict(adapter["selection"]), adapter["train_bias"]


def _expected_deltas(sel: Selection, attn, mlp, train_bias: bool, model: nn.Module):
    """name -> (dim, index, shape) of every delta an adapter for ``sel`` must carry."""
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


def _check_deltas(where: str, adapter: Mapping, sel: Selection, attn, mlp, train_bias: bool,
                  model: nn.Module) -> None:
    expected = _expected_deltas(sel, attn, mlp, train_bias, model)
    deltas = adapter["deltas"]
    if not isinstance(deltas, Mapping) or set(deltas) != set(expected):
        have = set(deltas) if isinstance(deltas, Mapping) else set()
        raise ValueError(
            f"{where}: adapter's deltas do not match its selection on this model (missing "
            f"{sorted(set(expected) - have)[:4]}, unexpected {sorted(have - set(expected))[:4]})")
    for name, (dim, index, shape) in expected.items():
        d = deltas[name]
        ok = (isinstance(d, Mapping) and d.get("dim") == dim
              and isinstance(d.get("index"), torch.Tensor)
              and d["index"].shape == index.shape and torch.equal(d["index"].cpu(), index)
              and isinstance(d.get("delta"), torch.Tensor) and d["delta"].is_floating_point()
              and tuple(d["delta"].shape) == shape)
        if not ok:
            raise ValueError(f"{where}: adapter['deltas'][{name!r}] does not fit this model "
                             f"(expected dim={dim}, a floating delta of shape {shape} and the "
                             "index of its selection)")
        if not torch.isfinite(d["delta"]).all():
            raise ValueError(f"{where}: adapter['deltas'][{name!r}] has non-finite values")
    perms = adapter.get("permutations")
    if perms is not None:
        want = {p.path: p.perm for p in _plans(sel, attn, mlp)}
        if (not isinstance(perms, Mapping) or set(perms) != set(want) or not all(
                isinstance(perms[k], torch.Tensor) and perms[k].shape == v.shape
                and torch.equal(perms[k].cpu(), v) for k, v in want.items())):
            raise ValueError(f"{where}: adapter['permutations'] do not match its selection")


def load(base_model: nn.Module, adapter: Mapping[str, Any]) -> nn.Module:
    """Put an adapter from :func:`export` on a model, in place; returns the model.

    On a plain base model this applies the adapter's selection (:func:`apply`, with its
    permutation) and adds the deltas to the trainable slices: the result is the trained model,
    ready to compute with, train further, :func:`export` (deltas relative to the base) or
    :func:`merge`. On a model that already carries an S²FT adapter this switches adapters: with
    the same selection only the slices are rewritten (base + new delta; fast), otherwise the old
    adapter is removed first (the exact base weights back, as :func:`unload`) and the new one
    applied. Adapters of version 1 (ftops' earlier ``heads``/``channels`` form) load as well.
    The adapter is checked against the model before anything is changed. After a switch to a
    different selection the trainable parameters are new objects: make a new optimizer.
    """
    where = "ftops.s2ft.load"
    if not isinstance(base_model, nn.Module):
        raise TypeError(f"{where}: base_model must be a torch.nn.Module, got "
                        f"{type(base_model).__name__}")
    sel, train_bias = _check_adapter(where, adapter)
    st = _state(base_model)
    if st is not None:
        attn, mlp = st.attn, st.mlp
        mods = _slice_modules(where, base_model, st, need_base=True)
    else:
        attn, mlp = _require_blocks(where, base_model)
    _check_selection(where, sel, attn, mlp)
    _check_deltas(where, adapter, sel, attn, mlp, train_bias, base_model)
    if st is None:
        apply(base_model, sel, train_bias=train_bias)
        st = _state(base_model)
    elif st.selection != sel or st.train_bias != train_bias:
        plans = _plans(sel, attn, mlp)
        _check_plans(where, base_model, plans)
        # Switch layouts in one pass per weight: base slices back, then old -> new permutation.
        for _, mod in mods:
            mod._set_slices()
        _rearrange(base_model, st.plans, plans, st.train_bias, train_bias)
        st = _State(sel, attn, mlp, plans, train_bias, st.requires_grad)
        setattr(base_model, _STATE_ATTR, st)
    deltas = adapter["deltas"]
    for s, mod in _slice_modules(where, base_model, st):
        d = deltas[f"{s.name}.weight"]["delta"]
        own = {"weight_slice": d if s.mode == "row" else d.t()}
        if s.mode == "row" and mod.bias_slice is not None:
            own["bias_slice"] = deltas[f"{s.name}.bias"]["delta"]
        mod._set_slices(own)
    return base_model
