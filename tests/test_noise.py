"""Counter-based noise (csrc/common/philox.h) through ftops.zo_noise / zo_noise_bits / noise_like.

What is checked:
- the raw words are Philox4x32-10 (Random123 known-answer vectors, then an independent numpy
  Philox for many seeds/ids/counters), laid out as documented: counter = (i/4 lo, i/4 hi, id, 0),
  key = (seed lo, seed hi), element i takes word i % 4;
- the normals are Box-Muller of those words (against a float64 evaluation of the same formula);
- noise is a pure function of (seed, index, element): prefix-stable, shape-independent,
  reproducible, independent of the thread count, and different for different seeds/indices;
- statistics on a million draws: mean, variance, Kolmogorov-Smirnov, tails, correlations between
  neighbouring elements, parameter indices and seeds; uniformity of the uint32 words;
- CUDA against CPU (only where CUDA exists).
"""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ftops
from ftops import _ops
from ftops.mezo import noise_like

try:  # scipy is in the test extra; fall back to our own KS statistic when it is missing
    import scipy.stats as _scipy_stats
except ImportError:  # pragma: no cover - depends on the environment
    _scipy_stats = None

N_STAT = 1 << 20  # "a million draws"
MASK32 = np.uint64(0xFFFFFFFF)


# --- independent references --------------------------------------------------------------------


def philox4x32_10(c, k):
    """Vectorized numpy Philox4x32-10 (Salmon et al. 2011). c: 4 arrays, k: 2 arrays/ints."""
    M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    W0, W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
    s32 = np.uint64(32)
    c0, c1, c2, c3 = [np.asarray(x, dtype=np.uint64) & MASK32 for x in c]
    k0, k1 = [np.asarray(x, dtype=np.uint64) & MASK32 for x in k]
    for _ in range(10):
        p0 = M0 * c0
        p1 = M1 * c2
        c0, c1, c2, c3 = (p1 >> s32) ^ c1 ^ k0, p1 & MASK32, (p0 >> s32) ^ c3 ^ k1, p0 & MASK32
        k0 = (k0 + W0) & MASK32
        k1 = (k1 + W1) & MASK32
    return c0, c1, c2, c3


def ref_words(seed, index, n):
    """The n uint32 words (as int64) that the design says element 0..n-1 of tensor `index` gets."""
    seed64 = seed & 0xFFFFFFFFFFFFFFFF
    g = np.arange((n + 3) // 4, dtype=np.uint64)
    zero = np.zeros_like(g)
    w = philox4x32_10(
        (g & MASK32, g >> np.uint64(32), zero + np.uint64(index), zero),
        (seed64 & 0xFFFFFFFF, seed64 >> 32),
    )
    return torch.from_numpy(np.stack(w, axis=1).reshape(-1)[:n].astype(np.int64))


def ref_normals_f64(words):
    """Box-Muller of word pairs (w0, w1), (w2, w3) in float64, as philox.h defines it."""
    w = words.numpy().astype(np.uint64).reshape(-1, 2)
    xa, xb = w[:, 0], w[:, 1]
    u1 = (((xa >> np.uint64(9)) << np.uint64(1)) | np.uint64(1)).astype(np.float64) * 2.0**-24
    theta = (xb >> np.uint64(8)).astype(np.float64) * (2.0 * math.pi / 2.0**24)
    r = np.sqrt(-2.0 * np.log(u1))
    return torch.from_numpy(np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1).reshape(-1))


def normal_cdf(x):
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def ks_statistic(x):
    """Two-sided one-sample KS statistic of x against N(0, 1)."""
    if _scipy_stats is not None:
        return float(_scipy_stats.kstest(x.double().cpu().numpy(), "norm").statistic)
    xs, _ = torch.sort(x.double().cpu())
    n = xs.numel()
    cdf = normal_cdf(xs)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max(float((i / n - cdf).max()), float((cdf - (i - 1) / n).max()))


def corr(a, b):
    a = a.double().flatten()
    b = b.double().flatten()
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / torch.sqrt((a * a).sum() * (b * b).sum()))


def noise(n, seed, index, device="cpu"):
    return _ops.zo_noise(torch.empty(n, device=device), seed, index)


def bits(n, seed, index, device="cpu"):
    return _ops.zo_noise_bits(torch.empty(n, device=device), seed, index)


# --- the words are Philox4x32-10 with the documented counter layout -------------------------------


# Random123 kat_vectors for philox4x32_10: (counter, key) -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_reference_philox_known_answers(ctr, key, expected):
    assert tuple(int(v) for v in philox4x32_10(ctr, key)) == expected


def test_bits_known_answer():
    # seed 0, index 0, group 0 is Philox(counter 0, key 0): the first Random123 vector.
    assert bits(4, 0, 0).tolist() == list(KAT[0][2])


@pytest.mark.parametrize(
    "seed,index",
    [(0, 0), (1, 0), (0, 1), (12345, 7), (2**32 + 5, 3), (2**63 - 1, 2**32 - 1), (-1, 17), (-(2**63), 1)],
)
def test_bits_match_reference(seed, index):
    n = 4097 + 2  # not a multiple of 4 or 64
    got = bits(n, seed, index)
    assert got.dtype == torch.int64 and got.shape == (n,)
    assert int(got.min()) >= 0 and int(got.max()) < 2**32
    assert torch.equal(got, ref_words(seed, index, n))


def ref_words_at(seed, index, offset, n):
    """ref_words for elements offset .. offset + n - 1 of the tensor (any offset, past 2^34 too)."""
    seed64 = seed & 0xFFFFFFFFFFFFFFFF
    g = np.arange(offset // 4, (offset + n + 3) // 4, dtype=np.uint64)
    zero = np.zeros_like(g)
    w = philox4x32_10(
        (g & MASK32, g >> np.uint64(32), zero + np.uint64(index), zero),
        (seed64 & 0xFFFFFFFF, seed64 >> 32),
    )
    flat = np.stack(w, axis=1).reshape(-1)
    return torch.from_numpy(flat[offset % 4 : offset % 4 + n].astype(np.int64))


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_every_cpu_philox_path_gives_the_reference_words(isa):
    """csrc/cpu/philox_simd.h computes Philox (one block, or two as interleaved chains) and the
    interleave of the normals with AVX-512 or AVX2 intrinsics (picked at run time): each path,
    forced with FTOPS_SIMD (capped at what this CPU has), gives the reference words, at offsets
    whose group index needs the counter's high word too, and the normals of this process."""
    cases = [(12345, 7, 0, 4097 + 2), (2**63 - 1, 3, 2**36 + 3, 1000), (-5, 2**32 - 1, 2**34 - 130, 777)]
    code = (
        "import sys, torch, ftops\n"
        "for seed, index, offset, n in %r:\n"
        "    w = ftops._ops.zo_noise_bits(torch.empty(n), seed, index, offset)\n"
        "    z = ftops._ops.zo_noise(torch.empty(n), seed, index, offset).view(torch.int32)\n"
        "    sys.stdout.write(','.join(map(str, w.tolist())) + '\\n')\n"
        "    sys.stdout.write(','.join(map(str, z.tolist())) + '\\n')\n" % (cases,)
    )
    env = dict(os.environ, FTOPS_SIMD=isa)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 * len(cases)
    for k, (seed, index, offset, n) in enumerate(cases):
        got = torch.tensor([int(v) for v in lines[2 * k].split(",")], dtype=torch.int64)
        assert torch.equal(got, ref_words_at(seed, index, offset, n)), (isa, seed, index, offset)
        normals = torch.tensor([int(v) for v in lines[2 * k + 1].split(",")], dtype=torch.int32)
        here = _ops.zo_noise(torch.empty(n), seed, index, offset).view(torch.int32)
        assert torch.equal(normals, here), (isa, seed, index, offset)


def test_bits_flattened_and_layout_independent():
    like = torch.empty(3, 5, 7, dtype=torch.float16).transpose(0, 2)  # non-contiguous, 105 elements
    got = _ops.zo_noise_bits(like, 9, 4)
    assert got.shape == (105,)
    assert torch.equal(got, bits(105, 9, 4))


@pytest.mark.parametrize("seed,index", [(0, 0), (99, 3), (2**40 + 1, 2**32 - 1), (-5, 1)])
def test_normals_are_box_muller_of_the_words(seed, index):
    n = 1 << 16
    z = noise(n, seed, index).double()
    ref = ref_normals_f64(bits(n, seed, index))
    err = (z - ref).abs()
    # float32 evaluation of |n| <= 5.77 with ~1-ulp polynomials: measured 5e-7 abs, 2.2e-7 rel.
    assert float(err.max()) < 1.5e-6, f"max abs error {float(err.max()):.3g} vs float64 Box-Muller"
    # and relative to the value, away from zero
    big = ref.abs() > 1e-2
    rel = (err[big] / ref[big].abs()).max()
    assert float(rel) < 1e-6, f"max rel error {float(rel):.3g}"


# --- a pure function of (seed, index, element) ----------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 63, 64, 65, 127, 4097])
def test_noise_prefix_stable(n):
    big = noise(10_000, 42, 3)
    assert torch.equal(noise(n, 42, 3), big[:n])
    assert torch.equal(bits(n, 42, 3), bits(10_000, 42, 3)[:n])


def test_noise_shape_and_dtype_independent():
    flat = noise(3 * 5 * 7, 11, 2)
    for like in [
        torch.empty(3, 5, 7),
        torch.empty(3, 5, 7, dtype=torch.float64),
        torch.empty(3, 5, 7, dtype=torch.bfloat16),
        torch.empty(3, 5, 7, dtype=torch.int32),
        torch.empty(7, 5, 3).permute(2, 1, 0),  # non-contiguous like
    ]:
        z = _ops.zo_noise(like, 11, 2)
        assert z.dtype == torch.float32 and z.shape == like.shape and z.is_contiguous()
        assert torch.equal(z.flatten(), flat)


def test_noise_like_is_zo_noise():
    t = torch.randn(17, 9, dtype=torch.bfloat16)
    z = noise_like(t, 1234, 5)
    assert z.dtype == torch.float32 and z.shape == t.shape and z.device == t.device
    assert torch.equal(z, _ops.zo_noise(t, 1234, 5))
    assert torch.equal(t, t.clone())  # does not touch the tensor it is shaped like


def test_noise_reproducible():
    a = noise(5000, 7, 1)
    for _ in range(3):
        torch.randn(100)  # the global generator must not matter
        assert torch.equal(noise(5000, 7, 1), a)
    torch.manual_seed(0)
    b = noise(5000, 7, 1)
    torch.manual_seed(1)
    assert torch.equal(noise(5000, 7, 1), b)


@pytest.mark.parametrize(
    "other",
    [(8, 1), (7, 0), (7, 2), (7 + 2**32, 1), (7 - 2**32, 1), (7 | 2**62, 1), (-7, 1), (7, 1 + 2**31)],
)
def test_noise_differs_for_other_seed_or_index(other):
    a = noise(4096, 7, 1)
    b = noise(4096, *other)
    # unrelated streams: essentially no element equal
    assert int((a == b).sum()) <= 2, other
    assert (a - b).abs().mean() > 0.5


def test_noise_zero_elements():
    assert noise(0, 1, 1).shape == (0,)
    assert _ops.zo_noise(torch.empty(0, 3), 1, 1).shape == (0, 3)
    assert bits(0, 1, 1).shape == (0,)


def test_noise_bad_index():
    with pytest.raises(RuntimeError, match="index"):
        noise(4, 1, -1)
    with pytest.raises(RuntimeError, match="index"):
        noise(4, 1, 2**32)
    with pytest.raises(RuntimeError, match="index"):
        bits(4, 1, -1)
    noise(4, 1, 2**32 - 1)  # the largest valid index


@pytest.mark.parametrize("n", [65, 4097, 200_003])
def test_noise_thread_count_invariant(n):
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        z1, w1 = noise(n, 5, 6), bits(n, 5, 6)
        torch.set_num_threads(2)
        z2, w2 = noise(n, 5, 6), bits(n, 5, 6)
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(z1, z2)
    assert torch.equal(w1, w2)


@pytest.mark.parametrize("op", ["zo_noise", "zo_noise_bits"])
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (65,), (3, 5, 7)])
def test_opcheck_noise(op, shape, device):
    like = torch.randn(shape, device=device)
    torch.library.opcheck(getattr(torch.ops.ftops, op).default, (like, 123, 4))


# --- statistics ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def z_big():
    z = noise(N_STAT, 20240611, 0)
    assert torch.isfinite(z).all()
    return z.double()


def test_mean_and_variance(z_big):
    n = z_big.numel()
    mean = float(z_big.mean())
    var = float(z_big.var())
    assert abs(mean) < 5 / math.sqrt(n), mean
    assert abs(var - 1) < 5 * math.sqrt(2 / n), var
    # higher moments: skewness 0, kurtosis 3 (std of sample kurtosis ~ sqrt(96/n))
    skew = float((z_big**3).mean())
    kurt = float((z_big**4).mean())
    assert abs(skew) < 5 * math.sqrt(15 / n), skew
    assert abs(kurt - 3) < 5 * math.sqrt(96 / n), kurt


def test_kolmogorov_smirnov(z_big):
    n = z_big.numel()
    d = ks_statistic(z_big)
    # asymptotic critical value at alpha = 0.001 is 1.9495 / sqrt(n)
    assert d * math.sqrt(n) < 1.9495, f"KS D = {d:.3g}, sqrt(n) D = {d * math.sqrt(n):.3f}"


def test_ks_statistic_can_fail():
    # The KS check above must reject a mildly wrong distribution of the same size.
    wrong = noise(N_STAT, 1, 0).double() * 1.01
    assert ks_statistic(wrong) * math.sqrt(N_STAT) > 1.9495


@pytest.mark.parametrize("k", [1.0, 2.0, 3.0, 4.0])
def test_tails(z_big, k):
    n = z_big.numel()
    p = math.erfc(k / math.sqrt(2))
    frac = float((z_big.abs() > k).double().mean())
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n), (k, frac, p)
    # each side separately
    for side in (z_big > k, z_big < -k):
        f = float(side.double().mean())
        assert abs(f - p / 2) < 5 * math.sqrt(p / 2 / n), (k, f, p / 2)


def test_range(z_big):
    # |z| <= sqrt(-2 log 2^-24) = 5.77 by construction; a million draws should exceed 4.5
    m = float(z_big.abs().max())
    assert 4.5 < m <= math.sqrt(-2 * math.log(2.0**-24)) + 1e-5, m


@pytest.mark.parametrize("lag", [1, 2, 3, 4, 5, 64])
def test_no_correlation_between_neighbouring_elements(z_big, lag):
    n = z_big.numel() - lag
    bound = 5 / math.sqrt(n)
    a, b = z_big[:-lag], z_big[lag:]
    assert abs(corr(a, b)) < bound, ("z", lag, corr(a, b))
    # Box-Muller pairs share the radius: check the squares too (independent normals: corr 0)
    assert abs(corr(a * a, b * b)) < bound, ("z^2", lag, corr(a * a, b * b))
    assert abs(corr(a.abs(), b.abs())) < bound, ("|z|", lag, corr(a.abs(), b.abs()))


def test_no_correlation_within_box_muller_pairs(z_big):
    # (n0, n1) = r (cos t, sin t): the product n0 * n1 must average 0 and n0^2 - n1^2 too
    pairs = z_big.view(-1, 2)
    n = pairs.shape[0]
    assert abs(float((pairs[:, 0] * pairs[:, 1]).mean())) < 5 / math.sqrt(n)
    assert abs(float((pairs[:, 0] ** 2 - pairs[:, 1] ** 2).mean())) < 5 * 2 / math.sqrt(n)


@pytest.mark.parametrize("index", [0, 1, 1000, 2**32 - 2])
def test_no_correlation_between_neighbouring_parameters(index):
    a, b = noise(N_STAT, 77, index), noise(N_STAT, 77, index + 1)
    bound = 5 / math.sqrt(N_STAT)
    assert abs(corr(a, b)) < bound
    assert abs(corr(a * a, b * b)) < bound


@pytest.mark.parametrize("seed,other", [(0, 1), (1000, 1001), (5, 5 + 2**32), (-1, 0), (2**62, 2**62 + 1)])
def test_no_correlation_between_neighbouring_seeds(seed, other):
    a, b = noise(N_STAT, seed, 3), noise(N_STAT, other, 3)
    bound = 5 / math.sqrt(N_STAT)
    assert abs(corr(a, b)) < bound
    assert abs(corr(a * a, b * b)) < bound


def test_correlation_check_can_fail():
    a = noise(N_STAT, 1, 0)
    b = 0.99 * noise(N_STAT, 2, 0) + 0.141 * a  # corr ~ 0.14
    assert abs(corr(a, b)) > 5 / math.sqrt(N_STAT)


@pytest.fixture(scope="module")
def words_big():
    return bits(N_STAT, 31337, 2)


def chi2_bound(df):
    # Wilson-Hilferty: chi2 quantile ~ df (1 - 2/(9 df) + z sqrt(2/(9 df)))^3; z = 5 one-sided.
    z = 5.0
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts):
    counts = counts.double()
    e = counts.sum() / counts.numel()
    return float(((counts - e) ** 2 / e).sum())


def test_words_bytes_uniform(words_big):
    w = words_big
    for shift in (0, 8, 16, 24):
        byte = (w >> shift) & 0xFF
        c = chi2(torch.bincount(byte, minlength=256))
        assert c < chi2_bound(255), (shift, c)
    # per position in the Philox output (w0 and w2 are xored "hi" words, w1 and w3 "lo" words)
    for j in range(4):
        c = chi2(torch.bincount((w[j::4] >> 24) & 0xFF, minlength=256))
        assert c < chi2_bound(255), ("word", j, c)


def test_words_top_bits_uniform(words_big):
    top = words_big >> 22  # 10 bits, 1024 bins
    c = chi2(torch.bincount(top, minlength=1024))
    assert c < chi2_bound(1023), c
    # the bits Box-Muller uses: 23 for the radius, 24 for the angle (coarsened to 12 bits here)
    c = chi2(torch.bincount(words_big[0::2] >> 20, minlength=4096))
    assert c < chi2_bound(4095), c
    c = chi2(torch.bincount(words_big[1::2] >> 20, minlength=4096))
    assert c < chi2_bound(4095), c


def test_words_bit_means(words_big):
    n = words_big.numel()
    for j in range(4):
        wj = words_big[j::4]
        for bit in range(32):
            m = float(((wj >> bit) & 1).double().mean())
            assert abs(m - 0.5) < 5 * 0.5 / math.sqrt(wj.numel()), (j, bit, m)
    # mean of the word itself: uniform on [0, 2^32) has mean 2^31 - 0.5, std 2^32 / sqrt(12)
    m = float(words_big.double().mean())
    assert abs(m - (2**31 - 0.5)) < 5 * 2**32 / math.sqrt(12 * n), m


def test_words_pairs_uniform(words_big):
    # joint distribution of neighbouring words' top 4 bits (256 cells)
    a = (words_big[:-1] >> 28)
    b = (words_big[1:] >> 28)
    c = chi2(torch.bincount(a * 16 + b, minlength=256))
    assert c < chi2_bound(255), c


def test_chi2_check_can_fail():
    w = bits(N_STAT, 1, 1)
    biased = torch.where(w % 97 == 0, w | 0xFF, w)  # ~1% of low bytes forced to 255
    assert chi2(torch.bincount(biased & 0xFF, minlength=256)) > chi2_bound(255)


# --- CUDA vs CPU ---------------------------------------------------------------------------------


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _cross_device_sizes():
    return [1, 7, 63, 64, 65, 4097, 1 << 20]


@cuda_only
@pytest.mark.parametrize("n", _cross_device_sizes())
@pytest.mark.parametrize("seed,index", [(0, 0), (123, 4), (2**40 + 3, 2**32 - 1), (-9, 7)])
def test_bits_cuda_equal_cpu(n, seed, index):
    cpu = bits(n, seed, index)
    gpu = bits(n, seed, index, device="cuda")
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.cpu(), cpu)


@cuda_only
@pytest.mark.parametrize("n", _cross_device_sizes())
@pytest.mark.parametrize("seed,index", [(0, 0), (123, 4), (2**40 + 3, 2**32 - 1), (-9, 7)])
def test_normals_cuda_close_to_cpu(n, seed, index):
    cpu = noise(n, seed, index)
    gpu = noise(n, seed, index, device="cuda").cpu()
    equal = float((gpu == cpu).double().mean())
    diff = float((gpu - cpu).abs().max())
    # design target: bit-identical; contract: within a few ulp (|z| <= 5.77, ulp(4) = 4.8e-7)
    assert diff <= 1e-6 + 1e-6 * float(cpu.abs().max()), (
        f"max |cuda - cpu| = {diff:.3g}; bit-identical fraction {equal:.6f}"
    )
    assert equal >= 0.999, f"bit-identical fraction {equal:.6f} (max diff {diff:.3g})"


@cuda_only
def test_noise_on_cuda_stays_on_its_device():
    like = torch.empty(10, device="cuda")
    assert _ops.zo_noise(like, 1, 1).device == like.device
    assert _ops.zo_noise_bits(like, 1, 1).device == like.device
    assert noise_like(like, 1, 1).device == like.device
