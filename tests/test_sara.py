"""ftops.sddmm and the SaRA optimizer (ftops.SaRA, ftops.sara).

sddmm against dense ``dY^T X`` gathered (float64), odd shapes, empty/full index sets, int32/int64,
bad inputs, opcheck, hypothesis over shapes; SaRA: value gradients equal the dense gradients
gathered (Linear and Conv), untouched entries stay bit-identical over steps, the nuclear-norm
gradient reaches the values, progressive reselection, delta/load round trip bit for bit, resume
from state_dict, unwrap, and the errors the issue lists.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import ftops
from ftops import sara as sara_mod

from conftest import DEVICES, TOL

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


# --- SaRA ---------------------------------------------------------------------------------------------

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


def _model(device, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    return Net(**kw).to(device=device, dtype=dtype)


def _batch(device, dtype=torch.float32, seed=1, T=(3, 5), d_in=80):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*T, d_in, generator=g).to(device=device, dtype=dtype)


def test_paper_lr_and_defaults():
    m = _model("cpu")
    opt = ftops.SaRA(m, threshold=0.01, lambda_rank=0)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * math.exp(-3.5))
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


def test_steps_touch_only_selected_entries(device, dtype):
    m = _model(device, dtype)
    w0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = ftops.SaRA(m, fraction=0.1, lr=1e-2, weight_decay=0.1, lambda_rank=1e-3)
    sel = {n: i.long().cpu() for n, i in opt.indices().items()}
    x = _batch(device, dtype)
    for _ in range(4):
        m(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    # at rest the managed weights hold the pretrained values (the update lives in the optimizer)
    for n, p in m.named_parameters():
        assert torch.equal(p.detach().cpu(), w0[n].cpu()), n
    opt.merge()
    changed_any = False
    for n, p in m.named_parameters():
        now, before = p.detach().cpu(), w0[n].cpu()
        if n not in sel:
            assert torch.equal(now, before), n
            continue
        mask = torch.zeros(p.numel(), dtype=torch.bool)
        mask[sel[n]] = True
        assert torch.equal(now.view(-1)[~mask], before.view(-1)[~mask]), n
        changed_any |= not torch.equal(now.view(-1)[mask], before.view(-1)[mask])
    assert changed_any


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
    opt.merge()
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


def test_nuclear_norm_needs_min_dim_over_64(device):
    m = _model(device, d_in=64, d_h=96, d_out=64)
    opt = ftops.SaRA(m, fraction=0.5, lr=1e-3, lambda_rank=1.0)
    assert [mg.name for mg in opt._eligible_for_rank()] == []
    m(_batch(device, d_in=64)).sum().backward()
    opt.step()
    assert opt._last_rank_matrix is None


def test_progressive_reselection(device):
    m = _model(device)
    w0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = ftops.SaRA(m, threshold=0.02, lr=5e-3, lambda_rank=0, progressive_iter=3)
    init = {n: i.clone() for n, i in opt.indices().items()}
    x = _batch(device)
    for s in range(5):
        m(x).pow(2).mean().backward()
        opt.step()
        if s == 2:
            delta = opt.delta()  # frozen + active = the initial set, with the values just updated
            # indices = (|W_now| < thr) ∩ initial, moments carried for the survivors
            params = dict(m.named_parameters())
            shrunk = False
            for n, p in zip(opt.names, opt.param_groups[0]["params"]):
                w = params[n].detach().view(-1)
                i0 = init[n].long()
                assert torch.equal(delta[n + ".sara_indices"].long(), i0)
                vals = delta[n + ".sara_values"]
                now = w0[n].view(-1).clone()  # the fine-tuned weight at the reselection
                now[i0] = now[i0] + vals
                expect = i0[now[i0].abs() < 0.02]
                assert torch.equal(opt.indices()[n].long(), expect)
                assert p.shape == expect.shape
                assert opt.state[p]["exp_avg"].shape == expect.shape
                assert int(opt.state[p]["step"]) == 3
                # survivors keep their values and the weight keeps their pretrained entries;
                # the dropped entries hold their fine-tuned values for good
                keep = torch.isin(i0, expect)
                assert torch.equal(p.detach(), vals[keep])
                assert torch.equal(w[expect], w0[n].view(-1)[expect])
                assert torch.equal(w[i0[~keep]], now[i0[~keep]])
                shrunk |= len(expect) < len(i0)
            assert shrunk, "lr too small for the test: nothing left the set"
            w_after = {n: p.detach().clone() for n, p in m.named_parameters()}
        opt.zero_grad()
    # the dropped entries (and everything outside the set) never change after the reselection
    fresh = _model(device)
    sara_mod.load(fresh, opt.delta())
    active = opt.indices()
    opt.merge()
    for (n, a), (_, b) in zip(m.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n  # round trip still exact after reselection
    for n, p in m.named_parameters():
        w, before = p.detach().view(-1), w_after[n].view(-1)
        frozen = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
        if n in active:
            frozen[active[n].long()] = False
        assert torch.equal(w[frozen], before[frozen]), n


def test_delta_load_round_trip_bit_exact(device, dtype, tmp_path):
    m = _model(device, dtype, conv=True)
    img = torch.randn(2, 3, 5, 5, device=device, dtype=dtype)
    opt = ftops.SaRA(m, fraction=0.15, lr=3e-3, lambda_rank=1e-3, weight_decay=0.01)
    x = _batch(device, dtype)
    for _ in range(3):
        m(x, img).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(p.dtype == sara_mod.values_dtype(dtype) for p in opt.param_groups[0]["params"])
    delta = opt.delta()
    assert all(isinstance(v, torch.Tensor) for v in delta.values())
    torch.save(delta, tmp_path / "d.pt")
    delta = torch.load(tmp_path / "d.pt", weights_only=True)
    fresh = _model(device, dtype, conv=True)
    out = sara_mod.load(fresh, delta)
    assert out is fresh
    y_managed = m(x, img)  # the update added by the managed forward
    opt.unwrap()  # ... or written into the weights
    for (n, a), (_, b) in zip(m.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n
    assert "forward" not in m.fc1.__dict__
    assert all(p.requires_grad for p in m.parameters())
    assert torch.equal(m(x, img), fresh(x, img))
    assert torch.equal(y_managed, fresh(x, img))
    with pytest.raises(RuntimeError, match="unwrapped"):
        opt.step()


def test_state_dict_resume(device):
    torch.manual_seed(0)
    m1 = _model(device)
    opt1 = ftops.SaRA(m1, threshold=0.02, lr=5e-3, lambda_rank=1e-3, progressive_iter=2)
    x = _batch(device)
    for _ in range(3):
        m1(x).pow(2).mean().backward()
        opt1.step()
        opt1.zero_grad()
    sd_model = copy.deepcopy(m1.state_dict())
    sd_opt = copy.deepcopy(opt1.state_dict())
    for _ in range(2):
        m1(x).pow(2).mean().backward()
        opt1.step()
        opt1.zero_grad()
    m2 = _model(device)
    m2.load_state_dict(sd_model)
    opt2 = ftops.SaRA(m2, threshold=0.02, lr=5e-3, lambda_rank=1e-3, progressive_iter=2)
    opt2.load_state_dict(sd_opt)
    for _ in range(2):
        m2(x).pow(2).mean().backward()
        opt2.step()
        opt2.zero_grad()
    opt1.merge()
    opt2.merge()
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


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


def test_errors():
    with pytest.raises(ValueError, match="selects no weight entry"):
        ftops.SaRA(_model("cpu"), threshold=1e-12)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="threshold"):
            ftops.SaRA(_model("cpu"), threshold=bad)
    for bad in (0.0, 1.5, -0.1, True, float("nan")):
        with pytest.raises(ValueError, match="fraction"):
            ftops.SaRA(_model("cpu"), fraction=bad)
    with pytest.raises(ValueError, match="no eligible layers"):
        ftops.SaRA(nn.Sequential(nn.LayerNorm(4), nn.ReLU()))
    with pytest.raises(ValueError, match="no eligible layers"):
        ftops.SaRA(_model("cpu"), modules=lambda n, mod: False)
    with pytest.raises(ValueError, match="not a module"):
        ftops.SaRA(_model("cpu"), modules=["nope"])
    with pytest.raises(TypeError, match="nn.Linear"):
        ftops.SaRA(_model("cpu"), modules=["norm"])
    m = _model("cpu")
    m.fc1.weight = nn.Parameter(torch.zeros(96, 80, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="fc1.weight has dtype torch.int8"):
        ftops.SaRA(m)
    m = _model("cpu")
    assert all(p.requires_grad for p in m.parameters())  # errors leave the model untouched
    tied = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="shared"):
        ftops.SaRA(tied, fraction=0.5, lr=1e-3)
    m = _model("cpu")
    ftops.SaRA(m, fraction=0.1, lr=1e-3)
    with pytest.raises(ValueError, match="already managed"):
        ftops.SaRA(m, fraction=0.1, lr=1e-3)


def test_load_errors():
    m = _model("cpu")
    opt = ftops.SaRA(m, fraction=0.1, lr=1e-3)
    d = opt.delta()
    bad = dict(d)
    bad["fc1.weight.sara_indices"] = bad["fc1.weight.sara_indices"].clone()
    bad["fc1.weight.sara_indices"][0] = 10**6
    fresh = _model("cpu")
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match="outside"):
        sara_mod.load(fresh, bad)
    with pytest.raises(ValueError, match="no parameter"):
        sara_mod.load(fresh, {"zz.sara_indices": d["fc1.weight.sara_indices"],
                              "zz.sara_values": d["fc1.weight.sara_values"]})
    with pytest.raises(TypeError, match="dtype"):
        sara_mod.load(fresh, {k: (v.double() if k.endswith("values") else v) for k, v in d.items()})
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k])


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


def test_weights_hold_pretrained_values_at_rest(device):
    """Between calls the managed weights hold the pretrained values, also when a forward raises;
    the trainable set is stored row-compressed with 2-byte columns."""
    m = _model(device)
    w0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = ftops.SaRA(m, fraction=0.2, lr=1e-2, lambda_rank=0)
    x = _batch(device)
    m(x).pow(2).mean().backward()
    opt.step()
    for n, p in m.named_parameters():
        assert torch.equal(p, w0[n]), n
    with pytest.raises(RuntimeError):
        m(torch.randn(3, 7, device=device))  # wrong input width: F.linear raises mid-swap
    for n, p in m.named_parameters():
        assert torch.equal(p, w0[n]), n
    for mg in opt._managed:
        assert mg.cols.dtype == torch.int16 and mg.row_ptr.shape == (mg.weight.shape[0] + 1,)
        assert torch.equal(mg.flat_indices(), opt.indices()[mg.name])
    # the module-level unwrap writes the update in as well
    y = m(x)
    sara_mod.unwrap(m)
    assert torch.equal(m(x), y)
    assert not torch.equal(m.fc1.weight, w0["fc1.weight"])
