"""ftops.zo_axpby_ (csrc/cpu/zo.cpp, csrc/cuda/zo.cu) against plain-PyTorch references.

    params[k] += sum_s coeffs[s*K + k] * z(seeds[s], ids[k]) - decay[k] * params[k]

with z = ftops.zo_noise (its own correctness is tests/test_noise.py). Two references:
- `ref64`: the formula in float64 (checked with a tolerance scaled by the size of the terms);
- `emulate`: the kernel's own arithmetic (float64 for float64, else float32 with float32
  coefficients, summed over seeds in order, then v + (acc - d*v), rounded once to the dtype),
  which the kernel must match to within 1 ulp, nearly everywhere exactly.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import DEVICES, FLOAT_DTYPES, TOL
from ftops import _ops

SIZES = [0, 1, 7, 63, 64, 65, 4097]
SHAPES = [(3, 5, 7), (2, 64), (1, 1, 65), (4, 0, 3), (5, 1), (17, 241)]
INT_VIEW = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# --- references ----------------------------------------------------------------------------------


def _coeffs_for(coeffs, K, k, S):
    return [coeffs[s * K + k] for s in range(S)]


def ref64(p, seeds, index, cs, d):
    """The formula in float64, fed the op's own noise."""
    v = p.double()
    acc = torch.zeros_like(v)
    for seed, c in zip(seeds, cs):
        acc = acc + c * _ops.zo_noise(p, seed, index).double()
    return v + (acc - d * v)


def emulate(p, seeds, index, cs, d):
    """The kernel's arithmetic, op by op, in its accumulation type; rounded once to p.dtype."""
    acc_t = torch.float64 if p.dtype == torch.float64 else torch.float32
    v = p.to(acc_t)
    acc = torch.zeros_like(v)
    for seed, c in zip(seeds, cs):
        ct = torch.tensor(c, dtype=acc_t, device=p.device)
        acc = acc + ct * _ops.zo_noise(p, seed, index).to(acc_t)
    dt = torch.tensor(d, dtype=acc_t, device=p.device)
    return (v + (acc - dt * v)).to(p.dtype)


def scale64(p, seeds, index, cs, d):
    """Sum of the magnitudes of the terms: what rounding errors are proportional to."""
    v = p.double()
    s = v.abs() * (1 + abs(d))
    for seed, c in zip(seeds, cs):
        s = s + abs(c) * _ops.zo_noise(p, seed, index).double().abs()
    return s


def ulp_diff(a, b):
    """|a - b| in units in the last place of their dtype (0 for +0 vs -0)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    it = INT_VIEW[a.dtype]
    nbits = torch.finfo(a.dtype).bits

    def ordered(x):
        i = x.contiguous().view(it).to(torch.int64)
        mag = i & ((1 << (nbits - 1)) - 1)
        return torch.where(i < 0, -mag, mag)

    return (ordered(a) - ordered(b)).abs()


def check_against_references(out, before, seeds, index, cs, d, what=""):
    """out = zo_axpby_(before) for one tensor: vs the kernel emulation and the float64 formula."""
    assert out.dtype == before.dtype and out.shape == before.shape
    if out.numel() == 0:
        return
    emu = emulate(before, seeds, index, cs, d)
    u = ulp_diff(out, emu)
    exact = float((u == 0).double().mean())
    assert int(u.max()) <= 1, f"{what}: {int(u.max())} ulp from the emulated kernel arithmetic"
    # nearly all elements must be the same rounding (expected: all of them)
    assert exact >= 0.999, f"{what}: only {exact:.4f} of elements equal to the emulation"
    ref = ref64(before, seeds, index, cs, d)
    tol = TOL[out.dtype]
    bound = tol["atol"] * 1e-3 + tol["rtol"] * scale64(before, seeds, index, cs, d)
    err = (out.double() - ref).abs()
    bad = err > bound
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} elements off the float64 reference, worst "
        f"{float((err / bound).max()):.3g}x the bound"
    )


def make_coeffs(S, K, gen):
    return [float(x) for x in (torch.rand(S * K, generator=gen, dtype=torch.float64) * 4 - 2)]


# --- agreement with the reference --------------------------------------------------------------------


@pytest.mark.parametrize("n_seeds", [1, 2, 8])
@pytest.mark.parametrize("size", SIZES)
def test_axpby_matches_reference(device, dtype, size, n_seeds):
    gen = torch.Generator().manual_seed(size * 10 + n_seeds)
    p = torch.randn(size, generator=gen, dtype=torch.float64).to(dtype).to(device)
    before = p.clone()
    seeds = [int(s) for s in torch.randint(-(2**62), 2**62, (n_seeds,), generator=gen)]
    cs = make_coeffs(n_seeds, 1, gen)
    d = 0.01
    _ops.zo_axpby_([p], seeds, [3], cs, [d])
    if size:
        assert not torch.equal(p, before)
    check_against_references(p, before, seeds, 3, cs, d, f"{dtype} n={size} S={n_seeds}")


@pytest.mark.parametrize("shape", SHAPES)
def test_axpby_multidim(device, dtype, shape):
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(shape, generator=gen).to(dtype).to(device)
    before = p.clone()
    _ops.zo_axpby_([p], [11, 12], [7], [1e-3, -0.5], [0.1])
    check_against_references(p, before, [11, 12], 7, [1e-3, -0.5], 0.1, f"{dtype} {shape}")
    # the noise follows the flattened (row-major) element index
    flat = before.flatten().clone()
    _ops.zo_axpby_([flat], [11, 12], [7], [1e-3, -0.5], [0.1])
    assert torch.equal(flat, p.flatten())


def test_axpby_coeff_layout(device):
    # coeffs[s*K + k]: seed-major. Zero params and no decay leave exactly sum_s c z.
    K, seeds, ids = 3, [5, 6], [0, 1, 2]
    cs = [1.0, 2.0, 3.0, -4.0, 0.5, 0.25]  # seed 5: (1, 2, 3), seed 6: (-4, 0.5, 0.25)
    params = [torch.zeros(9, dtype=torch.float64, device=device) for _ in range(K)]
    _ops.zo_axpby_(params, seeds, ids, cs, [0.0] * K)
    for k in range(K):
        z5 = _ops.zo_noise(params[k], 5, ids[k]).double()
        z6 = _ops.zo_noise(params[k], 6, ids[k]).double()
        assert torch.equal(params[k], cs[k] * z5 + cs[K + k] * z6), k


def test_axpby_single_seed_adds_scaled_noise_exactly(device):
    # p = 0, c = 1, d = 0: the result is the noise itself, bit for bit, in float32
    p = torch.zeros(4097, device=device)
    _ops.zo_axpby_([p], [99], [4], [1.0], [0.0])
    assert torch.equal(p, _ops.zo_noise(p, 99, 4))


def test_axpby_zero_coeffs_is_identity(device, dtype):
    p = torch.randn(4097, dtype=torch.float64).to(dtype).to(device)
    before = p.clone()
    _ops.zo_axpby_([p], [1, 2, 3], [0], [0.0, 0.0, 0.0], [0.0])
    assert torch.equal(p, before)


def test_axpby_decay_only(device, dtype):
    p = torch.randn(1000, dtype=torch.float64).to(dtype).to(device)
    before = p.clone()
    _ops.zo_axpby_([p], [1], [0], [0.0], [0.25])
    check_against_references(p, before, [1], 0, [0.0], 0.25, "decay only")
    assert torch.allclose(p.double(), 0.75 * before.double(), **TOL[dtype])


def test_axpby_contiguous_views_of_one_buffer(device, dtype):
    # a flat parameter buffer cut into contiguous views at odd offsets (misaligned vector loads
    # on CUDA); elements outside the views must not change
    buf = torch.randn(300, dtype=torch.float64).to(dtype).to(device)
    before = buf.clone()
    cuts = [(1, 8), (8, 73), (75, 140), (141, 141), (143, 299)]
    views = [buf[a:b] for a, b in cuts]
    ids = list(range(10, 10 + len(views)))
    cs = [0.5, -1.0, 2.0, 0.1, 1.5]
    decay = [0.0, 0.1, 0.0, 0.5, 0.2]
    _ops.zo_axpby_(views, [42], ids, cs, decay)
    untouched = torch.ones(300, dtype=torch.bool)
    for (a, b), idx, c, d in zip(cuts, ids, cs, decay):
        check_against_references(buf[a:b], before[a:b], [42], idx, [c], d, f"view {a}:{b}")
        untouched[a:b] = False
    assert torch.equal(buf[untouched.to(device)], before[untouched.to(device)])


def _mixed_list(device, gen):
    specs = [
        (1, torch.float32),
        (7, torch.bfloat16),
        (0, torch.float32),
        (63, torch.float16),
        (64, torch.float64),
        ((3, 5, 7), torch.float32),
        (65, torch.bfloat16),
        (4097, torch.float32),
        ((2, 0), torch.float16),
        (5000, torch.float16),
        (129, torch.float64),
    ]
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dt).to(device) for s, dt in specs]


@pytest.mark.parametrize("n_seeds", [1, 3, 8])
def test_axpby_many_tensors_one_call(device, n_seeds):
    gen = torch.Generator().manual_seed(n_seeds)
    params = _mixed_list(device, gen)
    K = len(params)
    before = [p.clone() for p in params]
    seeds = [1000 + 17 * s for s in range(n_seeds)]
    ids = [0, 5, 2**32 - 1, 3, 1, 9, 100, 2, 4, 6, 7]
    cs = make_coeffs(n_seeds, K, gen)
    decay = [float(x) for x in torch.rand(K, generator=gen, dtype=torch.float64) * 0.2]
    _ops.zo_axpby_(params, seeds, ids, cs, decay)
    for k in range(K):
        check_against_references(
            params[k], before[k], seeds, ids[k], _coeffs_for(cs, K, k, n_seeds), decay[k], f"k={k}"
        )
        # one call per tensor gives the very same bits
        single = before[k].clone()
        _ops.zo_axpby_([single], seeds, [ids[k]], _coeffs_for(cs, K, k, n_seeds), [decay[k]])
        assert torch.equal(single, params[k]), f"params[{k}] differs from its single-tensor call"


def test_axpby_many_tensors_beyond_one_launch(device):
    # more tensors than the CUDA kernel packs into one launch (24), all of one dtype
    params = [torch.randn(3 + 5 * k, device=device) for k in range(60)]
    before = [p.clone() for p in params]
    K = len(params)
    cs = [0.01 * (k + 1) for k in range(2 * K)]
    ids = list(range(K))[::-1]
    _ops.zo_axpby_(params, [8, 9], ids, cs, [0.001] * K)
    for k in range(K):
        check_against_references(params[k], before[k], [8, 9], ids[k], [cs[k], cs[K + k]], 0.001, f"k={k}")


def test_axpby_wrapper_accepts_tuples_and_generators(device):
    a, b = torch.zeros(5, device=device), torch.zeros(6, device=device)
    _ops.zo_axpby_((a, b), (3,), (0, 1), (1.0, 1.0), (0.0, 0.0))
    a2, b2 = torch.zeros(5, device=device), torch.zeros(6, device=device)
    _ops.zo_axpby_(iter([a2, b2]), iter([3]), iter([0, 1]), iter([1.0, 1.0]), iter([0.0, 0.0]))
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert torch.equal(a, _ops.zo_noise(a, 3, 0))


def test_axpby_empty_list_is_a_no_op():
    # an optimizer whose parameter list is empty (or a dtype bucket that is empty) must be able
    # to call the op; the dispatcher has no tensor to pick a kernel from
    _ops.zo_axpby_([], [1], [], [], [])


# --- thread-count invariance ---------------------------------------------------------------------


def _run_with_threads(n_threads, params, *args):
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(n_threads)
        out = [p.clone() for p in params]
        _ops.zo_axpby_(out, *args)
    finally:
        torch.set_num_threads(saved)
    return out


@pytest.mark.parametrize("dtype_", FLOAT_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_axpby_thread_count_invariant(dtype_):
    gen = torch.Generator().manual_seed(0)
    sizes = [7, 65, 4097, 100_003, 0, 3001, 64 * 33 + 1]
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype_) for s in sizes]
    K = len(params)
    args = ([5, 6, 7], list(range(K)), make_coeffs(3, K, gen), [0.01] * K)
    one = _run_with_threads(1, params, *args)
    two = _run_with_threads(2, params, *args)
    for k in range(K):
        assert torch.equal(one[k], two[k]), f"params[{k}] (n={sizes[k]}) depends on the thread count"
        if sizes[k]:
            assert not torch.equal(one[k], params[k])


# --- opcheck -------------------------------------------------------------------------------------


def test_opcheck_axpby(device, dtype):
    params = [
        torch.randn(65, device=device).to(dtype),
        torch.randn(3, 5, device=device).to(dtype),
        torch.randn(1, device=device).to(dtype),
        torch.randn(0, device=device).to(dtype),
    ]
    K = len(params)
    torch.library.opcheck(
        torch.ops.ftops.zo_axpby_.default,
        (params, [1, 2], [0, 1, 2, 3], [0.5] * (2 * K), [0.01] * K),
    )


def test_opcheck_axpby_mixed_dtypes(device):
    params = [torch.randn(7, device=device).to(dt) for dt in FLOAT_DTYPES]
    K = len(params)
    torch.library.opcheck(
        torch.ops.ftops.zo_axpby_.default, (params, [3], list(range(K)), [1.0] * K, [0.0] * K)
    )


# --- bad input: a clear RuntimeError naming the argument, and nothing modified -------------------


def assert_unchanged(params, before, what="a call that failed"):
    for k, (p, b) in enumerate(zip(params, before)):
        if p.layout != torch.strided:
            p, b = p.to_dense(), b.to_dense()
        assert torch.equal(p, b), f"params[{k}] was modified by {what}"


def _good(device, n=3):
    gen = torch.Generator().manual_seed(123)
    return [torch.randn(10 + k, generator=gen).to(device) for k in range(n)]


def _bad_tensors(device):
    yield "non-contiguous", torch.zeros(4, 6, device=device).t()
    yield "stride-0 expanded", torch.zeros(1, device=device).expand(8)
    yield "channels_last", torch.zeros(2, 3, 4, 5, device=device).to(memory_format=torch.channels_last)
    yield "int", torch.zeros(8, dtype=torch.int32, device=device)
    yield "bool", torch.zeros(8, dtype=torch.bool, device=device)
    yield "complex", torch.zeros(8, dtype=torch.complex64, device=device)
    yield "sparse", torch.zeros(8, device=device).to_sparse()


@pytest.mark.parametrize("pos", [0, 1, 2])
@pytest.mark.parametrize(
    "kind", ["non-contiguous", "stride-0 expanded", "channels_last", "int", "bool", "complex", "sparse"]
)
def test_bad_tensor_in_list(device, kind, pos):
    bad = dict(_bad_tensors(device))[kind]
    good = _good(device)
    params = good[:pos] + [bad] + good[pos:]
    before = [p.clone() for p in params]
    K = len(params)
    with pytest.raises(RuntimeError, match=rf"params\[{pos}\]"):
        _ops.zo_axpby_(params, [1, 2], list(range(K)), [1.0] * (2 * K), [0.1] * K)
    assert_unchanged(params, before)


@cuda_only
@pytest.mark.parametrize("cpu_pos", [0, 1, 2])
def test_mixed_devices(cpu_pos):
    params = _good("cuda")
    params[cpu_pos] = params[cpu_pos].cpu()
    before = [p.clone() for p in params]
    K = len(params)
    # the error names a tensor on the wrong device (which one depends on dispatch: any is fine)
    with pytest.raises(RuntimeError, match=r"params\[\d\].*(cpu|cuda|CPU|CUDA)"):
        _ops.zo_axpby_(params, [1], list(range(K)), [1.0] * K, [0.0] * K)
    for k, (p, b) in enumerate(zip(params, before)):
        assert torch.equal(p, b), f"params[{k}] was modified by a call that failed"


@cuda_only
def test_tensors_on_two_cuda_devices():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    params = [torch.zeros(8, device="cuda:0"), torch.zeros(8, device="cuda:1")]
    with pytest.raises(RuntimeError, match=r"params\[1\]"):
        _ops.zo_axpby_(params, [1], [0, 1], [1.0, 1.0], [0.0, 0.0])
    assert not params[0].any() and not params[1].any()


K3 = 3
BAD_ARGS = [
    # (name, seeds, ids, coeffs, decay, pattern)
    ("ids too short", [1], [0, 1], [1.0] * K3, [0.0] * K3, r"ids"),
    ("ids too long", [1], [0, 1, 2, 3], [1.0] * K3, [0.0] * K3, r"ids"),
    ("decay too short", [1], [0, 1, 2], [1.0] * K3, [0.0] * 2, r"decay"),
    ("decay too long", [1], [0, 1, 2], [1.0] * K3, [0.0] * 4, r"decay"),
    ("no seeds", [], [0, 1, 2], [], [0.0] * K3, r"seeds"),
    ("9 seeds", list(range(9)), [0, 1, 2], [1.0] * 9 * K3, [0.0] * K3, r"seeds"),
    ("coeffs per seed only", [1, 2], [0, 1, 2], [1.0, 1.0], [0.0] * K3, r"coeffs"),
    ("coeffs one short", [1, 2], [0, 1, 2], [1.0] * (2 * K3 - 1), [0.0] * K3, r"coeffs"),
    ("coeffs one long", [1], [0, 1, 2], [1.0] * (K3 + 1), [0.0] * K3, r"coeffs"),
    ("negative id", [1], [0, -1, 2], [1.0] * K3, [0.0] * K3, r"ids\[1\]"),
    ("id 2^32", [1], [0, 1, 2**32], [1.0] * K3, [0.0] * K3, r"ids\[2\]"),
]


@pytest.mark.parametrize("name,seeds,ids,coeffs,decay,pattern", BAD_ARGS, ids=[b[0] for b in BAD_ARGS])
def test_bad_arguments(device, name, seeds, ids, coeffs, decay, pattern):
    params = _good(device, K3)
    before = [p.clone() for p in params]
    with pytest.raises(RuntimeError, match=pattern):
        _ops.zo_axpby_(params, seeds, ids, coeffs, decay)
    for k, (p, b) in enumerate(zip(params, before)):
        assert torch.equal(p, b), f"params[{k}] was modified by a call that failed ({name})"


def test_eight_seeds_is_allowed(device):
    p = torch.zeros(10, dtype=torch.float64, device=device)
    _ops.zo_axpby_([p], list(range(8)), [0], [1.0] * 8, [0.0])
    expect = sum(_ops.zo_noise(p, s, 0).double() for s in range(8))
    assert torch.allclose(p, expect, rtol=0, atol=1e-12)


# --- hypothesis ----------------------------------------------------------------------------------


shape_st = st.lists(st.integers(0, 70), min_size=1, max_size=3).map(tuple)
coeff_st = st.one_of(st.just(0.0), st.floats(-10, 10, allow_nan=False, allow_infinity=False))


@pytest.mark.parametrize("dev", DEVICES)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    n_tensors=st.integers(1, 4),
    n_seeds=st.integers(1, 8),
)
def test_axpby_hypothesis(dev, data, n_tensors, n_seeds):
    shapes = [data.draw(shape_st, label=f"shape{k}") for k in range(n_tensors)]
    dtypes = [data.draw(st.sampled_from(FLOAT_DTYPES), label=f"dtype{k}") for k in range(n_tensors)]
    seeds = data.draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=n_seeds, max_size=n_seeds), label="seeds")
    ids = data.draw(st.lists(st.integers(0, 2**32 - 1), min_size=n_tensors, max_size=n_tensors), label="ids")
    cs = data.draw(st.lists(coeff_st, min_size=n_seeds * n_tensors, max_size=n_seeds * n_tensors), label="coeffs")
    decay = data.draw(st.lists(st.floats(0, 1), min_size=n_tensors, max_size=n_tensors), label="decay")
    pscale = data.draw(st.sampled_from([1e-3, 1.0, 30.0]), label="pscale")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), label="torch_seed"))
    params = [
        (torch.randn(s, generator=gen, dtype=torch.float64) * pscale).to(dt).to(dev)
        for s, dt in zip(shapes, dtypes)
    ]
    before = [p.clone() for p in params]
    _ops.zo_axpby_(params, seeds, ids, cs, decay)
    for k in range(n_tensors):
        check_against_references(
            params[k], before[k], seeds, ids[k], _coeffs_for(cs, n_tensors, k, n_seeds), decay[k],
            f"k={k} {dtypes[k]} {shapes[k]}",
        )


# --- CUDA vs CPU ---------------------------------------------------------------------------------


@cuda_only
@pytest.mark.parametrize("dtype_", FLOAT_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_axpby_cuda_matches_cpu(dtype_):
    gen = torch.Generator().manual_seed(5)
    cpu = _mixed_list("cpu", gen)
    cpu = [p.to(dtype_) for p in cpu]
    gpu = [p.cuda() for p in cpu]
    K = len(cpu)
    args = ([1, 2, 3], list(range(K)), make_coeffs(3, K, gen), [0.05] * K)
    _ops.zo_axpby_(cpu, *args)
    _ops.zo_axpby_(gpu, *args)
    for k in range(K):
        g = gpu[k].cpu()
        if g.numel() == 0:
            continue
        u = ulp_diff(g, cpu[k])
        equal = float((u == 0).double().mean())
        assert int(u.max()) <= 2, f"params[{k}]: {int(u.max())} ulp apart; equal fraction {equal:.6f}"
        assert equal >= 0.99, f"params[{k}]: bit-identical fraction {equal:.6f}"


def test_axpby_empty_list_still_checks_arguments():
    with pytest.raises(RuntimeError, match="seeds"):
        _ops.zo_axpby_([], [], [], [], [])
    with pytest.raises(RuntimeError, match="seeds"):
        _ops.zo_axpby_([], list(range(9)), [], [], [])
    with pytest.raises(RuntimeError, match="ids"):
        _ops.zo_axpby_([], [1], [0], [], [])


# --- non-finite coefficients, overlapping tensors, meta tensors ----------------------------------


@pytest.mark.parametrize("what", ["coeffs", "decay", "undo_coeffs"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_coefficient_refused(device, what, bad):
    """A NaN or infinite coefficient would write NaN into every element it touches: refused,
    naming the entry, before anything is written."""
    params = _good(device, K3)
    before = [p.clone() for p in params]
    coeffs, decay, undo = [0.5] * (2 * K3), [0.01] * K3, [0.1] * K3
    {"coeffs": coeffs, "decay": decay, "undo_coeffs": undo}[what][2] = bad
    with pytest.raises(RuntimeError, match=rf"zo_undo_axpby_: {what}\[2\] must be finite"):
        _ops.zo_undo_axpby_(params, 9, undo, [1, 2], list(range(K3)), coeffs, decay)
    if what != "undo_coeffs":
        with pytest.raises(RuntimeError, match=rf"zo_axpby_: {what}\[2\] must be finite"):
            _ops.zo_axpby_(params, [1, 2], list(range(K3)), coeffs, decay)
    assert_unchanged(params, before)


@pytest.mark.parametrize("op", ["axpby", "undo"])
@pytest.mark.parametrize("overlap", ["same tensor", "overlapping views"])
def test_overlapping_params_refused(device, op, overlap):
    """Two list entries sharing memory would each get the other's noise too."""
    buf = torch.randn(20, device=device)
    other = torch.randn(5, device=device)
    params = [other, buf[:12], buf if overlap == "same tensor" else buf[11:]]
    before = [p.clone() for p in params]
    with pytest.raises(RuntimeError, match=r"params\[1\] and params\[2\] share memory"):
        if op == "axpby":
            _ops.zo_axpby_(params, [1], [0, 1, 2], [1.0] * 3, [0.0] * 3)
        else:
            _ops.zo_undo_axpby_(params, 1, [0.1] * 3, [], [0, 1, 2], [], [0.0] * 3)
    assert_unchanged(params, before)
    # disjoint views of one buffer are fine
    _ops.zo_axpby_([buf[:10], buf[10:]], [1], [0, 1], [1.0, 1.0], [0.0, 0.0])


def test_meta_tensor_in_a_list_refused(device):
    """One meta tensor sends the whole call to the meta kernel, which would update nothing."""
    params = _good(device, 2) + [torch.zeros(5, device="meta")]
    before = [p.clone() for p in params[:2]]
    with pytest.raises(RuntimeError, match=r"params\[2\] is on meta but params\[0\] is on"):
        _ops.zo_axpby_(params, [1], [0, 1, 2], [1.0] * 3, [0.0] * 3)
    with pytest.raises(RuntimeError, match=r"params\[2\] is on meta"):
        _ops.zo_undo_axpby_(params, 1, [0.1] * 3, [], [0, 1, 2], [], [0.0] * 3)
    assert_unchanged(params[:2], before)
    # all on meta: fine (shape propagation)
    _ops.zo_axpby_([torch.zeros(3, device="meta")] * 1, [1], [0], [1.0], [0.0])
