"""Properties of the compiled library itself (csrc/ -> ftops/_C.so).

Error messages without iostreams: on the GPU test machine (GCC 13.3, torch 2.11) every argument
error formatted inside our library with TORCH_CHECK's c10::str (an std::ostringstream compiled
into _C.so) segfaulted instead of raising. Our checks now build their messages with FTOPS_CHECK
(csrc/common/check.h), and torch's own inline checks are compiled with STRIP_ERROR_MESSAGES
(CMakeLists.txt), so _C.so must not import any stream or locale symbol: that is checked here on
the built file, next to the source rule that keeps it so and the messages it must still produce.
"""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ftops import _ops

F = torch.ops.ftops
CSRC = Path(__file__).resolve().parents[1] / "csrc"

# Stream / locale machinery, as `nm -C` spells it.
_STREAM_SYMBOL = re.compile(
    r"ostream|istream|stringstream|streambuf|basic_ios|ios_base|_M_insert|locale|operator<<"
)
# <iostream>'s static initializer of std::cout & co. (not formatting): torch's headers include
# <iostream> (torch/headeronly/util/Float8_e4m3fn.h, via c10/core/ScalarType.h), so every TU that
# uses at::Tensor references it; GCC <= 12 as ios_base::Init, GCC >= 13 as ios_base_library_init.
_ALLOWED = {
    "std::ios_base::Init::Init()",
    "std::ios_base::Init::~Init()",
    "std::ios_base_library_init()",
}


def _undefined_symbols(lib: Path) -> list[str]:
    out = subprocess.run(["nm", "-D", "-C", "--undefined-only", str(lib)], check=True,
                         capture_output=True, text=True).stdout
    # "                 U name@VERSION" -> "name"
    return [line.split(None, 1)[1].rsplit("@", 1)[0].strip()
            for line in out.splitlines() if line.strip().startswith("U ")]


def test_library_imports_no_stream_symbols():
    if shutil.which("nm") is None:
        pytest.skip("nm (binutils) is not installed")
    lib = Path(_ops.__file__).with_name("_C.so")
    symbols = _undefined_symbols(lib)
    assert any("torchCheckFail" in s for s in symbols), "nm output not understood"
    bad = sorted({s for s in symbols if _STREAM_SYMBOL.search(s)} - _ALLOWED)
    assert not bad, f"{lib} formats with iostreams again (see csrc/common/check.h):\n" + "\n".join(bad)


def test_sources_use_ftops_check():
    """TORCH_CHECK & co. would format with c10::str, or, under STRIP_ERROR_MESSAGES, lose the message."""
    if not CSRC.is_dir():
        pytest.skip("no source tree next to the tests")
    banned = re.compile(r"\b(TORCH_CHECK\w*|TORCH_INTERNAL_ASSERT\w*|AT_ASSERT\w*|AT_ERROR|"
                        r"AT_DISPATCH_\w+|TORCH_WARN\w*|c10::str|std::cout|std::cerr)\b|"
                        r"#include\s*<(sstream|iostream|ostream|iomanip)>")
    found = []
    for path in sorted(CSRC.rglob("*")):
        if path.suffix not in {".h", ".cpp", ".cu", ".cuh"} or path.name in {"check.h", "dispatch.h"}:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if banned.search(line.split("//", 1)[0]):
                found.append(f"{path.relative_to(CSRC)}:{n}: {line.strip()}")
    assert not found, "use FTOPS_CHECK / FTOPS_DISPATCH_* (csrc/common/check.h):\n" + "\n".join(found)


def test_argument_error_raises_in_a_fresh_process(tmp_path):
    """The GPU machine's crash, as it was reported: a signal here is that crash."""
    code = "import torch, ftops; torch.ops.ftops.zo_noise(torch.zeros(3), 0, -1)"
    # cwd away from the checkout, whose ftops/ (no _C.so) would shadow the installed package
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode >= 0, f"died with signal {-r.returncode}:\n{r.stderr[-2000:]}"
    assert "RuntimeError: ftops.zo_noise: index = -1 is outside [0, 2^32)" in r.stderr, r.stderr


# --- exact messages, through the raw ops -------------------------------------------------------
# One case per kind of message piece (integers, size_t products, doubles, dtypes, shapes, strides,
# devices, device types, layouts), for every op. The Python wrappers are bypassed on purpose.
# redispatch() calls the kernel of `device` directly, which is how a tensor on another device or
# with another layout reaches our checks (the dispatcher would route the call elsewhere).


def _kernel(device):
    return torch._C.DispatchKeySet(
        torch._C.DispatchKey.CUDA if device.type == "cuda" else torch._C.DispatchKey.CPU)


def _meta(*shape):
    return torch.zeros(*shape, device="meta")


def _cases(device):
    z = lambda *s, dtype=torch.float32: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
    idx = lambda *v, dtype=torch.int64: torch.tensor(v, dtype=dtype, device=device)  # noqa: E731
    ks = _kernel(device)
    dev = str(z(1).device)  # "cpu", "cuda:0"
    hp = (0.9, 0.99, 1e-8)
    yield ("zo_noise",
           lambda: F.zo_noise(z(3), 0, -1),
           "ftops.zo_noise: index = -1 is outside [0, 2^32)")
    yield ("zo_noise_bits",
           lambda: F.zo_noise_bits(z(3), 0, 2**32),
           "ftops.zo_noise_bits: index = 4294967296 is outside [0, 2^32)")
    yield ("zo_axpby_ coeffs",
           lambda: F.zo_axpby_([z(3), z(2), z(4)], [1, 2], [0, 1, 2], [0.1] * 5, [0.0] * 3),
           "ftops.zo_axpby_: coeffs must have len(seeds) * len(params) = 6 entries, got 5")
    yield ("zo_axpby_ strides",
           lambda: F.zo_axpby_([z(2), z(3, 4).t()], [1], [0, 1], [0.1] * 2, [0.0] * 2),
           "ftops.zo_axpby_: params[1] must be contiguous (got strides [1, 4])")
    yield ("zo_axpby_ dtype",
           lambda: F.zo_axpby_([z(3, dtype=torch.int32)], [1], [0], [0.1], [0.0]),
           "ftops.zo_axpby_: params[0] has dtype Int; supported: float32, float64, float16, bfloat16")
    yield ("zo_axpby_ layout",
           lambda: F.zo_axpby_.default.redispatch(ks, [z(3).to_sparse()], [1], [0], [0.1], [0.0]),
           "ftops.zo_axpby_: params[0] must be a dense (strided) tensor, got layout Sparse")
    yield ("zo_axpby_ device type",
           lambda: F.zo_axpby_.default.redispatch(ks, [z(3), _meta(3)], [1], [0, 1], [0.1] * 2,
                                                  [0.0] * 2),
           f"ftops.zo_axpby_: params[1] is on meta but the other tensors are on {device.type}")
    yield ("zo_undo_axpby_ ids",
           lambda: F.zo_undo_axpby_([z(3), z(3)], 1, [0.1] * 2, [1], [0, 2**32], [0.1] * 2,
                                    [0.0] * 2),
           "ftops.zo_undo_axpby_: ids[1] = 4294967296 is outside [0, 2^32)")
    yield ("zo_undo_axpby_ seeds",
           lambda: F.zo_undo_axpby_([z(3)], 1, [0.1], list(range(9)), [0], [0.1] * 9, [0.0]),
           "ftops.zo_undo_axpby_: seeds must have 0 to 8 entries, got 9")
    yield ("adamw_ beta1",
           lambda: F.adamw_([z(3)], [z(3)], [z(3)], [z(3)], 0.1, 1.5, 0.99, 1e-8, 0.0, 1),
           "ftops.adamw_: beta1 must be in [0, 1), got 1.5")
    yield ("adamw_ eps %g",
           lambda: F.adamw_([z(3)], [z(3)], [z(3)], [z(3)], 0.1, 0.9, 0.99, -1.234567891e-12, 0.0, 1),
           "ftops.adamw_: eps must be finite and >= 0, got -1.23457e-12")
    yield ("adamw_ lr nan",
           lambda: F.adamw_([z(3)], [z(3)], [z(3)], [z(3)], float("nan"), *hp, 0.0, 1),
           "ftops.adamw_: lr must be finite, got nan")
    yield ("adamw_ weight_decay -inf",
           lambda: F.adamw_([z(3)], [z(3)], [z(3)], [z(3)], 0.1, *hp, float("-inf"), 1),
           "ftops.adamw_: weight_decay must be finite, got -inf")
    yield ("adamw_ sizes and strides",
           lambda: F.adamw_([z(3, 4)], [z(4, 3).t()], [z(3, 4)], [z(3, 4)], 0.1, *hp, 0.0, 1),
           "ftops.adamw_: grads[0] must be contiguous (got sizes [3, 4], strides [1, 3])")
    yield ("adamw_ dtype",
           lambda: F.adamw_([z(3, dtype=torch.float64)], [z(3, dtype=torch.float64)], [z(3)],
                            [z(3)], 0.1, *hp, 0.0, 1),
           "ftops.adamw_: exp_avgs[0] has dtype Float but must be Double "
           "(moments of float64 params are float64)")
    yield ("adamw_ device",
           lambda: F.adamw_.default.redispatch(ks, [z(3)], [_meta(3)], [z(3)], [z(3)], 0.1, *hp,
                                               0.0, 1, False, True),
           f"ftops.adamw_: grads[0] is on meta but params[0] is on {dev}")
    yield ("adamw_ device type",
           lambda: F.adamw_.default.redispatch(ks, [_meta(3)], [_meta(3)], [_meta(3)], [_meta(3)],
                                               0.1, *hp, 0.0, 1, False, True),
           f"ftops.adamw_: params[0] is on meta but this kernel is for {device.type}")
    yield ("adam_direction_ out dtype",
           lambda: F.adam_direction_([z(3, dtype=torch.float16)], [z(3)], [z(3)],
                                     [z(3, dtype=torch.float64)], *hp, 1),
           "ftops.adam_direction_: out[0] has dtype Double but must be Half (the dtype of "
           "grads[k]) or Float (the moment dtype)")
    yield ("adam_direction_ step",
           lambda: F.adam_direction_([z(3)], [z(3)], [z(3)], [z(3)], *hp, -7),
           "ftops.adam_direction_: step must be >= 1 (the step count after incrementing), got -7")
    yield ("sddmm shapes",
           lambda: F.sddmm(z(2, 3), z(5, 4), idx(0), idx(0)),
           "ftops.sddmm: dy ([2, 3]) and x ([5, 4]) must have the same number of rows T")
    yield ("sddmm rows int64",
           lambda: F.sddmm(z(2, 3), z(2, 4), idx(0, -1), idx(0, 3)),
           "ftops.sddmm: rows must lie in [0, m) = [0, 3) (m = dy.size(1)) but range over [-1, 0]")
    yield ("sddmm cols int32",
           lambda: F.sddmm(z(2, 3), z(2, 4), idx(0, 2, dtype=torch.int32),
                           idx(0, 4, dtype=torch.int32)),
           "ftops.sddmm: cols must lie in [0, n) = [0, 4) (n = x.size(1)) but range over [0, 4]")
    yield ("sddmm dtypes",
           lambda: F.sddmm(z(2, 3), z(2, 4), idx(0), idx(0, dtype=torch.int32)),
           "ftops.sddmm: cols has dtype Int but rows has Long; they must match")
    yield ("sddmm device",
           lambda: F.sddmm.default.redispatch(ks, z(2, 3), _meta(2, 4), idx(0), idx(0)),
           f"ftops.sddmm: x is on meta but dy is on {dev}")


_CASE_NAMES = [name for name, _, _ in _cases(torch.device("cpu"))]


@pytest.mark.parametrize("case", _CASE_NAMES)
def test_error_message(device, case):
    call, expected = {name: (f, msg) for name, f, msg in _cases(device)}[case]
    with pytest.raises(RuntimeError) as info:
        call()
    assert str(info.value).splitlines()[0] == expected
