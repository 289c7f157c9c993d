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
import warnings
import weakref
from typing import Callable, Iterable, NamedTuple, Sequence

import torch
import torch.distributed as dist

from . import _ops

__all__ = ["MeZO", "MeZOStep", "noise_like", "replay"]

logger = logging.getLogger(__name__)

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_SEED_RANGE = 2**63 - 1


def noise_like(tensor: torch.Tensor, seed: int, index: int, offset: int = 0) -> torch.Tensor:
    """The noise MeZO adds to parameter number ``index`` in a step with seed ``seed``.

    ``index`` is the parameter's position in the optimizer's parameter list (over all groups).
    The noise is standard normal, computed in float32 (the precision the kernels use for every
    parameter dtype) and returned as float32 with ``tensor``'s shape, on its device. It is a pure
    function of ``(seed, index, element index)``: the same for any thread count and on CPU and CUDA.
    ``offset``: ``tensor`` holds elements ``[offset, offset + tensor.numel())`` of the parameter
    (flattened), e.g. one rank's shard; the result is the noise of those elements.
    """
    return _ops.zo_noise(tensor, seed, index, offset)


class MeZOStep(NamedTuple):
    """One applied MeZO update, enough to replay it (see :func:`replay`).

    ``seeds`` and ``projected_grads`` have one entry per sample; ``lrs``, ``weight_decays`` and
    ``eps`` one per parameter group. ``projected_grads[s] = (L+ - L-) / (2 * eps[0])``: with one
    eps for all groups (the usual case) this is the paper's projected gradient.
    """

    seeds: tuple[int, ...]
    projected_grads: tuple[float, ...]
    lrs: tuple[float, ...]
    weight_decays: tuple[float, ...]
    eps: tuple[float, ...]


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

    def __init__(self, param_groups, selected=lambda p: p.requires_grad):
        self.params, self.tensors, self.offsets, self.ids, self.group_of = [], [], [], [], []
        index = 0
        for g, group in enumerate(param_groups):
            for p in group["params"]:
                if selected(p):
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


def _loss_value(loss) -> float:
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"MeZO: the closure must return a scalar loss, got a tensor of shape {tuple(loss.shape)}")
        return float(loss.detach().item())  # no cast: a float64 loss keeps its precision
    try:
        return float(loss)
    except (TypeError, ValueError):
        raise TypeError(f"MeZO: the closure must return a scalar tensor or a number, got {type(loss).__name__}") from None


class MeZO(torch.optim.Optimizer):
    r"""Zeroth-order SGD (MeZO, Malladi et al. 2023) with in-place, seed-regenerated noise.

    Args:
        params: parameters or parameter groups, as for any torch optimizer. Groups may set their
            own ``lr``, ``eps`` and ``weight_decay`` (put biases and norms in a group with
            ``weight_decay=0``, as with AdamW). Parameters with ``requires_grad=False`` are left
            alone.
        lr: learning rate (paper: 1e-6..1e-7 for full fine-tuning, 1e-4 for LoRA).
        eps: perturbation scale ε (paper: 1e-3).
        weight_decay: decoupled weight decay, ``θ -= lr * wd * θ`` each step.
        n_samples: two-point estimates averaged per step, each with a fresh seed (n-SPSA).
        seed: seed of the optimizer's own generator, which draws the per-step seeds. ``None``
            draws one at random. Its state is in ``state_dict``, so a resumed run continues
            bit-identically.
        keep_log: keep :attr:`log` (one small :class:`MeZOStep` per applied step).
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

    Safety: if the closure raises, the parameters are restored before the exception propagates;
    if a loss is NaN or infinite, the parameters are restored, the update is skipped, counted in
    :attr:`skipped_steps` and warned about.

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
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"MeZO: lr must be a number >= 0, got {lr!r}")
        if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
            raise ValueError(f"MeZO: eps must be a finite number > 0, got {eps!r}")
        if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
            raise ValueError(f"MeZO: weight_decay must be a number >= 0, got {weight_decay!r}")
        if not (isinstance(n_samples, int) and n_samples >= 1):
            raise ValueError(f"MeZO: n_samples must be an int >= 1, got {n_samples!r}")
        if not isinstance(exact_restore, bool):
            raise TypeError(f"MeZO: exact_restore must be a bool, got {exact_restore!r}")
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay))
        for i, group in enumerate(self.param_groups):
            if not group["eps"] > 0:
                raise ValueError(f"MeZO: param_groups[{i}]['eps'] must be > 0, got {group['eps']!r}")
        self.n_samples = n_samples
        self.keep_log = keep_log
        self.exact_restore = exact_restore
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(int(seed))
        self.log: list[MeZOStep] = []
        self.skipped_steps = 0
        self._seeds_synced = False

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
        if closure is None:
            raise TypeError("MeZO.step needs a closure that runs the forward pass and returns the loss")
        params = _ParamSet(self.param_groups)
        params.validate()
        fsdp_modules = _fsdp_modules_holding(params.params) if params.sharded else []

        def evaluate():
            # FSDP2 must gather the shards as they are now: drop any gathered copy a previous
            # forward left behind (see _fsdp_modules_holding)
            for module in fsdp_modules:
                module.reshard()
            return closure()

        self._sync_generator()
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
                loss_plus = _loss_value(loss)
                # θ - eps z from θ itself (not p+ - 2 eps z): correctly rounded and undoable
                # (exact_restore=False: p+ - 2 eps z)
                move(current, lambda g: eps[g], [current], lambda _, g: -eps[g], invertible=True)
                offset = -1.0
                loss_minus = _loss_value(evaluate())
                diffs.append(loss_plus - loss_minus)

            if dist.is_available() and dist.is_initialized():
                buf = torch.tensor(diffs, dtype=torch.float64, device=self._comm_device())
                dist.all_reduce(buf)  # one message of n_samples scalars per step
                diffs = (buf / dist.get_world_size()).tolist()
        except BaseException:
            restore()
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
            self.log.append(MeZOStep(tuple(seeds), tuple(d / (2.0 * eps[0]) for d in diffs),
                                     tuple(lrs), tuple(wds), tuple(eps)))
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
        state_dict = dict(state_dict)
        extra = state_dict.pop("mezo", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self._generator.set_state(extra["generator"].to(torch.uint8).cpu())
            self.skipped_steps = int(extra["skipped_steps"])
            self.n_samples = int(extra["n_samples"])
            self.exact_restore = bool(extra.get("exact_restore", True))  # (older checkpoints)
            self.log = _log_from_tensors(extra["log"])
        self._seeds_synced = False


def _log_to_tensors(log: Sequence[MeZOStep]) -> dict:
    if not log:
        return {}
    return {
        "seeds": torch.tensor([e.seeds for e in log], dtype=torch.int64),
        "projected_grads": torch.tensor([e.projected_grads for e in log], dtype=torch.float64),
        "lrs": torch.tensor([e.lrs for e in log], dtype=torch.float64),
        "weight_decays": torch.tensor([e.weight_decays for e in log], dtype=torch.float64),
        "eps": torch.tensor([e.eps for e in log], dtype=torch.float64),
    }


def _log_from_tensors(t: dict) -> list[MeZOStep]:
    if not t:
        return []
    rows = zip(t["seeds"].tolist(), t["projected_grads"].tolist(), t["lrs"].tolist(),
               t["weight_decays"].tolist(), t["eps"].tolist())
    return [MeZOStep(tuple(a), tuple(b), tuple(c), tuple(d), tuple(e)) for a, b, c, d, e in rows]


@torch.no_grad()
def replay(params: Iterable, log: Sequence[MeZOStep] | dict) -> None:
    """Reapply a MeZO fine-tune from its log to the base weights, in place.

    ``params`` must be what the optimizer was built with (a list of tensors, or the same list
    of parameter groups, in the same order), holding the base weights, with ``None`` in place of
    any parameter that was frozen (``requires_grad=False``) during training; ``log`` is
    ``optimizer.log`` (or the ``"log"`` entry of its state dict). The result matches the trained
    model to within float rounding, bit for bit wherever training restored the parameters exactly
    (its last pass recovers θ and rounds the same update from it; see the module docstring; with
    ``exact_restore=False`` the trained model carries the perturbations' rounding, which replay
    does not).
    """
    if isinstance(log, dict):
        log = _log_from_tensors(log)
    params = list(params)
    if params and isinstance(params[0], dict):
        groups = [{"params": list(g["params"])} for g in params]
    else:
        groups = [{"params": params}]
    pset = _ParamSet(groups, selected=lambda p: p is not None)
    pset.validate()
    for i, entry in enumerate(log):
        if len(entry.lrs) != len(groups):
            raise ValueError(f"replay: log entry {i} has {len(entry.lrs)} parameter groups but "
                             f"params has {len(groups)}")
        n = len(entry.seeds)
        scale = [entry.eps[0] / e for e in entry.eps]  # projected grads are relative to eps[0]
        pset.axpby(entry.seeds,
                   lambda s, g: -entry.lrs[g] / n * entry.projected_grads[s] * scale[g],
                   lambda g: entry.lrs[g] * entry.weight_decays[g])
