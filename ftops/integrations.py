"""transformers ``Trainer`` integration.

The gradient methods need nothing from here: pass the optimizer to the Trainer,
``Trainer(model, args, ..., optimizers=(opt, scheduler))`` (``GaLoreAdamW``, S²FT with any torch
optimizer, ``SaRA``). Two methods need a small adapter, because their step is not the Trainer's
``backward(); optimizer.step()``:

* :class:`MeZOTrainer`: MeZO runs forwards only and needs a closure. A drop-in ``Trainer``
  subclass (switch by changing the class name) whose training step is one MeZO step.
* :class:`OwLoreCallback`: steps an :class:`ftops.OwLore` sampler at the start of every optimizer
  step, as the OwLore loop does by hand.

Importing this module imports ``transformers``; ``import ftops`` does not.
"""
from __future__ import annotations

import logging
import warnings

import torch
from transformers import Trainer, TrainerCallback

from .mezo import REFERENCE_NO_DECAY, MeZO, param_groups as mezo_param_groups
from .owlore import OwLore

__all__ = ["MeZOTrainer", "OwLoreCallback"]

logger = logging.getLogger(__name__)


class _TrainerFacingMeZO(torch.optim.Optimizer):
    """What the Trainer holds in place of the user's MeZO: the same param groups and state (so LR
    schedulers built on either object act on both), ``step()`` without a closure does nothing
    (the MeZO step already ran in :meth:`MeZOTrainer.training_step`), and checkpoints are the
    MeZO's own."""

    def __init__(self, mezo: MeZO):
        super().__init__([torch.empty(0)], {})  # sets up torch's hooks; groups replaced below
        self.mezo = mezo
        self.defaults = mezo.defaults
        self.param_groups = mezo.param_groups
        self.state = mezo.state

    def step(self, closure=None):  # type: ignore[override]
        return None if closure is None else self.mezo.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass  # MeZO makes no gradients

    def state_dict(self):
        return self.mezo.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.mezo.load_state_dict(state_dict)
        self.param_groups = self.mezo.param_groups  # torch replaces the group dicts on load


class MeZOTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with :class:`ftops.MeZO` (forwards only, no ``.grad``).

    Use it as the Trainer, with a MeZO optimizer::

        opt = ftops.MeZO(model.parameters(), lr=1e-6, eps=1e-3, seed=0)
        trainer = MeZOTrainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None))
        trainer.train()

    or let it build the MeZO as the reference's trainer does (``optimizers`` left out): learning
    rate ``args.learning_rate``, weight decay ``args.weight_decay`` on every trainable parameter
    except those whose names contain ``"bias"``, ``"layer_norm"`` or ``"layernorm"``
    (:func:`ftops.mezo.param_groups`), seed ``args.seed``; ``mezo_kwargs`` go to
    :class:`ftops.MeZO` (``eps``, ``n_samples``, ``exact_restore``, ``keep_log``, ``seed``) and
    may set ``no_decay`` (the name substrings that get no weight decay)::

        trainer = MeZOTrainer(model=model, args=args, train_dataset=ds,
                              mezo_kwargs={"eps": 1e-3})

    Each optimizer step is one ``MeZO.step`` whose closure evaluates the Trainer's loss
    (``compute_loss``, so ``compute_loss_func`` and label smoothing apply) with the model in eval
    mode (no dropout in the two forwards, as the reference). With
    ``gradient_accumulation_steps=k`` the micro-batches of a window are kept and the step's closure
    averages the loss over all ``k`` of them at the same perturbation: the estimate of the whole
    window's projected gradient, with the memory of one micro-batch's forward. The logged
    ``loss`` is the window's loss at ``θ + εz`` (what MeZO returns); ``projected_grad`` is logged
    with it. ``max_grad_norm`` has nothing to clip (there are no gradients). With
    ``optimizers=(opt, None)`` the Trainer builds its usual LR schedule on the MeZO learning rate;
    a scheduler passed in must be built on the MeZO optimizer (else it would schedule nothing).
    """

    _MEZO_KWARGS = ("eps", "n_samples", "exact_restore", "keep_log", "seed", "no_decay")

    def __init__(self, *args, mezo_kwargs: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        where = "MeZOTrainer"
        opt = self.optimizer
        if isinstance(opt, _TrainerFacingMeZO):
            opt = opt.mezo
        if mezo_kwargs is not None:
            if not isinstance(mezo_kwargs, dict):
                raise TypeError(f"{where}: mezo_kwargs must be a dict, got "
                                f"{type(mezo_kwargs).__name__}")
            unknown = sorted(set(mezo_kwargs) - set(self._MEZO_KWARGS))
            if unknown:
                raise TypeError(f"{where}: unknown mezo_kwargs {unknown}; accepted: "
                                f"{list(self._MEZO_KWARGS)}")
            if opt is not None:
                raise ValueError(f"{where}: mezo_kwargs configure the MeZO the trainer builds; "
                                 "with optimizers=(ftops.MeZO(...), ...) set them on that MeZO")
        self._mezo_kwargs = dict(mezo_kwargs or {})
        self._window: list = []
        self.mezo: MeZO | None = None
        if opt is None:
            if self.lr_scheduler is not None:
                raise ValueError(f"{where}: a scheduler was passed without an optimizer; pass "
                                 "optimizers=(ftops.MeZO(...), scheduler built on it)")
            return  # built by create_optimizer, from the training arguments
        if not isinstance(opt, MeZO):
            raise TypeError("MeZOTrainer: pass a ftops.MeZO optimizer, optimizers=(ftops.MeZO(...), "
                            f"scheduler or None), or none at all; got {type(opt).__name__}")
        self.mezo = opt
        self.optimizer = _TrainerFacingMeZO(opt)
        sched_opt = getattr(self.lr_scheduler, "optimizer", None)
        if self.lr_scheduler is not None and getattr(sched_opt, "param_groups", None) \
                is not opt.param_groups:
            raise ValueError(f"{where}: the LR scheduler was not built on the MeZO optimizer "
                             "(it would change another optimizer's learning rate)")

    def create_optimizer(self, model=None):
        """The MeZO given to the trainer, or, when none was, one built from the training
        arguments with the reference's weight-decay rule (see the class docstring)."""
        if self.mezo is None:
            kw = dict(self._mezo_kwargs)
            no_decay = kw.pop("no_decay", REFERENCE_NO_DECAY)
            kw.setdefault("seed", self.args.seed)
            groups = mezo_param_groups(self.model if model is None else model,
                                       self.args.weight_decay, no_decay)
            self.mezo = MeZO(groups, lr=self.args.learning_rate, **kw)
            self.optimizer = _TrainerFacingMeZO(self.mezo)
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._window.append(inputs)
        if not self.accelerator.sync_gradients:
            # Not the last micro-batch of the window: nothing to compute yet. The Trainer sums
            # these returns for the logged loss; the last one carries the window's loss.
            return torch.zeros((), device=self.args.device)
        window, self._window = self._window, []
        model.eval()
        batches = [self._prepare_inputs(b) for b in window]
        scaled = self._loss_is_scaled(num_items_in_batch)

        def closure():
            total = None
            for batch in batches:
                with self.compute_loss_context_manager():
                    loss = self.compute_loss(model, batch, num_items_in_batch=num_items_in_batch)
                if self.args.n_gpu > 1:
                    loss = loss.mean()
                loss = loss.detach().double()  # exact for any float loss, summed in float64
                total = loss if total is None else total + loss
            return total if scaled else total / len(batches)

        loss = self.mezo.step(closure)
        return loss.detach().to(self.args.device)

    def _loss_is_scaled(self, num_items_in_batch) -> bool:
        """Whether compute_loss already divides by the window's token count (then the window's
        loss is the sum over its micro-batches), by the Trainer's own rule."""
        # `loss_is_scaled_for_ga` (a user override) is new in transformers 5.2x; older Trainers
        # (5.17 on our GPU machines) lack it and apply the rule below
        override = getattr(self, "loss_is_scaled_for_ga", None)
        if override is not None:
            return bool(override)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or self.compute_loss_func is not None)

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self.mezo is not None and self.mezo.log:
            logs["projected_grad"] = float(self.mezo.log[-1].projected_grads[0])
        return super().log(logs, *args, **kwargs)


class OwLoreCallback(TrainerCallback):
    """Steps an :class:`ftops.OwLore` sampler at the start of every optimizer step (once per
    gradient-accumulation window), before its forwards, so a Trainer runs the OwLore loop::

        opt = ftops.GaLoreAdamW(galore_param_groups(model, blocks, rank=8), lr=1e-3)
        sampler = ftops.OwLore(blocks, ratios, gamma=2, period=10, optimizer=opt)
        Trainer(model, args, train_dataset=ds, optimizers=(opt, None),
                callbacks=[OwLoreCallback(sampler)]).train()

    The sampler's ``state_dict`` is not part of Trainer checkpoints: save and restore it yourself
    when resuming (``sampler.state_dict()`` holds tensors and ints only). The sampler counts its
    own steps (the reference draws when the Trainer's ``global_step`` is a multiple of the
    period): when training begins at a ``global_step`` other than the sampler's step count, as
    after a resume without ``sampler.load_state_dict``, a warning says so.
    """

    def __init__(self, sampler: OwLore):
        if not isinstance(sampler, OwLore):
            raise TypeError("OwLoreCallback: sampler must be a ftops.OwLore, got "
                            f"{type(sampler).__name__}")
        self.sampler = sampler

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step != self.sampler.steps:
            warnings.warn(f"OwLoreCallback: training begins at global_step {state.global_step} but "
                          f"the sampler has taken {self.sampler.steps} steps; its draws follow its "
                          "own count (load its state_dict saved with the checkpoint to resume "
                          "them)", stacklevel=2)

    def on_step_begin(self, args, state, control, **kwargs):
        self.sampler.step()  # logs each draw (logger ftops.owlore, INFO)
