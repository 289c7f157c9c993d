"""ftops.MeZO against a plain-PyTorch MeZO fed the same noise, plus safety, resume, replay."""
import copy
import io
import math
import os
import warnings

import pytest
import torch

import ftops
from ftops import _ops
from ftops.mezo import MeZO, noise_like, param_groups, replay

from _dist import spawn
from test_zo_undo import bits


def least_squares(device, dtype=torch.float32, m=64, n=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, n, generator=g, dtype=torch.float64)
    b = A @ torch.randn(n, generator=g, dtype=torch.float64) + 0.01 * torch.randn(m, generator=g, dtype=torch.float64)
    return A.to(device, dtype), b.to(device, dtype)


def make_params(device, dtype, shapes=((13,), (4, 7), (1,), (65,)), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype)) for s in shapes]


def objective(params):
    """Any smooth function of a list of tensors (computed in float64)."""
    total = 0.0
    for i, p in enumerate(params):
        q = p.double()
        total = total + ((q - 0.1 * (i + 1)) ** 2).sum() + 0.5 * torch.sin(q).sum()
    return total


def reference_mezo(params, groups, seeds_per_step, n_samples, closure_of):
    """The paper's algorithm in float64 with noise_like as z: perturb, evaluate, restore, update.

    groups: list of (indices, lr, eps, wd); indices are positions in params (= noise ids).
    """
    for seeds in seeds_per_step:
        grads = []
        for seed in seeds:
            z = [noise_like(p, seed, k).double() for k, p in enumerate(params)]
            eps_of = {k: eps for idx, _, eps, _ in groups for k in idx}
            plus = [p + eps_of[k] * z[k] for k, p in enumerate(params)]
            minus = [p - eps_of[k] * z[k] for k, p in enumerate(params)]
            grads.append((float(closure_of(plus)) - float(closure_of(minus)), z))
        new = list(params)
        for idx, lr, eps, wd in groups:
            for k in idx:
                upd = sum(d / (2 * eps) * z[k] for d, z in grads) / n_samples
                new[k] = params[k] - lr * (upd + wd * params[k])
        params = new
    return params


@pytest.mark.parametrize("exact_restore", [True, False])
@pytest.mark.parametrize("n_samples", [1, 3, 10])
def test_matches_reference_float64(device, n_samples, exact_restore):
    params = make_params(device, torch.float64)
    base = [p.detach().clone() for p in params]
    groups = [{"params": params[:2], "lr": 1e-2, "eps": 1e-3, "weight_decay": 0.1},
              {"params": params[2:], "lr": 3e-2, "eps": 2e-3, "weight_decay": 0.0}]
    opt = MeZO(groups, n_samples=n_samples, seed=7, exact_restore=exact_restore)
    for _ in range(4):
        opt.step(lambda: objective(params))
    ref = reference_mezo(base, [([0, 1], 1e-2, 1e-3, 0.1), ([2, 3], 3e-2, 2e-3, 0.0)],
                         [e.seeds for e in opt.log], n_samples, objective)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, rtol=1e-9, atol=1e-9)


def _add_noise(params, terms):
    """zo_axpby_ without decay, emulated bit for bit: v + sum_s c_s z_s in float32 (products and
    sums in the kernel's order, c_s rounded to float32), rounded once to the parameter dtype."""
    out = []
    for k, t in enumerate(params):
        acc = torch.zeros_like(t, dtype=torch.float32)
        for seed, c in terms:
            acc = acc + torch.tensor(c, dtype=torch.float32, device=t.device) * noise_like(t, seed, k)
        out.append((t.float() + acc).to(t.dtype))
    return out


@pytest.mark.parametrize("n_samples", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_low_precision_matches_emulation_bitwise(device, dtype, n_samples):
    """Each pass recovers θ by undoing the previous perturbation exactly, then rounds its own
    change from θ once (float32 math); emulate that exactly (tests/test_zo_undo.py)."""
    from test_zo_undo import F, bits, offset, ref_undo

    params = make_params(device, dtype)
    emu = [p.detach().clone() for p in params]
    lr, eps = 1e-2, 1e-2
    opt = MeZO(params, lr=lr, eps=eps, n_samples=n_samples, seed=3)
    opt.step(lambda: objective(params))
    seeds = opt.log[0].seeds
    diffs = []
    theta, prev = emu, None
    for seed in seeds:
        a = [offset(p, seed, k, eps) for k, p in enumerate(emu)]
        if prev is not None:  # undo the previous sample's -eps z
            theta = [ref_undo(p, -ak) for p, ak in zip(theta, prev)]
        plus = [F(t, ak) for t, ak in zip(theta, a)]
        theta = [ref_undo(p, ak) for p, ak in zip(plus, a)]
        minus = [F(t, -ak) for t, ak in zip(theta, a)]
        diffs.append(float(objective(plus)) - float(objective(minus)))
        theta, prev = minus, a
    theta = [ref_undo(p, -ak) for p, ak in zip(theta, prev)]
    # the update from θ: θ + sum_s c_s z_s, rounded to nearest even
    final = _add_noise(theta, [(seed, -lr / n_samples * d / (2 * eps))
                               for seed, d in zip(seeds, diffs)])
    for p, f in zip(params, final):
        assert torch.equal(bits(p.detach()), bits(f))


@pytest.mark.parametrize("n_samples", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_inexact_restore_matches_emulation_bitwise(device, dtype, n_samples):
    """exact_restore=False: each pass adds its noise to the parameters as they are (one rounding
    to nearest even), and a pass that both removes the previous perturbation and adds the next
    one generates each seed's noise once, with the coefficients summed."""
    params = make_params(device, dtype)
    emu = [p.detach().clone() for p in params]
    lr, eps = 1e-2, 1e-2
    opt = MeZO(params, lr=lr, eps=eps, n_samples=n_samples, seed=3, exact_restore=False)
    opt.step(lambda: objective(params))
    seeds = opt.log[0].seeds
    diffs, prev = [], None
    for seed in seeds:
        # the previous sample's -eps z is removed in the same pass (its seed comes second)
        emu = _add_noise(emu, [(seed, eps)] + ([(prev, eps)] if prev is not None else []))
        plus = float(objective(emu))
        emu = _add_noise(emu, [(seed, -eps - eps)])
        diffs.append(plus - float(objective(emu)))
        prev = seed
    coeffs = [-lr / n_samples * d / (2 * eps) for d in diffs]
    coeffs[-1] += eps  # the last sample's -eps z is removed by the update's pass
    final = _add_noise(emu, list(zip(seeds, coeffs)))
    for p, f in zip(params, final):
        assert torch.equal(bits(p.detach()), bits(f))


@pytest.mark.parametrize("cycles", [1, 20])
def test_inexact_restore_at_lr_zero(device, dtype, cycles):
    """exact_restore=False: after lr=0 steps the parameters are back to within the rounding of
    the 3 passes per cycle (each at most half an ulp of the perturbed value)."""
    params = make_params(device, dtype, shapes=((4097,), (7, 9)))
    base = [p.detach().clone() for p in params]
    opt = MeZO(params, lr=0.0, eps=1e-3, seed=0, exact_restore=False)
    for _ in range(cycles):
        opt.step(lambda: objective(params))
    p, b = torch.cat([p.detach().flatten() for p in params]), torch.cat([b.flatten() for b in base])
    ulp = torch.finfo(dtype).eps * (b.double().abs() + 2e-3 * 6)
    drift = (p.double() - b.double()).abs()
    assert bool((drift <= 1.5 * cycles * ulp).all()), float((drift / ulp).max())


def test_inexact_restore_three_passes_each_seed_once(monkeypatch):
    calls = []
    real = _ops.zo_axpby_
    monkeypatch.setattr(_ops, "zo_axpby_", lambda *a: (calls.append(list(a[1])), real(*a)))
    monkeypatch.setattr(_ops, "zo_undo_axpby_", lambda *a: pytest.fail("zo_undo_axpby_ called"))
    params = make_params("cpu", torch.float32)
    for n in (1, 2, 4):
        calls.clear()
        opt = MeZO(params, lr=1e-3, n_samples=n, seed=0, exact_restore=False)
        opt.step(lambda: objective(params))
        seeds = list(opt.log[-1].seeds)
        expected = [[seeds[0]], [seeds[0]]]
        for i in range(1, n):
            expected += [[seeds[i], seeds[i - 1]], [seeds[i]]]
        assert calls == expected + [seeds]


def test_three_passes_per_step(monkeypatch):
    calls = []
    real = _ops.zo_undo_axpby_
    monkeypatch.setattr(_ops, "zo_undo_axpby_", lambda *a: (calls.append(a[3]), real(*a)))
    monkeypatch.setattr(_ops, "zo_axpby_", lambda *a: pytest.fail("zo_axpby_ called in a step"))
    params = make_params("cpu", torch.float32)
    for n in (1, 2, 4):
        calls.clear()
        MeZO(params, lr=1e-3, n_samples=n, seed=0).step(lambda: objective(params))
        assert len(calls) == 2 * n + 1
        assert len(calls[-1]) == n  # the last pass regenerates every sample's noise once


def test_noise_like_is_the_added_noise(device):
    params = make_params(device, torch.float32)
    frozen = torch.nn.Parameter(torch.ones(5, device=device), requires_grad=False)
    groups = [{"params": [params[0], frozen]}, {"params": params[1:]}]
    base = [p.detach().clone() for p in params]
    seen = []
    opt = MeZO(groups, lr=0.0, eps=1e-2, seed=11)
    opt.step(lambda: (seen.append([p.detach().clone() for p in params]), 0.0)[1])
    seed = opt.log[0].seeds[0]
    ids = [0, 2, 3, 4]  # positions over all groups; the frozen tensor keeps id 1
    for p, b, plus, k in zip(params, base, seen[0], ids):
        torch.testing.assert_close(plus, b + 1e-2 * noise_like(p, seed, k), rtol=0, atol=1e-6)
    torch.testing.assert_close(frozen.detach(), torch.ones(5, device=device), rtol=0, atol=0)


@pytest.mark.parametrize("scale,cycles,min_exact", [(1.0, 1, 0.99), (1.0, 50, 0.98), (0.02, 50, 0.75)])
def test_restore_at_lr_zero(device, dtype, scale, cycles, min_exact):
    """The undo is exact wherever the perturbation's rounding was injective: most elements come
    back bit for bit (measured: 99% after 50 cycles for N(0, 1) weights, 79% for N(0, 0.02)
    weights, where eps z crosses binades more often), the rest (a value pushed into a coarser
    binade, or swamped by |eps z|) within about an ulp of the perturbed value, never with the
    wrong sign."""
    params = make_params(device, dtype, shapes=((4097,), (7, 9)))
    with torch.no_grad():
        for p in params:
            p.mul_(scale)
    base = [p.detach().clone() for p in params]
    opt = MeZO(params, lr=0.0, eps=1e-3, seed=0)
    for _ in range(cycles):
        opt.step(lambda: objective(params))
    p, b = torch.cat([p.detach().flatten() for p in params]), torch.cat([b.flatten() for b in base])
    exact = float((p == b).double().mean())
    assert exact >= min_exact, exact
    assert not bool((p * b < 0).any())
    # no element moved by more than ~an ulp of the perturbed value (|b| + eps |z|, |z| < 6)
    ulp = torch.finfo(dtype).eps * (b.double().abs() + 1e-3 * 6)
    drift = (p.double() - b.double()).abs()
    assert bool((drift <= 3 * ulp).all()), float((drift / ulp).max())


def test_converges_least_squares(device):
    A, b = least_squares(device)
    w = torch.nn.Parameter(torch.zeros(A.shape[1], device=device))
    start = float(((A @ w.detach() - b) ** 2).mean())
    opt = MeZO([w], lr=2e-3, eps=1e-3, seed=0)
    for _ in range(2000):
        opt.step(lambda: ((A @ w - b) ** 2).mean())
    end = float(((A @ w.detach() - b) ** 2).mean())
    assert end < 0.01 * start


def test_converges_classification(device):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 8, generator=g)
    y = (X @ torch.randn(8, generator=g) > 0).long()
    X, y = X.to(device), y.to(device)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).to(device)
    opt = MeZO(model.parameters(), lr=5e-3, eps=1e-3, n_samples=2, seed=0)
    loss_fn = torch.nn.CrossEntropyLoss()
    with torch.no_grad():
        start = float(loss_fn(model(X), y))
    for _ in range(800):
        opt.step(lambda: loss_fn(model(X), y))
    acc = (model(X).argmax(1) == y).float().mean().item()
    with torch.no_grad():
        assert float(loss_fn(model(X), y)) < 0.6 * start
    assert acc > 0.85


def test_non_differentiable_objective():
    """Any objective works: here the negative accuracy of a linear classifier."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 5, generator=g)
    y = (X @ torch.randn(5, generator=g) > 0).float()
    w = torch.nn.Parameter(torch.zeros(5))
    opt = MeZO([w], lr=1e-1, eps=5e-2, seed=1)
    for _ in range(300):
        opt.step(lambda: -((X @ w > 0).float() == y).float().mean())
    assert ((X @ w > 0).float() == y).float().mean() > 0.8


@pytest.mark.parametrize("exact_restore", [True, False])
@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_closure_exception_restores(device, fail_at, exact_restore):
    params = make_params(device, torch.float64)
    base = [p.detach().clone() for p in params]
    opt = MeZO(params, lr=1e-1, n_samples=2, seed=0, exact_restore=exact_restore)
    count = [0]

    def closure():
        count[0] += 1
        if count[0] == fail_at:
            raise KeyError("boom")
        return objective(params)

    with pytest.raises(KeyError):
        opt.step(closure)
    for p, b in zip(params, base):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=1e-14)
    assert opt.log == []


@pytest.mark.parametrize("exact_restore", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_skips(device, bad, exact_restore):
    params = make_params(device, torch.float64)
    base = [p.detach().clone() for p in params]
    opt = MeZO(params, lr=1e-1, seed=0, exact_restore=exact_restore)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(lambda: torch.tensor(bad))
    assert opt.skipped_steps == 1 and opt.log == []
    for p, b in zip(params, base):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=1e-14)


@pytest.mark.parametrize("at", [1, 2], ids=["L+", "L-"])
@pytest.mark.parametrize("bad", ["1.0", True, torch.tensor(True), torch.ones(3), 1 + 2j,
                                 torch.tensor(1 + 2j), None],
                         ids=["str", "bool", "bool-tensor", "3-elements", "complex",
                              "complex-tensor", "None"])
def test_bad_loss_refused_and_restored(bad, at):
    """A closure result that is not a real scalar is refused (a string is not parsed, a bool is
    not 0/1); the parameters come back, the generator draws nothing, nothing is logged."""
    params = make_params("cpu", torch.float64)
    base = [p.detach().clone() for p in params]
    opt = MeZO(params, lr=1e-1, seed=0)
    gen = opt._generator.get_state()
    count = [0]

    def closure():
        count[0] += 1
        return bad if count[0] == at else objective(params)

    with pytest.raises(TypeError, match="scalar loss"):
        opt.step(closure)
    for p, b in zip(params, base):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=1e-14)
    assert opt.log == [] and torch.equal(opt._generator.get_state(), gen)


def test_bad_arguments():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="lr"):
        MeZO([p], lr=-1.0)
    with pytest.raises(ValueError, match="eps"):
        MeZO([p], eps=0.0)
    with pytest.raises(ValueError, match="weight_decay"):
        MeZO([p], weight_decay=-1.0)
    with pytest.raises(ValueError, match="n_samples"):
        MeZO([p], n_samples=0)
    with pytest.raises(TypeError, match="exact_restore"):
        MeZO([p], exact_restore="no")
    with pytest.raises(ValueError, match="eps"):
        MeZO([{"params": [p], "eps": -1.0}])
    with pytest.raises(TypeError, match="closure"):
        MeZO([p]).step(None)


@pytest.mark.parametrize("bad", ["noncontig", "complex", "sparse"])
def test_bad_parameter_leaves_model_untouched(bad):
    good = torch.nn.Parameter(torch.randn(10))
    if bad == "noncontig":
        other = torch.nn.Parameter(torch.randn(4, 6).t())
    elif bad == "complex":
        other = torch.nn.Parameter(torch.randn(6, dtype=torch.complex64))
    else:
        other = torch.nn.Parameter(torch.randn(4, 4).to_sparse())
    before = good.detach().clone()
    opt = MeZO([good, other], lr=1.0, seed=0)
    with pytest.raises(ValueError, match="parameter 1"):
        opt.step(lambda: 1.0)
    assert torch.equal(good.detach(), before)


@pytest.mark.parametrize("exact_restore", [True, False])
def test_resume_is_bit_identical(tmp_path, exact_restore):
    A, b = least_squares("cpu")
    w1 = torch.nn.Parameter(torch.zeros(A.shape[1]))
    opt1 = MeZO([w1], lr=1e-3, n_samples=2, seed=5, exact_restore=exact_restore)
    closure1 = lambda: ((A @ w1 - b) ** 2).mean()  # noqa: E731
    for _ in range(5):
        opt1.step(closure1)
    torch.save({"w": w1.detach().clone(), "opt": opt1.state_dict()}, tmp_path / "ckpt.pt")
    for _ in range(5):
        opt1.step(closure1)

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    w2 = torch.nn.Parameter(ckpt["w"])
    # a different seed and restore mode: the checkpoint wins
    opt2 = MeZO([w2], lr=1e-3, n_samples=2, seed=999, exact_restore=not exact_restore)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.exact_restore == exact_restore
    for _ in range(5):
        opt2.step(lambda: ((A @ w2 - b) ** 2).mean())
    assert torch.equal(w1.detach(), w2.detach())
    assert opt1.log == opt2.log


def test_lr_scheduler_and_log():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = MeZO([p], lr=1.0, seed=0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(5):
        opt.step(lambda: (p - 1).pow(2).sum())
        sched.step()
    assert [e.lrs[0] for e in opt.log] == [1.0, 1.0, 0.5, 0.5, 0.25]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_replay(device, dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.ReLU(), torch.nn.Linear(9, 1)).to(device, dtype)
    base = [p.detach().clone() for p in model.parameters()]
    X = torch.randn(32, 6, device=device, dtype=dtype)
    y = torch.randn(32, 1, device=device, dtype=dtype)
    groups = [{"params": [model[0].weight, model[2].weight], "weight_decay": 0.01},
              {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0}]
    # a float32 loss and an eps above bfloat16's resolution: a bfloat16 loss can round L+ and L-
    # to the same value, so that no step moves (seen with the 16-thread CPU kernels of a GPU box)
    opt = MeZO(groups, lr=1e-2, eps=1e-3 if dtype == torch.float32 else 2e-2, n_samples=2, seed=0)
    for _ in range(30):
        opt.step(lambda: ((model(X).float() - y.float()) ** 2).mean())
    buf = io.BytesIO()
    torch.save(opt.state_dict()["mezo"]["log"], buf)  # the whole fine-tune, in kilobytes
    buf.seek(0)
    log = torch.load(buf, weights_only=True)

    copies = [b.clone() for b in base]
    replay([{"params": copies[0::2]}, {"params": copies[1::2]}], log)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for c, p in zip(copies, model.parameters()):
        torch.testing.assert_close(c, p.detach(), rtol=tol, atol=tol)
    # and it did move away from the base weights
    assert any(not torch.equal(c, b) for c, b in zip(copies, base))


def test_replay_checks_groups():
    p = torch.nn.Parameter(torch.zeros(3))
    q = torch.nn.Parameter(torch.zeros(3))
    opt = MeZO([{"params": [p]}, {"params": [q]}], lr=0.1, seed=0)
    opt.step(lambda: (p + q).sum())
    with pytest.raises(ValueError, match="parameter groups"):
        replay([torch.zeros(3), torch.zeros(3)], opt.log)


def test_mixed_dtypes_in_one_optimizer(device):
    a = torch.nn.Parameter(torch.randn(100, device=device, dtype=torch.bfloat16))
    b = torch.nn.Parameter(torch.randn(7, device=device, dtype=torch.float32))
    opt = MeZO([a, b], lr=1e-2, seed=0)
    before = (a.detach().clone(), b.detach().clone())
    opt.step(lambda: a.float().sum() + b.sum())
    assert not torch.equal(a.detach(), before[0]) and not torch.equal(b.detach(), before[1])


# --- data parallel --------------------------------------------------------------------------------

def _ddp_body(rank, world, out_dir):
    A, b = least_squares("cpu", m=64)
    half = slice(rank * 32, (rank + 1) * 32)
    torch.manual_seed(0)
    model = torch.nn.Linear(A.shape[1], 1)
    opt = MeZO(model.parameters(), lr=1e-2, n_samples=2, seed=100 + rank)  # rank 0's seed wins
    for _ in range(10):
        opt.step(lambda: ((model(A[half]).squeeze(1) - b[half]) ** 2).mean())
    torch.save([p.detach() for p in model.parameters()], os.path.join(out_dir, f"rank{rank}.pt"))


def test_data_parallel_two_ranks(tmp_path):
    spawn(_ddp_body, 2, tmp_path)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for a, b in zip(r0, r1):
        assert torch.equal(a, b)  # ranks stay bit-identical

    # one process on the whole batch with rank 0's seed takes the same steps
    A, b = least_squares("cpu", m=64)
    torch.manual_seed(0)
    model = torch.nn.Linear(A.shape[1], 1)
    opt = MeZO(model.parameters(), lr=1e-2, n_samples=2, seed=100)
    for _ in range(10):
        opt.step(lambda: ((model(A).squeeze(1) - b) ** 2).mean())
    for a, p in zip(r0, model.parameters()):
        # the loss differences differ in float32 rounding (mean of half-batch losses vs one
        # full-batch loss), amplified by 1/(2 eps) each step: ~3e-5 after 10 steps
        torch.testing.assert_close(a, p.detach(), rtol=1e-3, atol=1e-4)


def test_replay_with_frozen_parameter():
    a = torch.nn.Parameter(torch.randn(5))
    frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    c = torch.nn.Parameter(torch.randn(4))
    base = [t.detach().clone() for t in (a, frozen, c)]
    opt = MeZO([a, frozen, c], lr=1e-2, seed=0)
    for _ in range(5):
        opt.step(lambda: (a ** 2).sum() + (c ** 3).sum() + frozen.sum())
    replay([base[0], None, base[2]], opt.log)
    torch.testing.assert_close(base[0], a.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(base[2], c.detach(), rtol=1e-6, atol=1e-6)
    assert torch.equal(frozen.detach(), base[1])


# --- every failure loud: group hyperparameters, duplicates, replay's checks -----------------------

@pytest.mark.parametrize("group,key,value", [
    (1, "lr", float("nan")), (0, "lr", float("inf")), (1, "lr", -1e-3), (1, "eps", 0.0),
    (0, "eps", float("nan")), (1, "weight_decay", -0.1), (0, "weight_decay", float("inf")),
])
def test_group_hyperparameters_checked_at_every_step(group, key, value):
    """A group value changed after construction is checked before anything is written: the
    closure is never called, the parameters stay bit for bit, the generator draws nothing."""
    params = make_params("cpu", torch.float32)
    opt = MeZO([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.01}], lr=1e-2,
               seed=0)
    opt.step(lambda: objective(params))
    opt.param_groups[group][key] = value
    before = [p.detach().clone() for p in params]
    gen = opt._generator.get_state()
    calls = []
    with pytest.raises(ValueError, match=rf"MeZO.step: param_groups\[{group}\]\['{key}'\]"):
        opt.step(lambda: calls.append(1) or objective(params))
    assert calls == [] and len(opt.log) == 1
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert torch.equal(opt._generator.get_state(), gen)


def test_scheduler_that_makes_lr_nan_is_refused():
    params = make_params("cpu", torch.float32)
    opt = MeZO(params, lr=1e-2, seed=0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < 2 else float("nan"))
    for _ in range(2):
        opt.step(lambda: objective(params))
        sched.step()
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\]"):
        opt.step(lambda: objective(params))
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


def test_same_parameter_twice_is_refused():
    """torch only warns; MeZO would add the noise twice (and drift at lr 0)."""
    p, q = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="appears twice"):
        MeZO([p, q, p])
    with pytest.raises(ValueError,
                       match=r"appears twice \(param_groups\[1\] and param_groups\[0\]"):
        MeZO([{"params": [p]}, {"params": [q, p]}])
    opt = MeZO([p], lr=0.0, seed=0)
    with pytest.raises(ValueError, match="appears twice"):
        opt.add_param_group({"params": [q, p]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": q, "eps": 1e-2})  # a tensor, as torch accepts
    assert opt.param_groups[1]["params"] == [q] and opt.param_groups[1]["lr"] == 0.0
    # a model whose weights are tied lists them once: fine, and lr 0 restores them
    model = torch.nn.Sequential(torch.nn.Embedding(7, 4), torch.nn.Linear(4, 7, bias=False))
    model[1].weight = model[0].weight
    base = model[0].weight.detach().clone()
    opt = MeZO(model.parameters(), lr=0.0, seed=0)
    x = torch.arange(7)
    for _ in range(3):
        opt.step(lambda: model(x).square().mean())
    torch.testing.assert_close(model[0].weight.detach(), base, rtol=0, atol=1e-6)


def test_replay_refuses_a_mismatch_and_writes_nothing():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 2))
    base = [p.detach().clone() for p in model.parameters()]
    opt = MeZO(model.parameters(), lr=1e-2, seed=0)
    x = torch.randn(8, 6)
    for _ in range(3):
        opt.step(lambda: model(x).square().mean())
    log = opt.state_dict()["mezo"]["log"]
    assert log["layouts"] == [{"group_sizes": [4], "shapes": [[9, 6], [9], [2, 9], [2]],
                               "dtypes": ["float32"] * 4, "trained": [0, 1, 2, 3]}]

    def attempt(params, pattern):
        before = [p.clone() for p in params if p is not None]
        with pytest.raises(ValueError, match=pattern):
            replay(params, log)
        assert all(torch.equal(a, b) for a, b in zip([p for p in params if p is not None], before))

    other = [b.clone() for b in base]
    other[2] = torch.zeros(9, 2)  # a transposed weight: same count, other shape
    attempt(other,
            r"parameter 2 has shape \[9, 2\] but log entry 0 was recorded with shape \[2, 9\]")
    attempt([b.clone() for b in base[:3]], r"sizes \[4\] but params has groups of sizes \[3\]")
    attempt([b.clone() for b in base] + [torch.zeros(2)], "sizes")
    attempt([b.double() for b in base], "dtype float64")
    attempt([base[0].clone(), None, base[2].clone(), base[3].clone()], "parameter 1 is None")
    # the right weights replay (and give the trained model)
    good = [b.clone() for b in base]
    replay(good, log)
    for g, p in zip(good, model.parameters()):
        torch.testing.assert_close(g, p.detach(), rtol=1e-6, atol=1e-7)


def test_replay_old_logs_without_layouts():
    """A log saved before layouts were recorded replays as before (unchecked)."""
    params = make_params("cpu", torch.float32)
    base = [p.detach().clone() for p in params]
    opt = MeZO(params, lr=1e-2, n_samples=2, seed=0)
    for _ in range(4):
        opt.step(lambda: objective(params))
    log = opt.state_dict()["mezo"]["log"]
    old = {k: v for k, v in log.items() if k not in ("layouts", "layout_of_step")}
    a, b, c = ([t.clone() for t in base] for _ in range(3))
    replay(a, log)
    replay(b, old)
    replay(c, [e._replace(layout=None) for e in opt.log])
    assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a, b, c))
    # and an old checkpoint loads
    sd = opt.state_dict()
    sd["mezo"]["log"] = old
    other = MeZO(make_params("cpu", torch.float32), lr=1e-2, n_samples=2, seed=1)
    other.load_state_dict(sd)
    assert [e.layout for e in other.log] == [None] * 4


def test_replay_follows_parameters_frozen_during_training():
    """Each step records which parameters it trained; a parameter frozen for some steps is left
    alone by those steps on replay (given as itself, not None)."""
    params = make_params("cpu", torch.float64)
    base = [p.detach().clone() for p in params]
    opt = MeZO(params, lr=1e-2, seed=0)
    for k in range(7):
        params[1].requires_grad_(not 2 <= k < 5)  # frozen in steps 2, 3, 4
        opt.step(lambda: objective(params))
    layouts = [e.layout for e in opt.log]
    assert layouts[0] is layouts[1] and layouts[2] is layouts[4]  # shared while unchanged
    assert layouts[0].trained == (0, 1, 2, 3) and layouts[2].trained == (0, 2, 3)
    sd = copy.deepcopy(opt.state_dict())
    assert len(sd["mezo"]["log"]["layouts"]) == 2  # each distinct layout stored once
    copies = [b.clone() for b in base]
    replay(copies, sd["mezo"]["log"])
    for c, p in zip(copies, params):
        torch.testing.assert_close(c, p.detach(), rtol=1e-12, atol=1e-12)
    # the log round-trips through the state dict, shared layouts included
    other = MeZO(make_params("cpu", torch.float64), lr=1e-2, seed=1)
    other.load_state_dict(sd)
    assert other.log == opt.log
    assert other.log[0].layout is other.log[1].layout


def test_noise_like_checks_its_arguments():
    t = torch.zeros(5)
    with pytest.raises(TypeError, match="seed"):
        noise_like(t, 1.5, 0)
    with pytest.raises(ValueError, match="index"):
        noise_like(t, 1, 2**32)
    with pytest.raises(ValueError, match="offset"):
        noise_like(t, 1, 0, -1)
    assert torch.equal(noise_like(t, -3, 2**32 - 1, 7), _ops.zo_noise(t, -3, 2**32 - 1, 7))


# --- the reference's weight-decay rule and its released configuration -----------------------------

def test_param_groups_follow_the_reference_no_decay_rule():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)                     # weight: decay; bias: none
            self.self_attn_layer_norm = torch.nn.LayerNorm(4)     # OPT's name: none
            self.input_layernorm = torch.nn.LayerNorm(4)          # Llama's name: none
            self.LayerNorm = torch.nn.LayerNorm(4)                # BERT's name: decay (as the
            self.frozen = torch.nn.Linear(4, 4)                   # reference: case-sensitive)
            self.frozen.requires_grad_(False)

    m = Block()
    groups = param_groups(m, weight_decay=0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [names[id(p)] for p in groups[0]["params"]] == [
        "proj.weight", "LayerNorm.weight"]
    assert [names[id(p)] for p in groups[1]["params"]] == [
        "proj.bias", "self_attn_layer_norm.weight", "self_attn_layer_norm.bias",
        "input_layernorm.weight", "input_layernorm.bias", "LayerNorm.bias"]
    custom = param_groups(m, 0.1, no_decay=("bias", "LayerNorm"))
    assert len(custom[1]["params"]) == 5  # the four biases and LayerNorm.weight

    # one step equals the reference's update with the decay applied by name
    params = [p for g in groups for p in g["params"]]
    base = [p.detach().double().clone() for p in params]
    opt = MeZO(groups, lr=1e-2, eps=1e-3, seed=0)
    x = torch.linspace(-1, 1, 8).reshape(2, 4)

    def loss():
        return (m.input_layernorm(m.self_attn_layer_norm(m.proj(x)))
                + m.LayerNorm(x)).double().square().mean()
    opt.step(loss)
    e = opt.log[0]
    for k, (p, b) in enumerate(zip(params, base)):
        wd = 0.1 if k < len(groups[0]["params"]) else 0.0
        z = noise_like(p, e.seeds[0], k).double()
        expected = b - 1e-2 * (e.projected_grads[0] * z + wd * b)
        torch.testing.assert_close(p.detach().double(), expected, rtol=1e-6, atol=1e-7)


def _tiny_opt_model(dtype):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=32,
                                 word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(cfg).to(dtype)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=48):
        g = torch.Generator().manual_seed(7)
        self.rows = [torch.randint(0, 64, (8,), generator=g) for _ in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


# princeton-nlp/MeZO's released OPT full-parameter MeZO (large_models/README.md, mezo.sh):
# MODE=ft LR=1e-7 EPS=1e-3, --lr_scheduler_type constant, --per_device_train_batch_size 16,
# --load_float16, weight decay left at the Trainer's default 0, 20000 steps (3 here).
REFERENCE_OPT_FT = dict(learning_rate=1e-7, eps=1e-3, weight_decay=0.0,
                        lr_scheduler_type="constant", per_device_train_batch_size=16,
                        dtype=torch.float16)


def _run_mezo_trainer(tmp_path, model, steps, **over):
    transformers = pytest.importorskip("transformers")
    from ftops.integrations import MeZOTrainer

    cfg = {**REFERENCE_OPT_FT, **over}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), learning_rate=cfg["learning_rate"],
        weight_decay=cfg["weight_decay"], lr_scheduler_type=cfg["lr_scheduler_type"],
        per_device_train_batch_size=cfg["per_device_train_batch_size"], max_steps=steps,
        report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
        train_sampling_strategy="sequential", seed=0, dataloader_num_workers=0)
    ds = _Tokens()
    trainer = MeZOTrainer(model=model, args=args, train_dataset=ds,
                          mezo_kwargs={"eps": cfg["eps"]})
    trainer.train()
    bs = cfg["per_device_train_batch_size"]
    batches = [torch.stack(ds.rows[k * bs:(k + 1) * bs]) for k in range(steps)]
    return trainer.mezo, batches


def _reference_mezo_steps(model, log, batches, eps, weight_decay, noise_dtype):
    """princeton-nlp/MeZO's zo_step + zo_update (large_models/trainer.py) in plain PyTorch, in
    the parameters' dtype, with the logged seeds' ftops noise in place of torch.normal's (the
    reference seeds torch's global generator; the noise distribution is the same). Noise ids
    follow ftops.mezo.param_groups' order. Returns the projected gradients."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = [any(s in n for s in ("bias", "layer_norm", "layernorm")) for n, _ in named]
    order = [k for k in range(len(named)) if not no_decay[k]] + \
        [k for k in range(len(named)) if no_decay[k]]
    ids = {k: i for i, k in enumerate(order)}
    model.eval()
    grads = []

    def perturb(seed, scaling_factor):
        for k, (_, p) in enumerate(named):
            z = noise_like(p, seed, ids[k]).to(noise_dtype)
            p.data = p.data + scaling_factor * z * eps

    with torch.no_grad():
        for entry, x in zip(log, batches):
            seed, lr = entry.seeds[0], entry.lrs[0]
            perturb(seed, 1)
            loss1 = model(input_ids=x, labels=x).loss
            perturb(seed, -2)
            loss2 = model(input_ids=x, labels=x).loss
            g = ((loss1 - loss2) / (2 * eps)).item()
            perturb(seed, 1)
            for k, (_, p) in enumerate(named):
                z = noise_like(p, seed, ids[k]).to(noise_dtype)
                if not no_decay[k]:
                    p.data = p.data - lr * (g * z + weight_decay * p.data)
                else:
                    p.data = p.data - lr * (g * z)
            grads.append(g)
    return grads


@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["released", "with-decay"])
def test_reference_configuration_float64_matches_the_reference_algorithm(tmp_path, weight_decay):
    """The released OPT configuration through MeZOTrainer (which builds the MeZO as the
    reference's trainer: lr and weight decay from the arguments, no decay on names with
    bias/layer_norm/layernorm, a constant schedule) takes the reference's steps. In float64, so
    that the comparison is tight; weight decay 0.1 exercises the no-decay rule."""
    model = _tiny_opt_model(torch.float64)
    ref = copy.deepcopy(model)
    base = [p.detach().clone() for p in model.parameters()]
    mezo, batches = _run_mezo_trainer(tmp_path, model, 3, weight_decay=weight_decay)
    assert [e.lrs for e in mezo.log] == [(1e-7, 1e-7)] * 3  # constant schedule
    assert [e.eps for e in mezo.log] == [(1e-3, 1e-3)] * 3
    assert [e.weight_decays for e in mezo.log] == [(weight_decay, 0.0)] * 3
    grads = _reference_mezo_steps(ref, mezo.log, batches, 1e-3, weight_decay, torch.float64)
    # transformers computes the loss in float32 and the reference divides by 2 eps in that
    # dtype (ftops in float64): the estimates agree to float32 rounding
    assert [e.projected_grads[0] for e in mezo.log] == pytest.approx(grads, rel=1e-6)
    for (n, p), q, b in zip(model.named_parameters(), ref.parameters(), base):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-13,
                                   msg=lambda m: f"{n}: {m}")
    assert sum(int((p.detach() != b).sum()) for p, b in zip(model.parameters(), base)) > 0


def test_reference_configuration_float16_update_is_below_resolution(tmp_path):
    """What the released configuration implies in its own precision (--load_float16): at lr 1e-7
    the update lr * g * z is below half a float16 ulp for nearly every weight, so the reference's
    float16 passes (+εz, -2εz, +εz, then the update) change the model mostly through the rounding
    of the perturbations (drift), not through the update. ftops restores θ exactly, so its model
    changes where the update (or the settling of a value that a perturbation swamped) moves it:
    far fewer weights than the reference's."""
    model = _tiny_opt_model(torch.float16)
    ref = copy.deepcopy(model)
    base = [p.detach().clone() for p in model.parameters()]
    mezo, batches = _run_mezo_trainer(tmp_path, model, 3)
    assert [e.lrs for e in mezo.log] == [(1e-7, 1e-7)] * 3
    grads = _reference_mezo_steps(ref, mezo.log, batches, 1e-3, 0.0, torch.float16)
    # the same estimates, up to the float16 forwards at perturbations rounded differently
    assert [e.projected_grads[0] for e in mezo.log] == pytest.approx(grads, rel=0.1, abs=0.02)
    total = sum(b.numel() for b in base)
    for entry in mezo.log:
        moved_by_update = 0  # (a bound: a zero weight counts as moved)
        for k, b in enumerate(p for g in mezo.param_groups for p in g["params"]):
            step = (1e-7 * entry.projected_grads[0] * noise_like(b, entry.seeds[0], k)).abs()
            half_ulp = torch.finfo(torch.float16).eps * b.detach().float().abs() / 4
            moved_by_update += int((step >= half_ulp).sum())
        assert moved_by_update < 0.1 * total
    ours = sum(int((p.detach() != b).sum()) for p, b in zip(model.parameters(), base))
    theirs = sum(int((p.detach() != b).sum()) for p, b in zip(ref.parameters(), base))
    assert theirs > 0.3 * total          # the reference's drift reaches a third of the weights
    assert ours < theirs / 3


# --- DDP and FSDP2: bit-exact steps, one all_reduce per step, checkpoints ---------------------------

def _tiny_model():
    torch.manual_seed(0)
    # sizes that shard unevenly over 2 ranks at offsets inside Philox groups and CPU blocks:
    # 37x13 -> rows 19 + 18 (offset 247), 3x37 -> 2 + 1 (offset 74), 1x3 -> 1 + 0 (an empty shard)
    return torch.nn.Sequential(torch.nn.Linear(13, 37), torch.nn.Tanh(), torch.nn.Linear(37, 3),
                               torch.nn.Tanh(), torch.nn.Linear(3, 1))


def _tiny_batch(rows=slice(None)):
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(16, 13, generator=g), torch.randn(16, generator=g)
    return X[rows], y[rows]


def _tiny_groups(params):
    """Weights with decay, biases without: two groups, as users set MeZO up."""
    params = list(params)
    return [{"params": params[0::2]}, {"params": params[1::2], "weight_decay": 0.0}]


def _tiny_opt(params, seed):
    return MeZO(_tiny_groups(params), lr=5e-2, eps=1e-3, weight_decay=0.01, n_samples=2, seed=seed)


def _count_all_reduce(fn):
    """Run fn(); return (its result, [numel of each dist.all_reduce it made])."""
    import torch.distributed as dist

    sizes, real = [], dist.all_reduce

    def counting(tensor, *args, **kwargs):
        sizes.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        return fn(), sizes
    finally:
        dist.all_reduce = real


def _run_with_checkpoint(rank, out_dir, model, params, local, closure, steps=(3, 2)):
    """`steps[0]` steps, a checkpoint (rank 0 writes the optimizer state), `steps[1]` more; then
    a fresh optimizer (other seed) loads the checkpoint on every rank, the weights are put back,
    and the last `steps[1]` steps are taken again. Returns the losses, the all_reduce sizes of
    the steps after the first, and the weights of both runs (through `local`)."""
    import torch.distributed as dist

    opt = _tiny_opt(params, seed=100 + rank)  # rank 0's seed wins
    losses = [float(opt.step(closure))]
    (more, sizes) = _count_all_reduce(lambda: [float(opt.step(closure)) for _ in range(steps[0] - 1)])
    losses += more
    path = os.path.join(out_dir, "opt.pt")
    if rank == 0:
        torch.save(opt.state_dict(), path)
    saved = [local(p).clone() for p in params]
    losses += [float(opt.step(closure)) for _ in range(steps[1])]
    final = [local(p).clone() for p in params]
    dist.barrier()

    opt2 = _tiny_opt(params, seed=999)
    opt2.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        for p, s in zip(params, saved):
            local(p).copy_(s)
    resumed_losses = [float(opt2.step(closure)) for _ in range(steps[1])]
    resumed = [local(p).clone() for p in params]
    return losses, resumed_losses, sizes, final, resumed


def _fsdp_body(rank, world, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = _tiny_model()
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    # the root holds the last layer and keeps FSDP's default (no reshard after forward for the
    # root): MeZO must reshard it, or the next forward reuses the stale gathered weights
    fully_shard(model, mesh=mesh)
    params = list(model.parameters())
    assert all(hasattr(p, "to_local") for p in params)  # DTensors
    X, y = _tiny_batch()  # the same batch on every rank: the loss values are then the same

    def closure():
        return ((model(X).squeeze(1) - y) ** 2).mean()

    losses, resumed_losses, sizes, final, resumed = _run_with_checkpoint(
        rank, out_dir, model, params, lambda p: p.to_local(), closure)
    assert resumed_losses == losses[-2:]
    for a, b in zip(final, resumed):
        assert torch.equal(a, b)  # checkpoint resumed identically
    full = [p.full_tensor() for p in params]
    torch.save({"losses": losses, "sizes": sizes, "full": full,
                "shards": [tuple(p.to_local().shape) for p in params]},
               os.path.join(out_dir, f"fsdp{rank}.pt"))


def _single_process_reference(steps):
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks
    try:
        model = _tiny_model()
        X, y = _tiny_batch()
        opt = _tiny_opt(model.parameters(), seed=100)
        losses = [float(opt.step(lambda: ((model(X).squeeze(1) - y) ** 2).mean())) for _ in range(steps)]
    finally:
        torch.set_num_threads(old)
    return losses, [p.detach() for p in model.parameters()]


def test_fsdp2_matches_single_process_bitwise(tmp_path):
    """MeZO on a model sharded by FSDP2 over 2 gloo ranks takes exactly the steps of one process
    on the unsharded model: same losses, same float32 weights bit for bit, over 5 steps with 2
    samples each, uneven and empty shards included. Both ranks evaluate the same batch, so the
    averaged loss differences equal the single process's (averaging two equal float64 values is
    exact); with different batches the steps would differ only through those scalars."""
    pytest.importorskip("torch.distributed.fsdp")
    spawn(_fsdp_body, 2, tmp_path)
    out = [torch.load(tmp_path / f"fsdp{r}.pt") for r in range(2)]
    assert out[0]["shards"][0::2] == [(19, 13), (2, 37), (1, 3)]  # the weights' shards
    assert out[1]["shards"][0::2] == [(18, 13), (1, 37), (0, 3)]
    ref_losses, ref_params = _single_process_reference(5)
    for o in out:
        assert o["sizes"] == [2, 2]  # one all_reduce of n_samples scalars per step
        assert o["losses"] == ref_losses
        for a, b in zip(o["full"], ref_params):
            assert torch.equal(a, b)
    assert not torch.equal(ref_params[0], _tiny_model()[0].weight.detach())  # it trained


def _ddp_wrapper_body(rank, world, out_dir):
    model = torch.nn.parallel.DistributedDataParallel(_tiny_model())
    params = list(model.parameters())
    X, y = _tiny_batch(slice(8 * rank, 8 * (rank + 1)))  # each rank its own half batch

    def closure():
        return ((model(X).squeeze(1) - y) ** 2).mean()

    losses, resumed_losses, sizes, final, resumed = _run_with_checkpoint(
        rank, out_dir, model, params, lambda p: p.detach(), closure)
    assert resumed_losses == losses[-2:]
    for a, b in zip(final, resumed):
        assert torch.equal(a, b)
    assert sizes == [2, 2]
    torch.save(final, os.path.join(out_dir, f"ddp{rank}.pt"))


def test_ddp_wrapped_model_and_checkpoint(tmp_path):
    """MeZO on a DistributedDataParallel model (2 gloo ranks, each its own half batch): ranks stay
    bit-identical, one all_reduce of n_samples scalars per step, and the optimizer state saved by
    rank 0 and loaded by every rank resumes exactly."""
    spawn(_ddp_wrapper_body, 2, tmp_path)
    r0, r1 = torch.load(tmp_path / "ddp0.pt"), torch.load(tmp_path / "ddp1.pt")
    for a, b in zip(r0, r1):
        assert torch.equal(a, b)
    assert not torch.equal(r0[0], _tiny_model()[0].weight.detach())


def test_dtensor_sharded_on_dim_1_is_refused(tmp_path):
    spawn(_dim1_body, 2, tmp_path)


def _dim1_body(rank, world, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    w = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
    before = w.to_local().clone()
    opt = MeZO([w], lr=0.1, seed=0)
    with pytest.raises(ValueError, match="not a contiguous range"):
        opt.step(lambda: w.to_local().sum())
    assert torch.equal(w.to_local(), before)
