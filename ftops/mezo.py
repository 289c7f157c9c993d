"""MeZO: zeroth-order SGD (Malladi et al. 2023) that fine-tunes with inference memory.

Each step estimates the gradient along a random direction ``z`` from two forward passes,
``g = (L(θ + εz) - L(θ - εz)) / (2ε)``, and moves ``θ -= lr * (g z + wd θ)``. The noise ``z`` is
never stored: it is regenerated from a seed by the counter-based kernels (csrc/common/philox.h),
and the perturbation, the restore and the update run in place over all parameters at once. The
restore is fused with the update (or with the next sample's perturbation), so a step makes 3
passes over the parameters where the reference makes 4.

Exact restore: a perturbation rounds ``θ + εz`` once (ties toward +inf), and the next pass does
not subtract ``εz`` from the rounded value: it recovers θ by inverting that rounding
(``zo_undo_axpby_``, csrc/common/zo_undo.h), bit for bit wherever the rounding was injective, and
applies its own change to θ. So ``θ - εz`` is the correctly rounded value too, and at lr=0 the
parameters come back bit-exactly except where a perturbation pushed a value into a coarser
binade or swamped it (``|εz| >> |θ|``). There the information is gone, and the undo returns the
simplest of the values the rounding merged (0 if it is one, else the most trailing zero bits): a
coarse grid point that later cycles keep, so the value settles instead of random-walking.

``exact_restore=False`` drops the undo: each pass adds its noise to the parameters as they are
(``p += (eps - lr g) z - lr wd p`` for the last pass, one ``zo_axpby_`` with float32 arithmetic
and one rounding to nearest even), as the reference does but in 3 passes instead of 4. The
parameters then come back to within rounding after a step (a few ulps of drift per cycle in
bfloat16/float16, as the reference's), and each pass costs a plain noise pass: on an H100 the bf16
undo pass took 0.53 ms per 2^26 elements against 0.26 ms for a plain one.
"""
from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections.abc import Mapping
from typing import Callable, Iterable, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

from . import _checks, _ops

__all__ = ["MeZO", "MeZOStep", "ParamLayout", "noise_like", "param_groups", "replay",
           "REFERENCE_NO_DECAY"]

logger = logging.getLogger(__name__)

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_SEED_RANGE = 2**63 - 1
# Group hyperparameters, checked at construction, by add_param_group, at every step (a scheduler
# or the user may have changed them) and in a loaded state dict.
_HYPER = dict(lr=dict(low=0.0), eps=dict(low=0.0, low_open=True), weight_decay=dict(low=0.0))

#: The reference's weight-decay rule (princeton-nlp/MeZO, large_models/trainer.py, ``zo_update``):
#: no weight decay for a parameter whose name contains one of these (case-sensitive) substrings.
REFERENCE_NO_DECAY = ("bias", "layer_norm", "layernorm")


def param_groups(model: torch.nn.Module, weight_decay: float,
                 no_decay: Sequence[str] = REFERENCE_NO_DECAY) -> list[dict]:
    """MeZO parameter groups for ``model`` with the reference's weight-decay rule.

    The parameters with ``requires_grad`` whose names (``model.named_parameters()``) contain any of
    the ``no_decay`` substrings go in a group with ``weight_decay=0``, all others in a group with
    ``weight_decay``; an empty group is left out. With the default ``no_decay`` this is exactly
    the reference's rule (``"bias" not in name and "layer_norm" not in name and "layernorm" not in
    name``; case-sensitive, so e.g. BERT's ``LayerNorm.weight`` does get weight decay there too).
    Pass the result to :class:`MeZO` (and the same to :func:`replay`)::

        opt = ftops.MeZO(ftops.mezo.param_groups(model, weight_decay=0.1), lr=1e-6)
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"mezo.param_groups: model must be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    wd = _checks.real("mezo.param_groups", "weight_decay", weight_decay, low=0.0)
    if isinstance(no_decay, str) or not all(isinstance(n, str) for n in no_decay):
        raise TypeError(f"mezo.param_groups: no_decay must be a sequence of strings, got "
                        f"{no_decay!r}")
    decay, keep = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (keep if any(n in name for n in no_decay) else decay).append(p)
    groups = [{"params": decay, "weight_decay": wd}, {"params": keep, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("mezo.param_groups: the model has no parameter with requires_grad")
    return groups


def noise_like(tensor: torch.Tensor, seed: int, index: int, offset: int = 0) -> torch.Tensor:
    """The noise MeZO adds to parameter number ``index`` in a step with seed ``seed``.

    ``index`` is the parameter's position in the optimizer's parameter list (over all groups).
    The noise is standard normal, computed in float32 (the precision the kernels use for every
    parameter dtype) and returned as float32 with ``tensor``'s shape, on its device. It is a pure
    function of ``(seed, index, element index)``: the same for any thread count and on CPU and CUDA.
    ``offset``: ``tensor`` holds elements ``[offset, offset + tensor.numel())`` of the parameter
    (flattened), e.g. one rank's shard; the result is the noise of those elements.
    """
    where = "mezo.noise_like"
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{where}: tensor must be a torch.Tensor, got {type(tensor).__name__}")
    seed = _checks.integer(where, "seed", seed, low=-2**63, high=2**63 - 1)
    index = _checks.integer(where, "index", index, low=0, high=2**32 - 1)
    offset = _checks.integer(where, "offset", offset, low=0, high=2**62 - 1)
    return _ops.zo_noise(tensor, seed, index, offset)


class ParamLayout(NamedTuple):
    """The parameters a MeZO step was applied to, so that :func:`replay` can refuse others.

    ``group_sizes``: parameters per group (frozen ones included); ``shapes`` and ``dtypes`` (e.g.
    ``"float32"``) of every parameter, over all groups in order; ``trained``: the indices (in that
    order, the noise ids) of the parameters the step changed (those with ``requires_grad``).
    Consecutive steps over the same parameters share one ``ParamLayout`` object.
    """

    group_sizes: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    trained: tuple[int, ...]


class MeZOStep(NamedTuple):
    """One applied MeZO update, enough to replay it (see :func:`replay`).

    ``seeds`` and ``projected_grads`` have one entry per sample; ``lrs``, ``weight_decays`` and
    ``eps`` one per parameter group. ``projected_grads[s] = (L+ - L-) / (2 * eps[0])``: with one
    eps for all groups (the usual case) this is the paper's projected gradient. ``layout`` records
    the parameters the step was applied to (``None`` in logs saved before it was recorded).
    """

    seeds: tuple[int, ...]
    projected_grads: tuple[float, ...]
    lrs: tuple[float, ...]
    weight_decays: tuple[float, ...]
    eps: tuple[float, ...]
    layout: Optional[ParamLayout] = None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _layout_of(groups, trained_ids) -> ParamLayout:
    params = [p for g in groups for p in g["params"]]
    return ParamLayout(tuple(len(g["params"]) for g in groups),
                       tuple(tuple(int(d) for d in p.shape) for p in params),
                       tuple(_dtype_name(p.dtype) for p in params), tuple(trained_ids))


def _apply_in_chunks(tensors, seeds, ids, coeffs_by_seed, decay, offsets):
    """zo_axpby_ over any number of seeds: the kernel takes at most 8 per call, decay goes once."""
    n = _ops.MAX_SEEDS_PER_CALL
    for start in range(0, len(seeds), n):
        chunk = range(start, min(start + n, len(seeds)))
        coeffs = [c for s in chunk for c in coeffs_by_seed[s]]
        _ops.zo_axpby_(tensors, [seeds[s] for s in chunk], ids, coeffs,
                       decay if start == 0 else [0.0] * len(tensors), offsets)


def _undo_apply_in_chunks(tensors, undo_seed, undo, seeds, ids, coeffs_by_seed, decay, invertible,
                          offsets):
    """zo_undo_axpby_ with the first (up to) 8 seeds, zo_axpby_ for any further chunks."""
    n = _ops.MAX_SEEDS_PER_CALL
    first = range(0, min(n, len(seeds)))
    _ops.zo_undo_axpby_(tensors, undo_seed, undo, [seeds[s] for s in first], ids,
                        [c for s in first for c in coeffs_by_seed[s]], decay, invertible, offsets)
    if len(seeds) > n:
        _apply_in_chunks(tensors, seeds[n:], ids, coeffs_by_seed[n:], [0.0] * len(tensors),
                         offsets)


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return None
    return DTensor


def _local_shard(p, where: str):
    """(the tensor the kernels update, its element offset in the flattened parameter).

    A plain tensor is itself at offset 0. A DTensor (FSDP2's sharded parameters, dim-0 shards;
    uneven shards and empty ones included) is its local shard at the global offset of its
    first element, which must hold a contiguous range of the parameter's elements (true for any
    Shard(0)/Replicate placement; a tensor-parallel Shard(1) is not, and is refused).
    """
    DTensor = _dtensor_type()
    if DTensor is None or not isinstance(p, DTensor):
        return p, 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = p.to_local()  # under no_grad: the local tensor itself, updated in place
    shape, start = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if tuple(local.shape) != tuple(shape):
        raise ValueError(f"MeZO: {where} is a DTensor whose local tensor has shape "
                         f"{tuple(local.shape)}, not the {tuple(shape)} its placements "
                         f"{p.placements} give")
    if local.numel() == 0:
        return local, 0
    # a contiguous range: the whole tensor, or leading dims of size 1, one partial dim d, then
    # whole dims
    d = next((i for i, (a, b) in enumerate(zip(shape, p.shape)) if a != b), None)
    if d is not None and (any(shape[i] != 1 for i in range(d))
                          or any(shape[i] != p.shape[i] for i in range(d + 1, len(shape)))):
        raise ValueError(f"MeZO: {where} is a DTensor with placements {p.placements} whose local "
                         "shard is not a contiguous range of the parameter's elements; MeZO "
                         "supports dim-0 sharding (FSDP2) and replication")
    offset, stride = 0, 1
    for i in reversed(range(len(shape))):
        offset += start[i] * stride
        stride *= p.shape[i]
    return local, offset


class _ParamSet:
    """The trainable tensors of an optimizer, flattened, with their noise ids and group.

    DTensor parameters (FSDP2) are replaced by their local shards, with the element offset of each
    shard: a shard gets exactly the noise and rounding of the same elements of the whole tensor,
    so a sharded run takes bit-identical steps to an unsharded one.
    """

    def __init__(self, param_groups, selected=lambda index, p: p.requires_grad):
        self.params, self.tensors, self.offsets, self.ids, self.group_of = [], [], [], [], []
        index = 0
        for g, group in enumerate(param_groups):
            for p in group["params"]:
                if selected(index, p):
                    local, offset = _local_shard(p, f"parameter {index} (shape {tuple(p.shape)})")
                    self.params.append(p)
                    self.tensors.append(local)
                    self.offsets.append(offset)
                    self.ids.append(index)
                    self.group_of.append(g)
                index += 1
        self.by_device: dict[torch.device, list[int]] = {}
        for k, p in enumerate(self.tensors):
            self.by_device.setdefault(p.device, []).append(k)
        self.sharded = any(p is not t for p, t in zip(self.params, self.tensors))

    def validate(self):
        """Check every tensor before any is touched, so a bad one cannot leave others perturbed."""
        for k, p in enumerate(self.tensors):
            where = f"parameter {self.ids[k]} (shape {tuple(self.params[k].shape)})"
            if p.layout != torch.strided:
                raise ValueError(f"MeZO: {where} has layout {p.layout}; only dense tensors are supported")
            if p.dtype not in _SUPPORTED_DTYPES:
                raise ValueError(f"MeZO: {where} has dtype {p.dtype}; supported: float32, float64, float16, bfloat16")
            if not p.is_contiguous():
                raise ValueError(f"MeZO: {where} is not contiguous (strides {p.stride()})")

    def _per_device(self):
        for idx in self.by_device.values():
            yield (idx, [self.tensors[k] for k in idx], [self.ids[k] for k in idx],
                   [self.offsets[k] for k in idx])

    def axpby(self, seeds, coeff, decay=None):
        """p += sum_s coeff(s, group) * z_s - decay(group) * p, for every tensor, one pass."""
        for idx, tensors, ids, offsets in self._per_device():
            coeffs = [[coeff(s, self.group_of[k]) for k in idx] for s in range(len(seeds))]
            dec = [decay(self.group_of[k]) if decay else 0.0 for k in idx]
            _apply_in_chunks(tensors, list(seeds), ids, coeffs, dec, offsets)

    def shift(self, undo_seed, undo_coeff, seeds, coeff=None, decay=None):
        """undo_axpby's pass without the exact undo, in one rounding to nearest even: with
        p = θ + u z_undo (u = undo_coeff(group), d = decay(group)),
        p += sum_s coeff(s, group) z_s - u z_undo - d θ, i.e. -u (1 - d) z_undo - d p: the decay
        applies to θ, as undo_axpby's. A seed that appears twice (the undo seed is one of `seeds`
        in a MeZO step) is generated once, with its coefficients summed (in float64, before the
        kernel's float32)."""
        order = list(dict.fromkeys([*seeds, undo_seed]))

        def total(i, g):
            c = sum(coeff(j, g) for j, s in enumerate(seeds) if s == order[i]) if coeff else 0.0
            if order[i] != undo_seed:
                return c
            return c - undo_coeff(g) * (1.0 - (decay(g) if decay else 0.0))

        self.axpby(order, total, decay)

    def undo_axpby(self, undo_seed, undo_coeff, seeds, coeff=None, decay=None, invertible=False):
        """One pass: undo the perturbation undo_coeff(group) * z_undo exactly, then
        p = θ + sum_s coeff(s, group) * z_s - decay(group) * θ (ties up when `invertible`)."""
        for idx, tensors, ids, offsets in self._per_device():
            undo = [undo_coeff(self.group_of[k]) for k in idx]
            coeffs = [[coeff(s, self.group_of[k]) for k in idx] for s in range(len(seeds))]
            dec = [decay(self.group_of[k]) if decay else 0.0 for k in idx]
            _undo_apply_in_chunks(tensors, undo_seed, undo, list(seeds), ids, coeffs, dec,
                                  invertible, offsets)


def _fsdp_modules_holding(params) -> list:
    """The FSDP2 modules (``fully_shard``) whose sharded parameters are among ``params``.

    FSDP2 keeps the root module's parameters unsharded after a forward that no backward follows
    (its default ``reshard_after_forward`` for the root), and the next forward then reuses them:
    it would not see MeZO's in-place changes to the shards. MeZO reshards these modules after
    each forward (``FSDPModule.reshard()``, a local operation that only frees the gathered copy).
    Finding them uses FSDP2's module-to-state registry, which has no public accessor.
    """
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    wanted = {id(p) for p in params}
    found = []
    for module in list(_module_state_mapping.keys()):
        if not isinstance(module, FSDPModule):
            continue
        try:
            state = module._get_fsdp_state()
            groups = getattr(state, "_fsdp_param_groups", None)
            if groups is None:  # torch < 2.12: one group per state
                group = getattr(state, "_fsdp_param_group", None)
                groups = [group] if group is not None else []
            if any(id(fp.sharded_param) in wanted for g in groups for fp in g.fsdp_params):
                found.append(module)
        except AttributeError:  # a torch whose FSDP2 internals differ: say so, do not guess
            logger.warning("MeZO: could not inspect FSDP2 module %s; if it is the root, pass "
                           "reshard_after_forward=True to fully_shard", type(module).__name__)
    return found


class MeZO(torch.optim.Optimizer):
    r"""Zeroth-order SGD (MeZO, Malladi et al. 2023) with in-place, seed-regenerated noise.

    Args:
        params: parameters or parameter groups, as for any torch optimizer. Groups may set their
            own ``lr``, ``eps`` and ``weight_decay`` (put biases and norms in a group with
            ``weight_decay=0``, as with AdamW; :func:`param_groups` builds the reference's
            grouping from a model's parameter names). Parameters with ``requires_grad=False``
            are left alone.
        lr: learning rate (paper: 1e-6..1e-7 for full fine-tuning, 1e-4 for LoRA).
        eps: perturbation scale ε (paper: 1e-3).
        weight_decay: decoupled weight decay, ``θ -= lr * wd * θ`` each step.
        n_samples: two-point estimates averaged per step, each with a fresh seed (n-SPSA).
        seed: seed of the optimizer's own generator, which draws the per-step seeds. ``None``
            draws one at random. Its state is in ``state_dict``, so a resumed run continues
            bit-identically.
        keep_log: keep :attr:`log` (one small :class:`MeZOStep` per applied step, with the
            :class:`ParamLayout` that :func:`replay` checks; steps over the same parameters
            share one layout).
        exact_restore: recover the unperturbed parameters exactly in every pass by inverting the
            perturbation's rounding (default; see the module docstring), or, with ``False``,
            subtract the perturbation as the reference does, which restores them to within
            rounding only. ``False`` is faster (H100, 1.3B parameters: a step's passes took
            16.8 ms instead of 26.3 in bfloat16, 15.7 instead of 25.2 in float32; 2 CPU cores,
            112M float32: 281 ms instead of 402) and drifts as the reference does in
            bfloat16/float16 (mean error after 1000 lr=0 steps on N(0, 0.02) bfloat16 weights:
            1.5e-3, as the reference's, against 9.5e-6 with the exact restore). Its value is in
            ``state_dict``.

    ``step(closure)`` needs a closure that runs the forward pass and returns the loss: a scalar
    tensor or a number, of any objective (differentiable or not: accuracy, a reward...). It is
    called ``2 * n_samples`` times per step under ``torch.no_grad()``; call ``model.eval()``
    yourself if dropout should be off, as the reference does. The step returns the first loss at
    ``θ + εz``, as the reference does.

    Safety: everything is checked before the first parameter is written: every group's ``lr``,
    ``eps`` and ``weight_decay`` (at every step, so a value set by hand or by a scheduler is
    checked too) and every parameter; a parameter listed twice is refused (its noise would be
    added twice). If the closure raises or returns something other than a real scalar (a
    string, a bool, a complex number, several elements), the parameters are restored and the
    generator is put back before the exception propagates; if a loss is NaN or infinite, the
    parameters are restored, the update is skipped, counted in :attr:`skipped_steps` and warned
    about. ``load_state_dict`` checks the whole state dict before changing anything.

    Data parallel: when ``torch.distributed`` is initialized, the generator state of rank 0 is
    broadcast once (at the first step and after ``load_state_dict``), so all ranks draw the same
    seeds; each rank evaluates its own batch and only the ``n_samples`` loss differences are
    all-reduced (averaged) per step, so all ranks apply the same update and stay identical.

    Sharded (FSDP2, ``fully_shard``): DTensor parameters are perturbed and updated shard by
    shard, each local shard with its global element offset, so every element gets the noise and
    the rounding it would get unsharded: with the same loss values a sharded run is bit-identical
    to a single-process one. Beyond FSDP's own all-gathers, a step still communicates only the
    ``n_samples`` loss differences. The forwards are FSDP's (each rank evaluates the whole model
    on its own batch); MeZO reshards the FSDP2 modules holding its parameters after every
    forward, so the next forward gathers the freshly perturbed shards.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        n_samples: int = 1,
        seed: int | None = None,
        keep_log: bool = True,
        exact_restore: bool = True,
    ):
        where = "MeZO"
        lr = _checks.real(where, "lr", lr, **_HYPER["lr"])
        eps = _checks.real(where, "eps", eps, **_HYPER["eps"])
        weight_decay = _checks.real(where, "weight_decay", weight_decay, **_HYPER["weight_decay"])
        n_samples = _checks.integer(where, "n_samples", n_samples, low=1)
        _checks.boolean(where, "exact_restore", exact_restore)
        _checks.boolean(where, "keep_log", keep_log)
        if seed is not None:  # torch.Generator.manual_seed's range
            seed = _checks.integer(where, "seed", seed, low=-2**63, high=2**64 - 1)
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay))
        self.n_samples = n_samples
        self.keep_log = keep_log
        self.exact_restore = exact_restore
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)
        self.log: list[MeZOStep] = []
        self.skipped_steps = 0
        self._seeds_synced = False
        self._layout: Optional[ParamLayout] = None

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_layout", None)  # an optimizer pickled before layouts

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer.add_param_group``, refusing a parameter that is already in
        the optimizer (or twice in the group: its noise would be added twice) and invalid
        hyperparameters."""
        _checks.add_param_group("MeZO", self, param_group, super().add_param_group, **_HYPER)

    # --- seeds ---------------------------------------------------------------------------------

    def _sync_generator(self) -> None:
        """Under torch.distributed, give every rank rank 0's generator state (once)."""
        if self._seeds_synced or not (dist.is_available() and dist.is_initialized()):
            return
        state = self._generator.get_state()
        device = self._comm_device()
        buf = state.to(device)
        dist.broadcast(buf, src=0)
        self._generator.set_state(buf.cpu())
        self._seeds_synced = True

    def _comm_device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _draw_seeds(self) -> list[int]:
        return torch.randint(0, _SEED_RANGE, (self.n_samples,), generator=self._generator).tolist()

    # --- the step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor | float]):  # type: ignore[override]
        where = "MeZO.step"
        if closure is None or not callable(closure):
            raise TypeError(f"{where} needs a closure that runs the forward pass and returns the "
                            f"loss, got {type(closure).__name__}")
        # everything is checked before the first parameter is written
        _checks.check_groups(where, self.param_groups, **_HYPER)
        _checks.integer(where, "n_samples", self.n_samples, low=1)
        _checks.boolean(where, "exact_restore", self.exact_restore)
        params = _ParamSet(self.param_groups)
        params.validate()
        layout = _layout_of(self.param_groups, params.ids) if self.keep_log else None
        if layout is not None and layout == self._layout:
            layout = self._layout  # consecutive steps share one object
        fsdp_modules = _fsdp_modules_holding(params.params) if params.sharded else []

        def evaluate():
            # FSDP2 must gather the shards as they are now: drop any gathered copy a previous
            # forward left behind (see _fsdp_modules_holding)
            for module in fsdp_modules:
                module.reshard()
            return closure()

        self._sync_generator()
        generator_state = self._generator.get_state()  # a failed step draws no seeds
        seeds = self._draw_seeds()
        groups = self.param_groups
        eps = [float(g["eps"]) for g in groups]
        n = len(seeds)

        diffs: list[float] = []
        first_loss = None
        # The parameters are F(θ) = round(θ + offset * eps_g * z_current) (ties up), with θ the
        # unperturbed values; every pass first recovers θ from that exactly (zo_undo_axpby_),
        # then applies its own change to θ. Every exit path brings offset back to 0.
        # (exact_restore=False: the parameters are θ + offset * eps_g * z_current within
        # rounding, and each pass adds its change to them as they are.)
        current, offset = None, 0.0

        def move(undo_seed, undo_coeff, new_seeds, coeff=None, decay=None, invertible=False):
            if self.exact_restore:
                params.undo_axpby(undo_seed, undo_coeff, new_seeds, coeff, decay, invertible)
            else:
                params.shift(undo_seed, undo_coeff, new_seeds, coeff, decay)

        def restore():
            if current is not None and offset != 0.0:
                off = offset
                move(current, lambda g: off * eps[g], [])
            for module in fsdp_modules:
                module.reshard()

        try:
            for s in range(n):
                if current is None:
                    move(seeds[s], lambda g: 0.0, [seeds[s]], lambda _, g: eps[g], invertible=True)
                else:  # undo the previous sample's -eps and perturb with the next in one pass
                    move(current, lambda g: -eps[g], [seeds[s]], lambda _, g: eps[g],
                         invertible=True)
                current, offset = seeds[s], 1.0
                loss = evaluate()
                if first_loss is None:
                    first_loss = loss
                loss_plus = _checks.scalar_loss(where, loss)
                # θ - eps z from θ itself (not p+ - 2 eps z): correctly rounded and undoable
                # (exact_restore=False: p+ - 2 eps z)
                move(current, lambda g: eps[g], [current], lambda _, g: -eps[g], invertible=True)
                offset = -1.0
                loss_minus = _checks.scalar_loss(where, evaluate())
                diffs.append(loss_plus - loss_minus)

            if dist.is_available() and dist.is_initialized():
                buf = torch.tensor(diffs, dtype=torch.float64, device=self._comm_device())
                dist.all_reduce(buf)  # one message of n_samples scalars per step
                diffs = (buf / dist.get_world_size()).tolist()
        except BaseException:
            restore()
            self._generator.set_state(generator_state)
            raise

        if not all(math.isfinite(d) for d in diffs):
            restore()
            self.skipped_steps += 1
            warnings.warn(
                f"MeZO: non-finite loss (L+ - L- = {diffs}); parameters restored and the update "
                f"skipped ({self.skipped_steps} skipped so far)",
                RuntimeWarning,
                stacklevel=2,
            )
            return first_loss

        # Undo the last perturbation and apply the update in one pass:
        # θ_g += -lr_g/n * sum_s diff_s/(2 eps_g) z_s - lr_g wd_g θ_g (rounded to nearest even)
        lrs = [float(g["lr"]) for g in groups]
        wds = [float(g["weight_decay"]) for g in groups]

        def coeff(s, g):
            return -lrs[g] / n * diffs[s] / (2.0 * eps[g])

        move(current, lambda g: -eps[g], seeds, coeff, lambda g: lrs[g] * wds[g])
        for module in fsdp_modules:  # a later forward (evaluation) gathers the updated shards
            module.reshard()
        if self.keep_log:
            self._layout = layout
            self.log.append(MeZOStep(tuple(seeds), tuple(d / (2.0 * eps[0]) for d in diffs),
                                     tuple(lrs), tuple(wds), tuple(eps), layout))
        return first_loss

    # --- checkpoints ---------------------------------------------------------------------------

    def state_dict(self):
        """The torch.optim state dict plus ``"mezo"``: the generator state, the skip count and
        the log, all as tensors (``torch.load(weights_only=True)`` works)."""
        sd = super().state_dict()
        sd["mezo"] = {
            "generator": self._generator.get_state(),
            "skipped_steps": self.skipped_steps,
            "n_samples": self.n_samples,
            "exact_restore": self.exact_restore,
            "log": _log_to_tensors(self.log),
        }
        return sd

    def load_state_dict(self, state_dict):
        """Load a state dict made by :meth:`state_dict`. Everything is checked first (the group
        count and sizes, the group hyperparameters, no per-parameter state, the generator state,
        the counters and the log), and on any mismatch nothing is changed."""
        where = "MeZO.load_state_dict"
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{where}: state_dict must be a dict, got {type(state_dict).__name__}")
        if "mezo" not in state_dict:
            raise ValueError(f"{where}: state_dict has no 'mezo' entry; it was not saved by "
                             "ftops.MeZO.state_dict()")
        base = {k: v for k, v in state_dict.items() if k != "mezo"}
        _checks.check_state_dict(where, base, self.param_groups,
                                 group_keys=("lr", "eps", "weight_decay"), **_HYPER)
        if base["state"]:
            raise ValueError(f"{where}: state_dict['state'] has entries for "
                             f"{len(base['state'])} parameters, but MeZO keeps no per-parameter "
                             "state; it was saved by another optimizer")
        extra = state_dict["mezo"]
        if not isinstance(extra, Mapping):
            raise TypeError(f"{where}: state_dict['mezo'] must be a dict, got "
                            f"{type(extra).__name__}")
        missing = [k for k in ("generator", "skipped_steps", "n_samples", "log") if k not in extra]
        if missing:
            raise ValueError(f"{where}: state_dict['mezo'] lacks {missing}")
        generator = torch.Generator()
        gstate = extra["generator"]
        if not isinstance(gstate, torch.Tensor) or gstate.dtype != torch.uint8 \
                or tuple(gstate.shape) != tuple(self._generator.get_state().shape):
            raise ValueError(f"{where}: state_dict['mezo']['generator'] must be the uint8 tensor "
                             f"of torch.Generator.get_state() (shape "
                             f"{list(self._generator.get_state().shape)}), got "
                             f"{_describe(gstate)}")
        try:
            generator.set_state(gstate.cpu())
        except RuntimeError as e:
            raise ValueError(f"{where}: state_dict['mezo']['generator'] is not a valid "
                             f"generator state ({e})") from None
        skipped = _checks.integer(where, "state_dict['mezo']['skipped_steps']",
                                  _plain(extra["skipped_steps"]), low=0)
        n_samples = _checks.integer(where, "state_dict['mezo']['n_samples']",
                                    _plain(extra["n_samples"]), low=1)
        exact = _checks.boolean(where, "state_dict['mezo']['exact_restore']",
                                _plain(extra.get("exact_restore", True)))
        log = _log_from_tensors(extra["log"], where)

        super().load_state_dict(base)
        self._generator.set_state(generator.get_state())
        self.skipped_steps = skipped
        self.n_samples = n_samples
        self.exact_restore = exact
        self.log = log
        self._layout = log[-1].layout if log else None
        self._seeds_synced = False


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:200]


def _plain(value):
    """A one-element tensor as a Python number or bool (checkpoints may hold either)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return value.item()
    return value


_LOG_KEYS = ("seeds", "projected_grads", "lrs", "weight_decays", "eps")


def _log_to_tensors(log: Sequence[MeZOStep]) -> dict:
    if not log:
        return {}
    out = {
        "seeds": torch.tensor([e.seeds for e in log], dtype=torch.int64),
        "projected_grads": torch.tensor([e.projected_grads for e in log], dtype=torch.float64),
        "lrs": torch.tensor([e.lrs for e in log], dtype=torch.float64),
        "weight_decays": torch.tensor([e.weight_decays for e in log], dtype=torch.float64),
        "eps": torch.tensor([e.eps for e in log], dtype=torch.float64),
    }
    # Each distinct layout once (plain lists and strings: torch.load(weights_only=True) reads
    # them), and per step the index of its layout (-1: none recorded).
    layouts: list[ParamLayout] = []
    index: dict = {}
    of_step = []
    for e in log:
        if e.layout is None:
            of_step.append(-1)
            continue
        key = id(e.layout)
        if key not in index:
            found = next((i for i, l in enumerate(layouts) if l == e.layout), None)
            if found is None:
                layouts.append(e.layout)
                found = len(layouts) - 1
            index[key] = found
        of_step.append(index[key])
    if layouts:
        out["layouts"] = [{"group_sizes": list(l.group_sizes),
                           "shapes": [list(s) for s in l.shapes],
                           "dtypes": list(l.dtypes), "trained": list(l.trained)}
                          for l in layouts]
        out["layout_of_step"] = torch.tensor(of_step, dtype=torch.int64)
    return out


def _int_list(where: str, name: str, value) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ValueError(f"{where}: {name} must be a list of non-negative ints, got "
                         f"{_describe(value)}")
    return tuple(int(v) for v in value)


def _layout_from_dict(where: str, i: int, d) -> ParamLayout:
    name = f"log['layouts'][{i}]"
    if not isinstance(d, Mapping) or not all(
            k in d for k in ("group_sizes", "shapes", "dtypes", "trained")):
        raise ValueError(f"{where}: {name} must be a dict with 'group_sizes', 'shapes', 'dtypes' "
                         "and 'trained'")
    sizes = _int_list(where, f"{name}['group_sizes']", d["group_sizes"])
    shapes = d["shapes"]
    if not isinstance(shapes, (list, tuple)):
        raise ValueError(f"{where}: {name}['shapes'] must be a list of shapes")
    shapes = tuple(_int_list(where, f"{name}['shapes'][{k}]", s) for k, s in enumerate(shapes))
    dtypes = d["dtypes"]
    if not isinstance(dtypes, (list, tuple)) or not all(
            isinstance(t, str) and t in _DTYPE_NAMES for t in dtypes):
        raise ValueError(f"{where}: {name}['dtypes'] must be a list of dtype names such as "
                         "'float32'")
    trained = _int_list(where, f"{name}['trained']", d["trained"])
    n = sum(sizes)
    if len(shapes) != n or len(dtypes) != n or any(t >= n for t in trained) \
            or list(trained) != sorted(set(trained)):
        raise ValueError(f"{where}: {name} is inconsistent ({len(sizes)} groups of {n} "
                         f"parameters, {len(shapes)} shapes, {len(dtypes)} dtypes, trained "
                         f"indices {list(trained)[:8]}...)")
    return ParamLayout(sizes, shapes, tuple(dtypes), trained)


_DTYPE_NAMES = {_dtype_name(t) for t in _SUPPORTED_DTYPES}


def _log_from_tensors(t, where: str = "replay") -> list[MeZOStep]:
    """The log entries of a :meth:`MeZO.state_dict` ``"log"`` entry, checked: the five tensors
    with one row per step (seeds and projected gradients one column per sample, the group
    hyperparameters one column per group), and the recorded layouts."""
    if not isinstance(t, Mapping):
        raise TypeError(f"{where}: the log must be a list of MeZOStep or the dict of "
                        f"MeZO.state_dict()['mezo']['log'], got {type(t).__name__}")
    if not t:
        return []
    missing = [k for k in _LOG_KEYS if k not in t]
    if missing:
        raise ValueError(f"{where}: the log lacks {missing}")
    for k in _LOG_KEYS:
        v = t[k]
        if not isinstance(v, torch.Tensor) or v.dim() != 2 or v.is_complex() \
                or (k == "seeds") != (not v.is_floating_point()):
            raise ValueError(f"{where}: log[{k!r}] must be a 2-D "
                             f"{'int64' if k == 'seeds' else 'float64'} tensor (one row per step), "
                             f"got {_describe(v)}")
    steps = t["seeds"].shape[0]
    samples, groups = t["seeds"].shape[1], t["lrs"].shape[1]
    for k in _LOG_KEYS:
        cols = samples if k in ("seeds", "projected_grads") else groups
        if tuple(t[k].shape) != (steps, cols) or cols == 0:
            what = "samples" if k in ("seeds", "projected_grads") else "groups"
            raise ValueError(f"{where}: log[{k!r}] has shape {list(t[k].shape)}, expected "
                             f"[{steps}, {cols}] (steps x {what})")
    layouts: list = []
    of_step = [-1] * steps
    if "layouts" in t or "layout_of_step" in t:
        raw = t.get("layouts")
        if not isinstance(raw, (list, tuple)):
            raise ValueError(f"{where}: log['layouts'] must be a list")
        layouts = [_layout_from_dict(where, i, d) for i, d in enumerate(raw)]
        idx = t.get("layout_of_step")
        if not isinstance(idx, torch.Tensor) or tuple(idx.shape) != (steps,) \
                or idx.is_floating_point() or idx.is_complex():
            raise ValueError(f"{where}: log['layout_of_step'] must be an int64 tensor with one "
                             f"entry per step ({steps}), got {_describe(idx)}")
        of_step = idx.tolist()
        if any(not -1 <= i < len(layouts) for i in of_step):
            raise ValueError(f"{where}: log['layout_of_step'] refers to a layout that the log "
                             "does not hold")
        for step, i in enumerate(of_step):
            if i >= 0 and len(layouts[i].group_sizes) != groups:
                raise ValueError(f"{where}: log step {step} has {groups} groups but its layout "
                                 f"{len(layouts[i].group_sizes)}")
    rows = zip(t["seeds"].tolist(), t["projected_grads"].tolist(), t["lrs"].tolist(),
               t["weight_decays"].tolist(), t["eps"].tolist(), of_step)
    return [MeZOStep(tuple(a), tuple(b), tuple(c), tuple(d), tuple(e),
                     layouts[i] if i >= 0 else None) for a, b, c, d, e, i in rows]


@torch.no_grad()
def replay(params: Iterable, log: Sequence[MeZOStep] | dict) -> None:
    """Reapply a MeZO fine-tune from its log to the base weights, in place.

    ``params`` must be what the optimizer was built with (a list of tensors, or the same list
    of parameter groups, in the same order), holding the base weights; ``log`` is
    ``optimizer.log`` (or the ``"log"`` entry of its state dict). The result matches the trained
    model to within float rounding, bit for bit wherever training restored the parameters exactly
    (its last pass recovers θ and rounds the same update from it; see the module docstring; with
    ``exact_restore=False`` the trained model carries the perturbations' rounding, which replay
    does not).

    Each log entry records the parameters its step was applied to (:class:`ParamLayout`: group
    sizes, every parameter's shape and dtype, which ones were trained). Everything is checked
    before the first parameter is written, and a mismatch (another model, another grouping,
    another dtype, a trained parameter given as ``None``) raises naming the parameter. A step
    updates exactly the parameters it trained; a frozen one may be given as ``None`` or as
    itself (left alone). A log saved before layouts were recorded replays unchecked: every
    parameter that is not ``None`` is updated, so give ``None`` for the frozen ones.
    """
    where = "replay"
    if isinstance(log, Mapping):
        log = _log_from_tensors(log, where)
    elif isinstance(log, (str, bytes, torch.Tensor)) or not isinstance(log, Iterable):
        raise TypeError(f"{where}: log must be optimizer.log (a list of MeZOStep) or the dict of "
                        f"MeZO.state_dict()['mezo']['log'], got {type(log).__name__}")
    log = list(log)
    for i, entry in enumerate(log):
        if not isinstance(entry, MeZOStep):
            raise TypeError(f"{where}: log[{i}] is {type(entry).__name__}, not a MeZOStep")
    groups = _replay_groups(where, params)
    sets: dict = {}
    for i, entry in enumerate(log):
        _check_entry(where, i, entry, groups)
        key = id(entry.layout) if entry.layout is not None else None
        if key not in sets:
            if entry.layout is None:
                selected = lambda index, p: p is not None  # noqa: E731
            else:
                _check_layout(where, i, entry.layout, groups)
                trained = set(entry.layout.trained)
                selected = lambda index, p, trained=trained: index in trained  # noqa: E731
            pset = _ParamSet(groups, selected=selected)
            pset.validate()
            sets[key] = pset
    for entry in log:
        pset = sets[id(entry.layout) if entry.layout is not None else None]
        n = len(entry.seeds)
        scale = [entry.eps[0] / e for e in entry.eps]  # projected grads are relative to eps[0]
        pset.axpby(entry.seeds,
                   lambda s, g: -entry.lrs[g] / n * entry.projected_grads[s] * scale[g],
                   lambda g: entry.lrs[g] * entry.weight_decays[g])


def _replay_groups(where: str, params) -> list[dict]:
    if isinstance(params, torch.Tensor) or not isinstance(params, Iterable):
        raise TypeError(f"{where}: params must be a list of tensors or of param groups, got "
                        f"{type(params).__name__}")
    params = list(params)
    if params and all(isinstance(g, Mapping) for g in params):
        if not all("params" in g for g in params):
            raise ValueError(f"{where}: every param group needs a 'params' entry")
        groups = [{"params": [g["params"]] if isinstance(g["params"], torch.Tensor)
                   else list(g["params"])} for g in params]
    elif any(isinstance(g, Mapping) for g in params):
        raise TypeError(f"{where}: params mixes tensors and param groups")
    else:
        groups = [{"params": params}]
    index = 0
    for g in groups:
        for p in g["params"]:
            if p is not None and not isinstance(p, torch.Tensor):
                raise TypeError(f"{where}: parameter {index} is {type(p).__name__}, not a tensor "
                                "(or None)")
            index += 1
    return groups


def _check_entry(where: str, i: int, e: MeZOStep, groups: list) -> None:
    if not (len(e.lrs) == len(e.weight_decays) == len(e.eps) == len(groups)):
        raise ValueError(f"{where}: log entry {i} has {len(e.lrs)} parameter groups but params has "
                         f"{len(groups)}")
    if len(e.seeds) == 0 or len(e.seeds) != len(e.projected_grads):
        raise ValueError(f"{where}: log entry {i} has {len(e.seeds)} seeds and "
                         f"{len(e.projected_grads)} projected gradients (one each per sample)")
    label = f"log entry {i}"
    for s, seed in enumerate(e.seeds):
        _checks.integer(where, f"{label} seeds[{s}]", seed, low=-2**63, high=2**63 - 1)
    for s, g in enumerate(e.projected_grads):
        _checks.real(where, f"{label} projected_grads[{s}]", g)
    for g in range(len(groups)):
        _checks.real(where, f"{label} lrs[{g}]", e.lrs[g], **_HYPER["lr"])
        _checks.real(where, f"{label} weight_decays[{g}]", e.weight_decays[g],
                     **_HYPER["weight_decay"])
        _checks.real(where, f"{label} eps[{g}]", e.eps[g], **_HYPER["eps"])


def _check_layout(where: str, i: int, layout: ParamLayout, groups: list) -> None:
    sizes = tuple(len(g["params"]) for g in groups)
    if tuple(layout.group_sizes) != sizes:
        raise ValueError(f"{where}: log entry {i} was recorded on param groups of sizes "
                         f"{list(layout.group_sizes)} but params has groups of sizes {list(sizes)}")
    trained = set(layout.trained)
    for index, p in enumerate(p for g in groups for p in g["params"]):
        if p is None:
            if index in trained:
                raise ValueError(f"{where}: parameter {index} is None but log entry {i} trained "
                                 f"it (shape {list(layout.shapes[index])})")
            continue
        if tuple(p.shape) != tuple(layout.shapes[index]):
            raise ValueError(f"{where}: parameter {index} has shape {list(p.shape)} but log entry "
                             f"{i} was recorded with shape {list(layout.shapes[index])}")
        if _dtype_name(p.dtype) != layout.dtypes[index]:
            raise ValueError(f"{where}: parameter {index} has dtype {_dtype_name(p.dtype)} but "
                             f"log entry {i} was recorded in {layout.dtypes[index]} (its rounding "
                             "would differ); convert the base weights first")
