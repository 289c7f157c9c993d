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

import torch
from transformers import Trainer, TrainerCallback

from .mezo import MeZO
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

    Each optimizer step is one ``MeZO.step`` whose closure evaluates the Trainer's loss
    (``compute_loss``, so ``compute_loss_func`` and label smoothing apply) with the model in eval
    mode (no dropout in the two forwards, as the reference). With
    ``gradient_accumulation_steps=k`` the micro-batches of a window are kept and the step's closure
    averages the loss over all ``k`` of them at the same perturbation: the estimate of the whole
    window's projected gradient, with the memory of one micro-batch's forward. The logged
    ``loss`` is the window's loss at ``θ + εz`` (what MeZO returns); ``projected_grad`` is logged
    with it. ``max_grad_norm`` has nothing to clip (there are no gradients). With
    ``optimizers=(opt, None)`` the Trainer builds its usual LR schedule on the MeZO learning rate.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        opt = self.optimizer
        if isinstance(opt, _TrainerFacingMeZO):
            opt = opt.mezo
        if not isinstance(opt, MeZO):
            raise TypeError("MeZOTrainer: pass a ftops.MeZO optimizer, optimizers=(ftops.MeZO(...), "
                            f"scheduler or None); got {type(opt).__name__}")
        self.mezo = opt
        self.optimizer = _TrainerFacingMeZO(opt)
        if self.lr_scheduler is not None and getattr(self.lr_scheduler, "optimizer", None) is not opt:
            logger.warning("MeZOTrainer: the LR scheduler was not built on the MeZO optimizer")
        self._window: list = []

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
                loss = loss.detach().float()
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
        if "loss" in logs and self.mezo.log:
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
    when resuming (``sampler.state_dict()`` holds tensors and ints only).
    """

    def __init__(self, sampler: OwLore):
        if not isinstance(sampler, OwLore):
            raise TypeError(f"OwLoreCallback: sampler must be a ftops.OwLore, got {type(sampler).__name__}")
        self.sampler = sampler

    def on_step_begin(self, args, state, control, **kwargs):
        self.sampler.step()  # logs each draw (logger ftops.owlore, INFO)
