"""The fused Adam(W) ops (ftops.adamw_, ftops.adam_direction_) and the helper ftops._adamw.

Against torch.optim.AdamW and a float64 plain-PyTorch reference over 20 steps, odd sizes (vector
tails), every dtype, mixed sizes/dtypes in one call, opcheck, and bad inputs that must raise and
leave every tensor bit-identical.
"""
import math

import pytest
import torch

from ftops import _ops
from ftops._adamw import fused_adam_direction, fused_adamw, moment_dtype, zeros_moment

from conftest import DEVICES, FLOAT_DTYPES, TOL

SIZES = [1, 7, 22, 4097]
STEPS = 20


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype, device, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)


def _ref_adamw(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step, maximize=False,
               bias_correction=True):
    """torch.optim.AdamW in float64, in place on float64 tensors."""
    if maximize:
        g = -g
    p.mul_(1 - lr * weight_decay)
    m.mul_(beta1).add_((1 - beta1) * g)
    v.mul_(beta2).add_((1 - beta2) * g * g)
    bc1 = 1 - beta1 ** step if bias_correction else 1.0
    bc2 = 1 - beta2 ** step if bias_correction else 1.0
    p.sub_(lr / bc1 * m / (v.sqrt() / math.sqrt(bc2) + eps))


def _ref_galore_direction(g, m, v, *, beta1, beta2, eps):
    """galore_torch.AdamW's moment update and N = m / (sqrt(v) + eps), in float64."""
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    return m / (v.sqrt() + eps)


def _tol(dtype):
    return TOL[dtype]


CONFIGS = [
    dict(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, maximize=False,
         bias_correction=True),
    dict(lr=0.02, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.0, maximize=True,
         bias_correction=False),
]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
def test_adamw_matches_float64_reference(device, dtype, size, cfg):
    cfg = CONFIGS[cfg]
    gen = _gen(size * 10 + 1)
    p = _randn((size,), dtype, device, gen)
    m = zeros_moment(p)
    v = zeros_moment(p)
    assert m.dtype == moment_dtype(dtype)
    p_ref = p.double()
    m_ref = torch.zeros_like(p_ref)
    v_ref = torch.zeros_like(p_ref)
    for step in range(1, STEPS + 1):
        g = _randn((size,), dtype, device, gen)
        _ops.adamw_([p], [g], [m], [v], step=step, **cfg)
        _ref_adamw(p_ref, g.double(), m_ref, v_ref, step=step, **cfg)
        p_ref = p_ref.to(dtype).double()  # the kernel rounds params to their dtype every step
    torch.testing.assert_close(p.double(), p_ref, **_tol(dtype))
    mtol = _tol(torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(m.double(), m_ref, **mtol)
    torch.testing.assert_close(v.double(), v_ref, **mtol)
    if size > 1:  # the test must be able to fail: params did move
        assert not torch.equal(p, _randn((size,), dtype, device, _gen(size * 10 + 1)))


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("dt", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_fused_adamw_matches_torch_optim(device, dt, maximize):
    gen = _gen(7)
    shapes = [(1,), (7,), (22,), (4097,), (3, 5), (64, 33)]
    params = [_randn(s, dt, device, gen) for s in shapes]
    ref = [p.clone().requires_grad_() for p in params]
    hp = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = torch.optim.AdamW(ref, foreach=False, maximize=maximize, **hp)
    m = [zeros_moment(p) for p in params]
    v = [zeros_moment(p) for p in params]
    for step in range(1, STEPS + 1):
        grads = [_randn(s, dt, device, gen) for s in shapes]
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        opt.step()
        fused_adamw(params, grads, m, v, lr=hp["lr"], beta1=0.9, beta2=0.95, eps=hp["eps"],
                    weight_decay=hp["weight_decay"], step=step, maximize=maximize)
    for p, r, mk, vk in zip(params, ref, m, v):
        st = opt.state[r]
        torch.testing.assert_close(p, r.detach(), **_tol(dt))
        torch.testing.assert_close(mk, st["exp_avg"], **_tol(dt))
        torch.testing.assert_close(vk, st["exp_avg_sq"], **_tol(dt))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("out_kind", ["grad", "moment"])
def test_adam_direction_matches_reference(device, dtype, size, bias_correction, out_kind):
    beta1, beta2, eps = 0.9, 0.999, 1e-6
    gen = _gen(size + 3)
    md = moment_dtype(dtype)
    m = torch.zeros(size, dtype=md, device=device)
    v = torch.zeros(size, dtype=md, device=device)
    out = torch.empty(size, dtype=dtype if out_kind == "grad" else md, device=device)
    m_ref = torch.zeros(size, dtype=torch.float64, device=device)
    v_ref = torch.zeros(size, dtype=torch.float64, device=device)
    for step in range(1, STEPS + 1):
        g = _randn((size,), dtype, device, gen)
        _ops.adam_direction_([g], [m], [v], [out], beta1=beta1, beta2=beta2, eps=eps, step=step,
                             bias_correction=bias_correction)
        n_ref = _ref_galore_direction(g.double(), m_ref, v_ref, beta1=beta1, beta2=beta2, eps=eps)
        if bias_correction:  # torch.optim.Adam's form: -lr * out is the update
            bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
            n_ref = (m_ref / bc1) / (v_ref.sqrt() / math.sqrt(bc2) + eps)
        torch.testing.assert_close(out.double(), n_ref, **_tol(out.dtype))
    torch.testing.assert_close(m.double(), m_ref, **_tol(md))
    torch.testing.assert_close(v.double(), v_ref, **_tol(md))


def test_adam_direction_gives_galore_update(device):
    """bias_correction=False + step_size lr*sqrt(bc2)/bc1 reproduces galore_torch.AdamW
    (no projection: project_back = identity; decoupled weight decay after the update)."""
    lr, beta1, beta2, eps, wd = 1e-2, 0.9, 0.999, 1e-6, 0.05
    gen = _gen(11)
    p = _randn((4, 33), torch.float32, device, gen)
    p_ref = p.double()
    m, v, n = zeros_moment(p), zeros_moment(p), torch.empty_like(p)
    m_ref, v_ref = torch.zeros_like(p_ref), torch.zeros_like(p_ref)
    for step in range(1, STEPS + 1):
        g = _randn(p.shape, torch.float32, device, gen)
        step_size = lr * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
        # galore_torch.AdamW.step, float64
        norm = _ref_galore_direction(g.double(), m_ref, v_ref, beta1=beta1, beta2=beta2, eps=eps)
        p_ref.add_(norm, alpha=-step_size)
        p_ref.add_(p_ref, alpha=-lr * wd)
        # ftops
        fused_adam_direction([g], [m], [v], [n], beta1=beta1, beta2=beta2, eps=eps, step=step,
                             bias_correction=False)
        p.add_(n, alpha=-step_size)
        p.add_(p, alpha=-lr * wd)
    torch.testing.assert_close(p.double(), p_ref, **_tol(torch.float32))


def _mixed_lists(device, sizes=(1, 7, 0, 22, 4097, 9000, (3, 5))):
    gen = _gen(5)
    dts = [FLOAT_DTYPES[i % len(FLOAT_DTYPES)] for i in range(len(sizes))]
    shapes = [(s,) if isinstance(s, int) else s for s in sizes]
    params = [_randn(s, d, device, gen) for s, d in zip(shapes, dts)]
    grads = [_randn(s, d, device, gen) for s, d in zip(shapes, dts)]
    m = [_randn(s, moment_dtype(d), device, gen, 0.1) for s, d in zip(shapes, dts)]
    v = [_randn(s, moment_dtype(d), device, gen, 0.1).abs() for s, d in zip(shapes, dts)]
    return params, grads, m, v


def test_adamw_multi_tensor_equals_single_tensor_calls(device):
    hp = dict(lr=3e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=3)
    params, grads, m, v = _mixed_lists(device)
    p1, m1, v1 = [t.clone() for t in params], [t.clone() for t in m], [t.clone() for t in v]
    _ops.adamw_(params, grads, m, v, **hp)
    for k in range(len(params)):
        _ops.adamw_([p1[k]], [grads[k]], [m1[k]], [v1[k]], **hp)
    for a, b in zip(params + m + v, p1 + m1 + v1):
        assert torch.equal(a, b)
    assert not torch.equal(params[4], _mixed_lists(device)[0][4])  # it did update


@pytest.mark.parametrize("out_kind", ["grad", "moment"])
def test_adam_direction_multi_tensor_equals_single_tensor_calls(device, out_kind):
    hp = dict(beta1=0.9, beta2=0.99, eps=1e-8, step=4, bias_correction=True)
    _, grads, m, v = _mixed_lists(device)
    out = [torch.full_like(g, float("nan"), dtype=g.dtype if out_kind == "grad" else mk.dtype)
           for g, mk in zip(grads, m)]
    m1, v1, out1 = [t.clone() for t in m], [t.clone() for t in v], [t.clone() for t in out]
    _ops.adam_direction_(grads, m, v, out, **hp)
    for k in range(len(grads)):
        _ops.adam_direction_([grads[k]], [m1[k]], [v1[k]], [out1[k]], **hp)
    for a, b in zip(m + v + out, m1 + v1 + out1):
        assert torch.equal(a, b)
    assert all(torch.isfinite(o).all() for o in out)


def test_fused_adamw_groups_by_step(device):
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    params, grads, m, v = _mixed_lists(device)
    steps = [1 + (k % 3) for k in range(len(params))]
    p1, m1, v1 = [t.clone() for t in params], [t.clone() for t in m], [t.clone() for t in v]
    fused_adamw(params, grads, m, v, step=steps, **hp)
    for k in range(len(params)):
        _ops.adamw_([p1[k]], [grads[k]], [m1[k]], [v1[k]], step=steps[k], **hp)
    for a, b in zip(params + m + v, p1 + m1 + v1):
        assert torch.equal(a, b)


def test_opcheck(device):
    params, grads, m, v = _mixed_lists(device, sizes=(1, 7, 22, (3, 5)))
    torch.library.opcheck(torch.ops.ftops.adamw_.default,
                          (params, grads, m, v, 1e-2, 0.9, 0.999, 1e-8, 0.01, 2, False, True))
    out = [torch.empty_like(g) for g in grads]
    torch.library.opcheck(torch.ops.ftops.adam_direction_.default,
                          (grads, m, v, out, 0.9, 0.999, 1e-8, 2, True))


def test_compile_fullgraph(device):
    params, grads, m, v = _mixed_lists(device, sizes=(7, 22))
    p1, m1, v1 = [t.clone() for t in params], [t.clone() for t in m], [t.clone() for t in v]

    def step_fn(ps, gs, ms, vs):
        fused_adamw(ps, gs, ms, vs, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                    weight_decay=0.01, step=1)

    torch.compile(step_fn, fullgraph=True, backend="aot_eager")(params, grads, m, v)
    step_fn(p1, grads, m1, v1)
    for a, b in zip(params + m + v, p1 + m1 + v1):
        assert torch.equal(a, b)


# --- bad inputs: must raise, naming the argument and index, and write nothing -----------------

def _three(device, dtype=torch.float32):
    gen = _gen(3)
    params = [_randn((n,), dtype, device, gen) for n in (4097, 7, 6)]
    grads = [_randn((n,), dtype, device, gen) for n in (4097, 7, 6)]
    m = [zeros_moment(p) for p in params]
    v = [zeros_moment(p) for p in params]
    return params, grads, m, v


def _adamw_call(params, grads, m, v, **over):
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=1)
    hp.update(over)
    _ops.adamw_(params, grads, m, v, **hp)


ADAMW_BAD = {
    "grad_shape": (lambda P, G, M, V, d: G.__setitem__(2, torch.zeros(5, device=d)),
                   {}, r"grads\[2\] has shape \[5\] but params\[2\] has shape \[6\]"),
    "grad_dtype": (lambda P, G, M, V, d: G.__setitem__(2, G[2].double()),
                   {}, r"grads\[2\] has dtype Double"),
    "moment_dtype": (lambda P, G, M, V, d: M.__setitem__(2, M[2].bfloat16()),
                     {}, r"exp_avgs\[2\] has dtype BFloat16"),
    "moment_shape": (lambda P, G, M, V, d: V.__setitem__(2, torch.zeros(2, 3, device=d)),
                     {}, r"exp_avg_sqs\[2\] has shape \[2, 3\] but params\[2\] has shape \[6\]"),
    "noncontiguous": (lambda P, G, M, V, d: V.__setitem__(2, torch.zeros(12, device=d)[::2]),
                      {}, r"exp_avg_sqs\[2\] must be contiguous"),
    "param_dtype": (lambda P, G, M, V, d: (P.__setitem__(2, torch.zeros(6, dtype=torch.int64, device=d)),
                                           G.__setitem__(2, torch.zeros(6, dtype=torch.int64, device=d))),
                    {}, r"params\[2\] has dtype Long"),
    "length": (lambda P, G, M, V, d: G.pop(), {}, r"grads has 2 tensors but params has 3"),
    "same_moment": (lambda P, G, M, V, d: V.__setitem__(2, M[2]), {}, r"exp_avgs\[2\] and exp_avg_sqs\[2\] share memory"),
    "step0": (lambda P, G, M, V, d: None, dict(step=0), r"step must be >= 1"),
    "beta1": (lambda P, G, M, V, d: None, dict(beta1=1.0), r"beta1 must be in \[0, 1\)"),
    "eps": (lambda P, G, M, V, d: None, dict(eps=-1.0), r"eps must be finite"),
    "lr": (lambda P, G, M, V, d: None, dict(lr=float("nan")), r"lr must be finite"),
}


@pytest.mark.parametrize("case", list(ADAMW_BAD))
def test_adamw_bad_input_raises_and_writes_nothing(device, case):
    mutate, over, msg = ADAMW_BAD[case]
    params, grads, m, v = _three(device)
    mutate(params, grads, m, v, device)
    before = [t.clone() for t in params + grads + m + v]
    with pytest.raises(RuntimeError, match=r"ftops\.adamw_: " + msg):
        _adamw_call(params, grads, m, v, **over)
    for a, b in zip(params + grads + m + v, before):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_adamw_mixed_devices_raises_and_writes_nothing():
    params, grads, m, v = _three("cuda")
    grads[2] = grads[2].cpu()
    before = [t.clone() for t in params + m + v]
    with pytest.raises(RuntimeError, match=r"grads\[2\] is on cpu but params\[0\] is on cuda"):
        _adamw_call(params, grads, m, v)
    for a, b in zip(params + m + v, before):
        assert torch.equal(a, b)
    params, grads, m, v = _three("cuda")
    out = [torch.empty_like(g) for g in grads]
    out[1] = out[1].cpu()
    with pytest.raises(RuntimeError, match=r"out\[1\] is on cpu but grads\[0\] is on cuda"):
        _ops.adam_direction_(grads, m, v, out, beta1=0.9, beta2=0.999, eps=1e-8, step=1)


DIRECTION_BAD = {
    "out_shape": (lambda G, M, V, O, d: O.__setitem__(2, torch.zeros(7, device=d)),
                  r"out\[2\] has shape \[7\] but grads\[2\] has shape \[6\]"),
    "out_dtype": (lambda G, M, V, O, d: O.__setitem__(2, O[2].half()), r"out\[2\] has dtype Half"),
    "moment_dtype": (lambda G, M, V, O, d: V.__setitem__(2, V[2].double()),
                     r"exp_avg_sqs\[2\] has dtype Double"),
    "noncontiguous": (lambda G, M, V, O, d: M.__setitem__(2, torch.zeros(6, 2, device=d)[:, 0]),
                      r"exp_avgs\[2\] must be contiguous"),
    "out_aliases_moment": (lambda G, M, V, O, d: O.__setitem__(2, M[2]),
                           r"exp_avgs\[2\] and out\[2\] share memory"),
    "length": (lambda G, M, V, O, d: O.pop(), r"out has 2 tensors but grads has 3"),
}


@pytest.mark.parametrize("case", list(DIRECTION_BAD))
def test_adam_direction_bad_input_raises_and_writes_nothing(device, case):
    mutate, msg = DIRECTION_BAD[case]
    _, grads, m, v = _three(device)
    out = [torch.zeros_like(g) for g in grads]
    mutate(grads, m, v, out, device)
    before = [t.clone() for t in grads + m + v + out]
    with pytest.raises(RuntimeError, match=r"ftops\.adam_direction_: " + msg):
        _ops.adam_direction_(grads, m, v, out, beta1=0.9, beta2=0.999, eps=1e-8, step=1)
    for a, b in zip(grads + m + v + out, before):
        assert torch.equal(a, b)


def test_fused_adamw_multi_group_error_writes_nothing(device):
    """Several op calls (different steps): the helper validates all before the first call."""
    params, grads, m, v = _three(device)
    grads[2] = torch.zeros(5, device=device)
    before = [t.clone() for t in params + m + v]
    with pytest.raises(ValueError, match=r"grads\[2\] has shape \[5\] but params\[2\] has shape \[6\]"):
        fused_adamw(params, grads, m, v, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                    weight_decay=0.0, step=[1, 2, 3])
    for a, b in zip(params + m + v, before):
        assert torch.equal(a, b)


def test_helpers_skip_empty_lists():
    fused_adamw([], [], [], [], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                step=1)
    fused_adam_direction([], [], [], [], beta1=0.9, beta2=0.999, eps=1e-8, step=1)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
def test_cuda_matches_cpu_bitwise():
    """Same element math, no FMA contraction on either side: CPU and CUDA agree bit for bit."""
    params, grads, m, v = _mixed_lists("cpu")
    cuda = [[t.cuda() for t in lst] for lst in (params, grads, m, v)]
    hp = dict(lr=3e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=3)
    for _ in range(3):
        _ops.adamw_(params, grads, m, v, **hp)
        _ops.adamw_(*cuda, **hp)
    for a, b in zip(params + m + v, cuda[0] + cuda[2] + cuda[3]):
        assert torch.equal(a, b.cpu())
    out = [torch.empty_like(g) for g in grads]
    out_c = [o.cuda() for o in out]
    _ops.adam_direction_(grads, m, v, out, beta1=0.9, beta2=0.99, eps=1e-8, step=5)
    _ops.adam_direction_(cuda[1], cuda[2], cuda[3], out_c, beta1=0.9, beta2=0.99, eps=1e-8, step=5)
    for a, b in zip(out + m + v, out_c + cuda[2] + cuda[3]):
        assert torch.equal(a, b.cpu())


# --- arguments that overlap in memory, meta tensors ----------------------------------------------

ALIASES = {
    # (mutate params, grads, exp_avgs, exp_avg_sqs, message)
    "param is its moment": (lambda P, G, M, V: M.__setitem__(1, P[1]),
                            r"params\[1\] and exp_avgs\[1\] share memory"),
    "param is its grad": (lambda P, G, M, V: G.__setitem__(0, P[0]),
                          r"params\[0\] and grads\[0\] share memory"),
    "param is another's moment": (lambda P, G, M, V: V.__setitem__(2, P[0][:6]),
                                  r"params\[0\] and exp_avg_sqs\[2\] share memory"),
    "grad overlaps a moment (views)": (
        lambda P, G, M, V: G.__setitem__(2, M[0].view(-1)[4000:4006]),
        r"grads\[2\] and exp_avgs\[0\] share memory"),
    "param listed twice": (lambda P, G, M, V: (P.__setitem__(2, P[1][:6]),),
                           r"params\[1\] and params\[2\] share memory"),
}


@pytest.mark.parametrize("case", list(ALIASES))
def test_adamw_overlapping_arguments_refused(device, case):
    """Storage overlap, not identity: a view into another argument is refused too."""
    mutate, msg = ALIASES[case]
    params, grads, m, v = _three(device)
    mutate(params, grads, m, v)
    before = [t.clone() for t in params + grads + m + v]
    with pytest.raises(RuntimeError, match=r"ftops\.adamw_: " + msg):
        _adamw_call(params, grads, m, v)
    for a, b in zip(params + grads + m + v, before):
        assert torch.equal(a, b)


def test_adam_direction_overlapping_arguments_refused(device):
    _, grads, m, v = _three(device)
    out = [torch.zeros_like(g) for g in grads]
    out[1] = grads[1]  # the direction written over the gradient it reads
    before = [t.clone() for t in grads + m + v]
    with pytest.raises(RuntimeError, match=r"grads\[1\] and out\[1\] share memory"):
        _ops.adam_direction_(grads, m, v, out, beta1=0.9, beta2=0.999, eps=1e-8, step=1)
    for a, b in zip(grads + m + v, before):
        assert torch.equal(a, b)


def test_meta_tensors_mixed_in_refused(device):
    """One meta tensor sends the call to the meta kernel, which would update nothing."""
    params, grads, m, v = _three(device)
    v[1] = torch.zeros(7, device="meta")
    before = [t.clone() for t in params + grads + m]
    with pytest.raises(RuntimeError, match=r"ftops\.adamw_: exp_avg_sqs\[1\] is on meta"):
        _adamw_call(params, grads, m, v)
    for a, b in zip(params + grads + m, before):
        assert torch.equal(a, b)
    _, grads, m, v = _three(device)
    out = [torch.zeros_like(g) for g in grads]
    out[0] = torch.zeros(4097, device="meta")
    before = [t.clone() for t in grads + m + v]
    with pytest.raises(RuntimeError, match=r"ftops\.adam_direction_: out\[0\] is on meta"):
        _ops.adam_direction_(grads, m, v, out, beta1=0.9, beta2=0.999, eps=1e-8, step=1)
    for a, b in zip(grads + m + v, before):
        assert torch.equal(a, b)
