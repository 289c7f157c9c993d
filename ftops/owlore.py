"""OwLore: outlier-weighted layerwise sampled low-rank projected training (Li et al. 2024).

OwLore builds on LISA (layerwise importance sampling): every ``period`` steps it samples
``gamma`` of the model's transformer blocks and trains only those; everything outside the blocks
(embeddings, final norm, LM head) always trains. OwLore draws block ``l`` with probability
proportional to its OWL outlier ratio (Yin et al. 2023, luuyin/OWL), so blocks with more
heavy-tailed weight/activation outliers are trained more often; with no ratios the draw is
uniform, which is LISA. The sampled blocks' Linear weights train with GaLore (low-rank projected
Adam); everything else trains with plain full-rank Adam.

This module provides the pieces the recipe needs and that the reference code leaves to scripts
and cached files:

* :func:`outlier_ratios` computes the per-block outlier ratios from a few calibration batches
  with forward hooks (no activations stored, the model untouched afterwards);
* :func:`galore_param_groups` splits the parameters into a full-rank group and a GaLore group
  with the reference's GaLore settings;
* :class:`OwLore` is the sampler: a small object with its own RNG and a ``state_dict``, stepped
  once per training step like an LR scheduler. It flips ``requires_grad`` on the blocks and, given
  the optimizer, frees the optimizer state of the blocks that leave the sample (LISA keeps it for
  every block ever sampled, so its memory grows towards that of full training; LMFlow #729/#768).

The OwLore recipe with :class:`ftops.GaLoreAdamW` (or any optimizer that follows the
``galore_torch`` param-group convention), with the reference's settings as defaults::

    import ftops
    from ftops.owlore import find_blocks, galore_param_groups

    blocks = find_blocks(model)                          # model.model.layers for Llama
    ratios = ftops.outlier_ratios(model, calib_batches)  # OWL, M=13, over a few batches of text
    groups = galore_param_groups(model, blocks)          # rank 256, gap 100, scale 1.0, "std"
    # groups[0]: everything that is not a Linear weight inside a block (embeddings, norms,
    #            LM head, biases): plain full-rank AdamW;
    # groups[1]: the blocks' Linear weights (attention and MLP projections): GaLore-projected.
    opt = ftops.GaLoreAdamW(groups, lr=3e-4)
    sampler = ftops.OwLore(blocks, ratios, gamma=5, period=50, optimizer=opt)
    for batch in loader:
        sampler.step()            # before the forward: (re)samples every `period` steps
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

Build the optimizer before the first ``sampler.step()``, over all parameters: the sampler then
freezes the inactive blocks (an optimizer built afterwards from ``requires_grad`` parameters, such
as ``ftops.layerwise(model, ...)``, would never see the other blocks). With per-parameter
optimizers, ``OwLore(..., optimizer=ftops.layerwise(model, make_optimizer))`` frees state through
its ``state`` view.

Parameters of inactive blocks have ``requires_grad=False`` and no gradient, so the optimizer
skips them (every torch optimizer, and GaLoreAdamW, skips parameters whose ``grad`` is None).
With state freeing (the default) a block that is sampled again starts with fresh moments (and,
with GaLore, a fresh projector computed at its first step), so the optimizer memory is that of
the ``gamma`` active blocks plus everything outside the blocks, independent of depth.

Where this differs from the reference code, and the option that gives the reference's behaviour:
``docs/owlore.md``.
"""
from __future__ import annotations

import logging
import numbers
import warnings
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ._checks import integer, real

__all__ = ["OwLore", "outlier_ratios", "find_blocks", "galore_param_groups", "REFERENCE_GALORE"]

logger = logging.getLogger(__name__)

# torch 2.11's torch.compile (dynamo) skips the guards of a module's parameters while the
# module's dicts are unchanged, and requires_grad_() changes no dict: a compiled model then
# keeps running the graph of the previous active set (AOT autograd baked in which parameters
# get gradients), so newly sampled blocks get no gradient. Fixed in torch 2.12 (pytorch#139476,
# #177158). The sampler replaces the switched blocks' `_parameters` dicts with equal copies,
# which fails those guards: the model recompiles once per new active set, as on later torch.
_STALE_REQUIRES_GRAD_GUARDS = tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 12)

# The OwLore reference's GaLore group (pixeli99/OwLore, src/lmflow/pipeline/finetuner.py: every
# projected weight gets rank 256, update_proj_gap 100, scale 1.0, proj_type "std").
REFERENCE_GALORE = dict(rank=256, update_proj_gap=100, scale=1.0, proj_type="std")
_PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")

# Attribute paths, tried in order, to a model's list of transformer blocks.
_BLOCK_PATHS = (
    "model.layers",            # Llama, Mistral, Qwen2, Gemma (...ForCausalLM)
    "layers",                  # LlamaModel and friends (the base model itself)
    "model.decoder.layers",    # OPT (...ForCausalLM)
    "decoder.layers",          # OPTModel
    "transformer.h",           # GPT-2, GPT-J, Falcon
    "h",                       # GPT2Model
    "bert.encoder.layer",      # BertFor...
    "roberta.encoder.layer",   # RobertaFor...
    "encoder.layer",           # BertModel, RobertaModel
    "gpt_neox.layers",         # GPT-NeoX, Pythia
)


def _get_path(obj, path):
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def _check_model(where: str, model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be a torch.nn.Module, got {type(model).__name__}")


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks (decoder/encoder layers) of a transformers-style model.

    Tries, in order: ``model.model.layers`` and ``model.layers`` (Llama-style), OPT's
    ``model.decoder.layers``, GPT-2's ``transformer.h``, BERT-style ``model.bert.encoder.layer`` /
    ``model.roberta.encoder.layer`` / ``model.encoder.layer``, GPT-NeoX's ``gpt_neox.layers``.
    The first path that leads to a non-empty ``nn.ModuleList`` wins. Raises ``ValueError`` when
    none does; pass the blocks explicitly then (any sequence of modules).
    """
    _check_model("find_blocks", model)
    for path in _BLOCK_PATHS:
        found = _get_path(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return found
    raise ValueError(
        f"could not find the transformer blocks of {type(model).__name__} (tried "
        f"{', '.join('model.' + p for p in _BLOCK_PATHS)}); pass blocks= explicitly, "
        "e.g. blocks=list(model.my_layers)")


def _as_blocks(blocks, where: str, arg: str = "blocks") -> list[nn.Module]:
    if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise TypeError(f"{where}: {arg} must be a sequence of modules (e.g. an nn.ModuleList), "
                        f"got a single {type(blocks).__name__}; use find_blocks(model)")
    if isinstance(blocks, (str, bytes, torch.Tensor, Mapping)):
        raise TypeError(f"{where}: {arg} must be a sequence of nn.Module, got "
                        f"{type(blocks).__name__}")
    try:
        out = list(blocks)
    except TypeError:
        raise TypeError(f"{where}: {arg} must be a sequence of nn.Module, got "
                        f"{type(blocks).__name__}") from None
    if not out:
        raise ValueError(f"{where}: {arg} is empty")
    for i, b in enumerate(out):
        if not isinstance(b, nn.Module):
            raise TypeError(f"{where}: {arg}[{i}] is a {type(b).__name__}, not an nn.Module")
    if len({id(b) for b in out}) != len(out):
        raise ValueError(f"{where}: {arg} contains the same module more than once")
    return out


def _blocks_of(where: str, model: nn.Module, blocks) -> list[nn.Module]:
    """``blocks`` (default: :func:`find_blocks`) checked to be submodules of ``model``."""
    blocks = _as_blocks(find_blocks(model) if blocks is None else blocks, where)
    inside = {id(m) for m in model.modules()}
    for i, b in enumerate(blocks):
        if id(b) not in inside:
            raise ValueError(f"{where}: blocks[{i}] ({type(b).__name__}) is not a submodule of "
                             "model")
    return blocks


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device) if device is not None else obj
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _call(model, batch, device):
    batch = _to_device(batch, device)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(*batch)
    return model(batch)


def outlier_ratios(model: nn.Module, batches: Iterable[Any],
                   blocks: Sequence[nn.Module] | None = None, M: float = 13.0, *,
                   mean_over: str = "block") -> list[float]:
    """OWL outlier ratio of each transformer block, from calibration batches.

    For each ``nn.Linear`` inside a block, with weight ``W`` (out x in), the OWL score is
    ``A[i, j] = |W[i, j]| * ||X[:, j]||_2`` where ``X`` holds the layer's inputs over all
    calibration tokens (all batches, all positions: the input is flattened to ``(-1, in)``). An
    entry is an outlier when ``A[i, j] > M * mean``. The block's ratio is its number of outlier
    entries over its number of entries, over all its Linear layers: a fraction in [0, 1].

    The defaults are the OwLore reference's:

    * ``mean_over="block"``: the mean is taken over the scores of all the block's Linear layers
      together. luuyin/OWL, ``lib/prune_all.py``: the block's per-layer score matrices are
      flattened and concatenated, then ``check_outlier_mean(scores, Hyper_m)`` counts
      ``scores > mean(scores) * Hyper_m`` over all of them. ``mean_over="layer"`` compares each
      layer's scores with that layer's own mean instead (an ftops variant; it counts more
      outliers in layers whose scores are small next to the rest of the block's).
    * ``M=13``: pixeli99/OwLore samples with the ratios cached in
      ``metric_cache/llama2_7b_ratio_13.txt`` (read by ``src/lmflow/pipeline/finetuner.py``
      for ``--lisa_prob_mode owl``), whose name gives OWL's ``Hyper_m`` = 13. OWL's own pruning
      script uses 5 (luuyin/OWL, ``llama7b_wanda_owll.sh``).

    OWL reports percents (``count / numel * 100``); this returns fractions. The sampler only uses
    ``ratio / sum(ratios)`` (as the reference does), so the scale does not matter.

    Args:
        model: called as ``model(**batch)`` for a dict batch, ``model(*batch)`` for a tuple/list
            and ``model(batch)`` otherwise; tensors in the batch are moved to the device of the
            model's first parameter. The output is ignored.
        batches: an iterable (list, generator, DataLoader) of at least one batch. OWL used 128
            sequences of 2048 tokens of C4.
        blocks: the transformer blocks (any sequence of submodules of ``model``); by default
            found by :func:`find_blocks`.
        M: the outlier threshold multiplier (finite, > 0).
        mean_over: ``"block"`` (OWL) or ``"layer"``, see above.

    Returns:
        one float per block, in block order.

    Raises ``ValueError`` naming the layer when a weight or a layer's calibration input holds a
    NaN or an infinity (an outlier count over NaN scores would be silently 0, and the block
    never sampled). Memory: the hooks keep only a float64 vector of squared column norms per
    Linear layer (``in_features`` entries), never the activations; the scores are formed in
    float64 chunks of rows. Runs under ``torch.no_grad()`` with the whole model in eval mode;
    each submodule's training/eval flag is restored afterwards and the hooks are removed, also
    when the model raises.
    """
    where = "outlier_ratios"
    _check_model(where, model)
    M = real(where, "M", M, low=0.0, low_open=True)
    if mean_over not in ("layer", "block"):
        raise ValueError(f"{where}: mean_over must be 'block' or 'layer', got {mean_over!r}")
    if isinstance(batches, (torch.Tensor, Mapping, str, bytes)):
        raise TypeError(f"{where}: batches must be an iterable of batches (e.g. a list), got a "
                        f"single {type(batches).__name__}; pass [batch]")
    try:
        batch_iter = iter(batches)
    except TypeError:
        raise TypeError(f"{where}: batches must be an iterable of batches, got "
                        f"{type(batches).__name__}") from None
    blocks = _blocks_of(where, model, blocks)
    names = {id(m): n for n, m in model.named_modules()}

    layers: list[list[nn.Linear]] = []
    labels: dict[int, str] = {}
    seen: set[int] = set()
    for b, block in enumerate(blocks):
        lins = []
        for sub, m in block.named_modules():
            if not isinstance(m, nn.Linear) or m.weight.numel() == 0:
                continue
            if id(m) in seen:
                raise ValueError(f"{where}: blocks[{b}] shares a Linear layer with another block")
            seen.add(id(m))
            labels[id(m)] = f"blocks[{b}] layer {names.get(id(m), sub)!r}"
            w = m.weight
            if w.device.type == "meta":
                raise ValueError(f"{where}: the weight of {labels[id(m)]} is on the meta device; "
                                 "load the weights first")
            if not w.is_floating_point():
                raise TypeError(f"{where}: the weight of {labels[id(m)]} has dtype {w.dtype}; "
                                "the OWL score needs floating-point weights")
            if not bool(torch.isfinite(w.detach()).all()):
                raise ValueError(f"{where}: the weight of {labels[id(m)]} holds NaN or inf "
                                 "values")
            lins.append(m)
        if not lins:
            raise ValueError(f"{where}: blocks[{b}] ({type(block).__name__}) contains no "
                             "non-empty nn.Linear layer")
        layers.append(lins)

    sq_norms: dict[int, torch.Tensor] = {}

    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor):
            return
        x = x.detach().reshape(-1, module.in_features)
        s = torch.linalg.vector_norm(x, dim=0, dtype=torch.float64).square_()
        acc = sq_norms.get(id(module))
        if acc is None:
            sq_norms[id(module)] = s
        else:
            acc.add_(s.to(acc.device))

    try:
        first = next(model.parameters())
        device = first.device if first.device.type != "meta" else None
    except StopIteration:
        device = None
    modes = [(m, m.training) for m in model.modules()]
    handles = []
    n_batches = 0
    try:
        for lins in layers:
            for m in lins:
                handles.append(m.register_forward_hook(hook, with_kwargs=True))
        model.eval()
        with torch.no_grad():
            for batch in batch_iter:
                try:
                    _call(model, batch, device)
                except Exception as e:
                    e.add_note(f"{where}: raised by the model's forward on calibration batch "
                               f"{n_batches}")
                    raise
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    if n_batches == 0:
        raise ValueError(f"{where}: batches is empty: it needs at least one calibration batch")

    ratios = []
    with torch.no_grad():
        for b, lins in enumerate(layers):
            used = []
            for m in lins:
                sq = sq_norms.get(id(m))
                if sq is None:
                    continue
                if not bool(torch.isfinite(sq).all()):
                    raise ValueError(f"{where}: the calibration input of {labels[id(m)]} holds "
                                     "NaN or inf values (or its squared norm overflows float64)")
                used.append((m.weight, sq.sqrt().to(m.weight.device)))
            if not used:
                raise ValueError(f"{where}: blocks[{b}]: none of its Linear layers ran during "
                                 "calibration; is the block part of the model's forward?")
            skipped = len(lins) - len(used)
            if skipped:
                warnings.warn(f"{where}: blocks[{b}]: {skipped} of its {len(lins)} Linear layers "
                              "received no input during calibration; they are left out of its "
                              "ratio", stacklevel=2)
            sums = [_score_sum(w, n) for w, n in used]
            numels = [w.numel() for w, _ in used]
            if mean_over == "block":
                means = [sum(sums) / sum(numels)] * len(used)
            else:
                means = [s / n for s, n in zip(sums, numels)]
            count = sum(_count_above(w, n, M * mu) for (w, n), mu in zip(used, means))
            ratios.append(count / sum(numels))
    return ratios


def _row_chunks(w: torch.Tensor, chunk: int = 1 << 22):
    """|W| in float64, about ``chunk`` elements (whole rows) at a time: no full-size temporary."""
    w = w.detach()
    rows = max(1, chunk // max(1, w.shape[1]))
    for r in range(0, w.shape[0], rows):
        yield w[r:r + rows].abs().double()


def _score_sum(w: torch.Tensor, col_norm: torch.Tensor) -> float:
    """sum_ij |W_ij| * n_j, without forming A."""
    return sum(float(torch.mv(a, col_norm).sum()) for a in _row_chunks(w))


def _count_above(w: torch.Tensor, col_norm: torch.Tensor, thr: float) -> int:
    """#{(i, j): |W_ij| * n_j > thr}."""
    return sum(int((a.mul_(col_norm) > thr).sum()) for a in _row_chunks(w))


def _check_galore_options(where: str, options: dict) -> None:
    for key in options:
        if not isinstance(key, str):
            raise TypeError(f"{where}: option names must be strings, got {key!r}")
    if "params" in options:
        raise ValueError(f"{where}: 'params' is not an option (the groups' parameters are chosen "
                         "from the blocks)")
    if "rank" in options:
        integer(where, "rank", options["rank"], low=1)
    if "update_proj_gap" in options:
        integer(where, "update_proj_gap", options["update_proj_gap"], low=1)
    if "scale" in options:
        real(where, "scale", options["scale"], low=0.0)
    if "proj_type" in options and options["proj_type"] not in _PROJ_TYPES:
        raise ValueError(f"{where}: proj_type must be one of {', '.join(_PROJ_TYPES)}, got "
                         f"{options['proj_type']!r}")


def galore_param_groups(model: nn.Module, blocks: Sequence[nn.Module] | None = None, *,
                        targets: Sequence[str] | None = None, **galore_options) -> list[dict]:
    """Param groups for the OwLore recipe, in the ``galore_torch`` convention.

    Returns ``[{"params": rest}, {"params": projected, **options}]``: ``projected`` are the 2-D
    weights of every ``nn.Linear`` inside the blocks (attention and MLP projections; this also
    covers BERT's ``intermediate.dense``/``output.dense``) and ``rest`` is every other parameter
    of ``model`` (embeddings, norms, LM head, biases), trained full-rank. Parameters with
    ``requires_grad=False`` when called (e.g. frozen by the user) are left out.

    ``options`` are :data:`REFERENCE_GALORE` (the OwLore reference's ``rank=256,
    update_proj_gap=100, scale=1.0, proj_type="std"``) updated with ``galore_options``, e.g.
    ``rank=128`` or ftops' ``projector="randomized"``. The reference puts each weight in its own
    group with the same options, which trains the same way as one group.

    ``targets``: a tuple of module-name substrings selects the projected weights by the reference's
    rule instead (pixeli99/OwLore, ``src/lmflow/pipeline/finetuner.py``): every ``nn.Linear`` of
    ``model`` whose qualified name contains one of them; the reference uses ``("attn", "mlp")``.
    ``blocks`` is then not used. The two rules pick the same weights on Llama, Mistral, Qwen2 and
    Gemma; on BERT-style models the reference's names match nothing (``attention``,
    ``intermediate``, ``output``), so its rule trains every weight full-rank there.

    Pass the result to ``ftops.GaLoreAdamW`` (or ``galore_torch.GaLoreAdamW``).
    """
    where = "galore_param_groups"
    _check_model(where, model)
    _check_galore_options(where, galore_options)
    options = {**REFERENCE_GALORE, **galore_options}
    projected, ids = [], set()
    if targets is None:
        for block in _blocks_of(where, model, blocks):
            for m in block.modules():
                if isinstance(m, nn.Linear) and m.weight.requires_grad and id(m.weight) not in ids:
                    projected.append(m.weight)
                    ids.add(id(m.weight))
        what = "the blocks contain no trainable nn.Linear weight"
    else:
        if isinstance(targets, (str, bytes)) or not isinstance(targets, Sequence) or not targets \
                or not all(isinstance(t, str) and t for t in targets):
            raise TypeError(f"{where}: targets must be a non-empty sequence of non-empty strings, "
                            f"e.g. ('attn', 'mlp'), got {targets!r}")
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and any(t in name for t in targets) \
                    and m.weight.requires_grad and id(m.weight) not in ids:
                projected.append(m.weight)
                ids.add(id(m.weight))
        what = f"no trainable nn.Linear of model has a name containing one of {tuple(targets)}"
    if not projected:
        raise ValueError(f"{where}: {what}")
    if len(ids) != sum(1 for p in model.parameters() if id(p) in ids):
        raise ValueError(f"{where}: the blocks' Linear weights are not all parameters of model")
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return [{"params": rest}, {"params": projected, **options}]


def _ratios_to_probs(ratios, n: int, gamma: int) -> torch.Tensor:
    """Sampling probabilities ``ratios / sum(ratios)`` (float64), checked."""
    where = "OwLore"
    if ratios is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    if isinstance(ratios, torch.Tensor):
        if ratios.dtype == torch.bool or ratios.is_complex() or ratios.dim() != 1:
            raise TypeError(f"{where}: ratios must be a 1-D real tensor or a sequence of numbers, "
                            f"got a tensor of shape {list(ratios.shape)} and dtype {ratios.dtype}")
        r = ratios.detach().to(device="cpu", dtype=torch.float64)
    elif isinstance(ratios, (str, bytes, Mapping)) or not isinstance(ratios, Iterable):
        raise TypeError(f"{where}: ratios must be a sequence of numbers or a 1-D tensor, got "
                        f"{type(ratios).__name__}")
    else:
        vals = list(ratios)
        for i, v in enumerate(vals):
            if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_complex() \
                    and v.dtype != torch.bool:
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{where}: ratios[{i}] must be a real number, got "
                                f"{type(v).__name__} {v!r}")
        r = torch.tensor([float(v) for v in vals], dtype=torch.float64)
    if r.numel() != n:
        raise ValueError(f"{where}: ratios has {r.numel()} entries but there are {n} blocks")
    bad = (~torch.isfinite(r)) | (r < 0)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"{where}: ratios must be finite and >= 0, got ratios[{i}] = "
                         f"{float(r[i])!r}")
    positive = int((r > 0).sum())
    if positive < gamma:
        raise ValueError(f"{where}: only {positive} block(s) have a positive ratio, fewer than "
                         f"gamma={gamma}: blocks with ratio 0 are never sampled")
    total = sum(r.tolist())  # summed left to right, as the reference does
    if 0 < total < float("inf") and total >= torch.finfo(torch.float64).tiny:
        return r / total  # the reference's normalisation, to the bit
    scaled = r / r.max()  # a sum that overflows (or underflows): the same ratios, rescaled
    return scaled / scaled.sum()


class OwLore:
    """Outlier-weighted (OwLore) / uniform (LISA) layerwise block sampler.

    Call :meth:`step` once per training step, before the forward (as one steps an LR scheduler).
    On the first call and then every ``period`` calls it draws ``gamma`` distinct blocks, block
    ``l`` with probability ``ratios[l] / sum(ratios)`` (sequential draws without replacement, as
    the reference's ``numpy.random.choice(..., replace=False, p=...)``; uniform when ``ratios``
    is None, i.e. LISA), sets ``requires_grad=True`` on the sampled blocks' parameters and
    ``requires_grad=False`` on the other blocks' parameters. Parameters outside the blocks are
    never touched (they keep training). Before the first call nothing is changed and
    :attr:`active` is empty.

    Args:
        blocks: the transformer blocks, a sequence of modules (e.g. ``model.model.layers``, or
            :func:`find_blocks`), each with at least one parameter. No parameter may belong to
            two blocks.
        ratios: one finite, non-negative weight per block (e.g. :func:`outlier_ratios`), or None
            for uniform sampling. Blocks with weight 0 are never sampled; at least ``gamma``
            weights must be positive. Only the proportions matter.
        gamma: number of blocks active at a time, in ``[1, len(blocks)]`` (reference: 5).
        period: steps between two draws, >= 1 (reference: 50).
        seed: seed of the sampler's own ``torch.Generator`` (the global RNGs are not used), so
            the draws do not depend on what else consumes random numbers, and ``state_dict``
            holds the generator. Under ``torch.distributed`` rank 0's generator state is
            broadcast at the first draw (and after :meth:`load_state_dict`), so every rank draws
            the same blocks. ``seed=None`` draws as the reference does, with
            ``numpy.random.choice`` from numpy's global RNG (seeded by the user, e.g. by
            transformers' ``set_seed``; the Trainer saves and restores it in its checkpoints);
            under ``torch.distributed`` rank 0's draw is then broadcast at every draw.
        optimizer: optional; anything with a ``state`` mapping keyed by parameter (every
            ``torch.optim.Optimizer``, ``ftops.GaLoreAdamW``, ``ftops.layerwise(...)``), a list of
            such, or a dict whose values are such (e.g. per-parameter optimizers). When given, the
            optimizer state of the deactivated blocks' parameters is deleted at each draw
            (``del optimizer.state[p]``) unless ``keep_state=True``.
        keep_state: keep the optimizer state of inactive blocks (the reference's behaviour: the
            memory then grows with the number of distinct blocks ever sampled, up to full-model
            optimizer state, and a block sampled again resumes its old moments and projector).

    At each draw the gradients of the deactivated blocks' parameters are set to None (with or
    without ``optimizer=``), so that no optimizer updates a frozen block from a stale gradient.
    As in LISA, every parameter of a sampled block becomes trainable, including one the user had
    frozen inside a block.
    """

    def __init__(self, blocks: Sequence[nn.Module],
                 ratios: Sequence[float] | torch.Tensor | None = None, gamma: int = 5,
                 period: int = 50, seed: int | None = 0, optimizer=None, keep_state: bool = False):
        where = "OwLore"
        self.blocks = _as_blocks(blocks, where)
        n = len(self.blocks)
        gamma = integer(where, "gamma", gamma, low=1)
        if gamma > n:
            raise ValueError(f"{where}: gamma must be <= {n} (the number of blocks), got {gamma}")
        period = integer(where, "period", period, low=1)
        if seed is not None:
            seed = integer(where, "seed", seed, low=-(1 << 63), high=(1 << 64) - 1)
        if not isinstance(keep_state, bool):
            raise TypeError(f"{where}: keep_state must be a bool, got {type(keep_state).__name__}")
        probs = _ratios_to_probs(ratios, n, gamma)

        params: list[list[torch.nn.Parameter]] = []
        owner: dict[int, int] = {}
        for b, block in enumerate(self.blocks):
            ps = []
            for p in block.parameters():
                if id(p) in owner and owner[id(p)] != b:
                    raise ValueError(f"{where}: blocks[{owner[id(p)]}] and blocks[{b}] share a "
                                     "parameter; the sampler cannot freeze one without the other")
                if id(p) not in owner:
                    owner[id(p)] = b
                    ps.append(p)
            if not ps:
                raise ValueError(f"{where}: blocks[{b}] ({type(block).__name__}) has no parameter: "
                                 "sampling it would train nothing")
            params.append(ps)

        if optimizer is None:
            optimizers = []
        elif hasattr(optimizer, "state"):
            optimizers = [optimizer]
        elif isinstance(optimizer, Mapping):  # e.g. {param: its own optimizer}
            optimizers = list(optimizer.values())
        elif isinstance(optimizer, (str, bytes, torch.Tensor)):
            optimizers = [optimizer]  # refused below
        else:
            try:
                optimizers = list(optimizer)
            except TypeError:
                raise TypeError(f"{where}: optimizer must have a `state` mapping (a "
                                "torch.optim.Optimizer) or be a list of such, got "
                                f"{type(optimizer).__name__}") from None
        for o in optimizers:
            if not isinstance(getattr(o, "state", None), Mapping):
                raise TypeError(f"{where}: optimizer {type(o).__name__} has no `state` mapping "
                                "keyed by parameter")

        self.gamma, self.period, self.seed = gamma, period, seed
        self.keep_state = keep_state
        self.probs = probs
        self._uniform = ratios is None
        self._params = params
        self._optimizers = optimizers
        self._gen = torch.Generator(device="cpu")
        if seed is not None:
            self._gen.manual_seed(seed)
        self._synced = False  # rank 0's generator state not yet received (torch.distributed)
        self.steps = 0
        self.active: list[int] = []
        self.history: list[list[int]] = []  # not saved; the draws made by this object

    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def _comm_device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _sync_generator(self) -> None:
        """Under torch.distributed, take rank 0's generator state (once, and after a load), so
        every rank draws the same blocks even if the seeds differ."""
        if self._synced or not self._distributed():
            return
        buf = self._gen.get_state().to(self._comm_device())
        dist.broadcast(buf, src=0)
        self._gen.set_state(buf.cpu())
        self._synced = True

    def _sample(self) -> list[int]:
        if self.seed is None:
            import numpy as np

            p = None if self._uniform else self.probs.numpy()  # the reference passes p=None
            picks = torch.as_tensor(np.random.choice(range(len(self.blocks)), self.gamma,
                                                     replace=False, p=p))
            if self._distributed():
                buf = picks.to(device=self._comm_device(), dtype=torch.int64)
                dist.broadcast(buf, src=0)
                picks = buf.cpu()
        else:
            self._sync_generator()
            picks = torch.multinomial(self.probs, self.gamma, replacement=False,
                                      generator=self._gen)
        return sorted(int(i) for i in picks)

    def _apply(self, active: list[int]) -> None:
        on = set(active)
        for b, ps in enumerate(self._params):
            if _STALE_REQUIRES_GRAD_GUARDS and any(p.requires_grad != (b in on) for p in ps):
                for m in self.blocks[b].modules():
                    m._parameters = type(m._parameters)(m._parameters)
            if b in on:
                for p in ps:
                    p.requires_grad_(True)
            else:
                for p in ps:
                    p.requires_grad_(False)
                    p.grad = None
                    if not self.keep_state:
                        for o in self._optimizers:
                            if p in o.state:
                                del o.state[p]
        self.active = list(active)

    def step(self) -> bool:
        """Advance one training step; draws a new sample on the first call and every ``period``.

        Returns True when it drew (the set of trainable parameters may have changed: under
        ``DistributedDataParallel``, wrap the model again, see docs/distributed.md).
        """
        drew = self.steps % self.period == 0
        if drew:
            active = self._sample()
            self._apply(active)
            self.history.append(active)
            logger.info("OwLore: step %d trains blocks %s", self.steps, active)
        self.steps += 1
        return drew

    def block_parameters(self, index: int) -> list[torch.nn.Parameter]:
        """The parameters of block ``index`` (each shared parameter listed once)."""
        index = integer("OwLore.block_parameters", "index", index, low=0,
                        high=len(self._params) - 1)
        return list(self._params[index])

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and ints (``torch.load(weights_only=True)`` works). With ``seed=None``
        ``rng_state`` is empty: numpy's global RNG is the program's, not the sampler's."""
        return {
            "steps": self.steps,
            "active": torch.tensor(self.active, dtype=torch.int64),
            "rng_state": (self._gen.get_state() if self.seed is not None
                          else torch.empty(0, dtype=torch.uint8)),
            "gamma": self.gamma,
            "period": self.period,
            "num_blocks": len(self.blocks),
            "probs": self.probs.clone(),
        }

    _KEYS = ("steps", "active", "rng_state", "gamma", "period", "num_blocks", "probs")

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume: the same future draws and the same active set as the saved run.

        The configuration (number of blocks, gamma, period, sampling probabilities, generator
        kind) must match this sampler's. Everything is checked before anything changes: a state
        that is malformed or from elsewhere raises and leaves the sampler and the model as they
        were. The saved active set is applied at once (requires_grad set, and inactive blocks'
        gradients and, unless ``keep_state``, optimizer state dropped), so load the optimizer's
        state before or after, either works.
        """
        where = "OwLore.load_state_dict"
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{where}: state_dict must be a dict (from OwLore.state_dict()), got "
                            f"{type(state_dict).__name__}")
        missing = [k for k in self._KEYS if k not in state_dict]
        if missing:
            raise KeyError(f"{where}: state_dict is missing {missing}; is it an OwLore sampler's "
                           "state_dict()?")

        def as_int(key):
            v = state_dict[key]
            if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point() \
                    and not v.is_complex() and v.dtype != torch.bool:
                v = int(v.item())
            return integer(where, f"state_dict[{key!r}]", v)

        n = len(self.blocks)
        for key, mine in (("num_blocks", n), ("gamma", self.gamma), ("period", self.period)):
            saved = as_int(key)
            if saved != mine:
                raise ValueError(f"{where}: state_dict was saved with {key}={saved}, this sampler "
                                 f"has {key}={mine}")
        steps = as_int("steps")
        if steps < 0:
            raise ValueError(f"{where}: state_dict['steps'] must be >= 0, got {steps}")

        probs = state_dict["probs"]
        if not isinstance(probs, torch.Tensor) or not probs.is_floating_point() \
                or probs.shape != self.probs.shape:
            raise ValueError(f"{where}: state_dict['probs'] must be a float tensor of shape "
                             f"[{n}], got {_describe(probs)}")
        if not torch.allclose(probs.detach().cpu().double(), self.probs, rtol=1e-9, atol=0):
            raise ValueError(f"{where}: state_dict was saved with different ratios (sampling "
                             "probabilities)")

        active = state_dict["active"]
        if isinstance(active, torch.Tensor):
            if active.dim() != 1 or active.is_floating_point() or active.is_complex() \
                    or active.dtype == torch.bool:
                raise ValueError(f"{where}: state_dict['active'] must be a 1-D integer tensor, got "
                                 f"{_describe(active)}")
            active = [int(i) for i in active.tolist()]
        elif isinstance(active, (list, tuple)) and all(
                isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in active):
            active = [int(i) for i in active]
        else:
            raise ValueError(f"{where}: state_dict['active'] must be a 1-D integer tensor, got "
                             f"{_describe(active)}")
        if len(set(active)) != len(active):
            raise ValueError(f"{where}: state_dict['active'] holds a block twice: {active}")
        if any(not 0 <= i < n for i in active):
            raise ValueError(f"{where}: state_dict['active'] holds a block index outside "
                             f"[0, {n - 1}]: {active}")
        if (steps > 0 and len(active) != self.gamma) or (steps == 0 and active):
            raise ValueError(f"{where}: inconsistent state_dict: steps={steps} with "
                             f"{len(active)} active block(s) (gamma={self.gamma})")

        rng = state_dict["rng_state"]
        if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.dim() != 1:
            raise ValueError(f"{where}: state_dict['rng_state'] must be a 1-D uint8 tensor, got "
                             f"{_describe(rng)}")
        if self.seed is None:
            if rng.numel() != 0:
                raise ValueError(f"{where}: state_dict holds a generator state (saved with a "
                                 "seed), this sampler draws from numpy's global RNG (seed=None)")
        else:
            if rng.numel() == 0:
                raise ValueError(f"{where}: state_dict was saved with seed=None (numpy's global "
                                 "RNG), this sampler has its own generator (seed given)")
            try:
                torch.Generator(device="cpu").set_state(rng.cpu())
            except RuntimeError as e:
                raise ValueError(f"{where}: state_dict['rng_state'] is not a CPU generator state "
                                 f"({e})") from None

        if self.seed is not None:
            self._gen.set_state(rng.cpu())
            self._synced = False
        self.steps = steps
        if active:
            self._apply(sorted(active))
        else:
            self.active = []

    def __repr__(self) -> str:
        uniform = torch.allclose(self.probs, self.probs[0].expand_as(self.probs))
        kind = "uniform (LISA)" if uniform else "outlier-weighted"
        rng = "numpy global RNG" if self.seed is None else f"seed={self.seed}"
        return (f"OwLore(blocks={len(self.blocks)}, gamma={self.gamma}, period={self.period}, "
                f"sampling={kind}, {rng}, keep_state={self.keep_state}, steps={self.steps}, "
                f"active={self.active})")


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"a tensor of shape {list(v.shape)} and dtype {v.dtype}"
    return f"{type(v).__name__} {v!r}"[:200]
