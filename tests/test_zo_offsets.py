"""Element offsets (the `offsets` / `offset` arguments of the zo ops): a tensor that holds elements
[o, o + n) of a larger one, e.g. one rank's FSDP2 shard, must get exactly the noise and exactly the
rounding of those elements of the whole tensor, bit for bit, for every dtype and every pass (the
perturbation, the exact undo, the update). Philox groups hold 4 elements and the CPU kernel works
in blocks of 64, so the offsets below start pieces inside a group (1, 3, 5), at a block boundary
(64) and past one (4097).
"""
import pytest
import torch

from conftest import FLOAT_DTYPES
from ftops import _ops
from ftops.mezo import noise_like

INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32,
            torch.float16: torch.int16, torch.bfloat16: torch.int16}
N = 4097 + 4099  # the whole tensor; cut below at odd places
CUTS = [[0, 1, 3, 5, 4097, N], [0, 64, 65, 130, 4096, N - 1, N], [0, 3, N]]


def bits(x):
    return x.contiguous().view(INT_VIEW[x.dtype])


def pieces_of(whole, cuts):
    """Fresh contiguous copies of whole[a:b] for consecutive cuts, with their offsets."""
    return [whole[a:b].clone() for a, b in zip(cuts, cuts[1:])], cuts[:-1]


def make_theta(n, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * 0.05
    x[::17] = 0.0  # zeros and tiny values take the undo's other branches
    x[5::23] *= 1e-6
    return x.to(dtype).to(device)


@pytest.mark.parametrize("offset", [0, 1, 3, 5, 63, 64, 4097])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 64, 130])
def test_noise_at_offset_is_a_slice(device, offset, n):
    whole_n = offset + n + 70
    whole = noise_like(torch.empty(whole_n, device=device), 11, 3)
    whole_bits = _ops.zo_noise_bits(torch.empty(whole_n, device=device), 11, 3)
    part = noise_like(torch.empty(n, device=device), 11, 3, offset=offset)
    assert torch.equal(part.view(torch.int32), whole[offset:offset + n].view(torch.int32))
    part_bits = _ops.zo_noise_bits(torch.empty(n, device=device), 11, 3, offset)
    assert torch.equal(part_bits, whole_bits[offset:offset + n])


def test_noise_at_offset_keeps_shape(device):
    whole = noise_like(torch.empty(9, 5, device=device), 2, 0)
    part = noise_like(torch.empty(4, 5, device=device), 2, 0, offset=5 * 5)
    assert part.shape == (4, 5)
    assert torch.equal(part, whole[5:])


def test_noise_offset_beyond_32_bits():
    """Offsets past 2^32 elements reach Philox groups whose counter needs the high word."""
    off = (1 << 34) + 3
    a = _ops.zo_noise_bits(torch.empty(9), 5, 1, off)
    b = _ops.zo_noise_bits(torch.empty(12), 5, 1, off - 3)
    assert torch.equal(a, b[3:])
    assert not torch.equal(a, _ops.zo_noise_bits(torch.empty(9), 5, 1, 3))


@pytest.mark.parametrize("dtype_", FLOAT_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("cuts", CUTS, ids=["1-3-5-4097", "64-65-130-4096", "3"])
def test_axpby_pieces_equal_whole(device, dtype_, cuts):
    whole = make_theta(N, dtype_, device)
    pieces, offsets = pieces_of(whole, cuts)
    seeds, K = [7, 8, 2**40 + 3], len(pieces)
    c = [0.3, -0.01, 1e-3]
    _ops.zo_axpby_([whole], seeds, [4], c, [0.01])
    # all pieces in one multi-tensor call, as the optimizer sends a rank's shards
    _ops.zo_axpby_(pieces, seeds, [4] * K, [ci for ci in c for _ in range(K)], [0.01] * K, offsets)
    assert torch.equal(bits(torch.cat(pieces)), bits(whole))


@pytest.mark.parametrize("dtype_", FLOAT_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("invertible", [False, True])
@pytest.mark.parametrize("cuts", CUTS[:2], ids=["1-3-5-4097", "64-65-130-4096"])
def test_undo_passes_pieces_equal_whole(device, dtype_, invertible, cuts):
    """A full MeZO step's passes (perturb, undo + perturb back, undo + update with several seeds),
    once on the whole tensor and once on pieces at odd offsets."""
    whole = make_theta(N, dtype_, device, seed=1)
    pieces, offsets = pieces_of(whole, cuts)
    K = len(pieces)
    eps = 0.3 if dtype_ in (torch.float16, torch.bfloat16) else 1e-3  # make the undo work hard
    passes = [  # (undo_seed, undo_coeff, seeds, coeffs, decay, invertible)
        (5, 0.0, [5], [eps], 0.0, True),
        (5, eps, [5], [-eps], 0.0, True),
        (5, -eps, [6, 5, 9], [eps, 0.1, -0.2], 0.0, invertible),
        (6, eps, [], [], 0.02, invertible),
    ]
    for undo_seed, u, seeds, c, d, inv in passes:
        _ops.zo_undo_axpby_([whole], undo_seed, [u], seeds, [2], c, [d], inv)
        _ops.zo_undo_axpby_(pieces, undo_seed, [u] * K, seeds, [2] * K,
                            [ci for ci in c for _ in range(K)], [d] * K, inv, offsets)
        assert torch.equal(bits(torch.cat(pieces)), bits(whole)), (undo_seed, u, seeds)


def test_offsets_only_shift_the_noise(device):
    """A piece at offset o is not the same as the piece at offset 0 (the offset is used)."""
    p0 = torch.zeros(9, device=device)
    p1 = torch.zeros(9, device=device)
    _ops.zo_axpby_([p0], [1], [0], [1.0], [0.0], [0])
    _ops.zo_axpby_([p1], [1], [0], [1.0], [0.0], [5])
    assert not torch.equal(p0, p1)
    assert torch.equal(p1, noise_like(p1, 1, 0, offset=5))


@pytest.mark.parametrize("threads", [1, 2])
def test_offsets_thread_count_invariant(threads):
    whole = make_theta(20_000, torch.bfloat16, "cpu")
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        pieces, offsets = pieces_of(whole, [0, 3, 9_001, 20_000])
        _ops.zo_undo_axpby_(pieces, 3, [0.0] * 3, [3], [1] * 3, [0.2] * 3, [0.0] * 3, True, offsets)
        _ops.zo_undo_axpby_(pieces, 3, [0.2] * 3, [3], [1] * 3, [-0.2] * 3, [0.0] * 3, True, offsets)
    finally:
        torch.set_num_threads(old)
    _ops.zo_undo_axpby_([whole], 3, [0.0], [3], [1], [0.2], [0.0], True)
    _ops.zo_undo_axpby_([whole], 3, [0.2], [3], [1], [-0.2], [0.0], True)
    assert torch.equal(bits(torch.cat(pieces)), bits(whole))


def test_opcheck_with_offsets(device):
    ps = [make_theta(65, torch.float32, device), make_theta(7, torch.bfloat16, device)]
    torch.library.opcheck(torch.ops.ftops.zo_axpby_.default,
                          (ps, [1, 2], [0, 1], [0.1, 0.2, 0.3, 0.4], [0.0, 0.01], [3, 4097]))
    torch.library.opcheck(torch.ops.ftops.zo_undo_axpby_.default,
                          (ps, 3, [1e-3, 1e-3], [3], [0, 1], [0.1, 0.2], [0.0, 0.0], True, [1, 5]))
    like = torch.empty(3, 5, device=device)
    torch.library.opcheck(torch.ops.ftops.zo_noise.default, (like, 1, 2, 7))
    torch.library.opcheck(torch.ops.ftops.zo_noise_bits.default, (like, 1, 2, 7))


def test_bad_offsets(device):
    p = torch.zeros(4, device=device)
    q = torch.zeros(4, device=device)
    with pytest.raises(RuntimeError, match="offsets has 1 entries but params has 2"):
        _ops.zo_axpby_([p, q], [1], [0, 1], [0.1, 0.1], [0.0, 0.0], [3])
    with pytest.raises(RuntimeError, match=r"offsets\[1\] = -1"):
        _ops.zo_undo_axpby_([p, q], 1, [0.0, 0.0], [1], [0, 1], [0.1, 0.1], [0.0, 0.0], False, [0, -1])
    assert torch.equal(p, torch.zeros(4, device=device)), "a bad call wrote to params"
    with pytest.raises(RuntimeError, match="offset = -2"):
        _ops.zo_noise(p, 1, 0, -2)
    with pytest.raises(RuntimeError, match="offsets has 1 entries but params is empty"):
        _ops.zo_axpby_([], [1], [], [], [], [0])
