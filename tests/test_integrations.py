"""transformers Trainer: every method trains through it exactly as in a hand-written loop.

Each test runs a few Trainer steps on a tiny randomly initialized Llama (2 blocks, hidden 32)
with sequential batches and compares the parameters with those of the same loop written by
hand (same initial weights, same batches, same optimizer and scheduler), then checks which
parameters moved. CPU only: the Trainer is configured with ``use_cpu=True``.
"""
import copy
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ftops  # noqa: E402
from ftops import s2ft  # noqa: E402
from ftops.integrations import MeZOTrainer, OwLoreCallback  # noqa: E402
from ftops.owlore import find_blocks, galore_param_groups  # noqa: E402

VOCAB, SEQ, N_EXAMPLES = 64, 8, 16


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg)


class Examples(torch.utils.data.Dataset):
    """Counting sequences (next token = token + 1 mod VOCAB): learnable in a few steps."""

    def __init__(self, n=N_EXAMPLES, offset=0):
        g = torch.Generator().manual_seed(1234 + offset)
        starts = torch.randint(0, VOCAB, (n,), generator=g)
        self.rows = [(s + torch.arange(SEQ)) % VOCAB for s in starts]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def batches(ds, batch_size, steps):
    """The batches a sequential Trainer sees, in order (the dataset repeats per epoch)."""
    per_epoch = len(ds) // batch_size
    out = []
    for step in range(steps):
        k = step % per_epoch
        rows = [ds[i] for i in range(k * batch_size, (k + 1) * batch_size)]
        out.append({key: torch.stack([r[key] for r in rows]) for key in rows[0]})
    return out


def args(tmp_path, steps=4, batch_size=4, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=batch_size,
                per_device_eval_batch_size=batch_size, max_steps=steps, report_to=[],
                use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
                train_sampling_strategy="sequential", max_grad_norm=0.0, seed=0,
                dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_model(a, b, rtol=1e-5, atol=1e-6):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


def changed(before, model):
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def manual_gradient_loop(model, opt, sched, bs, steps, before_step=None, clip=None):
    model.train()
    losses = []
    for batch in bs:
        if before_step is not None:
            before_step()
        loss = model(**batch).loss
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters()], clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def train_losses(trainer):
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def galore_groups(model):
    mats = [p for n, p in model.named_parameters() if p.dim() == 2 and "layers" in n]
    rest = [p for p in model.parameters() if all(p is not q for q in mats)]
    return [{"params": mats, "rank": 4, "update_proj_gap": 2, "scale": 0.5}, {"params": rest}]


# --- gradient methods through optimizers=(opt, scheduler) -------------------------------------

def test_galore_trainer_matches_manual_loop(tmp_path):
    model, ref = tiny_llama(), tiny_llama()
    before = snapshot(model)
    opt = ftops.GaLoreAdamW(galore_groups(model), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ds = Examples()
    trainer = transformers.Trainer(model=model, args=args(tmp_path, steps=6), train_dataset=ds,
                                   optimizers=(opt, sched))
    trainer.train()

    ropt = ftops.GaLoreAdamW(galore_groups(ref), lr=1e-2)
    rsched = torch.optim.lr_scheduler.StepLR(ropt, step_size=2, gamma=0.5)
    losses = manual_gradient_loop(ref, ropt, rsched, batches(ds, 4, 6), 6)
    assert_same_model(model, ref)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 3)  # the scheduler stepped
    logged = train_losses(trainer)
    assert logged == pytest.approx(losses, rel=1e-4)
    assert logged[-1] < logged[0]
    assert changed(before, model) == set(before)  # every parameter trains


def test_galore_trainer_grad_clipping(tmp_path):
    """max_grad_norm clips the model's gradients before the GaLore step, as for torch AdamW."""
    model, ref = tiny_llama(), tiny_llama()
    opt = ftops.GaLoreAdamW(galore_groups(model), lr=1e-2)
    ds = Examples()
    transformers.Trainer(model=model, args=args(tmp_path, steps=3, max_grad_norm=0.05),
                         train_dataset=ds,
                         optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))).train()
    ropt = ftops.GaLoreAdamW(galore_groups(ref), lr=1e-2)
    manual_gradient_loop(ref, ropt, torch.optim.lr_scheduler.LambdaLR(ropt, lambda s: 1.0),
                         batches(ds, 4, 3), 3, clip=0.05)
    assert_same_model(model, ref)


def test_owlore_trainer_callback(tmp_path, caplog):
    model, ref = tiny_llama(), tiny_llama()
    before = snapshot(model)

    def setup(m):
        blocks = find_blocks(m)
        opt = ftops.GaLoreAdamW(galore_param_groups(m, blocks, rank=4, update_proj_gap=2), lr=1e-2)
        sampler = ftops.OwLore(blocks, None, gamma=1, period=3, seed=5, optimizer=opt)
        return opt, sampler

    opt, sampler = setup(model)
    ds = Examples()
    with caplog.at_level(logging.INFO, logger="ftops.owlore"):
        transformers.Trainer(model=model, args=args(tmp_path, steps=5, max_grad_norm=1.0),
                             train_dataset=ds,
                             optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)),
                             callbacks=[OwLoreCallback(sampler)]).train()
    assert sampler.steps == 5 and len(sampler.history) == 2  # steps 0 and 3 drew
    assert "OwLore: step 3 trains blocks" in caplog.text

    ropt, rsampler = setup(ref)
    manual_gradient_loop(ref, ropt, torch.optim.lr_scheduler.LambdaLR(ropt, lambda s: 1.0),
                         batches(ds, 4, 5), 5, before_step=rsampler.step, clip=1.0)
    assert rsampler.history == sampler.history
    assert_same_model(model, ref)
    # what moved: the blocks that were sampled, and everything outside the blocks
    drawn = {b for draw in sampler.history for b in draw}
    moved = changed(before, model)
    for k in before:
        if k.startswith("model.layers."):
            block = int(k.split(".")[2])
            assert (k in moved) == (block in drawn), k
        else:
            assert k in moved, k


def test_s2ft_trainer_trains_only_the_slices(tmp_path):
    model, ref = tiny_llama(), tiny_llama()
    sel = s2ft.select(model, v_ratio=0.5, o_ratio=0.5, u_ratio=0.25, d_ratio=0.25, seed=0)
    s2ft.apply(model, sel)
    s2ft.apply(ref, sel)
    before = snapshot(model)

    def make(m):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        return opt, torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.5,
                                                      total_iters=4)

    opt, sched = make(model)
    ds = Examples()
    trainer = transformers.Trainer(model=model, args=args(tmp_path, max_grad_norm=1.0),
                                   train_dataset=ds, optimizers=(opt, sched))
    trainer.train()
    ropt, rsched = make(ref)
    manual_gradient_loop(ref, ropt, rsched, batches(ds, 4, 4), 4, clip=1.0)
    assert_same_model(model, ref)
    assert train_losses(trainer)[-1] < train_losses(trainer)[0]

    # Only the slice rows/columns of the sliced layers moved; nothing else did.
    sliced = {}
    for name, mod in model.named_modules():
        if isinstance(mod, s2ft.RowSliceLinear):
            sliced[name + ".weight"] = (mod.start, mod.start + mod.rows)
            if mod.bias_slice is not None:
                sliced[name + ".bias"] = (mod.start, mod.start + mod.rows)
        elif isinstance(mod, s2ft.ColumnSliceLinear):
            sliced[name + ".weight_t"] = (mod.start, mod.start + mod.cols)
    assert sliced
    sd = model.state_dict()
    for k in before:
        if k in sliced:
            s, e = sliced[k]
            assert not torch.equal(sd[k][s:e], before[k][s:e]), k
            assert torch.equal(sd[k][:s], before[k][:s]), k
            assert torch.equal(sd[k][e:], before[k][e:]), k
        elif k.endswith("_slice"):
            continue  # the slice parameters themselves (views of the buffers above)
        else:
            assert torch.equal(sd[k], before[k]), k


def _sara_run(tmp_path, trainer_clip, sara_clip, steps=4):
    model, ref = tiny_llama(), tiny_llama()
    opt = ftops.SaRA(model, fraction=0.1, lr=1e-2, lambda_rank=0.0, max_grad_norm=sara_clip)
    ds = Examples()
    trainer = transformers.Trainer(model=model, args=args(tmp_path, steps=steps,
                                                          max_grad_norm=trainer_clip),
                                   train_dataset=ds,
                                   optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)))
    trainer.train()
    return model, ref, opt, ds, trainer


def test_sara_trainer_matches_manual_loop(tmp_path):
    """The Trainer clears gradients with model.zero_grad(), which does not reach SaRA's values
    (they are not model parameters): SaRA.step consumes them, so nothing accumulates."""
    model, ref, opt, ds, trainer = _sara_run(tmp_path, trainer_clip=0.0, sara_clip=None)
    before = snapshot(ref)
    ropt = ftops.SaRA(ref, fraction=0.1, lr=1e-2, lambda_rank=0.0)
    manual_gradient_loop(ref, ropt, torch.optim.lr_scheduler.LambdaLR(ropt, lambda s: 1.0),
                         batches(ds, 4, 4), 4)
    assert all(p.grad is None for p in opt.param_groups[0]["params"])
    assert train_losses(trainer)[-1] < train_losses(trainer)[0]
    # the model holds the fine-tuned weights: its state_dict is the pretrained model + the delta
    delta, names = opt.delta(), opt.names
    reloaded = tiny_llama()
    ftops.sara.load(reloaded, delta)
    for k, v in model.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k
    assert_same_model(model, ref)
    # only the selected entries of the managed weights moved
    sd = model.state_dict()
    for name in names:
        idx = delta[name + ".sara_indices"].long()
        moved = (sd[name].reshape(-1) != before[name].reshape(-1)).nonzero().squeeze(1)
        assert moved.numel() > 0
        assert torch.isin(moved, idx).all(), name
    for k in before:
        if k not in names:
            assert torch.equal(sd[k], before[k]), k


def test_sara_trainer_clipping(tmp_path):
    """Trainer's max_grad_norm does not reach the values; SaRA(max_grad_norm=) clips them."""
    model, ref, opt, ds, _ = _sara_run(tmp_path, trainer_clip=1.0, sara_clip=0.01, steps=3)
    ropt = ftops.SaRA(ref, fraction=0.1, lr=1e-2, lambda_rank=0.0)
    vals = ropt.param_groups[0]["params"]
    ref.train()
    for batch in batches(ds, 4, 3):
        ref(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(vals, 0.01)
        ropt.step()
        ropt.zero_grad()
    opt.unwrap()
    ropt.unwrap()
    assert_same_model(model, ref)
    unclipped, _, uopt, *_ = _sara_run(tmp_path, trainer_clip=1.0, sara_clip=None, steps=3)
    uopt.unwrap()
    with pytest.raises(AssertionError):
        assert_same_model(model, unclipped)


def test_sara_max_grad_norm_is_checked():
    with pytest.raises(ValueError, match="max_grad_norm"):
        ftops.SaRA(tiny_llama(), fraction=0.1, max_grad_norm=0.0)


def test_sara_save_pretrained_round_trip(tmp_path):
    """save_pretrained after SaRA training saves the fine-tuned model: from_pretrained gives a
    plain model that computes exactly what the trained model computes."""
    model = tiny_llama()
    opt = ftops.SaRA(model, fraction=0.1, lr=1e-2, lambda_rank=5e-4)
    bs = batches(Examples(), 4, 3)
    manual_gradient_loop(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), bs, 3)
    model.save_pretrained(tmp_path / "saved")
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "saved")
    model.eval()
    with torch.no_grad():
        assert torch.equal(plain(**bs[0]).logits, model(**bs[0]).logits)
        assert not torch.equal(tiny_llama()(**bs[0]).logits, model(**bs[0]).logits)
    for k, v in model.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k


@pytest.mark.parametrize("resume_at", [2, 4])  # before and after the reselection at step 3
def test_sara_trainer_checkpoint_resume(tmp_path, resume_at):
    """Trainer checkpoints hold the fine-tuned model and SaRA's state: resume_from_checkpoint
    continues exactly as the uninterrupted run."""
    def run(out, resume=None):
        model = tiny_llama()
        opt = ftops.SaRA(model, fraction=0.1, lr=1e-2, lambda_rank=5e-4, progressive_iter=3)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        trainer = transformers.Trainer(
            model=model, args=args(out, steps=6, save_strategy="steps", save_steps=2),
            train_dataset=Examples(), optimizers=(opt, sched))
        trainer.train(resume_from_checkpoint=resume)
        return model, opt

    full, fopt = run(tmp_path / "full")
    ckpt = tmp_path / "full" / f"checkpoint-{resume_at}"
    saved = transformers.LlamaForCausalLM.from_pretrained(ckpt)  # the checkpoint's model
    assert not torch.equal(saved.state_dict()["model.layers.0.mlp.up_proj.weight"],
                           tiny_llama().state_dict()["model.layers.0.mlp.up_proj.weight"])
    resumed, ropt = run(tmp_path / "resumed", resume=str(ckpt))
    for k, v in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    assert ropt.num_trainable() == fopt.num_trainable() < sum(
        mg.values.numel() + mg.frozen_values.numel() for mg in fopt._managed)


# --- MeZO ---------------------------------------------------------------------------------------

def _grad_watch(model):
    """Records torch.is_grad_enabled() at every forward of the model."""
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(torch.is_grad_enabled()))
    return seen


@pytest.mark.parametrize("trainer_kind", ["current", "before_loss_is_scaled_for_ga"])
def test_mezo_trainer_matches_manual_loop(tmp_path, monkeypatch, trainer_kind):
    if trainer_kind != "current":
        # transformers before 5.2x (5.17 on our GPU machines) has no such attribute; the MeZO
        # trainer failed there with AttributeError
        monkeypatch.delattr(transformers.Trainer, "loss_is_scaled_for_ga", raising=False)
        assert not hasattr(transformers.Trainer, "loss_is_scaled_for_ga")
    model, ref = tiny_llama(), tiny_llama()
    seen = _grad_watch(model)
    opt = ftops.MeZO(model.parameters(), lr=1e-3, eps=1e-3, seed=0)
    ds = Examples()
    trainer = MeZOTrainer(model=model, args=args(tmp_path, steps=4), train_dataset=ds,
                          optimizers=(opt, torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5)))
    trainer.train()

    ropt = ftops.MeZO(ref.parameters(), lr=1e-3, eps=1e-3, seed=0)
    rsched = torch.optim.lr_scheduler.StepLR(ropt, 2, gamma=0.5)
    ref.eval()
    losses = []
    for batch in batches(ds, 4, 4):
        losses.append(float(ropt.step(lambda: ref(**batch).loss)))
        rsched.step()
    assert_same_model(model, ref, rtol=1e-5, atol=1e-6)
    assert not torch.equal(model.model.embed_tokens.weight, tiny_llama().model.embed_tokens.weight)
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["loss"] for e in logged] == pytest.approx(losses, rel=1e-4)
    assert all("projected_grad" in e for e in logged)
    assert seen and not any(seen)  # every forward ran without autograd
    assert all(p.grad is None for p in model.parameters())
    assert len(opt.log) == 4 and opt.param_groups[0]["lr"] == pytest.approx(2.5e-4)


def test_mezo_trainer_gradient_accumulation_and_eval(tmp_path):
    """k micro-batches make one MeZO step over the whole window (same perturbation), equal to
    one step on the concatenated batch; evaluation during and after training works."""
    model, ref = tiny_llama(), tiny_llama()
    opt = ftops.MeZO(model.parameters(), lr=1e-3, eps=1e-3, seed=3)
    ds = Examples()
    trainer = MeZOTrainer(model=model, args=args(tmp_path, steps=3, batch_size=2,
                                                 gradient_accumulation_steps=2,
                                                 eval_strategy="steps", eval_steps=2),
                          train_dataset=ds, eval_dataset=Examples(8, offset=1),
                          optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)))
    trainer.train()
    assert len(opt.log) == 3  # one MeZO step per window, not per micro-batch

    ropt = ftops.MeZO(ref.parameters(), lr=1e-3, eps=1e-3, seed=3)
    ref.eval()
    losses = []
    for batch in batches(ds, 4, 3):
        losses.append(float(ropt.step(lambda: ref(**batch).loss)))
    # The window's loss is a sum of two micro-batch losses, the reference's one mean: they differ
    # by float rounding, which the finite difference amplifies (eps=1e-3). Each step moves the
    # weights by ~1e-3, so 2e-5 still tells a wrong window or perturbation apart.
    for mine, theirs in zip(opt.log, ropt.log):
        assert mine.seeds == theirs.seeds
        assert mine.projected_grads == pytest.approx(theirs.projected_grads, rel=1e-3)
    assert_same_model(model, ref, rtol=0, atol=2e-5)
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert logged == pytest.approx(losses, rel=1e-4)
    assert any("eval_loss" in e for e in trainer.state.log_history)
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    assert all(p.grad is None for p in model.parameters())


def test_mezo_trainer_needs_mezo(tmp_path):
    model = tiny_llama()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="ftops.MeZO"):
        MeZOTrainer(model=model, args=args(tmp_path), train_dataset=Examples(),
                    optimizers=(opt, None))


def test_mezo_trainer_checkpoint_state(tmp_path):
    """The Trainer saves the MeZO's own state dict (generator state and log included)."""
    model = tiny_llama()
    opt = ftops.MeZO(model.parameters(), lr=1e-3, seed=0)
    trainer = MeZOTrainer(model=model, args=args(tmp_path, steps=2), train_dataset=Examples(),
                          optimizers=(opt, None))
    trainer.train()
    sd = trainer.optimizer.state_dict()
    assert "mezo" in sd and len(sd["mezo"]["log"]["seeds"]) == 2
    other = ftops.MeZO(tiny_llama().parameters(), lr=1e-3, seed=99)
    other.load_state_dict(copy.deepcopy(sd))
    assert torch.equal(other._generator.get_state(), opt._generator.get_state())
