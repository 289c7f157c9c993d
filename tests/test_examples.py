"""The torchrun examples in examples/ run to the end with 2 processes (gloo on the CPU; nccl where
the machine has a GPU for each, see examples/tiny_model.local_device), so they cannot
rot unnoticed. Each is a short script; the assertions check the line it ends with."""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

pytest.importorskip("torch.distributed")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
GLOO_EXIT_ABORT = "terminate called without an active exception"

CASES = {
    "galore_ddp.py": ([], "saved"),
    "owlore_ddp.py": ([], "step 11"),
    "s2ft_ddp.py": ([], "saved"),
    "sara_ddp.py": ([], "saved"),
    "mezo_fsdp.py": (["--steps", "5", "--check"], "weights bit-identical: True"),
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs_under_torchrun(script, tmp_path):
    args, expect = CASES[script]
    # --standalone: torchrun picks a free port; cwd and TMPDIR away from the checkout (its
    # ftops/ has no compiled library) and from other runs' files.
    env = dict(os.environ, TMPDIR=str(tmp_path), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(EXAMPLES / script), *args]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and GLOO_EXIT_ABORT in r.stderr and expect in r.stdout:
        # The script did all its work and a rank aborted in gloo's teardown at interpreter exit
        # (a torch race, pytorch/pytorch#190489; the examples free their wrappers and destroy the
        # group first, which makes it rare). Once more, and that run must pass.
        warnings.warn(f"{script}: gloo aborted at exit after a complete run; ran it again")
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{script} failed (rc={r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert expect in r.stdout, r.stdout[-2000:]
