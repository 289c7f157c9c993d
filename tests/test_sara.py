"""ftops.sddmm and the SaRA optimizer (ftops.SaRA, ftops.sara).

sddmm against dense ``dY^T X`` gathered (float64), odd shapes, empty/full index sets, int32/int64,
bad inputs, opcheck, hypothesis over shapes. SaRA: value gradients equal the dense gradients
gathered (Linear and Conv), the model holds ``W0 + delta`` after every step (so its state_dict is
the fine-tuned model), the update equals torch AdamW on the delta (float64), the nuclear-norm
gradient reaches the values, progressive reselection, delta/load round trip bit for bit, exact
resume from state_dict, the reference's options (scope="all", decay towards zero, nuclear norm of
the weights, Adam reset at reselection) and its released configuration, and the hostile-input
probe (TestSaRAHostileInputs): every public entry point with bad arguments, faults and foreign
state, each failing loudly and changing nothing.
"""
import copy
import math
import os

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import ftops
from ftops import sara as sara_mod

from _dist import spawn

# --- sddmm ------------------------------------------------------------------------------------------

SDDMM_TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=2e-2),
    torch.bfloat16: dict(rtol=3e-2, atol=8e-2),
}


def _inputs(T, m, n, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(T, m, generator=g, dtype=torch.float64).to(dtype).to(device)
    x = torch.randn(T, n, generator=g, dtype=torch.float64).to(dtype).to(device)
    return dy, x


def _indices(m, n, nnz, itype, device, seed=0, sort=True):
    g = torch.Generator().manual_seed(seed + 1)
    flat = torch.randperm(m * n, generator=g)[:nnz]
    if sort:
        flat = flat.sort().values
    return (flat // n).to(itype).to(device), (flat % n).to(itype).to(device), flat


def _ref(dy, x, rows, cols):
    return (dy.double().t() @ x.double())[rows.long(), cols.long()]


@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 5, 3), (33, 17, 70), (300, 65, 129), (513, 7, 1)])
@pytest.mark.parametrize("itype", [torch.int32, torch.int64])
def test_sddmm_matches_dense(device, dtype, shape, itype):
    T, m, n = shape
    dy, x = _inputs(T, m, n, dtype, device)
    for nnz in sorted({1, (m * n + 1) // 3, m * n}):
        for sort in (True, False):
            rows, cols, _ = _indices(m, n, nnz, itype, device, seed=nnz, sort=sort)
            out = ftops.sddmm(dy, x, rows, cols)
            assert out.dtype == dtype and out.shape == (nnz,) and out.device == dy.device
            torch.testing.assert_close(out.double().cpu(), _ref(dy, x, rows, cols).cpu(),
                                       **SDDMM_TOL[dtype])


def test_sddmm_full_set_equals_gemm(device):
    dy, x = _inputs(257, 19, 23, torch.float64, device)
    flat = torch.arange(19 * 23, device=device)
    out = ftops.sddmm(dy, x, flat // 23, flat % 23)
    torch.testing.assert_close(out.view(19, 23), dy.t() @ x, rtol=1e-12, atol=1e-12)


def test_sddmm_empty(device):
    dy, x = _inputs(9, 4, 5, torch.float32, device)
    e = torch.empty(0, dtype=torch.int64, device=device)
    assert ftops.sddmm(dy, x, e, e).shape == (0,)
    # T = 0: every output is an empty sum
    rows, cols, _ = _indices(4, 5, 6, torch.int32, device)
    out = ftops.sddmm(dy[:0], x[:0], rows, cols)
    assert torch.equal(out.cpu(), torch.zeros(6))


def test_sddmm_strided_inputs(device):
    dy, x = _inputs(40, 30, 24, torch.float32, device)
    rows, cols, _ = _indices(15, 12, 50, torch.int64, device)
    dys, xs = dy[::2, ::2], x[::2, 1::2]  # non-contiguous views
    out = ftops.sddmm(dys, xs, rows, cols)
    torch.testing.assert_close(out.double(), _ref(dys, xs, rows, cols), **SDDMM_TOL[torch.float32])
    out_t = ftops.sddmm(dy.t().contiguous().t(), x, rows, cols)  # column-major dy
    torch.testing.assert_close(out_t.double(), _ref(dy, x, rows, cols), **SDDMM_TOL[torch.float32])


def test_sddmm_deterministic_over_threads():
    dy, x = _inputs(700, 40, 50, torch.float32, "cpu")
    rows, cols, _ = _indices(40, 50, 900, torch.int32, "cpu")
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = ftops.sddmm(dy, x, rows, cols)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a, ftops.sddmm(dy, x, rows, cols))


def test_sddmm_errors(device):
    dy, x = _inputs(8, 4, 5, torch.float32, device)
    r = torch.tensor([0, 3], device=device)
    c = torch.tensor([0, 4], device=device)
    with pytest.raises(RuntimeError, match="rows must lie in"):
        ftops.sddmm(dy, x, torch.tensor([0, 4], device=device), c)
    with pytest.raises(RuntimeError, match="rows must lie in"):
        ftops.sddmm(dy, x, torch.tensor([-1, 0], device=device), c)
    with pytest.raises(RuntimeError, match="cols must lie in"):
        ftops.sddmm(dy, x, r, torch.tensor([0, 5], device=device))
    with pytest.raises(RuntimeError, match="same number of rows"):
        ftops.sddmm(dy, x[:7], r, c)
    with pytest.raises(RuntimeError, match="x has dtype"):
        ftops.sddmm(dy, x.double(), r, c)
    with pytest.raises(RuntimeError, match="int32 or int64"):
        ftops.sddmm(dy, x, r.float(), c.float())
    with pytest.raises(RuntimeError, match="cols has dtype"):
        ftops.sddmm(dy, x, r.int(), c)
    with pytest.raises(RuntimeError, match="cols has 1 entries|rows has 2 entries"):
        ftops.sddmm(dy, x, r, c[:1])
    with pytest.raises(RuntimeError, match="dy must be 2-D"):
        ftops.sddmm(dy[0], x, r, c)
    with pytest.raises(RuntimeError, match="supported"):
        ftops.sddmm(dy.int(), x.int(), r, c)


def test_sddmm_opcheck(device):
    dy, x = _inputs(19, 6, 7, torch.float32, device)
    rows, cols, _ = _indices(6, 7, 11, torch.int32, device)
    torch.library.opcheck(torch.ops.ftops.sddmm.default, (dy, x, rows, cols))
    e = torch.empty(0, dtype=torch.int64, device=device)
    torch.library.opcheck(torch.ops.ftops.sddmm.default, (dy, x, e, e))


def test_sddmm_compile():
    dy, x = _inputs(19, 6, 7, torch.float32, "cpu")
    rows, cols, _ = _indices(6, 7, 11, torch.int64, "cpu")
    f = torch.compile(lambda a, b: ftops.sddmm(a, b, rows, cols) * 2, fullgraph=True,
                      backend="eager")
    torch.testing.assert_close(f(dy, x), 2 * ftops.sddmm(dy, x, rows, cols))


@settings(max_examples=25, deadline=None)
@given(T=st.integers(0, 80), m=st.integers(1, 40), n=st.integers(1, 40),
       density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16),
       dt=st.sampled_from([torch.float32, torch.float64]), i64=st.booleans())
def test_sddmm_hypothesis(T, m, n, density, seed, dt, i64):
    dy, x = _inputs(T, m, n, dt, "cpu", seed)
    nnz = int(round(density * m * n))
    rows, cols, _ = _indices(m, n, nnz, torch.int64 if i64 else torch.int32, "cpu", seed)
    out = ftops.sddmm(dy, x, rows, cols)
    torch.testing.assert_close(out.double(), _ref(dy, x, rows, cols), **SDDMM_TOL[dt])


def _csr(m, n, flat, ctype):
    rows = flat // n
    row_ptr = torch.zeros(m + 1, dtype=torch.int64)
    row_ptr[1:] = torch.bincount(rows, minlength=m).cumsum(0)
    return row_ptr, (flat % n).to(ctype)


@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 5, 3), (33, 17, 70), (300, 65, 129), (513, 7, 1),
                                   (1100, 40, 33)])
@pytest.mark.parametrize("ctype", [torch.int16, torch.int32, torch.int64])
def test_sddmm_csr_matches_dense(device, dtype, shape, ctype):
    T, m, n = shape
    dy, x = _inputs(T, m, n, dtype, device)
    for nnz in sorted({0, 1, (m * n + 1) // 3, m * n}):
        _, _, flat = _indices(m, n, nnz, torch.int64, "cpu", seed=nnz)
        flat = flat.sort().values
        row_ptr, cols = _csr(m, n, flat, ctype)
        if nnz > 2:  # any order within a row
            g = torch.Generator().manual_seed(nnz)
            for r in range(m):
                a, b = int(row_ptr[r]), int(row_ptr[r + 1])
                cols[a:b] = cols[a:b][torch.randperm(b - a, generator=g)]
        out = ftops.sddmm_csr(dy, x, row_ptr.to(device), cols.to(device))
        assert out.dtype == dtype and out.shape == (nnz,) and out.device == dy.device
        rows = torch.repeat_interleave(torch.arange(m), row_ptr.diff())
        torch.testing.assert_close(out.double().cpu(), _ref(dy, x, rows, cols.long()).cpu(),
                                   **SDDMM_TOL[dtype])
        # the same as the list form
        if nnz:
            assert torch.equal(out, ftops.sddmm(dy, x, rows.to(device), cols.long().to(device)))


def test_sddmm_unsorted_rows_equal_sorted(device):
    dy, x = _inputs(70, 30, 20, torch.float32, device)
    rows, cols, _ = _indices(30, 20, 200, torch.int64, device, sort=False)
    order = torch.argsort(rows.cpu(), stable=True).to(device)
    out = ftops.sddmm(dy, x, rows, cols)
    assert torch.equal(out[order], ftops.sddmm(dy, x, rows[order], cols[order]))


def test_sddmm_csr_errors():
    dy, x = _inputs(8, 4, 5, torch.float32, "cpu")
    rp = torch.tensor([0, 1, 1, 2, 2])
    c = torch.tensor([0, 4], dtype=torch.int16)
    assert ftops.sddmm_csr(dy, x, rp, c).shape == (2,)
    with pytest.raises(RuntimeError, match="cols must lie in"):
        ftops.sddmm_csr(dy, x, rp, torch.tensor([0, 5], dtype=torch.int16))
    with pytest.raises(RuntimeError, match="non-decreasing"):
        ftops.sddmm_csr(dy, x, torch.tensor([0, 2, 1, 2, 2]), c)
    with pytest.raises(RuntimeError, match="end at"):
        ftops.sddmm_csr(dy, x, torch.tensor([0, 1, 1, 2, 3]), c)
    with pytest.raises(RuntimeError, match="m \\+ 1"):
        ftops.sddmm_csr(dy, x, rp[:-1], c)
    with pytest.raises(RuntimeError, match="int64"):
        ftops.sddmm_csr(dy, x, rp.int(), c)
    with pytest.raises(RuntimeError, match="int16, int32 or int64"):
        ftops.sddmm_csr(dy, x, rp, c.float())
    with pytest.raises(RuntimeError, match="x has dtype"):
        ftops.sddmm_csr(dy, x.double(), rp, c)


def test_sddmm_csr_opcheck(device):
    dy, x = _inputs(19, 6, 7, torch.float32, device)
    _, _, flat = _indices(6, 7, 11, torch.int64, "cpu")
    row_ptr, cols = _csr(6, 7, flat.sort().values, torch.int16)
    torch.library.opcheck(torch.ops.ftops.sddmm_csr.default,
                          (dy, x, row_ptr.to(device), cols.to(device)))



# --- SaRA ---------------------------------------------------------------------------------------

class Net(nn.Module):
    def __init__(self, d_in=80, d_h=96, d_out=72, conv=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1) if conv else None
        self.fc1 = nn.Linear(d_in, d_h)
        self.fc2 = nn.Linear(d_h, d_out, bias=False)
        self.norm = nn.LayerNorm(d_h)

    def forward(self, x, img=None):
        h = torch.relu(self.norm(self.fc1(x)))
        y = self.fc2(h)
        if self.conv is not None and img is not None:
            y = y + self.conv(img).mean()
        return y


class EmbNet(nn.Module):
    """Embedding, Linear with bias, LayerNorm and a head tied to the embedding: every kind of
    parameter the reference trains (scope="all")."""

    def __init__(self, vocab=100, d=72, d_h=80, tied=True):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, d_h)
        self.proj = nn.Linear(d_h, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.norm(self.proj(torch.relu(self.fc(self.emb(ids)))))
        return self.head(h)


def _model(device, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    return Net(**kw).to(device=device, dtype=dtype)


def _emb_model(device, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    m = EmbNet(**kw)
    with torch.no_grad():  # small entries in the biases and norms too, as in a trained model
        m.norm.weight.normal_(0, 0.02)
        m.norm.bias.normal_(0, 0.02)
        m.fc.bias.normal_(0, 0.02)
        m.proj.bias.normal_(0, 0.02)
        m.emb.weight.normal_(0, 0.02)
    return m.to(device=device, dtype=dtype)


def _batch(device, dtype=torch.float32, seed=1, T=(3, 5), d_in=80):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*T, d_in, generator=g).to(device=device, dtype=dtype)


def _ids(device, seed=1, vocab=100):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (4, 7), generator=g).to(device)


def _train(m, opt, x, steps, img=None):
    for _ in range(steps):
        m(x, img).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def _params(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def _equal_nested(a, b, path="state_dict"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _equal_nested(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _equal_nested(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), path


def _snapshot(m, opt):
    return _params(m), copy.deepcopy(opt.state_dict())


def _assert_unchanged(snap, m, opt):
    """Weights, trainable values, moments, index sets, generator: bit for bit as in ``snap``."""
    params, sd = snap
    for n, p in m.named_parameters():
        assert torch.equal(p.detach(), params[n]), n
    _equal_nested(opt.state_dict(), sd)


def _expected_weights(w0, opt):
    """W0 with ``(W0[idx] + delta)`` (rounded once to the weight dtype) at the delta's entries."""
    out = {n: t.clone() for n, t in w0.items()}
    d = opt.delta()
    for n in opt.names:
        idx = d[n + ".sara_indices"].long()
        flat = out[n].view(-1)
        flat[idx] = (flat[idx] + d[n + ".sara_values"]).to(flat.dtype)
    return out


def test_paper_lr_and_defaults():
    m = _model("cpu")
    opt = ftops.SaRA(m, threshold=0.01, lambda_rank=0)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * math.exp(-3.5))
    assert sara_mod.paper_lr(2e-3) == pytest.approx(1e-3 * math.exp(-0.7))
    assert opt.names == ["fc1.weight", "fc2.weight"]
    for p in m.parameters():
        assert not p.requires_grad
    assert all(p.requires_grad for p in opt.param_groups[0]["params"])
    for name, idx in opt.indices().items():
        assert idx.dtype == torch.int32
        w = dict(m.named_parameters())[name]
        assert torch.equal(idx.long(), (w.detach().abs() < 0.01).view(-1).nonzero().squeeze(1))


@pytest.mark.parametrize("conv", [False, True])
def test_value_grads_equal_dense_grads(device, conv):
    torch.manual_seed(0)
    m = _model(device, torch.float64, conv=conv)
    ref = copy.deepcopy(m)
    x = _batch(device, torch.float64)
    img = torch.randn(2, 3, 6, 5, dtype=torch.float64, device=device) if conv else None
    opt = ftops.SaRA(m, fraction=0.3, lr=1e-3, lambda_rank=0)
    (m(x, img) ** 2).sum().backward()
    (ref(x, img) ** 2).sum().backward()
    refp = dict(ref.named_parameters())
    for name, p in zip(opt.names, opt.param_groups[0]["params"]):
        idx = opt.indices()[name].long()
        dense = refp[name].grad.reshape(-1)[idx]
        torch.testing.assert_close(p.grad, dense, rtol=1e-10, atol=1e-12)
    assert "conv.weight" in opt.names if conv else True
    for p in m.parameters():
        assert p.grad is None  # no dense .grad for managed (or any frozen) weights


def test_input_grad_and_forward_unchanged(device):
    m = _model(device)
    ref = copy.deepcopy(m)
    ftops.SaRA(m, fraction=0.2, lr=1e-3)
    x = _batch(device).requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    y, yr = m(x), ref(xr)
    assert torch.equal(y, yr)
    y.sum().backward()
    yr.sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)


def test_model_holds_fine_tuned_weights(device, dtype):
    """After every step each managed weight is W0 + delta at its trainable entries (rounded once,
    as ftops.sara.load computes it) and W0 elsewhere; a plain model loaded from the trained
    model's state_dict computes exactly what the trained model computes."""
    m = _model(device, dtype)
    w0 = _params(m)
    opt = ftops.SaRA(m, fraction=0.1, lr=1e-2, weight_decay=0.1, lambda_rank=1e-3,
                     progressive_iter=2)
    x = _batch(device, dtype)
    for step in range(4):
        m(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        expected = _expected_weights(w0, opt)
        for n, p in m.named_parameters():
            assert torch.equal(p.detach(), expected[n]), (step, n)
        plain = _model(device, dtype)
        plain.load_state_dict(m.state_dict())
        assert torch.equal(plain(x), m(x)), step
    changed = {n for n, p in m.named_parameters() if not torch.equal(p.detach(), w0[n])}
    assert changed == {"fc1.weight", "fc2.weight"}
    for mg in opt._managed:  # the trainable set stays row-compressed with 2-byte columns
        assert mg.cols.dtype == torch.int16 and mg.row_ptr.shape == (mg.weight.shape[0] + 1,)
        assert torch.equal(mg.flat_indices(), opt.indices()[mg.name])
        assert mg.base.dtype == dtype and mg.base.shape == mg.values.shape


def test_save_with_torch_and_reload_plain(device, dtype, tmp_path):
    """torch.save(model.state_dict()) after SaRA training holds the fine-tuned model."""
    m = _model(device, dtype, conv=True)
    img = torch.randn(2, 3, 5, 5, device=device, dtype=dtype)
    pre = copy.deepcopy(m.state_dict())
    opt = ftops.SaRA(m, fraction=0.15, lr=3e-3, lambda_rank=1e-3, weight_decay=0.01)
    x = _batch(device, dtype)
    _train(m, opt, x, 3, img)
    torch.save(m.state_dict(), tmp_path / "model.pt")
    plain = _model(device, dtype, conv=True, seed=5)  # other weights: all must come from the file
    plain.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert torch.equal(plain(x, img), m(x, img))
    fresh = _model(device, dtype, conv=True)
    fresh.load_state_dict(pre)
    sara_mod.load(fresh, opt.delta())  # the compact delta gives the same model
    for (n, a), (_, b) in zip(plain.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), n
    assert any(not torch.equal(v, pre[k]) for k, v in plain.state_dict().items())


def test_matches_adamw_reference_float64(device):
    """SaRA's update == torch AdamW on the delta with the dense gradient gathered."""
    m = _model(device, torch.float64)
    ref = copy.deepcopy(m)
    opt = ftops.SaRA(m, fraction=0.25, lr=1e-2, weight_decay=0.05, lambda_rank=0)
    names, idxs = opt.names, [i.long() for i in opt.indices().values()]
    refp = dict(ref.named_parameters())
    deltas = [torch.zeros(len(i), dtype=torch.float64, device=device, requires_grad=True)
              for i in idxs]
    bases = [refp[n].detach().view(-1)[i].clone() for n, i in zip(names, idxs)]
    ropt = torch.optim.AdamW(deltas, lr=1e-2, weight_decay=0.05)
    x = _batch(device, torch.float64)
    for _ in range(3):
        (m(x) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        (ref(x) ** 2).mean().backward()
        for d, n, i in zip(deltas, names, idxs):
            d.grad = refp[n].grad.view(-1)[i].clone()
            refp[n].grad = None
        ropt.step()
        with torch.no_grad():
            for d, n, i, b in zip(deltas, names, idxs, bases):
                refp[n].view(-1)[i] = b + d
    for n in names:
        torch.testing.assert_close(dict(m.named_parameters())[n], refp[n], rtol=1e-10, atol=1e-13)


def test_nuclear_norm_gradient_reaches_values(device):
    m = _model(device, torch.float64)
    opt = ftops.SaRA(m, fraction=0.5, lr=1e-3, lambda_rank=0.5, modules=["fc1"])
    p = opt.param_groups[0]["params"][0]
    idx = opt.indices()["fc1.weight"]
    with torch.no_grad():
        p.copy_(torch.randn(p.shape, dtype=p.dtype, device=device))
    # reference: autograd through the nuclear norm of the scattered delta
    v = p.detach().clone().requires_grad_(True)
    D = torch.zeros(96 * 80, dtype=torch.float64, device=device).index_put((idx.long(),), v)
    (0.5 * torch.linalg.matrix_norm(D.view(96, 80), ord="nuc")).backward()
    g = sara_mod.nuclear_norm_grad(p.detach(), idx, (96, 80))
    torch.testing.assert_close(0.5 * g, v.grad, rtol=1e-8, atol=1e-10)
    # and step() adds it to the gradient before the update: zero data gradient here
    p.grad = torch.zeros_like(p)
    before = p.detach().clone()
    state_m = opt.state[p]["exp_avg"]
    opt.step()
    assert opt._last_rank_matrix == "fc1.weight"
    torch.testing.assert_close(state_m, 0.1 * v.grad, rtol=1e-10, atol=1e-14)  # (1-beta1) * grad
    assert not torch.equal(p.detach(), before)
    # D = 0 (the start): no gradient, no SVD
    assert sara_mod.nuclear_norm_grad(torch.zeros(5, dtype=torch.float64), idx[:5], (96, 80)) is None


@pytest.mark.parametrize("shape", [(130, 70), (70, 130)])  # tall, and wide (done transposed)
def test_nuclear_norm_grad_tall_wide_and_low_rank(device, shape):
    m, n = shape
    g = torch.Generator().manual_seed(0)
    for flat in (torch.randperm(m * n, generator=g)[:m * n // 5].sort().values,
                 torch.arange(3 * n)):  # only the first 3 rows: rank 3, the rest is null space
        flat = flat.to(device)
        vals = torch.randn(flat.numel(), generator=g, dtype=torch.float64).to(device)
        D = torch.zeros(m * n, dtype=torch.float64, device=device)
        D[flat] = vals
        U, S, Vh = torch.linalg.svd(D.view(m, n), full_matrices=False)
        r = int((S > S[0] * 1e-10).sum())
        ref = (U[:, :r] @ Vh[:r]).reshape(-1)[flat]
        out = sara_mod.nuclear_norm_grad(vals, flat.int(), shape)
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
        out32 = sara_mod.nuclear_norm_grad(vals.float(), flat, shape)
        assert out32.dtype == torch.float32
        torch.testing.assert_close(out32.double(), ref, rtol=1e-3, atol=1e-4)


def test_nuclear_norm_of_the_weights(device):
    """rank_of="weights": the penalty is the nuclear norm of the fine-tuned trainable entries
    (the reference's W ⊙ M), not of the delta; it acts from the first step."""
    m = _model(device, torch.float64)
    opt = ftops.SaRA(m, fraction=0.5, lr=1e-3, lambda_rank=0.5, modules=["fc1"],
                     rank_of="weights")
    p = opt.param_groups[0]["params"][0]
    idx = opt.indices()["fc1.weight"].long()
    entries = m.fc1.weight.detach().reshape(-1)[idx].clone().requires_grad_(True)
    D = torch.zeros(96 * 80, dtype=torch.float64, device=device).index_put((idx,), entries)
    (0.5 * torch.linalg.matrix_norm(D.view(96, 80), ord="nuc")).backward()
    p.grad = torch.zeros_like(p)
    opt.step()  # the delta is zero: rank_of="delta" would add nothing here
    torch.testing.assert_close(opt.state[p]["exp_avg"], 0.1 * entries.grad, rtol=1e-8,
                               atol=1e-12)


def test_nuclear_norm_needs_min_dim_over_64(device):
    m = _model(device, d_in=64, d_h=96, d_out=64)
    opt = ftops.SaRA(m, fraction=0.5, lr=1e-3, lambda_rank=1.0)
    assert [mg.name for mg in opt._eligible_for_rank()] == []
    m(_batch(device, d_in=64)).sum().backward()
    opt.step()
    assert opt._last_rank_matrix is None


def test_progressive_reselection(device):
    m = _model(device)
    w0 = _params(m)
    opt = ftops.SaRA(m, threshold=0.02, lr=5e-3, lambda_rank=0, progressive_iter=3)
    init = {n: i.clone() for n, i in opt.indices().items()}
    x = _batch(device)
    for s in range(5):
        m(x).pow(2).mean().backward()
        opt.step()
        if s == 2:
            delta = opt.delta()  # frozen + active = the initial set, with the values just updated
            params = dict(m.named_parameters())
            shrunk = False
            for n, p in zip(opt.names, opt.param_groups[0]["params"]):
                w = params[n].detach().view(-1)
                i0 = init[n].long()
                assert torch.equal(delta[n + ".sara_indices"].long(), i0)
                vals = delta[n + ".sara_values"]
                now = w0[n].view(-1).clone()  # the fine-tuned weight at the reselection
                now[i0] = now[i0] + vals
                assert torch.equal(w, now)  # the model holds it
                # indices = (|W_now| < thr) ∩ initial, moments carried for the survivors
                expect = i0[now[i0].abs() < 0.02]
                assert torch.equal(opt.indices()[n].long(), expect)
                assert p.shape == expect.shape
                assert opt.state[p]["exp_avg"].shape == expect.shape
                assert int(opt.state[p]["step"]) == 3
                keep = torch.isin(i0, expect)
                assert torch.equal(p.detach(), vals[keep])
                shrunk |= len(expect) < len(i0)
            assert shrunk, "lr too small for the test: nothing left the set"
            w_after = _params(m)
        opt.zero_grad()
    # the dropped entries (and everything outside the set) never change after the reselection
    active = opt.indices()
    for n, p in m.named_parameters():
        w, before = p.detach().view(-1), w_after[n].view(-1)
        frozen = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
        if n in active:
            frozen[active[n].long()] = False
        assert torch.equal(w[frozen], before[frozen]), n
    fresh = _model(device)
    sara_mod.load(fresh, opt.delta())
    for (n, a), (_, b) in zip(m.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n  # round trip still exact after reselection


def test_progressive_reset(device):
    """progressive_reset=True: the survivors' moments and step counts restart at the
    reselection, so the next update is a first AdamW step again."""
    m = _model(device, torch.float64)
    opt = ftops.SaRA(m, threshold=0.02, lr=5e-3, lambda_rank=0, progressive_iter=2,
                     progressive_reset=True)
    x = _batch(device, torch.float64)
    _train(m, opt, x, 2)
    for p in opt.param_groups[0]["params"]:
        st = opt.state[p]
        assert int(st["step"]) == 0 and not st["exp_avg"].any() and not st["exp_avg_sq"].any()
        assert st["exp_avg"].shape == p.shape
    before = [p.detach().clone() for p in opt.param_groups[0]["params"]]
    (m(x) ** 2).mean().backward()
    grads = [p.grad.clone() for p in opt.param_groups[0]["params"]]
    opt.step()
    for b, g, p in zip(before, grads, opt.param_groups[0]["params"]):
        # AdamW's first step: -lr * g / (|g| + eps)
        torch.testing.assert_close(p.detach(), b - 5e-3 * g / (g.abs() + 1e-8), rtol=1e-9,
                                   atol=1e-12)


def test_delta_load_round_trip_bit_exact(device, dtype, tmp_path):
    m = _model(device, dtype, conv=True)
    img = torch.randn(2, 3, 5, 5, device=device, dtype=dtype)
    opt = ftops.SaRA(m, fraction=0.15, lr=3e-3, lambda_rank=1e-3, weight_decay=0.01)
    x = _batch(device, dtype)
    _train(m, opt, x, 3, img)
    assert all(p.dtype == sara_mod.values_dtype(dtype) for p in opt.param_groups[0]["params"])
    delta = opt.delta()
    assert all(isinstance(v, torch.Tensor) for v in delta.values())
    assert delta["fc1.weight.sara_shape"].tolist() == [96, 80]
    torch.save(delta, tmp_path / "d.pt")
    delta = torch.load(tmp_path / "d.pt", weights_only=True)
    fresh = _model(device, dtype, conv=True)
    out = sara_mod.load(fresh, delta)
    assert out is fresh
    y_managed = m(x, img)
    opt.unwrap()
    for (n, a), (_, b) in zip(m.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n
    assert "forward" not in m.fc1.__dict__
    assert all(p.requires_grad for p in m.parameters())
    assert torch.equal(m(x, img), fresh(x, img))
    assert torch.equal(y_managed, fresh(x, img))
    with pytest.raises(RuntimeError, match="unwrapped"):
        opt.step()


@pytest.mark.parametrize("save_at", [1, 3])  # before and after the reselection at step 2
def test_state_dict_resume_exact(device, save_at, tmp_path):
    x = _batch(device)
    kw = dict(threshold=0.02, lr=5e-3, lambda_rank=1e-3, progressive_iter=2)
    m1 = _model(device)
    opt1 = ftops.SaRA(m1, **kw)
    _train(m1, opt1, x, save_at)
    torch.save({"model": m1.state_dict(), "opt": opt1.state_dict()}, tmp_path / "ck.pt")
    _train(m1, opt1, x, 5 - save_at)
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    m2 = _model(device)
    opt2 = ftops.SaRA(m2, **kw)
    m2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    assert opt2.param_groups[0]["sara_step"] == save_at
    _train(m2, opt2, x, 5 - save_at)
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(a, b), n
    _equal_nested(opt1.state_dict(), opt2.state_dict())
    _equal_nested(opt1.delta(), opt2.delta())


def test_load_state_dict_writes_the_fine_tuned_entries(device):
    """The optimizer state alone, loaded into an optimizer on the pretrained model, restores the
    fine-tuned model (active and reselection-frozen entries)."""
    x = _batch(device)
    kw = dict(threshold=0.02, lr=5e-3, lambda_rank=0, progressive_iter=2)
    m1 = _model(device)
    opt1 = ftops.SaRA(m1, **kw)
    _train(m1, opt1, x, 4)
    assert sum(mg.frozen_indices.numel() for mg in opt1._managed) > 0
    m2 = _model(device)
    opt2 = ftops.SaRA(m2, **kw)
    opt2.load_state_dict(copy.deepcopy(opt1.state_dict()))
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(a, b), n


def test_training_reduces_loss(device):
    torch.manual_seed(0)
    m = _model(device)
    opt = ftops.SaRA(m, fraction=0.2, lr=1e-2)
    x = _batch(device)
    target = torch.randn(3, 5, 72, device=device)
    losses = []
    for _ in range(15):
        loss = (m(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_modules_filter_and_names():
    m = _model("cpu", conv=True)
    opt = ftops.SaRA(m, fraction=0.1, lr=1e-3, modules=lambda n, mod: isinstance(mod, nn.Linear))
    assert opt.names == ["fc1.weight", "fc2.weight"]
    assert "forward" not in m.conv.__dict__
    m2 = _model("cpu", conv=True)
    opt2 = ftops.SaRA(m2, fraction=0.1, lr=1e-3, modules=["conv", "fc2"])
    assert opt2.names == ["conv.weight", "fc2.weight"]
    assert opt2.num_trainable() == sum(max(1, round(0.1 * p.numel()))
                                       for p in (m2.conv.weight, m2.fc2.weight))


def test_lr_scheduler_works():
    m = _model("cpu")
    opt = ftops.SaRA(m, fraction=0.1, lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    m(_batch("cpu")).sum().backward()
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)


@pytest.mark.parametrize("kind", ["conv1d_same", "conv2d_reflect_stride", "conv3d_valid",
                                  "conv2d_unbatched_groups"])
def test_conv_variants_grads(device, kind):
    torch.manual_seed(0)
    if kind == "conv1d_same":
        conv, x = nn.Conv1d(4, 6, 4, padding="same", dilation=2), torch.randn(2, 4, 11)
    elif kind == "conv2d_reflect_stride":
        conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, padding_mode="reflect")
        x = torch.randn(2, 3, 7, 6)
    elif kind == "conv3d_valid":
        conv, x = nn.Conv3d(2, 3, 2, padding="valid"), torch.randn(1, 2, 4, 3, 5)
    else:
        conv, x = nn.Conv2d(4, 6, 3, groups=2, padding=1), torch.randn(4, 5, 5)
    conv = conv.to(device=device, dtype=torch.float64)
    x = x.to(device=device, dtype=torch.float64)
    ref = copy.deepcopy(conv)
    opt = ftops.SaRA(conv, fraction=0.4, lr=1e-3, lambda_rank=0)
    xa, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yr = conv(xa), ref(xr)
    torch.testing.assert_close(ya, yr, rtol=1e-12, atol=1e-12)
    (ya.sin().sum()).backward()
    (yr.sin().sum()).backward()
    torch.testing.assert_close(xa.grad, xr.grad, rtol=1e-12, atol=1e-12)
    idx = opt.indices()["weight"].long()
    torch.testing.assert_close(opt.param_groups[0]["params"][0].grad,
                               ref.weight.grad.reshape(-1)[idx], rtol=1e-10, atol=1e-12)


def test_gradient_accumulation(device):
    m = _model(device, torch.float64)
    opt = ftops.SaRA(m, fraction=0.2, lr=1e-3, lambda_rank=0)
    x1, x2 = _batch(device, torch.float64, seed=1), _batch(device, torch.float64, seed=2)
    (m(x1) ** 2).sum().backward()
    (m(x2) ** 2).sum().backward()
    acc = [p.grad.clone() for p in opt.param_groups[0]["params"]]
    opt.zero_grad()
    (m(torch.cat([x1, x2])) ** 2).sum().backward()
    for a, p in zip(acc, opt.param_groups[0]["params"]):
        torch.testing.assert_close(a, p.grad, rtol=1e-10, atol=1e-12)


def test_unwrap_makes_the_model_plain(device):
    m = _model(device)
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    opt = ftops.SaRA(m, fraction=0.2, lr=1e-2, lambda_rank=0)
    x = _batch(device)
    _train(m, opt, x, 2)
    trained, y = _params(m), m(x)
    assert opt.merge() is m  # merge = unwrap: nothing is written, the model holds the update
    for n, p in m.named_parameters():
        assert torch.equal(p.detach(), trained[n]) and p.requires_grad == flags[n], n
    assert torch.equal(m(x), y) and not hasattr(m.fc1, "_ftops_sara")
    assert "forward" not in m.fc1.__dict__ and not hasattr(m.fc1.weight, "_ftops_sara")
    # the module-level unwrap does the same without the optimizer
    m2 = _model(device)
    ftops.SaRA(m2, fraction=0.2, lr=1e-2, scope="all")
    sara_mod.unwrap(m2)
    assert all("forward" not in mod.__dict__ for mod in m2.modules())
    assert not any(hasattr(p, "_ftops_sara") for p in m2.parameters())
    ftops.SaRA(m2, fraction=0.2, lr=1e-2)  # can be managed again


# --- the reference's options and its released configuration --------------------------------------

def test_scope_all_matches_adamw_on_every_parameter(device):
    """scope="all" trains every parameter's entries below the threshold (embedding, biases, norm,
    a tied head), as the reference; the update equals torch AdamW on their deltas with the dense
    gradients gathered (float64)."""
    m = _emb_model(device)
    ref = copy.deepcopy(m)
    opt = ftops.SaRA(m, threshold=2e-2, lr=1e-2, weight_decay=0.05, lambda_rank=0, scope="all")
    assert opt.names == ["emb.weight", "fc.weight", "fc.bias", "proj.weight", "proj.bias",
                         "norm.weight", "norm.bias"]  # head.weight is emb.weight (tied)
    kinds = {mg.name: mg.kind for mg in opt._managed}
    assert kinds["fc.weight"] == "linear" and kinds["emb.weight"] == kinds["fc.bias"] == "dense"
    refp = dict(ref.named_parameters())
    idxs = opt.indices()
    for n, i in idxs.items():
        assert torch.equal(i.long(), (refp[n].detach().abs() < 2e-2).view(-1).nonzero()[:, 0])
    deltas = {n: torch.zeros(len(i), dtype=torch.float64, device=device, requires_grad=True)
              for n, i in idxs.items()}
    bases = {n: refp[n].detach().view(-1)[i.long()].clone() for n, i in idxs.items()}
    ropt = torch.optim.AdamW(list(deltas.values()), lr=1e-2, weight_decay=0.05)
    ids = _ids(device)
    for _ in range(3):
        m(ids).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        ref(ids).pow(2).mean().backward()
        for n, d in deltas.items():
            d.grad = refp[n].grad.view(-1)[idxs[n].long()].clone()
        ref.zero_grad()
        ropt.step()
        with torch.no_grad():
            for n, d in deltas.items():
                refp[n].view(-1)[idxs[n].long()] = bases[n] + d
    for n, p in m.named_parameters():
        torch.testing.assert_close(p, refp[n], rtol=1e-10, atol=1e-13, msg=n)
        assert p.grad is None, n  # the dense gradients were consumed by the step
    assert m.head.weight is m.emb.weight


def _ddp_scope_all_body(rank, world, out_dir):
    from torch.nn.parallel import DistributedDataParallel as DDP
    m = _emb_model("cpu")
    opt = ftops.SaRA(m, threshold=2e-2, lr=1e-2, lambda_rank=1e-3, scope="all", seed=7 * rank)
    ddp = DDP(m)
    n = 4 // world
    ids = _ids("cpu")[rank * n:(rank + 1) * n]
    for _ in range(3):
        ddp(ids).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    torch.save(m.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))


def test_scope_all_under_ddp(tmp_path):
    """scope="all" under DistributedDataParallel: the layers' values are registered (DDP averages
    them), the other parameters' dense gradients are averaged by DDP as themselves, every rank
    takes rank 0's nuclear-norm draws: two ranks on half batches end as one process on the whole
    batch."""
    spawn(_ddp_scope_all_body, 2, tmp_path)
    ref = _emb_model("cpu")
    opt = ftops.SaRA(ref, threshold=2e-2, lr=1e-2, lambda_rank=1e-3, scope="all", seed=0)
    for _ in range(3):
        ref(_ids("cpu")).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    base = _emb_model("cpu").state_dict()
    for r in range(2):
        sd = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(sd[k], v, rtol=1e-9, atol=1e-11, msg=k)
    assert all(not torch.equal(v, base[k]) for k, v in ref.state_dict().items())


def test_decay_towards_zero_matches_adamw_on_the_entries(device):
    """decay_towards="zero": AdamW's decoupled decay acts on the absolute trainable entries (the
    reference's AdamW on W[mask]) instead of on the delta."""
    m = _model(device, torch.float64)
    ref = copy.deepcopy(m)
    opt = ftops.SaRA(m, fraction=0.3, lr=1e-2, weight_decay=0.5, lambda_rank=0,
                     decay_towards="zero")
    names, idxs = opt.names, [i.long() for i in opt.indices().values()]
    refp = dict(ref.named_parameters())
    entries = [refp[n].detach().view(-1)[i].clone().requires_grad_(True)
               for n, i in zip(names, idxs)]
    ropt = torch.optim.AdamW(entries, lr=1e-2, weight_decay=0.5)
    x = _batch(device, torch.float64)
    for _ in range(3):
        (m(x) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        (ref(x) ** 2).mean().backward()
        for e, n, i in zip(entries, names, idxs):
            e.grad = refp[n].grad.view(-1)[i].clone()
            refp[n].grad = None
        ropt.step()
        with torch.no_grad():
            for e, n, i in zip(entries, names, idxs):
                refp[n].view(-1)[i] = e
    for n in names:
        torch.testing.assert_close(dict(m.named_parameters())[n], refp[n], rtol=1e-10, atol=1e-13)


def test_reference_released_configuration():
    """The reference's released run (finetune.sh: threshold 2e-3, lr from the paper's rule,
    lambda_rank 5e-4, re-selection half way, AdamW weight decay 1e-2, default optimizer
    optim/adamw.py) through ftops.sara.REFERENCE on a small model, 8 steps re-selecting at 4:
    every parameter entry below 2e-3 trains (embedding, biases, norms), the lr is
    1e-3 * exp(-0.7), the set shrinks to |W_4| < 2e-3 right after step 4 with the Adam state
    reset, and the dropped entries keep their step-4 values."""
    m = _emb_model("cpu", dtype=torch.float32, tied=False)
    w0 = _params(m)
    opt = ftops.SaRA(m, progressive_iter=4, **sara_mod.REFERENCE)
    g = opt.param_groups[0]
    assert g["lr"] == pytest.approx(1e-3 * math.exp(-350 * 2e-3)) and g["lambda_rank"] == 5e-4
    assert g["weight_decay"] == 1e-2 and opt.decay_towards == "zero"
    assert opt.scope == "all" and opt.rank_of == "weights" and opt.progressive_reset
    init = opt.indices()
    assert set(init) == {n for n, w in w0.items() if (w.abs() < 2e-3).any()}
    assert {"emb.weight", "fc.bias", "norm.weight", "norm.bias", "head.weight"} <= set(init)
    for n, i in init.items():
        assert torch.equal(i.long(), (w0[n].abs() < 2e-3).view(-1).nonzero()[:, 0]), n
    # the nuclear norm's candidates: every managed 2-D matrix with min(m, n) > 64
    assert {mg.name for mg in opt._eligible_for_rank()} == {"emb.weight", "fc.weight",
                                                            "proj.weight", "head.weight"}
    ids = _ids("cpu")
    for s in range(8):
        m(ids).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if s == 3:
            w4 = _params(m)
            shrunk = 0
            for n, i in opt.indices().items():
                i0 = init[n].long()
                assert torch.equal(i.long(), i0[w4[n].view(-1)[i0].abs() < 2e-3]), n
                shrunk += len(i0) - len(i)
            assert shrunk > 0, "nothing left the set: the test does not test the reselection"
            for p in opt.param_groups[0]["params"]:
                assert int(opt.state[p]["step"]) == 0
    active = opt.indices()
    for n, w in m.named_parameters():
        if n not in init:  # no entry below the threshold: never trained
            assert torch.equal(w.detach(), w0[n]), n
            continue
        frozen = torch.zeros(w.numel(), dtype=torch.bool)
        frozen[init[n].long()] = True
        frozen[active[n].long()] = False
        assert torch.equal(w.detach().view(-1)[frozen], w4[n].view(-1)[frozen]), n
        assert not torch.equal(w.detach(), w0[n]), n


# --- the hostile-input probe ----------------------------------------------------------------------

class TestSaRAHostileInputs:
    """Every public SaRA entry point tried as a hostile user would: wrong types, devices, shapes,
    NaN weights and gradients, empty models, duplicates, a failing closure or backward, state
    dicts from elsewhere. Each must raise a clear error naming the argument (or work), and a
    failing call must leave the model, the values and the optimizer state bit-identical."""

    def _trained(self, steps=1, **kw):
        m = _model("cpu")
        opt = ftops.SaRA(m, **{**dict(fraction=0.2, lr=1e-2, lambda_rank=1e-3), **kw})
        _train(m, opt, _batch("cpu"), steps)
        return m, opt

    # -- construction --

    @pytest.mark.parametrize("kw, exc, match", [
        (dict(threshold=0.0), ValueError, "threshold"),
        (dict(threshold=-1.0), ValueError, "threshold"),
        (dict(threshold=float("nan")), ValueError, "threshold"),
        (dict(threshold=float("inf")), ValueError, "threshold"),
        (dict(threshold="0.1"), TypeError, "threshold"),
        (dict(threshold=None), ValueError, "threshold= .* or fraction="),
        (dict(fraction=0.0), ValueError, "fraction"),
        (dict(fraction=1.5), ValueError, "fraction"),
        (dict(fraction=-0.1), ValueError, "fraction"),
        (dict(fraction=float("nan")), ValueError, "fraction"),
        (dict(fraction=True), TypeError, "fraction"),
        (dict(lr=-1e-3), ValueError, "lr"),
        (dict(lr=float("nan")), ValueError, "lr"),
        (dict(lr="fast"), TypeError, "lr"),
        (dict(lambda_rank=-1.0), ValueError, "lambda_rank"),
        (dict(lambda_rank=float("inf")), ValueError, "lambda_rank"),
        (dict(betas=(1.0, 0.999)), ValueError, "betas"),
        (dict(betas=0.9), TypeError, "betas"),
        (dict(eps=-1e-8), ValueError, "eps"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay"),
        (dict(weight_decay=float("nan")), ValueError, "weight_decay"),
        (dict(progressive_iter=0), ValueError, "progressive_iter"),
        (dict(progressive_iter=2.5), TypeError, "progressive_iter"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(max_grad_norm=0.0), ValueError, "max_grad_norm"),
        (dict(register_values="yes"), TypeError, "register_values"),
        (dict(scope="biases"), ValueError, "scope"),
        (dict(decay_towards="one"), ValueError, "decay_towards"),
        (dict(rank_of="both"), ValueError, "rank_of"),
        (dict(progressive_reset=1), TypeError, "progressive_reset"),
        (dict(modules=3), TypeError, "modules"),
        (dict(modules=[1]), TypeError, "modules"),
        (dict(modules=["fc1", "fc1"]), ValueError, "twice"),
        (dict(modules=["nope"]), ValueError, "not a module"),
        (dict(modules=["norm"]), TypeError, "nn.Linear"),
        (dict(modules=[]), ValueError, "no eligible layers"),
        (dict(modules=lambda n, mod: False), ValueError, "no eligible layers"),
        (dict(threshold=1e-12), ValueError, "selects no weight entry"),
    ])
    def test_constructor_arguments(self, kw, exc, match):
        m = _model("cpu")
        before = _params(m)
        with pytest.raises(exc, match=match):
            ftops.SaRA(m, **{**dict(lr=1e-2), **kw})
        for n, p in m.named_parameters():  # the model is left as it was
            assert torch.equal(p.detach(), before[n]) and p.requires_grad, n
        assert all("forward" not in mod.__dict__ for mod in m.modules())

    def test_paper_lr_rule_that_cannot_train_is_refused(self):
        with pytest.raises(ValueError, match="lr=0 for threshold=5.*Pass lr="):
            ftops.SaRA(_model("cpu"), threshold=5)
        with pytest.raises(ValueError, match="too small to train"):
            ftops.SaRA(_model("cpu"), threshold=0.05)
        opt = ftops.SaRA(_model("cpu"), threshold=5, lr=1e-3)  # an explicit lr is taken
        assert opt.param_groups[0]["lr"] == 1e-3
        with pytest.raises(TypeError, match="threshold"):
            sara_mod.paper_lr("2e-3")

    def test_bad_models(self):
        with pytest.raises(TypeError, match="model must be an nn.Module"):
            ftops.SaRA([nn.Linear(3, 3)])
        with pytest.raises(ValueError, match="no eligible layers"):
            ftops.SaRA(nn.Sequential(nn.LayerNorm(4), nn.ReLU()))
        with pytest.raises(ValueError, match="no eligible layers"):
            ftops.SaRA(nn.Sequential(), scope="all")
        m = _model("cpu")
        m.fc1.weight = nn.Parameter(torch.zeros(96, 80, dtype=torch.int8), requires_grad=False)
        with pytest.raises(TypeError, match="fc1.weight has dtype torch.int8"):
            ftops.SaRA(m)
        m = _model("cpu")
        with torch.no_grad():
            m.fc2.weight[3, 4] = float("nan")
        with pytest.raises(ValueError, match="fc2.weight has NaN"):
            ftops.SaRA(m, fraction=0.1, lr=1e-3)
        with torch.device("meta"):
            meta = nn.Linear(4, 4)
        with pytest.raises(ValueError, match="meta device"):
            ftops.SaRA(meta, fraction=0.5, lr=1e-3)
        tied = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        tied[1].weight = tied[0].weight
        with pytest.raises(ValueError, match="shared"):
            ftops.SaRA(tied, fraction=0.5, lr=1e-3)
        ftops.SaRA(tied, fraction=0.5, lr=1e-3, scope="all")  # dense gradient: fine
        m = _model("cpu")
        ftops.SaRA(m, fraction=0.1, lr=1e-3)
        with pytest.raises(ValueError, match="already managed"):
            ftops.SaRA(m, fraction=0.1, lr=1e-3)
        with pytest.raises(ValueError, match="already managed"):
            ftops.SaRA(m, fraction=0.1, lr=1e-3, scope="all")

    @pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
    def test_zero_size_layers_are_skipped(self):
        for kw in (dict(fraction=0.5), dict(threshold=0.5)):
            m = nn.Sequential(nn.Linear(6, 0), nn.Linear(0, 5), nn.Linear(5, 7))
            opt = ftops.SaRA(m, lr=1e-2, lambda_rank=0, **kw)
            assert opt.names == ["2.weight"]
            m[2](torch.randn(3, 5)).sum().backward()
            opt.step()
            with pytest.raises(ValueError, match="zero entries"):
                ftops.SaRA(nn.Sequential(nn.Linear(6, 0), nn.Linear(0, 5)), lr=1e-2, **kw)

    # -- step --

    @pytest.mark.parametrize("key, bad", [
        ("lr", float("nan")), ("lr", float("inf")), ("lr", -1e-3), ("lr", "0.1"),
        ("eps", -1e-8), ("eps", float("nan")), ("weight_decay", -0.1),
        ("weight_decay", float("inf")), ("betas", (1.0, 0.999)), ("betas", (0.9, float("nan"))),
        ("lambda_rank", -1.0), ("lambda_rank", float("nan")), ("progressive_iter", 0),
        ("sara_step", -1),
    ])
    def test_group_hyperparameters_checked_at_step(self, key, bad):
        m, opt = self._trained()
        m(_batch("cpu")).pow(2).mean().backward()
        snap = _snapshot(m, opt)
        good = opt.param_groups[0][key]
        opt.param_groups[0][key] = bad
        with pytest.raises((ValueError, TypeError), match=key):
            opt.step()
        opt.param_groups[0][key] = good
        _assert_unchanged(snap, m, opt)
        opt.step()  # and it steps once repaired
        assert not torch.equal(m.fc1.weight, snap[0]["fc1.weight"])

    @pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
    def test_scheduler_that_sets_nan_lr(self):
        m, opt = self._trained()
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float("nan") if s else 1.0)
        sched.step()
        m(_batch("cpu")).pow(2).mean().backward()
        snap = _snapshot(m, opt)
        with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\]"):
            opt.step()
        _assert_unchanged(snap, m, opt)

    def test_failing_closure_and_backward_change_nothing(self):
        m, opt = self._trained()
        snap = _snapshot(m, opt)

        def closure():
            m(_batch("cpu")).pow(2).mean().backward()
            raise RuntimeError("data loader died")

        with pytest.raises(RuntimeError, match="data loader died"):
            opt.step(closure)
        _assert_unchanged(snap, m, opt)
        opt.zero_grad()
        h = m.norm.register_full_backward_hook(lambda *a: (_ for _ in ()).throw(
            RuntimeError("backward failed")))
        with pytest.raises(RuntimeError, match="backward failed"):
            m(_batch("cpu")).pow(2).mean().backward()
        h.remove()
        _assert_unchanged(snap, m, opt)
        opt.zero_grad()
        with pytest.raises(TypeError, match="closure must be callable"):
            opt.step("closure")
        _assert_unchanged(snap, m, opt)
        loss = opt.step(lambda: m(_batch("cpu")).pow(2).mean().backward() or 1.5)
        assert loss == 1.5 and not torch.equal(m.fc1.weight, snap[0]["fc1.weight"])

    @pytest.mark.parametrize("bad", [float("nan"), float("inf")])
    def test_non_finite_gradient_is_refused(self, bad):
        m, opt = self._trained()
        (m(_batch("cpu")) * bad).sum().backward()
        snap = _snapshot(m, opt)
        with pytest.raises(ValueError, match="fc1.weight.*NaN or infinite.*nothing was updated"):
            opt.step()
        _assert_unchanged(snap, m, opt)
        # also a dense gradient (scope="all")
        m2 = _emb_model("cpu")
        opt2 = ftops.SaRA(m2, threshold=2e-2, lr=1e-2, scope="all")
        (m2(_ids("cpu")) * bad).sum().backward()
        snap = _snapshot(m2, opt2)
        with pytest.raises(ValueError, match="NaN or infinite"):
            opt2.step()
        _assert_unchanged(snap, m2, opt2)

    def test_model_changed_after_construction(self):
        m, opt = self._trained()
        m.double()
        with pytest.raises(ValueError, match="fc1.weight is now torch.float64.*build SaRA after"):
            opt.step()
        m, opt = self._trained()
        m.fc1.weight = nn.Parameter(torch.zeros(96, 81))
        with pytest.raises(ValueError, match="shape"):
            opt.step()
        if torch.cuda.is_available():
            m, opt = self._trained()
            m.cuda()
            with pytest.raises(ValueError, match="move the model before building SaRA"):
                opt.step()

    def test_param_groups_are_sealed(self):
        m, opt = self._trained()
        with pytest.raises(TypeError, match="another optimizer"):
            opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
        opt.param_groups[0]["params"].append(nn.Parameter(torch.zeros(3)))
        with pytest.raises(ValueError, match="must not be edited"):
            opt.step()

    def test_after_unwrap(self):
        m, opt = self._trained()
        opt.unwrap()
        for call in (opt.step, opt.delta, opt.state_dict, opt.reselect, opt.indices,
                     opt.num_trainable, lambda: opt.load_state_dict({})):
            with pytest.raises(RuntimeError, match="unwrapped"):
                call()
        assert opt.unwrap() is m  # a second unwrap is harmless
        assert sara_mod.unwrap(_model("cpu")) is not None  # a plain model: nothing to do

    # -- load_state_dict --

    def _load_fails(self, sd, exc, match, **kw):
        m, opt = self._trained(steps=2, **kw)
        snap = _snapshot(m, opt)
        with pytest.raises(exc, match=match):
            opt.load_state_dict(sd)
        _assert_unchanged(snap, m, opt)

    def _good_state(self, **kw):
        return copy.deepcopy(self._trained(steps=3, **kw)[1].state_dict())

    def test_load_state_dict_from_elsewhere(self):
        other = _model("cpu", d_in=81)
        oopt = ftops.SaRA(other, fraction=0.2, lr=1e-2)
        self._load_fails(oopt.state_dict(), ValueError, "shape \\[96, 81\\].*\\[96, 80\\]")
        m = _model("cpu")
        adam = torch.optim.AdamW(m.parameters())
        m(_batch("cpu")).sum().backward()
        adam.step()
        self._load_fails(adam.state_dict(), ValueError, "one param group of 2")
        sd = {"state": {0: {"step": torch.tensor(1.0)}, 1: {"step": torch.tensor(1.0)}},
              "param_groups": [dict(self._good_state()["param_groups"][0])]}
        self._load_fails(sd, ValueError, "lacks .*not a state dict of ftops.SaRA")
        self._load_fails("state", TypeError, "must be a dict")
        self._load_fails({"state": {}}, ValueError, "not an optimizer state dict")
        one = ftops.SaRA(_model("cpu"), fraction=0.2, lr=1e-2, modules=["fc1"]).state_dict()
        self._load_fails(one, ValueError, "one param group of 2")

    @pytest.mark.parametrize("key, bad, exc, match", [
        ("values", "abc", TypeError, "must be a tensor, got str"),
        ("indices", [1, 2], TypeError, "must be a tensor, got list"),
        ("step", "3", TypeError, "must be a tensor"),
        ("step", torch.tensor(-1.0), ValueError, "step"),
        ("step", torch.tensor(1.5), ValueError, "whole number"),
        ("shape", torch.tensor([80, 96]), ValueError, "shape"),
        ("indices", "unsorted", ValueError, "sorted, distinct"),
        ("indices", "out_of_range", ValueError, "sorted, distinct and in \\[0, 7680\\)"),
        ("indices", "float", ValueError, "int32/int64"),
        ("values", "short", ValueError, "1-D float tensor"),
        ("values", "float64", TypeError, "needs torch.float32"),
        ("values", "nan", ValueError, "NaN or infinite"),
        ("base", "float16", TypeError, "needs torch.float32"),
        ("exp_avg", "short", ValueError, "1-D float tensor"),
        ("exp_avg_sq", "negative", ValueError, "negative"),
        ("frozen_indices", "overlap", ValueError, "overlap"),
    ])
    def test_load_state_dict_malformed_entries(self, key, bad, exc, match):
        sd = self._good_state()
        st = sd["state"][0]
        t = st[key] if isinstance(st[key], torch.Tensor) else None
        if bad == "unsorted":
            bad = t.flip(0)
        elif bad == "out_of_range":
            bad = t.clone()
            bad[-1] = 96 * 80
        elif bad == "float":
            bad = t.float()
        elif bad == "short":
            bad = t[:-1]
        elif bad == "float64":
            bad = t.double()
        elif bad == "float16":
            bad = t.half()
        elif bad == "nan":
            bad = t.clone()
            bad[0] = float("nan")
        elif bad == "negative":
            bad = t.clone()
            bad[0] = -1.0
        elif bad == "overlap":
            bad = st["indices"][:1].clone()
            st["frozen_values"] = st["values"][:1].clone()
            st["frozen_base"] = st["base"][:1].clone()
        st[key] = bad
        self._load_fails(sd, exc, match)

    @pytest.mark.parametrize("key, bad", [("lr", float("nan")), ("betas", (0.9, 1.0)),
                                          ("sara_step", -2), ("progressive_iter", 0)])
    def test_load_state_dict_bad_hyperparameters(self, key, bad):
        sd = self._good_state()
        sd["param_groups"][0][key] = bad
        self._load_fails(sd, (ValueError, TypeError), key)

    def test_load_state_dict_bad_generator_state(self):
        sd = self._good_state()
        sd["sara_rng"] = torch.zeros(3, dtype=torch.uint8)
        self._load_fails(sd, ValueError, "sara_rng")
        sd["sara_rng"] = "seed"
        self._load_fails(sd, TypeError, "sara_rng")

    # -- ftops.sara.load --

    def _delta(self):
        m, opt = self._trained(steps=2)
        return opt.delta()

    def _load_delta_fails(self, delta, exc, match, model=None):
        fresh = model if model is not None else _model("cpu")
        before = copy.deepcopy(fresh.state_dict())
        with pytest.raises(exc, match=match):
            sara_mod.load(fresh, delta)
        for k, v in fresh.state_dict().items():
            assert torch.equal(v, before[k]), k

    def test_load_delta_refuses_mismatches(self):
        d = self._delta()
        bad = dict(d)
        bad["fc1.weight.sara_indices"] = d["fc1.weight.sara_indices"].clone()
        bad["fc1.weight.sara_indices"][0] = 10**6
        self._load_delta_fails(bad, ValueError, "outside")
        # a weight of another shape, or a bigger one: the recorded shape refuses it
        self._load_delta_fails(d, ValueError, "shape \\[96, 80\\].*\\[96, 81\\]",
                               _model("cpu", d_in=81))
        self._load_delta_fails(d, ValueError, "shape \\[96, 80\\].*\\[100, 80\\]",
                               _model("cpu", d_h=100))
        dup = dict(d)
        i = d["fc2.weight.sara_indices"].clone()
        i[1] = i[0]
        dup["fc2.weight.sara_indices"] = i
        self._load_delta_fails(dup, ValueError, "duplicate")
        nan = dict(d)
        nan["fc1.weight.sara_values"] = d["fc1.weight.sara_values"].clone()
        nan["fc1.weight.sara_values"][0] = float("nan")
        self._load_delta_fails(nan, ValueError, "NaN")
        self._load_delta_fails({"zz.sara_indices": d["fc1.weight.sara_indices"],
                                "zz.sara_values": d["fc1.weight.sara_values"]},
                               ValueError, "no parameter")
        self._load_delta_fails({k: (v.double() if k.endswith("values") else v)
                                for k, v in d.items()}, TypeError, "dtype")
        self._load_delta_fails({"fc1.weight.sara_indices": d["fc1.weight.sara_indices"]},
                               ValueError, "needs both")
        self._load_delta_fails({**d, "fc1.weight.sara_values": [0.1]}, TypeError,
                               "must be a tensor, got list")
        self._load_delta_fails({**d, "fc1.weight.extra": torch.zeros(1)}, ValueError,
                               "unexpected keys")
        self._load_delta_fails({**d, "fc1.weight.sara_shape": torch.tensor([96.0, 80.0])},
                               ValueError, "1-D int64")
        self._load_delta_fails(list(d.items()), TypeError, "dict of tensors")
        with pytest.raises(TypeError, match="base_model must be an nn.Module"):
            sara_mod.load(d, d)
        tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        tied[1].weight = tied[0].weight
        one = {"0.weight.sara_indices": torch.tensor([1]), "0.weight.sara_values": torch.ones(1),
               "1.weight.sara_indices": torch.tensor([2]), "1.weight.sara_values": torch.ones(1)}
        self._load_delta_fails(one, ValueError, "same \\(tied\\) parameter", tied)

    def test_load_delta_without_shape_still_loads_when_consistent(self):
        m, opt = self._trained(steps=2)
        old = {k: v for k, v in opt.delta().items() if not k.endswith(".sara_shape")}
        fresh = sara_mod.load(_model("cpu"), old)
        for (n, a), (_, b) in zip(m.named_parameters(), fresh.named_parameters()):
            assert torch.equal(a, b), n
        # without the shape an index past the end is still refused
        self._load_delta_fails(old, ValueError, "outside", _model("cpu", d_in=40))
