"""GaLoreAdamW and layerwise mode: against galore_torch (PyPI galore-torch), randomized projector
quality on known spectra, non-finite gradients, rank handling, resume, layerwise + accumulation."""
import copy
import importlib.util
import io
import math
import sys
import types
import warnings

import pytest
import torch

import ftops
from ftops.galore import GaLoreAdamW, randomized_basis, svd_basis

PROJ_TYPES = ["std", "reverse_std", "left", "right", "full"]
SHAPES = {"tall": (48, 20), "wide": (20, 48), "square": (32, 32)}
TOL32 = dict(rtol=2e-5, atol=2e-5)


def galore_torch_adamw():
    """galore_torch.adamw.AdamW, loaded without the package __init__ (which imports bitsandbytes)."""
    if "galore_torch.adamw" in sys.modules:
        return sys.modules["galore_torch.adamw"].AdamW
    spec = importlib.util.find_spec("galore_torch")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("galore-torch is not installed")
    pytest.importorskip("transformers")  # galore_torch.adamw imports transformers.utils.versions
    root = list(spec.submodule_search_locations)[0]
    pkg = sys.modules.get("galore_torch")
    if pkg is None:
        pkg = types.ModuleType("galore_torch")
        pkg.__path__ = [root]
        sys.modules["galore_torch"] = pkg
    for name in ("galore_projector", "adamw"):
        s = importlib.util.spec_from_file_location(f"galore_torch.{name}", f"{root}/{name}.py")
        mod = importlib.util.module_from_spec(s)
        sys.modules[f"galore_torch.{name}"] = mod
        s.loader.exec_module(mod)
    return sys.modules["galore_torch.adamw"].AdamW


def has_galore_torch():
    if "galore_torch.adamw" in sys.modules:
        return True
    return importlib.util.find_spec("galore_torch") is not None and \
        importlib.util.find_spec("transformers") is not None


def spectrum_matrix(m, n, sigma, gen, device="cpu"):
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=gen)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=gen)).Q
    return ((U * sigma[:k]) @ V.T).to(device)


def decaying_grads(shape, steps, seed, device):
    """Gradients with a decaying spectrum (well separated top singular values)."""
    gen = torch.Generator().manual_seed(seed)
    k = min(shape)
    sigma = torch.arange(1, k + 1, dtype=torch.float32) ** -1.0
    return [spectrum_matrix(*shape, sigma * (1 + 0.1 * t), gen, device)
            + 1e-3 * torch.randn(shape, generator=gen).to(device) for t in range(steps)]


# --- against galore_torch -------------------------------------------------------------------------

def run_pair(ref_cls, shape, device, steps=20, proj_type="std", rank=8, gap=5, lr=1e-2, wd=0.1,
             correct_bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed + 1)
    w0 = torch.randn(shape, generator=gen).to(device)
    b0 = torch.randn(shape[1], generator=gen).to(device)
    n0 = torch.randn(shape[0], generator=gen).to(device)
    pa = [t.clone().requires_grad_() for t in (w0, b0, n0)]
    pb = [t.clone().requires_grad_() for t in (w0, b0, n0)]
    kw = dict(rank=rank, update_proj_gap=gap, scale=0.25, proj_type=proj_type)
    # the 1-D n0 sits inside the projected group: plain AdamW there too
    groups = lambda ps: [{"params": [ps[0], ps[2]], **kw}, {"params": [ps[1]]}]
    ours = GaLoreAdamW(groups(pa), lr=lr, weight_decay=wd, correct_bias=correct_bias)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups_b = [{"params": [pb[0]], **kw}, {"params": [pb[1], pb[2]]}]
        ref = ref_cls(groups_b, lr=lr, weight_decay=wd, correct_bias=correct_bias)
    grads = decaying_grads(shape, steps, seed, device)
    for t in range(steps):
        gb = torch.randn(shape[1], generator=gen).to(device)
        gn = torch.randn(shape[0], generator=gen).to(device)
        for ps in (pa, pb):
            ps[0].grad, ps[1].grad, ps[2].grad = grads[t].clone(), gb.clone(), gn.clone()
        ours.step()
        ref.step()
    return pa, pb, ours, ref


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_matches_galore_torch(device, proj_type, shape):
    ref_cls = galore_torch_adamw()
    pa, pb, ours, ref = run_pair(ref_cls, SHAPES[shape], device, proj_type=proj_type)
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, **TOL32)
    for a, b in zip(pa, pb):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours.state[a][key], ref.state[b][key], rtol=1e-4, atol=1e-7)
        assert ours.state[a]["step"] == ref.state[b]["step"] == 20
    # same basis as galore_torch's projector
    proj = ref.state[pb[0]]["projector"].ortho_matrix
    st = ours.state[pa[0]]
    if proj_type == "full":
        torch.testing.assert_close(st["proj_left"], proj[0])
        torch.testing.assert_close(st["proj_right"], proj[1])
    else:
        side = "proj_left" if "proj_left" in st else "proj_right"
        assert ("proj_left" in st) != ("proj_right" in st)
        torch.testing.assert_close(st[side], proj)


def test_matches_galore_torch_no_bias_correction(device):
    ref_cls = galore_torch_adamw()
    pa, pb, _, _ = run_pair(ref_cls, (24, 40), device, correct_bias=False, wd=0.0, steps=12)
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, **TOL32)


def test_rank_larger_than_dims_matches_galore_torch_and_warns_once(device):
    ref_cls = galore_torch_adamw()
    with pytest.warns(UserWarning, match="larger than min") as rec:
        pa, pb, ours, _ = run_pair(ref_cls, (12, 20), device, rank=64, steps=6)
    assert sum("larger than min" in str(w.message) for w in rec) == 1
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, **TOL32)
    assert ours.state[pa[0]]["proj_left"].shape == (12, 12)


def test_reverse_std_square_projection_fixed(device):
    """A wide matrix, reverse_std, rank >= rows: the projected gradient is square; galore_torch's
    project_back multiplies on the wrong side there (shape error). Ours projects on the right."""
    m, n = 6, 10
    w = torch.randn(m, n, device=device, requires_grad=True)
    w0 = w.detach().clone()
    opt = GaLoreAdamW([{"params": [w], "rank": 8, "update_proj_gap": 10, "scale": 1.0,
                        "proj_type": "reverse_std"}], lr=0.1)
    g = torch.randn(m, n, device=device)
    w.grad = g
    with pytest.warns(UserWarning, match="larger than min"):
        opt.step()
    st = opt.state[w]
    assert "proj_right" in st and "proj_left" not in st
    P = st["proj_right"]
    assert P.shape == (m, n)
    # first Adam step: N = m/(sqrt(v)+eps) with m = 0.1 R, v = 0.001 R^2
    R = g @ P.T
    N = 0.1 * R / (torch.sqrt(0.001 * R * R) + 1e-6)
    expected = w0 - 0.1 * math.sqrt(0.001) / 0.1 * (N @ P)
    torch.testing.assert_close(w.detach(), expected, **TOL32)
    if has_galore_torch():
        ref_cls = galore_torch_adamw()
        wb = w0.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = ref_cls([{"params": [wb], "rank": 8, "update_proj_gap": 10, "scale": 1.0,
                            "proj_type": "reverse_std"}], lr=0.1)
        wb.grad = g.clone()
        with pytest.raises(RuntimeError):  # the bug this fixes
            ref.step()


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-3, ValueError), (1.5, TypeError),
                                     (True, TypeError), (None, TypeError)])
def test_rank_must_be_positive_int(bad, exc):
    w = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(exc, match="rank"):
        GaLoreAdamW([{"params": [w], "rank": bad}])


@pytest.mark.parametrize("key,value", [("proj_type", "diag"), ("projector", "qr"), ("update_proj_gap", 0)])
def test_bad_group_options(key, value):
    w = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=key):
        GaLoreAdamW([{"params": [w], "rank": 2, key: value}])


# --- randomized projector ---------------------------------------------------------------------------

def energy(basis_left, A):
    return float((basis_left.T @ A).square().sum())


SPECTRA = {
    "poly0.5": lambda k: torch.arange(1, k + 1, dtype=torch.float32) ** -0.5,
    "poly1": lambda k: torch.arange(1, k + 1, dtype=torch.float32) ** -1.0,
    "exp0.01": lambda k: torch.exp(-0.01 * torch.arange(1, k + 1, dtype=torch.float32)),
    "lowrank+noise": lambda k: torch.cat([torch.linspace(10, 1, 16), torch.full((k - 16,), 0.05)]),
}


@pytest.mark.parametrize("spectrum", list(SPECTRA))
@pytest.mark.parametrize("shape,rank", [((256, 512), 24), ((512, 256), 32)])
def test_randomized_captures_energy(device, spectrum, shape, rank):
    gen = torch.Generator().manual_seed(7)
    A = spectrum_matrix(*shape, SPECTRA[spectrum](min(shape)), gen, device)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    best = float(S[:rank].square().sum())
    g = torch.Generator(device=device).manual_seed(0)
    for side in ("left", "right", "full"):
        left, right = randomized_basis(A, rank, side, generator=g)
        if left is not None:
            assert left.shape == (shape[0], rank)
            torch.testing.assert_close(left.T @ left, torch.eye(rank, device=device), atol=1e-4, rtol=0)
            assert energy(left, A) >= 0.99 * best, (side, energy(left, A) / best)
        if right is not None:
            assert right.shape == (rank, shape[1])
            assert energy(right.T, A.T) >= 0.99 * best, (side, energy(right.T, A.T) / best)
        if side == "full":  # the captured bilinear energy ||L^T A R^T||^2, also >= 0.99
            assert float((left.T @ A @ right.T).square().sum()) >= 0.99 * best
    # warm start from the previous basis on a perturbed matrix (cheaper: fewer iterations)
    left, _ = randomized_basis(A, rank, "left", generator=g)
    A2 = A + 0.2 * spectrum_matrix(*shape, SPECTRA[spectrum](min(shape)), gen, device)
    S2 = torch.linalg.svdvals(A2)
    new, _ = randomized_basis(A2, rank, "left", prev_left=left, generator=g)
    assert energy(new, A2) >= 0.99 * float(S2[:rank].square().sum())
    # signs aligned with the previous basis
    assert bool(((new * left).sum(0) >= 0).all())


def test_randomized_beats_a_random_basis(device):
    """Guard against a vacuous energy test: a random basis captures far less."""
    gen = torch.Generator().manual_seed(3)
    A = spectrum_matrix(256, 512, SPECTRA["poly1"](256), gen, device)
    best = float(torch.linalg.svdvals(A)[:16].square().sum())
    rnd = torch.linalg.qr(torch.randn(256, 16, generator=gen).to(device)).Q
    assert energy(rnd, A) < 0.5 * best


def test_optimizer_with_randomized_projector(device):
    shape = (64, 40)
    grads = decaying_grads(shape, 8, 0, device)
    w = torch.zeros(shape, device=device, requires_grad=True)
    opt = GaLoreAdamW([{"params": [w], "rank": 6, "update_proj_gap": 3, "projector": "randomized"}], lr=1e-2)
    for t, g in enumerate(grads):
        w.grad = g.clone()
        opt.step()
        P = opt.state[w]["proj_right"]  # std, tall: right projection, r x n
        assert P.shape == (6, 40)
        torch.testing.assert_close(P @ P.T, torch.eye(6, device=device), atol=1e-4, rtol=0)
        exact = svd_basis(g, 6, "right")[1]
        if t % 3 == 0:  # just refreshed: same subspace as the exact basis (up to rotation)
            torch.testing.assert_close((P @ exact.T).abs().sum(0), torch.ones(6, device=device),
                                       atol=0.05, rtol=0)


# --- non-finite gradients -------------------------------------------------------------------------

def test_nonfinite_grad_skips_refresh_and_step(device):
    shape = (24, 16)
    grads = decaying_grads(shape, 6, 1, device)
    w = torch.randn(shape, device=device, requires_grad=True)
    b = torch.randn(16, device=device, requires_grad=True)
    opt = GaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 2}, {"params": [b]}], lr=1e-2)
    bad = grads[0].clone()
    bad[3, 5] = float("nan")
    # step 0 (a refresh) with a NaN gradient: no basis yet, nothing happens to w; b steps normally
    w.grad, b.grad = bad, torch.ones(16, device=device)
    w0, b0 = w.detach().clone(), b.detach().clone()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert torch.equal(w.detach(), w0) and not torch.equal(b.detach(), b0)
    assert opt.state[w]["step"] == 0 and "proj_right" not in opt.state[w]
    # finite gradients: refresh happens now (retried), then a normal step
    for g in grads[1:3]:
        w.grad = g.clone()
        opt.step()
    assert opt.state[w]["step"] == 2
    basis = opt.state[w]["proj_right"].clone()
    moments = opt.state[w]["exp_avg"].clone()
    # step count 2 is a refresh step: an inf gradient keeps the old basis, skips the update, no new warning
    inf = grads[3].clone()
    inf[0, 0] = float("inf")
    w.grad = inf
    w1 = w.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert torch.equal(opt.state[w]["proj_right"], basis)
    assert torch.equal(opt.state[w]["exp_avg"], moments)
    assert torch.equal(w.detach(), w1) and opt.state[w]["step"] == 2
    w.grad = grads[4].clone()
    opt.step()
    assert opt.state[w]["step"] == 3
    assert not torch.equal(opt.state[w]["proj_right"], basis)  # refreshed on the retry
    assert torch.isfinite(w).all()


# --- state ----------------------------------------------------------------------------------------

def make_model(device, dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Tanh(),
                               torch.nn.Linear(40, 12)).to(device=device, dtype=dtype)


def galore_groups(model, **kw):
    mats = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() != 2]
    return [{"params": mats, "rank": 6, "update_proj_gap": 4, "scale": 0.5, **kw}, {"params": rest}]


def train(model, opt, data, steps):
    for x, y in data[:steps]:
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


def batches(device, n, dtype=torch.float32):
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(16, 24, generator=gen).to(device, dtype), torch.randn(16, 12, generator=gen).to(device, dtype))
            for _ in range(n)]


@pytest.mark.parametrize("projector", ["svd", "randomized"])
@pytest.mark.parametrize("pdtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_resume_equals_uninterrupted(device, projector, pdtype):
    data = batches(device, 14, pdtype)
    m1 = make_model(device, pdtype)
    o1 = GaLoreAdamW(galore_groups(m1, projector=projector), lr=1e-2, weight_decay=0.01)
    train(m1, o1, data, 14)

    m2 = make_model(device, pdtype)
    o2 = GaLoreAdamW(galore_groups(m2, projector=projector), lr=1e-2, weight_decay=0.01)
    train(m2, o2, data, 6)
    buf = io.BytesIO()
    torch.save({"model": m2.state_dict(), "opt": o2.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m3 = make_model(device, pdtype)
    m3.load_state_dict(ck["model"])
    o3 = GaLoreAdamW(galore_groups(m3, projector=projector), lr=1e-2, weight_decay=0.01)
    o3.load_state_dict(ck["opt"])
    for p in m3.parameters():  # moments stay float32 even for bf16 params
        assert o3.state[p]["exp_avg"].dtype == torch.float32
    train(m3, o3, data[6:], 8)
    for a, b in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(m1.parameters(), m3.parameters()):
        for k, v in o1.state[a].items():
            if torch.is_tensor(v):
                assert torch.equal(v, o3.state[b][k]), k
            else:
                assert v == o3.state[b][k]


def test_state_can_be_dropped_per_parameter(device):
    model = make_model(device)
    opt = GaLoreAdamW(galore_groups(model), lr=1e-2)
    data = batches(device, 3)
    train(model, opt, data, 2)
    w = model[0].weight
    assert set(opt.state[w]) == {"step", "exp_avg", "exp_avg_sq", "proj_right"}
    del opt.state[w]
    assert w not in opt.state
    train(model, opt, data[2:], 1)
    assert opt.state[w]["step"] == 1 and opt.state[model[2].weight]["step"] == 3


def test_bf16_close_to_f32(device):
    data32 = batches(device, 5)
    m32, m16 = make_model(device), make_model(device, torch.bfloat16)
    o32 = GaLoreAdamW(galore_groups(m32), lr=1e-2)
    o16 = GaLoreAdamW(galore_groups(m16), lr=1e-2)
    train(m32, o32, data32, 5)
    train(m16, o16, [(x.bfloat16(), y.bfloat16()) for x, y in data32], 5)
    for a, b in zip(m32.parameters(), m16.parameters()):
        torch.testing.assert_close(b.float(), a, rtol=0.05, atol=0.02)


# --- every failure loud, and no half-updated model ------------------------------------------------

def _three_groups(device):
    model = make_model(device)
    ps = list(model.parameters())  # w0 (40x24), b0, w2 (12x40), b2
    opt = GaLoreAdamW([{"params": [ps[0]], "rank": 6, "update_proj_gap": 2},
                       {"params": [ps[1], ps[3]]},
                       {"params": [ps[2]], "rank": 4, "update_proj_gap": 2, "proj_type": "left"}],
                      lr=1e-2, weight_decay=0.01)
    return model, ps, opt


def _frozen_copy(ps, opt):
    return ([p.detach().clone() for p in ps], [p.grad.clone() for p in ps],
            copy.deepcopy(opt.state_dict()))


def _assert_bitwise_same(a, b):
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape
        if a.numel():
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_bitwise_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_bitwise_same(x, y)
    else:
        assert a == b or (a != a and b != b)


@pytest.mark.parametrize("key,value,exc", [
    ("lr", float("nan"), ValueError), ("lr", float("inf"), ValueError), ("lr", -1e-3, ValueError),
    ("eps", -1e-8, ValueError), ("weight_decay", float("nan"), ValueError),
    ("weight_decay", -0.1, ValueError), ("betas", (0.9, 1.0), ValueError),
    ("betas", (float("nan"), 0.999), ValueError), ("rank", 0, ValueError),
    ("update_proj_gap", 0, ValueError), ("proj_type", "diag", ValueError),
    ("scale", float("inf"), ValueError), ("correct_bias", "yes", TypeError),
])
def test_invalid_last_group_changes_nothing(device, key, value, exc):
    """An invalid value set on the last group after construction (by hand or a scheduler) is
    found before the first group is updated: parameters, gradients and state bit for bit."""
    model, ps, opt = _three_groups(device)
    data = batches(device, 3)
    train(model, opt, data, 2)
    x, y = data[2]
    (model(x) - y).square().mean().backward()
    before = _frozen_copy(ps, opt)
    opt.param_groups[2][key] = value
    with pytest.raises(exc, match=rf"GaLoreAdamW.step: param_groups\[2\]\['{key}'\]"):
        opt.step()
    opt.param_groups[2][key] = before[2]["param_groups"][2][key]
    _assert_bitwise_same(before, _frozen_copy(ps, opt))
    opt.step()  # and with the value put back it steps


def test_failing_refresh_changes_nothing(device, monkeypatch):
    """Every new basis of a refresh step is computed before the first update: a projector that
    fails on the last parameter leaves the model, moments and bases as they were."""
    model, ps, opt = _three_groups(device)
    data = batches(device, 3)
    train(model, opt, data, 2)  # the next step (step count 2) refreshes both projected weights
    x, y = data[2]
    (model(x) - y).square().mean().backward()
    before = _frozen_copy(ps, opt)
    real = ftops.galore.svd_basis

    def failing(grad, rank, side):
        if grad.shape == ps[2].shape:
            raise torch.linalg.LinAlgError("svd did not converge")
        return real(grad, rank, side)
    monkeypatch.setattr(ftops.galore, "svd_basis", failing)
    with pytest.raises(torch.linalg.LinAlgError, match="converge"):
        opt.step()
    _assert_bitwise_same(before, _frozen_copy(ps, opt))
    monkeypatch.setattr(ftops.galore, "svd_basis", real)
    opt.step()
    assert opt.state[ps[2]]["step"] == 3


def test_same_parameter_twice_is_refused():
    """torch only warns; GaLore would step the shared moments twice."""
    w, b = torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match="appears twice"):
        GaLoreAdamW([{"params": [w, w], "rank": 2}])
    with pytest.raises(ValueError, match="appears twice"):
        GaLoreAdamW([{"params": [w], "rank": 2}, {"params": [b, w]}])
    opt = GaLoreAdamW([w])
    with pytest.raises(ValueError, match="appears twice"):
        opt.add_param_group({"params": [b, w], "rank": 2})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="same tensor"):
        ftops.layerwise([w, b, w], lambda p: GaLoreAdamW([p]))


def test_load_state_dict_refuses_a_foreign_or_malformed_state():
    """Checked at load time, naming what differs, and nothing is loaded (the full table is in
    tests/test_probe.py)."""
    model = make_model("cpu")
    opt = GaLoreAdamW(galore_groups(model), lr=1e-2)
    train(model, opt, batches("cpu", 2), 2)
    good = copy.deepcopy(opt.state_dict())
    adamw = torch.optim.AdamW([{"params": [model[0].weight, model[2].weight]},
                               {"params": [model[0].bias, model[2].bias]}])
    (model(torch.randn(3, 24)).square().mean()).backward()
    adamw.step()
    with pytest.raises(ValueError, match="correct_bias"):
        opt.load_state_dict(adamw.state_dict())
    bad = copy.deepcopy(good)
    bad["state"][0]["exp_avg"] = torch.zeros(40, 24)  # a full-size moment for a projected weight
    with pytest.raises(ValueError,
                       match=r"exp_avg'\] has shape \[40, 24\] but must have shape \[40, 6\]"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(good)
    bad["param_groups"][0]["rank"] = 3  # the saved basis and moments are rank 6
    with pytest.raises(ValueError,
                       match=r"proj_right'\] has shape \[6, 24\] but must have shape \[3, 24\]"):
        opt.load_state_dict(bad)
    _assert_bitwise_same(good, opt.state_dict())
    opt.load_state_dict(good)  # the real one loads


# --- layerwise: a backward pass that raises -------------------------------------------------------

class _Fail(torch.autograd.Function):
    """Identity forward; its backward raises (a stand-in for running out of memory)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("CUDA out of memory (simulated)")


def _layerwise_run(device, accum, schedule):
    """Trains a layerwise model on `schedule`: a list of (batch index, fail) where fail is None,
    "loss" (the backward raises before any parameter gets its gradient) or "middle" (after the
    last layer's parameters got theirs). Returns the model and the Layerwise."""
    data = batches(device, 12)
    model = make_model(device)
    lw = ftops.layerwise(model, make_optimizer, accumulation_steps=accum)
    for i, fail in schedule:
        x, y = data[i]
        if fail == "middle":
            out = model[2](_Fail.apply(model[1](model[0](x))))
        else:
            out = model(x)
        loss = (out - y).square().mean().div(accum)
        if fail == "loss":
            loss = _Fail.apply(loss)
        if fail is None:
            loss.backward()
        elif fail == "loss":  # no gradient reached a parameter: nothing to recover
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                with pytest.raises(RuntimeError, match="simulated"):
                    loss.backward()
        else:
            with pytest.warns(RuntimeWarning, match="backward pass raised"):
                with pytest.raises(RuntimeError, match="simulated"):
                    loss.backward()
            assert all(p.grad is None for p in model.parameters())
    return model, lw


@pytest.mark.parametrize("accum,failing,fail,skipped", [
    (1, 2, "loss", [2]),            # a lost step
    (3, 4, "middle", [3, 4]),       # mid-window: the window so far is dropped, partial grads too
    (3, 3, "loss", [3]),            # first micro-batch of a window
])
def test_layerwise_recovers_after_a_failed_backward(device, accum, failing, fail, skipped):
    """After a backward pass raises, training goes on as if its window had not been there."""
    n = 9 + len(skipped)
    with_failure = [(i, fail if i == failing else None) for i in range(n)]
    without = [(i, None) for i in range(n) if i not in skipped]
    m1, lw1 = _layerwise_run(device, accum, with_failure)
    m2, lw2 = _layerwise_run(device, accum, without)
    assert lw1.failed_backwards == (fail == "middle") and lw2.failed_backwards == 0
    assert lw1.num_steps == lw2.num_steps == 9 // accum
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_layerwise_failure_in_the_last_micro_batch_keeps_earlier_steps(device):
    """accumulation_steps=1: parameters whose gradient was complete before the failure were
    stepped during the failed pass; they keep that update, the others lose the step, and the
    next backward passes train normally."""
    data = batches(device, 3)
    model = make_model(device)
    lw = ftops.layerwise(model, make_optimizer)
    last = [p.detach().clone() for p in model[2].parameters()]
    first = [p.detach().clone() for p in model[0].parameters()]
    x, y = data[0]
    with pytest.warns(RuntimeWarning, match=r"2 parameter\(s\) had already been stepped"):
        with pytest.raises(RuntimeError, match="simulated"):
            (model[2](_Fail.apply(model[1](model[0](x)))) - y).square().mean().backward()
    assert all(not torch.equal(p, q) for p, q in zip(model[2].parameters(), last))
    assert all(torch.equal(p, q) for p, q in zip(model[0].parameters(), first))
    assert [lw.state[p]["step"] for p in model[2].parameters()] == [1, 1]
    for x, y in data[1:]:
        (model(x) - y).square().mean().backward()
    assert lw.num_steps == 2
    assert [lw.state[p]["step"] for p in model.parameters()] == [2, 2, 3, 3]


# --- galore_torch's released configuration, side by side ------------------------------------------

def _tiny_llama(dtype):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=384,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def _released_groups(model, **galore):
    """torchrun_main.py's grouping: the weights of the Linear modules whose names contain "attn"
    or "mlp" are projected, everything else is a plain group (listed first)."""
    projected = [m.weight for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and any(k in n for k in ("attn", "mlp"))]
    ids = {id(p) for p in projected}
    regular = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": regular}, {"params": projected, **galore}]


# jiaweizzhao/GaLore scripts/benchmark_c4/llama_60m.sh (and the other C4 scripts): GaLore-AdamW
# with rank 128, update_proj_gap 200, galore_scale 0.25, proj_type std (the default), lr 0.01,
# weight decay 0, bfloat16 weights.
RELEASED = dict(rank=128, update_proj_gap=200, scale=0.25, proj_type="std")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_released_configuration_side_by_side_with_galore_torch(dtype):
    """The released configuration on a small Llama (hidden 256, so that rank 128 projects) with
    ftops and with galore_torch from the same weights and batches: the same steps (float32: to
    float32 rounding; bfloat16: galore_torch keeps its moments in bfloat16, ftops in float32, so
    the weights agree to bfloat16 resolution)."""
    ref_cls = galore_torch_adamw()
    m1, m2 = _tiny_llama(dtype), _tiny_llama(dtype)
    ours = GaLoreAdamW(_released_groups(m1, **RELEASED), lr=0.01, weight_decay=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = ref_cls(_released_groups(m2, **RELEASED), lr=0.01, weight_decay=0.0)
    gen = torch.Generator().manual_seed(3)
    base = [p.detach().clone() for p in m1.parameters()]
    for _ in range(4):
        x = torch.randint(0, 64, (4, 16), generator=gen)
        for m, opt in ((m1, ours), (m2, ref)):
            m(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{n}: {m}")
    w = m1.model.layers[0].self_attn.q_proj.weight
    assert ours.state[w]["proj_right"].shape == (128, 256)  # std, square: the right side
    assert all(not torch.equal(a, b) for a, b in zip(m1.parameters(), base))


# --- layerwise ------------------------------------------------------------------------------------

def make_optimizer(p):
    if p.dim() == 2:
        return GaLoreAdamW([{"params": [p], "rank": 6, "update_proj_gap": 4, "scale": 0.5}],
                           lr=1e-2, weight_decay=0.01)
    return GaLoreAdamW([p], lr=1e-2, weight_decay=0.01)


def lr_lambda(step):
    return 1.0 / (1 + step)


@pytest.mark.parametrize("accum", [1, 3])
def test_layerwise_accumulation_equals_plain(device, accum):
    data = batches(device, 4 * accum)
    ref = make_model(device)
    opt = GaLoreAdamW(galore_groups(ref), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    model = make_model(device)
    lw = ftops.layerwise(model, make_optimizer, accumulation_steps=accum,
                         make_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda))
    grads_seen = []
    for o in lw.optimizers:  # when any inner optimizer steps, only its own gradient exists
        o.register_step_pre_hook(
            lambda o, a, k: grads_seen.append(sum(p.grad is not None for p in model.parameters())))
    for w in range(4):
        for k in range(accum):
            x, y = data[w * accum + k]
            (model(x) - y).square().mean().div(accum).backward()
            (ref(x) - y).square().mean().div(accum).backward()
            if k < accum - 1:  # not stepped yet: gradients accumulate
                assert all(p.grad is not None for p in model.parameters())
        opt.step()
        opt.zero_grad()
        sched.step()
        assert all(p.grad is None for p in model.parameters())
        for a, b in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert lw.num_steps == 4
    # last micro-batch: each parameter's gradient is freed as soon as it is used, so the count
    # of live gradients falls by one per inner step (accum=1: only one gradient ever exists)
    n = len(list(model.parameters()))
    assert grads_seen == ([1] * n if accum == 1 else list(range(n, 0, -1))) * 4
    assert all(s.last_epoch == 4 for s in lw.schedulers)  # once per window, not per micro-batch
    assert all(g["lr"] == opt.param_groups[0]["lr"] for g in lw.param_groups)


def test_layerwise_combined_scheduler(device):
    data = batches(device, 6)
    ref = make_model(device)
    opt = GaLoreAdamW(galore_groups(ref), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model = make_model(device)
    lw = ftops.layerwise(model, make_optimizer, accumulation_steps=2)
    lw_sched = torch.optim.lr_scheduler.StepLR(lw, step_size=1, gamma=0.5)
    for w in range(3):
        for k in range(2):
            x, y = data[2 * w + k]
            (model(x) - y).square().mean().div(2).backward()
            (ref(x) - y).square().mean().div(2).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        lw.step()
        lw_sched.step()
        assert {g["lr"] for g in lw.param_groups} == {opt.param_groups[0]["lr"]} == {1e-2 * 0.5 ** (w + 1)}
        for a, b in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_layerwise_param_missing_from_last_microbatch(device):
    """A parameter with gradients early in the window but none in its last micro-batch is still
    stepped once, with what it accumulated."""
    a1 = torch.nn.Linear(8, 8).to(device)
    a2 = torch.nn.Linear(8, 8).to(device)
    b1, b2 = copy.deepcopy(a1), copy.deepcopy(a2)
    lw = ftops.layerwise(list(a1.parameters()) + list(a2.parameters()), make_optimizer, accumulation_steps=2)
    opt = GaLoreAdamW(galore_groups(torch.nn.Sequential(b1, b2)), lr=1e-2, weight_decay=0.01)
    x = torch.randn(4, 8, device=device)
    a2(a1(x)).sum().backward()
    b2(b1(x)).sum().backward()
    a1(x).sum().backward()  # last micro-batch: a2 gets no gradient
    b1(x).sum().backward()
    opt.step()
    assert all(p.grad is None for p in list(a1.parameters()) + list(a2.parameters()))
    for p, q in zip(list(a1.parameters()) + list(a2.parameters()), list(b1.parameters()) + list(b2.parameters())):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert lw.optimizer_for(a2.weight).state[a2.weight]["step"] == 1


def test_layerwise_state_dict_and_drop(device):
    model = make_model(device)
    lw = ftops.layerwise(model, make_optimizer)
    data = batches(device, 2)
    for x, y in data:
        (model(x) - y).square().mean().backward()
    w = model[0].weight
    assert lw.state[w]["step"] == 2 and len(lw.state) == 4
    sd = lw.state_dict()
    del lw.state[w]
    assert w not in lw.optimizer_for(w).state
    lw.load_state_dict(sd)
    assert lw.state[w]["step"] == 2


def test_layerwise_bad_args():
    model = make_model("cpu")
    with pytest.raises(ValueError, match="accumulation_steps"):
        ftops.layerwise(model, make_optimizer, accumulation_steps=0)
    with pytest.raises(ValueError, match="exactly"):
        ftops.layerwise(model, lambda p: GaLoreAdamW(model.parameters()))


def test_chunked_fused_calls_give_the_same_result(device, monkeypatch):
    """Projected gradients are batched into fused calls of bounded size; any batching is equal."""
    data = batches(device, 5)
    m1, m2 = make_model(device), make_model(device)
    o1 = GaLoreAdamW(galore_groups(m1, proj_type="full"), lr=1e-2, weight_decay=0.01)
    o2 = GaLoreAdamW(galore_groups(m2, proj_type="full"), lr=1e-2, weight_decay=0.01)
    train(m1, o1, data, 5)
    monkeypatch.setattr(ftops.galore, "_FLUSH_NUMEL", 1)  # one fused call per parameter
    train(m2, o2, data, 5)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
