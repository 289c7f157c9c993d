"""ftops.zo_undo_axpby_ (csrc/common/zo_undo.h): exact undo of a perturbation pass.

A perturbation pass maps t to F(t) = round_up_ties(t + a), a = 0 + u * z (float32 math, float64
for float64): the exact real sum rounded to the parameter dtype, to nearest with ties toward
+inf. The undo must give back t bit for bit wherever F is injective at t, and otherwise the
simplest member of the range F maps to p (+0 if 0 is one, else the most trailing zero bits).
The references below recompute F with plain torch ops (IEEE adds, exact TwoSum, bit patterns for
the neighbours; checked against exact rational arithmetic), find F's preimage ranges by
bisection (F is monotone) and decide injectivity by brute force: t is the only preimage of F(t)
iff F(t - 1 ulp) != F(t) != F(t + 1 ulp).
"""
import os
import subprocess
import sys
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DEVICES, FLOAT_DTYPES
from ftops import _ops

SIZES = [1, 7, 65, 4097]
INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32,
            torch.float16: torch.int16, torch.bfloat16: torch.int16}


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def bits(x):
    return x.contiguous().view(INT_VIEW[x.dtype])


def step(x, k):
    """The value k representable values above x (k may be a tensor; -0 and +0 are both 0)."""
    nb = torch.finfo(x.dtype).bits
    i = bits(x).to(torch.int64)
    mag = i & ((1 << (nb - 1)) - 1)
    o = torch.where(i < 0, -mag, mag) + k
    b = torch.where(o < 0, (-o) | (1 << (nb - 1)), o)
    if nb == 64:
        return b.view(torch.float64)
    b = torch.where(b >= (1 << (nb - 1)), b - (1 << nb), b)
    return b.to(INT_VIEW[x.dtype]).view(x.dtype)


def round_up_ties(v, t, dtype):
    """round(v + t) to dtype, ties toward +inf; v, t in the accumulation type."""
    if v.dtype == dtype:  # float32 / float64: exact error of the sum by TwoSum
        s = v + t
        bb = s - v
        err = (v - (s - bb)) + (t - bb)
        up = step(s, 1)
        tie = (err > 0) & (err + err == up - s)
        return torch.where(tie, up, s)
    y = v + t  # float32; its error exactly (TwoSum)
    bb = y - v
    err = (v - (y - bb)) + (t - bb)
    s = y.to(dtype)  # nearest, ties to even
    e = y - s.to(v.dtype)
    up, down = step(s, 1), step(s, -1)
    half_up = (up.to(v.dtype) - s.to(v.dtype)) / 2
    half_down = (s.to(v.dtype) - down.to(v.dtype)) / 2
    # y on a midpoint: the exact sum y + err lies on the side of err (>= 0: up). Past the
    # largest value s is +-inf and inf arithmetic would fake a midpoint: there y is a midpoint
    # iff it is the overflow threshold max + half a spacing (or its mirror).
    finite = torch.isfinite(s)
    to_up = (e == half_up) & (err >= 0) & finite
    to_down = (e == -half_down) & (err < 0) & finite
    big = torch.tensor(torch.finfo(dtype).max, dtype=dtype)
    threshold = big.to(v.dtype) + (big.to(v.dtype) - step(big, -1).to(v.dtype)) / 2
    top = (y == threshold) & (err < 0)  # just below the threshold: the largest value
    bottom = (y == -threshold) & (err >= 0)  # on or just above its mirror: ties go up
    r = torch.where(to_up, up, torch.where(to_down, down, s))
    return torch.where(top, big.to(r.device), torch.where(bottom, -big.to(r.device), r))


def offset(p, seed, index, u):
    """a = 0 + u * z(seed, index) in the kernel's accumulation type."""
    acc = acc_dtype(p.dtype)
    z = _ops.zo_noise(p, seed, index).to(acc)
    return torch.zeros((), dtype=acc, device=p.device) + torch.tensor(u, dtype=acc, device=p.device) * z


def F(t, a):
    return round_up_ties(t.to(a.dtype), a, t.dtype)


def ordinal(x):
    """Bit patterns as integers in value order (-0 and +0 both 0)."""
    nb = torch.finfo(x.dtype).bits
    i = bits(x).to(torch.int64)
    mag = i & ((1 << (nb - 1)) - 1)
    return torch.where(i < 0, -mag, mag)


def from_ordinal(o, dtype):
    return step(torch.zeros(o.shape, dtype=dtype, device=o.device), o)


def preimage_range(p, a):
    """[lo, hi] (ordinals) of the finite t with F(t) == p, by bisection over the ordinals (F is
    monotone; +-inf take part so that p = +-inf gets the values that overflow to it); lo > hi
    if there are none."""
    nb = torch.finfo(p.dtype).bits
    top = int(ordinal(torch.tensor(float("inf"), dtype=p.dtype)))
    po = ordinal(p)
    bounds = []
    for want_ge in (True, False):  # lo = least t with F(t) >= p; hi = greatest t with F(t) <= p
        lo_b = torch.full_like(po, -top)
        hi_b = torch.full_like(po, top)
        for _ in range(nb + 1):
            if want_ge:
                mid = (lo_b >> 1) + (hi_b >> 1) + (lo_b & hi_b & 1)  # floor((lo + hi) / 2)
                ok = ordinal(F(from_ordinal(mid, p.dtype), a)) >= po
                hi_b, lo_b = torch.where(ok, mid, hi_b), torch.where(ok, lo_b, mid + 1)
            else:
                mid = (lo_b >> 1) + (hi_b >> 1) + ((lo_b | hi_b) & 1)  # ceil((lo + hi) / 2)
                ok = ordinal(F(from_ordinal(mid, p.dtype), a)) <= po
                lo_b, hi_b = torch.where(ok, mid, lo_b), torch.where(ok, hi_b, mid - 1)
        bounds.append(lo_b if want_ge else hi_b)
    return bounds[0].clamp(min=1 - top), bounds[1].clamp(max=top - 1)  # finite values only


def simplest(lo, hi):
    """The ordinal in [lo, hi] with the most trailing zero bits of its magnitude (0 if inside),
    by brute force over the bit positions: the largest k such that the range holds a multiple
    of 2^k."""
    neg = hi < 0
    a, b = torch.where(neg, -hi, lo), torch.where(neg, -lo, hi)  # magnitudes a <= b
    best = a.clone()
    for k in range(63):
        m = torch.div(b, 1 << k, rounding_mode="floor") * (1 << k)  # largest multiple <= b
        best = torch.where(m >= a, m, best)
    r = torch.where(neg, -best, best)
    return torch.where((lo <= 0) & (hi >= 0), torch.zeros_like(r), r)


def ref_undo(p, a):
    """The documented rule: the simplest finite preimage of p; none: p - a rounded (inf: p);
    NaN stays."""
    lo, hi = preimage_range(p, a)
    r = from_ordinal(simplest(lo, hi), p.dtype)
    q = torch.where(torch.isinf(p), p, (p.to(a.dtype) - a).to(p.dtype))
    out = torch.where(lo <= hi, r, q)
    return torch.where(torch.isnan(p), p, out)


def undo_only(p, seed, index, u):
    """zo_undo_axpby_ with no apply seeds: params = undo(params) (+ 0)."""
    _ops.zo_undo_axpby_([p], seed, [u], [], [index], [], [0.0])


def injective_at(t, a):
    p = F(t, a)
    return (bits(F(step(t, -1), a)) != bits(p)) & (bits(F(step(t, 1), a)) != bits(p))


def make_theta(n, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g, dtype=torch.float64) * 0.02
    if n > 64:  # a few wide-range values: tiny, large, exact zero, binade edges
        t[:8] = torch.tensor([0.0, 1e-7, -3e-6, 1.0, -2.0, 0.5, 0.25 - 1e-9, 100.0])
    return t.to(dtype).to(device)


# --- the round trip --------------------------------------------------------------------------


@pytest.mark.parametrize("u", [1e-4, 1e-3, -1e-2, 0.3, 10.0])
@pytest.mark.parametrize("size", SIZES)
def test_undo_recovers_theta_where_injective(device, dtype, size, u):
    theta = make_theta(size, dtype, device, seed=size)
    seed, index = 12345 + size, 3
    a = offset(theta, seed, index, u)
    p = theta.clone()
    # the perturbation pass itself, through the op: no undo (u=0), apply +u z with ties up
    _ops.zo_undo_axpby_([p], seed, [0.0], [seed], [index], [u], [0.0], True)
    assert torch.equal(bits(p), bits(F(theta, a))), "perturbation pass != round_up_ties(t + a)"
    undo_only(p, seed, index, u)
    inj = injective_at(theta, a)
    exact = bits(p) == bits(theta)
    assert bool(exact[inj].all()), f"{int((~exact & inj).sum())} injective elements not recovered"
    # elsewhere: a preimage of F(theta) (theta is one; rounding merged it with others)
    pre = bits(F(p, a)) == bits(F(theta, a))
    assert bool(pre.all()), f"{int((~pre).sum())} results are not preimages"
    # never the wrong sign
    assert not bool(((p * theta) < 0).any())
    # and exactly the documented rule
    assert torch.equal(bits(p), bits(ref_undo(F(theta, a), a)))
    if size == 4097 and abs(u) <= 1e-3:
        assert float(inj.double().mean()) > 0.8


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
       log_scale=st.floats(-30, 6), log_u=st.floats(-12, 3), u_sign=st.sampled_from([-1.0, 1.0]),
       n=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
def test_undo_rule_hypothesis(dtype, log_scale, log_u, u_sign, n, seed):
    """Any magnitudes of weights and perturbation (down to subnormals, up to |a| >> |t|): the
    undo is the simplest preimage (bisection reference), t itself where F is injective."""
    g = torch.Generator().manual_seed(seed)
    theta = (torch.randn(n, generator=g, dtype=torch.float64) * 2.0 ** log_scale).to(dtype)
    u = u_sign * 2.0 ** log_u
    a = offset(theta, seed, 1, u)
    p = theta.clone()
    _ops.zo_undo_axpby_([p], seed, [0.0], [seed], [1], [u], [0.0], True)
    assert torch.equal(bits(p), bits(F(theta, a)))
    undo_only(p, seed, 1, u)
    assert torch.equal(bits(p), bits(ref_undo(F(theta, a), a)))
    inj = injective_at(theta, a)
    same = (bits(p) == bits(theta)) | ((p == 0) & (theta == 0))  # -0 and +0 map alike: +0 back
    assert bool(same[inj].all())
    assert not bool(((p * theta) < 0).any())


@pytest.mark.parametrize("dtype_", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("u", [1e-3, -0.3, 20.0])
def test_undo_every_half_pattern(device, dtype_, u):
    """Every bit pattern of the half types (subnormals, +-0, the largest values, +-inf: the
    values that overflow to it) through the vectorized undo and apply: the documented rule and
    one rounding, bit for bit. NaN patterns are left out (NaN stays NaN, checked below)."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype_)
    p = every[~torch.isnan(every)].to(device)
    a = offset(p, 77, 5, u)
    q = p.clone()
    undo_only(q, 77, 5, u)
    assert torch.equal(bits(q), bits(ref_undo(p, a)))
    q = p.clone()  # undo, then apply 0.25 * z(77) with ties up
    _ops.zo_undo_axpby_([q], 77, [u], [77], [5], [0.25], [0.0], True)
    t = ref_undo(p, a).to(a.dtype)
    z = _ops.zo_noise(p, 77, 5).to(a.dtype)
    assert torch.equal(bits(q), bits(round_up_ties(t, 0.25 * z, dtype_)))


def test_ties_to_even_would_lose_float32_elements():
    """Why the perturbation rounds ties up: with ties to even, float32 |a| ~ |t|/8 collides often."""
    theta = make_theta(1 << 16, torch.float32, "cpu", seed=0)
    a = offset(theta, 7, 0, 1e-3)
    rne = theta + a
    inj_rne = (step(theta, 1) + a != rne) & (step(theta, -1) + a != rne)
    inj_up = injective_at(theta, a)
    assert float(inj_up.double().mean()) > float(inj_rne.double().mean()) + 0.03


def test_zero_preferred_when_it_is_a_preimage(device):
    for dtype in (torch.bfloat16, torch.float16):
        theta = (torch.rand(4097, generator=torch.Generator().manual_seed(0)) - 0.5) * 1e-5
        theta = theta.to(dtype).to(device)
        a = offset(theta, 5, 0, 1e-2)
        p = theta.clone()
        _ops.zo_undo_axpby_([p], 5, [0.0], [5], [0], [1e-2], [0.0], True)
        zero_ok = bits(F(torch.zeros_like(theta), a)) == bits(p)
        undo_only(p, 5, 0, 1e-2)
        assert float(zero_ok.double().mean()) > 0.2  # the case is exercised
        assert bool((bits(p) == 0)[zero_ok].all())
        assert not bool(((p * theta) < 0).any())


@pytest.mark.parametrize("invertible", [False, True])
@pytest.mark.parametrize("size", SIZES)
def test_undo_then_apply_is_one_rounding(device, dtype, size, invertible):
    """zo_undo_axpby_ == undo, then v + (sum c z - d v) rounded once (RNE as zo_axpby_ or ties up)."""
    p0 = make_theta(size, dtype, device, seed=size + 1)
    seeds, cs, d = [21, 22, 23], [0.5, -1e-3, 2e-2], 0.01
    for undo_seed in (22, 99):  # shared with an apply seed, or not
        p = p0.clone()
        _ops.zo_undo_axpby_([p], undo_seed, [-1e-3], seeds, [4], cs, [d], invertible)
        t = p0.clone()
        undo_only(t, undo_seed, 4, -1e-3)
        assert torch.equal(bits(t), bits(ref_undo(p0, offset(p0, undo_seed, 4, -1e-3))))
        if not invertible:
            _ops.zo_axpby_([t], seeds, [4], cs, [d])
            assert torch.equal(bits(p), bits(t))
        else:
            acc = acc_dtype(dtype)
            v = t.to(acc)
            s = torch.zeros_like(v)
            for seed, c in zip(seeds, cs):
                s = s + torch.tensor(c, dtype=acc, device=device) * _ops.zo_noise(t, seed, 4).to(acc)
            want = round_up_ties(v, s - torch.tensor(d, dtype=acc, device=device) * v, dtype)
            assert torch.equal(bits(p), bits(want))


def test_mezo_cycle_restores_bitwise_where_injective(device, dtype):
    """+eps z, undo and -eps z, undo: bit-exact wherever both perturbations were injective."""
    theta = make_theta(4097, dtype, device, seed=9)
    eps, seed = 1e-3, 77
    p = theta.clone()
    _ops.zo_undo_axpby_([p], seed, [0.0], [seed], [0], [eps], [0.0], True)
    _ops.zo_undo_axpby_([p], seed, [eps], [seed], [0], [-eps], [0.0], True)
    _ops.zo_undo_axpby_([p], seed, [-eps], [seed], [0], [0.0], [0.0], False)
    a = offset(theta, seed, 0, eps)
    inj = injective_at(theta, a) & injective_at(theta, -a)
    assert bool((bits(p) == bits(theta))[inj].all())
    assert float((bits(p) == bits(theta)).double().mean()) > 0.8


# --- launch invariance and op plumbing --------------------------------------------------------


def test_multi_tensor_equals_single(device):
    shapes = [(7,), (65,), (3, 33), (0,), (4097,), (1,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float32, torch.bfloat16]
    ps = [make_theta(int(torch.tensor(s).prod()), dt, device, seed=i).reshape(s)
          for i, (s, dt) in enumerate(zip(shapes, dtypes))]
    ids = [5, 1, 9, 2, 0, 7]
    undo = [1e-3, -2e-3, 0.0, 1e-2, 1e-3, 5.0]
    seeds = [31, 32]
    cs = [0.1 * (k + 1) for k in range(2 * len(ps))]
    decay = [0.0, 0.01, 0.0, 0.1, 0.0, 0.0]
    together = [p.clone() for p in ps]
    _ops.zo_undo_axpby_(together, 32, undo, seeds, ids, cs, decay, True)
    K = len(ps)
    for k, p in enumerate(ps):
        one = p.clone()
        _ops.zo_undo_axpby_([one], 32, [undo[k]], seeds, [ids[k]], [cs[k], cs[K + k]], [decay[k]], True)
        assert torch.equal(bits(one.flatten()), bits(together[k].flatten()))


def test_thread_count_invariance():
    p0 = make_theta(200_003, torch.bfloat16, "cpu", seed=3)
    results = []
    old = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            p = p0.clone()
            _ops.zo_undo_axpby_([p], 8, [1e-3], [8, 9], [0], [-1e-3, 0.5], [0.0], True)
            results.append(p)
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(bits(r), bits(results[0])) for r in results[1:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_agree_bitwise(dtype):
    p0 = make_theta(100_003, dtype, "cpu", seed=4)
    for invertible in (False, True):
        out = []
        for dev in ("cpu", "cuda"):
            p = p0.clone().to(dev)  # clone: .to("cpu") of a CPU tensor is the same tensor
            _ops.zo_undo_axpby_([p], 11, [2e-3], [11, 12], [3], [-2e-3, 0.25], [0.01], invertible)
            out.append(p.cpu())
        assert torch.equal(bits(out[0]), bits(out[1]))


def test_opcheck(device):
    ps = [make_theta(65, torch.float32, device, 0), make_theta(7, torch.bfloat16, device, 1)]
    torch.library.opcheck(torch.ops.ftops.zo_undo_axpby_.default,
                          (ps, 3, [1e-3, 1e-3], [3, 4], [0, 1], [0.1, 0.2, 0.3, 0.4], [0.0, 0.0], True))
    torch.library.opcheck(torch.ops.ftops.zo_undo_axpby_.default,
                          (ps, 3, [1e-3, -1e-3], [], [0, 1], [], [0.0, 0.1], False))


def test_bad_arguments():
    p = torch.zeros(4)
    with pytest.raises(RuntimeError, match="undo_coeffs"):
        _ops.zo_undo_axpby_([p], 1, [], [1], [0], [0.1], [0.0])
    with pytest.raises(RuntimeError, match="seeds must have 0 to 8"):
        _ops.zo_undo_axpby_([p], 1, [0.0], list(range(9)), [0], [0.1] * 9, [0.0])
    with pytest.raises(RuntimeError, match="contiguous"):
        _ops.zo_undo_axpby_([torch.zeros(4, 6).t()], 1, [0.0], [1], [0], [0.1], [0.0])
    with pytest.raises(RuntimeError, match="dense"):
        _ops.zo_undo_axpby_([torch.zeros(4, 4).to_sparse()], 1, [0.0], [1], [0], [0.1], [0.0])
    _ops.zo_undo_axpby_([], 1, [], [1], [], [], [])  # empty list: a no-op
    with pytest.raises(RuntimeError, match="ids"):
        _ops.zo_undo_axpby_([], 1, [], [1], [0], [], [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_binade_crossings_do_not_drift(dtype):
    """Values just below a power of two lose a bit whenever a perturbation pushes them across it;
    the undo picks the simpler of the two preimages, so such an element moves at most once, by
    1 ulp, however many cycles follow (no random walk, no bias)."""
    g = torch.Generator().manual_seed(0)
    n = 4096
    mag = 0.0625 - torch.rand(n, generator=g, dtype=torch.float64) * 0.004
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    theta = (mag * sign).to(dtype)
    p = theta.clone()
    eps = 1e-3
    for c in range(200):
        seed = 1000 + c
        _ops.zo_undo_axpby_([p], seed, [0.0], [seed], [0], [eps], [0.0], True)
        _ops.zo_undo_axpby_([p], seed, [eps], [seed], [0], [-eps], [0.0], True)
        _ops.zo_undo_axpby_([p], seed, [-eps], [], [0], [], [0.0], False)
    nb = torch.finfo(dtype).bits

    def ordered(x):
        i = bits(x).to(torch.int64)
        mag = i & ((1 << (nb - 1)) - 1)
        return torch.where(i < 0, -mag, mag)

    moved = (ordered(p) - ordered(theta)).abs()
    assert int(moved.max()) <= 1
    assert 0.05 < float((moved > 0).double().mean()) < 0.6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_values_near_zero_do_not_random_walk(dtype):
    """|t| << eps: every perturbation merges t with its neighbours (a wide preimage range). The
    simplest member is a coarse grid point that later ranges (narrower than its grid) keep, so
    the drift stays within a few spacings of the largest perturbation instead of growing like
    sqrt(cycles) as it would if each undo picked, say, the member nearest p - a."""
    g = torch.Generator().manual_seed(1)
    n, eps, cycles = 4096, 1e-3, 300
    theta = ((torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 2e-4).to(dtype)
    p = theta.clone()
    widest = 0.0
    for c in range(cycles):
        seed = 5000 + c
        _ops.zo_undo_axpby_([p], seed, [0.0], [seed], [0], [eps], [0.0], True)
        _ops.zo_undo_axpby_([p], seed, [eps], [seed], [0], [-eps], [0.0], True)
        _ops.zo_undo_axpby_([p], seed, [-eps], [], [0], [], [0.0], False)
        a = offset(p, seed, 0, eps).abs().max().to(dtype)
        widest = max(widest, float(step(a, 1).double() - a.double()))  # spacing at the largest |a|
    drift = (p.double() - theta.double()).abs()
    assert float(drift.max()) <= 4 * widest
    assert not bool(((p * theta) < 0).any())


def _exact_round_up_ties(x, dtype):
    """round(x) to dtype for an exact rational x, ties toward +inf (brute force over neighbours)."""
    c = torch.tensor(float(x), dtype=torch.float64).to(dtype)  # within a few values of the answer
    cands = [step(c, k) for k in range(-3, 4)]
    vals = [Fraction(float(v)) for v in cands]
    best = min(range(len(cands)), key=lambda i: (abs(vals[i] - x), -vals[i]))
    return cands[best]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_perturbation_rounds_the_exact_sum(dtype):
    """F(t) is the exact real t + a rounded with ties up, also where the float32 sum lands on a
    16-bit midpoint that the exact sum misses: t is chosen around M - a for the midpoint M
    nearest a, so t + a is within a hair of M. Checked with rational arithmetic, through the
    perturbation pass of the op."""
    n, seed, index, u = 3000, 31, 2, 3e-3
    a = offset(torch.zeros(n, dtype=dtype), seed, index, u)  # float32
    near = a.to(dtype)
    side = torch.where(near.to(a.dtype) < a, 1, -1)
    mid = (near.double() + step(near, side).double()) / 2  # a T midpoint next to a
    k = torch.randint(-2, 3, (n,), generator=torch.Generator().manual_seed(2))
    t = step((mid - a.double()).to(dtype), k)
    t[: n // 3] = (torch.randn(n // 3, generator=torch.Generator().manual_seed(3)) * 0.05).to(dtype)
    p = t.clone()
    _ops.zo_undo_axpby_([p], seed, [0.0], [seed], [index], [u], [0.0], True)
    assert torch.equal(bits(p), bits(F(t, a)))
    misses = 0
    for i in range(n):
        x = Fraction(float(t[i])) + Fraction(float(a[i]))
        want = _exact_round_up_ties(x, dtype)
        assert bits(p[i : i + 1]).item() == bits(want.reshape(1)).item(), (i, float(t[i]), float(a[i]))
        y = float(t[i].float() + a[i])  # the float32 sum
        misses += dtype != torch.float32 and y == float(mid[i]) and Fraction(y) != x
    if dtype == torch.bfloat16:
        assert misses > 0  # the case is exercised (2 elements with these seeds)


def _coeffs_for_offsets(z, want, accept=None):
    """Per element of z (float32 noise), the float32 coefficient u nearest want / z whose offset
    fl(u * z) passes `accept` (a test on a tensor of offsets; default: equals want), searched
    over the 64 float32 values either side; want / z where none passes."""
    u0 = want / z
    cand = torch.stack([step(u0, j) for j in sorted(range(-64, 65), key=abs)])
    prod = cand * z
    hit = accept(prod) if accept is not None else prod == want
    return torch.where(hit.any(0), cand[hit.int().argmax(0), torch.arange(z.numel())], u0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_perturbation_rounds_the_exact_sum_at_overflow(device, dtype):
    """At the midpoint past the largest value (65520 in float16) the float32 sum can land on the
    midpoint while the exact sum is a hair below it (then the result is the largest value, not
    inf), and at the mirror an exact tie goes up to -max (ties toward +inf), not to -inf. Both
    went to inf before. The undo of each result is a preimage."""
    big = torch.tensor(torch.finfo(dtype).max, dtype=dtype)
    half = (big.double() - step(big, -1).double()).item() / 2
    threshold = big.double().item() + half
    ulp = (step(torch.tensor(threshold, dtype=torch.float32), 1).double().item() - threshold)
    z = _ops.zo_noise(torch.zeros(1), 41, 0)[0]
    top, bottom = big.double().item(), -big.double().item()
    cases = [  # (t, the wanted float32 a, accept(tensor of a), expected result)
        (big, half, lambda a: (top + a > threshold - ulp / 2) & (top + a < threshold), big),
        (big, half, lambda a: top + a == threshold, torch.tensor(float("inf"), dtype=dtype)),
        (-big, -half, lambda a: bottom + a == -threshold, -big),
        (-big, -half, lambda a: (bottom + a > -threshold - ulp / 2) & (bottom + a < -threshold),
         torch.tensor(float("-inf"), dtype=dtype)),
    ]
    for t, want, accept, expected in cases:
        u = float(_coeffs_for_offsets(z.reshape(1), torch.tensor([want], dtype=torch.float32),
                                      lambda prod: accept(prod.double()))[0])
        a = offset(torch.zeros(1, dtype=dtype), 41, 0, u)
        assert bool(accept(a.double())), f"no coefficient found for {want}"
        assert float(t.float() + a) in (threshold, -threshold)  # the float32 sum is the midpoint
        p = t.reshape(1).clone().to(device)
        _ops.zo_undo_axpby_([p], 41, [0.0], [41], [0], [u], [0.0], True)
        assert bits(p).item() == bits(expected.reshape(1)).item(), (float(t), u)
        assert bits(F(t.reshape(1), a)).item() == bits(expected.reshape(1)).item()
        undo_only(p, 41, 0, u)
        assert bits(F(p.cpu(), a)).item() == bits(expected.reshape(1)).item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_overflowed_perturbation_is_undone(device, dtype):
    """A perturbation that pushes a weight near the largest value past it gives +-inf; the undo
    brings back a finite preimage (the simplest value that overflows to that inf), so a MeZO
    step that sees an inf loss and restores loses no weight. NaN stays NaN."""
    big = float(torch.finfo(dtype).max)
    g = torch.Generator().manual_seed(3)
    mag = big * (1 - torch.rand(4097, generator=g, dtype=torch.float64) * 0.01)
    sign = torch.where(torch.rand(4097, generator=g) < 0.5, -1.0, 1.0).double()
    theta = (mag * sign).to(dtype).to(device)
    u = big * 0.02
    a = offset(theta, 11, 0, u)
    p = theta.clone()
    _ops.zo_undo_axpby_([p], 11, [0.0], [11], [0], [u], [0.0], True)
    assert bool(torch.isinf(p).any())  # the case is exercised
    undo_only(p, 11, 0, u)
    assert bool(torch.isfinite(p).all())
    assert torch.equal(bits(F(p, a)), bits(F(theta, a)))  # preimages of what the pass produced
    assert torch.equal(bits(p), bits(ref_undo(F(theta, a), a)))
    nan = torch.full((5,), float("nan"), dtype=dtype, device=device)
    undo_only(nan, 11, 0, u)
    assert bool(torch.isnan(nan).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_undo_where_the_shortcut_rounding_ties(device, dtype):
    """Offsets a that put t + a on (or a float32 ulp or two beside) a midpoint of the spacing h
    around p: a = (m + 1/2) h + d ulp(a), for weights across many binades, each weight its own
    one-element tensor with its own coefficient (searched so that fl(u z) is that a). Here the
    shortcut's rounding of a to a multiple of h must go up at an exact tie (its (a + big) - big
    rounds ties to even). Compared with the reference rule; rerun in the other shortcut mode
    (test below)."""
    g = torch.Generator().manual_seed(7)
    K = 300
    mags = torch.exp2(torch.randint(-20, 8, (K,), generator=g).double()) * (1 + torch.rand(K, generator=g, dtype=torch.float64))
    theta = (mags * torch.where(torch.rand(K, generator=g) < 0.5, -1.0, 1.0).double()).to(dtype)
    h = (step(theta, 1).double() - theta.double()).abs()
    m = torch.randint(-3, 4, (K,), generator=g).double()
    d = torch.randint(-2, 3, (K,), generator=g)
    target = step(((m + 0.5) * h).float(), d)  # float32 offsets at or beside the tie
    ids = list(range(K))
    z = torch.stack([_ops.zo_noise(torch.zeros(1), 13, k)[0] for k in ids])
    u = _coeffs_for_offsets(z, target)
    a = u * z + 0.0  # the kernel's offset, 0 + u * z
    assert int((a == target).sum()) > K // 2  # most offsets are exactly the wanted ones
    ps = [F(theta[k : k + 1], a[k : k + 1]).to(device) for k in ids]
    p_all = torch.cat([q.cpu() for q in ps])
    _ops.zo_undo_axpby_(ps, 13, [float(v) for v in u], [], ids, [], [0.0] * K)
    got = torch.cat([q.cpu() for q in ps])
    assert torch.equal(bits(got), bits(ref_undo(p_all, a)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_undo_where_the_offset_is_near_the_shortcut_guard(device, dtype):
    """The shortcut rounds a to a multiple of p's spacing h as (a + big) - big, big = 1.5 * 2^23 h,
    which is exact only while |a| < 2^22 h; its guard |a| < 2^(e-1) (p in [2^e, 2^(e+1))) keeps
    it there, and equals that bound for float32. Offsets a few float32 ulps either side of
    +-2^(e-1), +-2^e and +-2^22 h, for weights across binades where t and p can share a binade:
    compared with the reference rule; rerun in the other shortcut mode (test below)."""
    g = torch.Generator().manual_seed(11)
    K = 240
    e = torch.randint(-20, 10, (K,), generator=g).double()
    # theta in the upper part of its binade, so that t = p - a for |a| ~ 2^(e-1) stays there
    theta = (torch.exp2(e) * (1.55 + 0.4 * torch.rand(K, generator=g, dtype=torch.float64)) *
             torch.where(torch.rand(K, generator=g) < 0.5, -1.0, 1.0).double()).to(dtype)
    mant = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[dtype]
    bound = torch.stack([torch.exp2(e - 1), torch.exp2(e), torch.exp2(e - mant + 22)])
    pick = torch.randint(0, 3, (K,), generator=g)
    mag = bound[pick, torch.arange(K)] * torch.where(torch.rand(K, generator=g) < 0.5, -1.0, 1.0).double()
    d = torch.randint(-3, 4, (K,), generator=g)
    target = step(mag.float(), d)
    ids = list(range(K))
    z = torch.stack([_ops.zo_noise(torch.zeros(1), 17, k)[0] for k in ids])
    u = _coeffs_for_offsets(z, target)
    a = u * z + 0.0
    assert int((a == target).sum()) > K // 2
    ps = [F(theta[k : k + 1], a[k : k + 1]).to(device) for k in ids]
    p_all = torch.cat([q.cpu() for q in ps])
    finite = torch.isfinite(p_all)
    assert int(finite.sum()) > K // 2
    _ops.zo_undo_axpby_(ps, 17, [float(v) for v in u], [], ids, [], [0.0] * K)
    got = torch.cat([q.cpu() for q in ps])
    assert torch.equal(bits(got), bits(ref_undo(p_all, a)))


def test_undo_in_the_other_shortcut_mode_gives_the_same_results():
    """The undo takes a same-binade shortcut (csrc/common/zo_undo.h) wherever it holds and the
    exact path for the other elements, gathered into full vectors (the CPU per 1024 elements, a
    CUDA warp in shared memory); FTOPS_ZO_UNDO_SHORTCUT=0 takes the exact path everywhere. The
    undo tests of this file, rerun in the other mode than this run's, must all pass: the results
    are the same bit for bit."""
    mode = "1" if os.environ.get("FTOPS_ZO_UNDO_SHORTCUT") == "0" else "0"
    env = dict(os.environ, FTOPS_ZO_UNDO_SHORTCUT=mode)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__),
         "-k", "undo and not shortcut_mode and not simd_path"],
        env=env, capture_output=True, text=True, timeout=600, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_undo_on_every_cpu_simd_path_gives_the_same_results(isa, tmp_path):
    """The CPU undo lists the elements its shortcut leaves to the exact path with an AVX-512
    compress where the CPU has it, else with a scalar loop (and Philox has per-ISA paths too,
    csrc/cpu/simd_isa.h): forced to a lesser path with FTOPS_SIMD, a subprocess must produce
    the same bits as this one, at odd sizes and offsets, in both shortcut modes."""
    code = (
        "import sys, torch\n"
        "from ftops import _ops\n"
        "g = torch.Generator().manual_seed(5)\n"
        "out = []\n"
        "for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):\n"
        "    ps = [(torch.randn(n, generator=g) * s).to(dtype) for n, s in ((4097, 0.02), (3000, 1e-3), (77, 1.0))]\n"
        "    _ops.zo_axpby_(ps, [21], [0, 1, 2], [1e-3, 2e-3, 1e-3], [0.0] * 3, offsets=[0, 13, 2**33 + 5])\n"
        "    _ops.zo_undo_axpby_(ps, 21, [1e-3, 2e-3, 1e-3], [21, 8], [0, 1, 2], [-1e-3, -2e-3, -1e-3, 1e-4, 1e-4, 1e-4],\n"
        "                        [0.0, 1e-3, 0.0], invertible=True, offsets=[0, 13, 2**33 + 5])\n"
        "    out += ps\n"
        "torch.save(out, sys.argv[1])\n"
    )
    here = os.path.dirname(os.path.abspath(__file__))
    results = {}
    for name, extra in (("default", {}), ("forced", {"FTOPS_SIMD": isa})):
        for mode in ("0", "1"):
            env = {k: v for k, v in os.environ.items() if k != "FTOPS_SIMD"}
            env.update(extra, FTOPS_ZO_UNDO_SHORTCUT=mode)
            path = str(tmp_path / f"{name}{mode}.pt")
            out = subprocess.run([sys.executable, "-c", code, path], env=env, capture_output=True,
                                 text=True, timeout=120, cwd=here)
            assert out.returncode == 0, out.stderr[-2000:]
            results[name, mode] = torch.load(path)
    ref = results["default", "0"]
    for key, got in results.items():
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            assert torch.equal(bits(a), bits(b)), key
