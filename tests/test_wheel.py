"""Wheels: `pip wheel . --no-build-isolation` gives a wheel that installs elsewhere and works, pins
the torch minor it was built against, and refuses another torch with a clear message.

One CPU-only wheel is built per session (module fixture), in its own build folder
(``build/wheel-test-cpu``, so the checkout's usual build folder, which may be a CUDA build, is not
reconfigured): the first run compiles the kernels (minutes), later runs are incremental. Set
``FTOPS_TEST_WHEEL=/path/to/ftops-*.whl`` to test an existing wheel instead of building one.

Where the CPU has AVX2, that wheel's vectorized CPU loops are compiled for AVX2 only
(``FTOPS_CPU_TARGET=avx2``) and the kernel tests are rerun with it: a release build picks its
AVX-512 code on a machine that has AVX-512 (as CI's), and its AVX2 code, which most laptops run,
would otherwise go untested.
"""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# the CPU target of the test wheel's vectorized loops ("" = the release default, all of them)
WHEEL_CPU_TARGET = "avx2" if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else ""


def _minor(version):
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    given = os.environ.get("FTOPS_TEST_WHEEL")
    if given:
        return Path(given)
    if not (ROOT / "pyproject.toml").exists():
        pytest.skip("not a source checkout")
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, FTOPS_CUDA="OFF", FTOPS_CPU_TARGET=WHEEL_CPU_TARGET)
    cmd = [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-build-isolation", "--no-deps",
           "-q", "-w", str(out), "-C", f"build-dir={ROOT / 'build' / 'wheel-test-cpu'}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list(out.glob("ftops-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                           str(target), str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return target


def run_python(code, site, cwd):
    """Run code in a fresh interpreter that sees only the installed wheel (and the venv)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True,
                          text=True)


def test_wheel_tag_and_torch_pin(wheel):
    assert wheel.name.startswith("ftops-") and "-py3-none-linux_" in wheel.name, wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        info = z.read("ftops/_build_info.py").decode()
    assert "ftops/_C.so" in names
    major, minor = _minor(torch.__version__)
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist: torch")]
    assert len(requires) == 1, requires
    spec = requires[0].split("Requires-Dist: torch", 1)[1].replace(" ", "")
    assert sorted(spec.split(",")) == sorted([f">={major}.{minor}", f"<{major}.{minor + 1}"]), spec
    assert f'TORCH_VERSION = "{torch.__version__}"' in info


def test_wheel_installs_and_runs(installed, tmp_path):
    code = f"""
import os, torch, ftops
assert ftops.__file__.startswith({str(installed)!r}), ftops.__file__
info = ftops.build_info()
assert info["cuda"] is False and info["torch_built"] == torch.__version__, info
assert os.environ.get("FTOPS_TEST_WHEEL") or info["cpu_target"] == ({WHEEL_CPU_TARGET!r} or "auto"), info
dy, x = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
rows, cols = torch.tensor([0, 2, 1], dtype=torch.int32), torch.tensor([3, 0, 1], dtype=torch.int32)
out = ftops.sddmm(dy, x, rows, cols)
ref = (dy.t() @ x)[rows.long(), cols.long()]
torch.testing.assert_close(out, ref)
print("ok", info["torch_built"])
"""
    proc = run_python(code, installed, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ok", torch.__version__]


def test_wheel_refuses_another_torch_minor(installed, tmp_path):
    major, minor = _minor(torch.__version__)
    other = f"{major}.{minor + 1}.0"
    code = f"""
import torch
torch.__version__ = {other!r}
import ftops
"""
    proc = run_python(code, installed, tmp_path)
    assert proc.returncode != 0
    err = proc.stderr
    assert "ImportError" in err, err[-3000:]
    assert f"compiled against torch {torch.__version__}" in err, err[-3000:]
    assert f"torch {other} is installed" in err, err[-3000:]
    assert "--no-build-isolation" in err, err[-3000:]


KERNEL_TESTS = ["test_noise.py", "test_zo_ops.py", "test_zo_undo.py", "test_zo_offsets.py",
                "test_adamw_op.py", "test_sara.py"]


@pytest.mark.skipif(WHEEL_CPU_TARGET != "avx2", reason="this CPU has no AVX2")
def test_avx2_code_passes_the_kernel_tests(installed, tmp_path):
    """The kernel test files, run on the wheel whose vectorized loops are AVX2 code, with the
    hand-written SIMD paths (Philox, SDDMM, the undo's gathering) forced to AVX2 as well."""
    if os.environ.get("FTOPS_TEST_WHEEL"):
        pytest.skip("an existing wheel: its CPU target is whatever it was built with")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FTOPS_ZO_UNDO_SHORTCUT")}
    env.update(PYTHONPATH=str(installed), FTOPS_SIMD="avx2")
    check = subprocess.run([sys.executable, "-c", "import ftops; print(ftops.__file__, ftops.build_info()['cpu_target'])"],
                           env=env, cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr[-3000:]
    where, target = check.stdout.split()
    assert where.startswith(str(installed)) and target == "avx2", check.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         *[str(ROOT / "tests" / name) for name in KERNEL_TESTS]],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
