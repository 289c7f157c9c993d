"""OwLore: outlier-weighted layerwise sampled low-rank projected training (Li et al. 2024).

OwLore builds on LISA (layerwise importance sampling): every ``period`` steps it samples
``gamma`` of the model's transformer blocks and trains only those; everything outside the blocks
(embeddings, final norm, LM head) always trains. OwLore draws block ``l`` with probability
proportional to its OWL outlier ratio (Yin et al. 2023, luuyin/OWL), so blocks with more
heavy-tailed weight/activation outliers are trained more often; with no ratios the draw is
uniform, which is LISA. The sampled blocks' Linear weights train with GaLore (low-rank projected
Adam); everything else trains with plain full-rank Adam.

This module provides the two pieces the recipe needs and that the reference code leaves to
scripts:

* :func:`outlier_ratios` computes the per-block outlier ratios from a few calibration batches
  with forward hooks (no activations stored, the model untouched afterwards);
* :class:`OwLore` is the sampler: a small object with its own RNG and a ``state_dict``, stepped
  once per training step like an LR scheduler. It flips ``requires_grad`` on the blocks and, given
  the optimizer, frees the optimizer state of the blocks that leave the sample (LISA keeps it for
  every block ever sampled, so its memory grows towards that of full training; LMFlow #729/#768).

The OwLore recipe with :class:`ftops.GaLoreAdamW` (or any optimizer that follows the
``galore_torch`` param-group convention)::

    import ftops
    from ftops.owlore import find_blocks, galore_param_groups

    blocks = find_blocks(model)                          # model.model.layers for Llama
    ratios = ftops.outlier_ratios(model, calib_batches)  # a few batches of real text
    groups = galore_param_groups(model, blocks, rank=128, update_proj_gap=100, scale=1.0,
                                 proj_type="std")
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
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["OwLore", "outlier_ratios", "find_blocks", "galore_param_groups"]

logger = logging.getLogger(__name__)

# torch 2.11's torch.compile (dynamo) skips the guards of a module's parameters while the
# module's dicts are unchanged, and requires_grad_() changes no dict: a compiled model then
# keeps running the graph of the previous active set (AOT autograd baked in which parameters
# get gradients), so newly sampled blocks get no gradient. Fixed in torch 2.12 (pytorch#139476,
# #177158). The sampler replaces the switched blocks' `_parameters` dicts with equal copies,
# which fails those guards: the model recompiles once per new active set, as on later torch.
_STALE_REQUIRES_GRAD_GUARDS = tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 12)

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


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks (decoder/encoder layers) of a transformers-style model.

    Tries, in order: ``model.model.layers`` and ``model.layers`` (Llama-style), OPT's
    ``model.decoder.layers``, GPT-2's ``transformer.h``, BERT-style ``model.bert.encoder.layer`` /
    ``model.roberta.encoder.layer`` / ``model.encoder.layer``, GPT-NeoX's ``gpt_neox.layers``.
    The first path that leads to a non-empty ``nn.ModuleList`` wins. Raises ``ValueError`` when
    none does; pass the blocks explicitly then (any sequence of modules).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for path in _BLOCK_PATHS:
        found = _get_path(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return found
    raise ValueError(
        f"could not find the transformer blocks of {type(model).__name__} (tried "
        f"{', '.join('model.' + p for p in _BLOCK_PATHS)}); pass blocks= explicitly, "
        "e.g. blocks=list(model.my_layers)")


def _as_blocks(blocks, arg="blocks") -> list[nn.Module]:
    if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise TypeError(f"{arg} must be a sequence of modules (e.g. an nn.ModuleList), "
                        f"got a single {type(blocks).__name__}; use find_blocks(model)")
    try:
        out = list(blocks)
    except TypeError:
        raise TypeError(f"{arg} must be a sequence of nn.Module, got {type(blocks).__name__}") from None
    if not out:
        raise ValueError(f"{arg} is empty")
    for i, b in enumerate(out):
        if not isinstance(b, nn.Module):
            raise TypeError(f"{arg}[{i}] is a {type(b).__name__}, not an nn.Module")
    if len({id(b) for b in out}) != len(out):
        raise ValueError(f"{arg} contains the same module more than once")
    return out


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


def outlier_ratios(model: nn.Module, batches: Iterable[Any], blocks: Sequence[nn.Module] | None = None,
                   M: float = 7.0, *, mean_over: str = "layer") -> list[float]:
    """OWL outlier ratio of each transformer block, from calibration batches.

    For each ``nn.Linear`` inside a block, with weight ``W`` (out x in), the OWL score is
    ``A[i, j] = |W[i, j]| * ||X[:, j]||_2`` where ``X`` holds the layer's inputs over all
    calibration tokens (all batches, all positions: the input is flattened to ``(-1, in)``). An
    entry is an outlier when ``A[i, j] > M * mean(A)``. The block's ratio is the number of outlier
    entries over the number of entries, summed over the block's Linear layers:
    ``ratio = sum_layers count / sum_layers numel`` (a fraction in [0, 1]; OWL prints percents).

    ``mean_over`` picks the mean the threshold uses: ``"layer"`` (default) compares each layer's
    scores with that layer's own mean; ``"block"`` compares them with the mean over all scores of
    the block's Linear layers together, which is what luuyin/OWL's code does (it concatenates the
    block's scores before ``check_outlier_mean``). The two differ when a block's layers have
    different score scales (e.g. ``down_proj`` against ``q_proj``).

    Args:
        model: called as ``model(**batch)`` for a dict batch, ``model(*batch)`` for a tuple/list
            and ``model(batch)`` otherwise; tensors in the batch are moved to the device of the
            model's first parameter. The output is ignored.
        batches: an iterable of at least one batch (e.g. a few hundred sequences of real text).
        blocks: the transformer blocks (any sequence of modules inside ``model``); by default
            found by :func:`find_blocks` (Llama-style ``model.model.layers``, BERT-style
            ``model.bert.encoder.layer`` / ``model.encoder.layer``, ...).
        M: the outlier threshold multiplier (> 0); OWL searches 5..13 per model family.
        mean_over: ``"layer"`` or ``"block"``, see above.

    Returns:
        one float per block, in block order.

    Memory: the hooks keep only a float64 vector of squared column norms per Linear layer
    (``in_features`` entries), never the activations; the scores are formed in chunks of rows.
    Runs under ``torch.no_grad()`` with the whole model in eval mode; each submodule's
    training/eval flag is restored afterwards and the hooks are removed, also when the model
    raises.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(M, bool) or not isinstance(M, (int, float)) or not math.isfinite(M) or M <= 0:
        raise ValueError(f"M must be a finite number > 0, got {M!r}")
    if mean_over not in ("layer", "block"):
        raise ValueError(f"mean_over must be 'layer' or 'block', got {mean_over!r}")
    blocks = find_blocks(model) if blocks is None else blocks
    blocks = _as_blocks(blocks)

    layers: list[list[nn.Linear]] = []
    seen: set[int] = set()
    for b, block in enumerate(blocks):
        lins = [m for m in block.modules() if isinstance(m, nn.Linear)]
        if not lins:
            raise ValueError(f"blocks[{b}] ({type(block).__name__}) contains no nn.Linear layer")
        for m in lins:
            if id(m) in seen:
                raise ValueError(f"blocks[{b}] shares a Linear layer with another block")
            seen.add(id(m))
        layers.append(lins)

    sq_norms: dict[int, torch.Tensor] = {}

    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs.get("input")
        if x is None:
            return
        x = x.detach().reshape(-1, module.in_features)
        s = torch.linalg.vector_norm(x, dim=0, dtype=torch.float32).double().square_()
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
            for batch in batches:
                _call(model, batch, device)
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    if n_batches == 0:
        raise ValueError("batches is empty: outlier_ratios needs at least one calibration batch")

    ratios = []
    with torch.no_grad():
        for b, lins in enumerate(layers):
            used = [(m.weight, sq_norms[id(m)].sqrt().to(device=m.weight.device, dtype=torch.float32))
                    for m in lins if id(m) in sq_norms]
            if not used:
                raise ValueError(f"blocks[{b}]: none of its Linear layers ran during calibration; "
                                 "is the block part of the model's forward?")
            skipped = len(lins) - len(used)
            if skipped:
                warnings.warn(f"blocks[{b}]: {skipped} of its {len(lins)} Linear layers received no input "
                              "during calibration; they are left out of its ratio", stacklevel=2)
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
    """|W| in float32, ``chunk`` elements (whole rows) at a time, so no full-size temporary."""
    w = w.detach()
    rows = max(1, chunk // max(1, w.shape[1]))
    for r in range(0, w.shape[0], rows):
        yield w[r:r + rows].abs().float()


def _score_sum(w: torch.Tensor, col_norm: torch.Tensor) -> float:
    """sum_ij |W_ij| * n_j, without forming A."""
    return sum(float(torch.mv(a, col_norm).double().sum()) for a in _row_chunks(w))


def _count_above(w: torch.Tensor, col_norm: torch.Tensor, thr: float) -> int:
    """#{(i, j): |W_ij| * n_j > thr}."""
    return sum(int((a.mul_(col_norm) > thr).sum()) for a in _row_chunks(w))


def galore_param_groups(model: nn.Module, blocks: Sequence[nn.Module] | None = None,
                        **galore_options) -> list[dict]:
    """Param groups for the OwLore recipe, in the ``galore_torch`` convention.

    Returns ``[{"params": rest}, {"params": projected, **galore_options}]`` where ``projected``
    are the 2-D weights of every ``nn.Linear`` inside the blocks (attention and MLP projections;
    this also covers BERT's ``intermediate.dense``/``output.dense``, which name filters on
    ``attn``/``mlp`` miss) and ``rest`` is every other parameter of ``model`` (embeddings, norms,
    LM head, biases), trained full-rank. ``galore_options`` are the group keys, e.g.
    ``rank=128, update_proj_gap=100, scale=1.0, proj_type="std"``. Parameters with
    ``requires_grad=False`` when called (e.g. frozen by the user) are left out. Pass the result to
    ``ftops.GaLoreAdamW`` (or ``galore_torch.GaLoreAdamW``).
    """
    blocks = _as_blocks(find_blocks(model) if blocks is None else blocks)
    projected, ids = [], set()
    for block in blocks:
        for m in block.modules():
            if isinstance(m, nn.Linear) and m.weight.requires_grad and id(m.weight) not in ids:
                projected.append(m.weight)
                ids.add(id(m.weight))
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    if len(ids) != sum(1 for p in model.parameters() if id(p) in ids):
        raise ValueError("the blocks' Linear weights are not all parameters of model")
    return [{"params": rest}, {"params": projected, **galore_options}]


class OwLore:
    """Outlier-weighted (OwLore) / uniform (LISA) layerwise block sampler.

    Call :meth:`step` once per training step, before the forward (as one steps an LR scheduler).
    On the first call and then every ``period`` calls it draws ``gamma`` distinct blocks, block
    ``l`` with probability ``ratios[l] / sum(ratios)`` (sequential draws without replacement, as
    ``numpy.random.choice(..., replace=False, p=...)``; uniform when ``ratios`` is None, i.e. LISA),
    sets ``requires_grad=True`` on the sampled blocks' parameters and ``requires_grad=False`` on
    the other blocks' parameters. Parameters outside the blocks are never touched (they keep
    training). Before the first call nothing is changed and :attr:`active` is empty.

    Args:
        blocks: the transformer blocks, a sequence of modules (e.g. ``model.model.layers``, or
            :func:`find_blocks`). No parameter may belong to two blocks.
        ratios: one non-negative weight per block (e.g. :func:`outlier_ratios`), or None for
            uniform sampling. Blocks with weight 0 are never sampled; at least ``gamma`` weights
            must be positive.
        gamma: number of blocks active at a time, in ``[1, len(blocks)]``.
        period: steps between two draws (>= 1).
        seed: seed of the sampler's own ``torch.Generator`` (the global RNG is not used). Under
            ``torch.distributed`` rank 0's generator state is broadcast at the first draw (and
            after :meth:`load_state_dict`), so every rank draws the same blocks.
        optimizer: optional; anything with a ``state`` mapping keyed by parameter (every
            ``torch.optim.Optimizer``, ``ftops.GaLoreAdamW``, ``ftops.layerwise(...)``), a list of
            such, or a dict whose values are such (e.g. per-parameter optimizers). When given, the
            optimizer state of the deactivated blocks' parameters is deleted at each draw
            (``del optimizer.state[p]``) unless ``keep_state=True``.
        keep_state: keep the optimizer state of inactive blocks (LISA's behaviour: the memory then
            grows with the number of distinct blocks ever sampled, up to full-model Adam state).

    At each draw the gradients of the deactivated blocks' parameters are set to None (with or
    without ``optimizer=``), so that no optimizer updates a frozen block from a stale gradient. As in LISA, every parameter of a sampled block becomes trainable, including
    one the user had frozen inside a block.
    """

    def __init__(self, blocks: Sequence[nn.Module], ratios: Sequence[float] | torch.Tensor | None = None,
                 gamma: int = 5, period: int = 50, seed: int = 0, optimizer=None, keep_state: bool = False):
        self.blocks = _as_blocks(blocks)
        n = len(self.blocks)
        if isinstance(gamma, bool) or not isinstance(gamma, int) or not 1 <= gamma <= n:
            raise ValueError(f"gamma must be an int in [1, {n}] (the number of blocks), got {gamma!r}")
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"period must be an int >= 1, got {period!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.gamma, self.period, self.seed = gamma, period, seed
        self.keep_state = bool(keep_state)
        self.probs = self._check_ratios(ratios, n, gamma)

        self._params: list[list[torch.nn.Parameter]] = []
        owner: dict[int, int] = {}
        for b, block in enumerate(self.blocks):
            ps = []
            for p in block.parameters():
                if id(p) in owner and owner[id(p)] != b:
                    raise ValueError(f"blocks[{owner[id(p)]}] and blocks[{b}] share a parameter; "
                                     "the sampler cannot freeze one without the other")
                if id(p) not in owner:
                    owner[id(p)] = b
                    ps.append(p)
            self._params.append(ps)

        if optimizer is None:
            self._optimizers = []
        elif hasattr(optimizer, "state"):
            self._optimizers = [optimizer]
        elif isinstance(optimizer, Mapping):  # e.g. {param: its own optimizer}
            self._optimizers = list(optimizer.values())
        else:
            try:
                self._optimizers = list(optimizer)
            except TypeError:
                raise TypeError("optimizer must have a `state` mapping (a torch.optim.Optimizer) or be "
                                f"a list of such, got {type(optimizer).__name__}") from None
        for o in self._optimizers:
            if not isinstance(getattr(o, "state", None), Mapping):
                raise TypeError(f"optimizer {type(o).__name__} has no `state` mapping keyed by parameter")

        self._gen = torch.Generator(device="cpu")
        self._gen.manual_seed(seed)
        self._synced = False  # rank 0's generator state not yet received (torch.distributed)
        self.steps = 0
        self.active: list[int] = []
        self.history: list[list[int]] = []  # not saved; the draws made by this object

    @staticmethod
    def _check_ratios(ratios, n, gamma) -> torch.Tensor:
        if ratios is None:
            return torch.full((n,), 1.0 / n, dtype=torch.float64)
        try:
            r = torch.as_tensor(ratios, dtype=torch.float64).detach().cpu().flatten()
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"ratios must be a sequence of numbers or a tensor, got {type(ratios).__name__}") from None
        if r.numel() != n:
            raise ValueError(f"ratios has {r.numel()} entries but there are {n} blocks")
        if not torch.isfinite(r).all() or (r < 0).any():
            raise ValueError(f"ratios must be finite and >= 0, got {r.tolist()}")
        positive = int((r > 0).sum())
        if positive < gamma:
            raise ValueError(f"only {positive} block(s) have a positive ratio, fewer than gamma={gamma}: "
                             "blocks with ratio 0 are never sampled")
        return r / r.sum()

    def _sync_generator(self) -> None:
        """Under torch.distributed, take rank 0's generator state (once, and after a load), so
        every rank draws the same blocks even if the seeds differ."""
        if self._synced or not (dist.is_available() and dist.is_initialized()):
            return
        device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")
        buf = self._gen.get_state().to(device)
        dist.broadcast(buf, src=0)
        self._gen.set_state(buf.cpu())
        self._synced = True

    def _sample(self) -> list[int]:
        self._sync_generator()
        picks = torch.multinomial(self.probs, self.gamma, replacement=False, generator=self._gen)
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
        ``DistributedDataParallel``, wrap the model again, see the README's Distributed section).
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
        return list(self._params[index])

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and ints (``torch.load(weights_only=True)`` works)."""
        return {
            "steps": self.steps,
            "active": torch.tensor(self.active, dtype=torch.int64),
            "rng_state": self._gen.get_state(),
            "gamma": self.gamma,
            "period": self.period,
            "num_blocks": len(self.blocks),
            "probs": self.probs.clone(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume: the same future draws and the same active set as the saved run.

        The configuration (number of blocks, gamma, period, sampling probabilities) must match this
        sampler's, else ``ValueError``. The saved active set is applied at once (requires_grad
        set, and inactive blocks' gradients and, unless ``keep_state``, optimizer state dropped),
        so load the optimizer's state before or after, either works.
        """
        missing = {"steps", "active", "rng_state", "gamma", "period", "num_blocks", "probs"} - set(state_dict)
        if missing:
            raise KeyError(f"OwLore state_dict is missing {sorted(missing)}")
        for key, mine in (("num_blocks", len(self.blocks)), ("gamma", self.gamma), ("period", self.period)):
            if int(state_dict[key]) != mine:
                raise ValueError(f"state_dict was saved with {key}={int(state_dict[key])}, "
                                 f"this sampler has {key}={mine}")
        probs = torch.as_tensor(state_dict["probs"], dtype=torch.float64)
        if probs.shape != self.probs.shape or not torch.allclose(probs, self.probs, rtol=1e-9, atol=0):
            raise ValueError("state_dict was saved with different ratios (sampling probabilities)")
        active = [int(i) for i in torch.as_tensor(state_dict["active"]).tolist()]
        steps = int(state_dict["steps"])
        if steps < 0 or (steps > 0 and len(active) != self.gamma) or (steps == 0 and active) \
                or any(not 0 <= i < len(self.blocks) for i in active):
            raise ValueError(f"inconsistent state_dict: steps={steps}, active={active}")
        self._gen.set_state(state_dict["rng_state"])
        self._synced = False
        self.steps = steps
        if active:
            self._apply(sorted(active))
        else:
            self.active = []

    def __repr__(self) -> str:
        uniform = torch.allclose(self.probs, self.probs[0].expand_as(self.probs))
        kind = "uniform (LISA)" if uniform else "outlier-weighted"
        return (f"OwLore(blocks={len(self.blocks)}, gamma={self.gamma}, period={self.period}, "
                f"sampling={kind}, keep_state={self.keep_state}, steps={self.steps}, active={self.active})")
