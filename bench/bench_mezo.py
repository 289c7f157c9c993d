#!/usr/bin/env python
"""MeZO benchmark: ftops.MeZO against the paper's algorithm (princeton-nlp/MeZO), in one run.

What is measured (issue 2, section 6):

* Pass time per step without the forwards. ftops: ``MeZO.step`` with a closure that returns a
  fixed scalar tensor, i.e. exactly its 3 passes (perturb, perturb back, restore + update) plus
  the Python overhead. Reference: the paper's trainer reimplemented below, 4 RNG passes with
  ``torch.manual_seed`` + ``torch.normal`` per parameter and the same closure. ftops is timed
  twice: as it comes (exact restore) and with ``exact_restore=False`` (plain noise passes,
  restore within rounding). All three run in one process on one set of weights, interleaved step
  by step (so background load hits them alike); median wall time (and CPU time) over ``--steps``
  steps after ``--warmup`` steps. CUDA timings synchronize before and after every step. Memory
  and drift (below) are measured for all three; the drift target applies to the default.
* Peak memory beyond the weights, each implementation in a fresh subprocess (1 warm-up step, then
  the measured steps). CPU: ``VmHWM`` (peak RSS) of the measured steps minus ``VmRSS`` right after
  the weights were allocated; the high-water mark is reset (``echo 5 > /proc/self/clear_refs``)
  after the warm-up step so the number is the steady-state peak. Before the weights are allocated each worker runs
  its implementation once on a tiny model so that thread pools and code pages are already resident
  and do not count as "memory beyond the weights".
  CUDA: ``torch.cuda.max_memory_allocated()`` over the measured steps (stats reset after warm-up)
  minus ``torch.cuda.memory_allocated()`` with only the weights allocated.
  Reported as bytes and as % of the largest parameter (target: ftops <= 1%).
* Per-pass time (``--pass-numel``, default 2^21 elements on CPU, 2^26 on CUDA; 0 skips it): each
  kind of MeZO pass (perturbation, exact undo fused with the next perturbation, plain
  ``zo_axpby_``) on one tensor, per dtype and, on CPU, with 1 thread and with all threads, as a
  ratio to the same pass in float32 (the half types must not fall off the vectorized path); and,
  for scale, torch's own in-place ``Tensor.normal_`` on the same tensor (on CUDA, with the ratio
  to the floor: how near it a pass that only writes Gaussian noise gets).
* ``--timing-runs`` (default 3 on CUDA, 1 on CPU): the step timing is repeated in that many fresh
  processes. On the H100 the reference's step moved between 70 and 114 ms from one process to the
  next while staying steady within each (and ftops' between 30 and 33 ms), so one process is one
  draw of the ratio; the ratio reported and judged is the median of the per-process ratios, and
  each process's numbers are printed and kept in the JSON.
* CUDA only: the bandwidth floor = 3 passes x (read + write of every weight byte) / device-to-
  device copy bandwidth measured in the same run (``dst.copy_(src)`` of a large tensor).
* Restore drift in bfloat16 and float16: ``--drift-cycles`` perturb/restore cycles at lr=0 on a
  ``--drift-numel`` tensor. ftops: ``MeZO.step`` with lr=0 and a constant closure. Reference: its
  3 perturbation passes (+eps, -2eps, +eps) with ``torch.normal`` in the parameter dtype; its 4th
  (update) pass at lr=0 is ``p - 0 * (...) == p`` exactly, so it is skipped. Reported: max, 99.9th
  percentile and mean distance in ulps (number of representable values between the final and the
  initial value; the max is dominated by elements near zero, where ulps are tiny), the max error
  in units of the spacing at the initial value, the max absolute error, and the fraction of
  elements that changed. Default size: 2^20 elements on CUDA, 2^17 on CPU (time budget).

Usage (from anywhere; ftops must be installed)::

    python bench/bench_mezo.py                 # CPU, ~112M float32 parameters
    python bench/bench_mezo.py --quick         # small model, < 1 minute
    python bench/bench_mezo.py --device cuda   # ~1.3B parameters, float32 and bfloat16

Results are printed as a table and written as JSON to ``--out`` (default bench/results/mezo.json).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ftops.bench.memory import PeakMeter, proc_status_kb

HERE = Path(__file__).resolve().parent
LR, EPS, WD = 1e-6, 1e-3, 0.0  # the paper's OPT settings (weight decay 0)
NO_DECAY = ("bias", "layer_norm", "layernorm")  # the reference skips weight decay for these names

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# ------------------------------------------------------------------------------------------------
# Models: lists of (name, shape) shaped like a decoder-only transformer (OPT naming).
# ------------------------------------------------------------------------------------------------

MODELS = {
    # d_model, layers, ffn, vocab, positions
    "tiny": (64, 2, 256, 512, 64),              # warm-up before the weights are allocated
    "quick-14m": (384, 4, 1536, 16384, 1024),   # --quick on CPU
    "gpt-112m": (768, 12, 3072, 32768, 2048),   # CPU (issue: 113M fp32 parameters)
    "opt-1.3b": (2048, 24, 8192, 50272, 2050),  # CUDA (OPT-1.3B shapes)
}


def model_shapes(name: str) -> list[tuple[str, tuple[int, ...]]]:
    d, n_layers, ffn, vocab, pos = MODELS[name]
    shapes = [("embed_tokens.weight", (vocab, d)), ("embed_positions.weight", (pos, d))]
    for i in range(n_layers):
        pre = f"layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes += [(pre + f"self_attn.{proj}.weight", (d, d)), (pre + f"self_attn.{proj}.bias", (d,))]
        shapes += [(pre + "self_attn_layer_norm.weight", (d,)), (pre + "self_attn_layer_norm.bias", (d,))]
        shapes += [(pre + "fc1.weight", (ffn, d)), (pre + "fc1.bias", (ffn,))]
        shapes += [(pre + "fc2.weight", (d, ffn)), (pre + "fc2.bias", (d,))]
        shapes += [(pre + "final_layer_norm.weight", (d,)), (pre + "final_layer_norm.bias", (d,))]
    shapes += [("final_layer_norm.weight", (d,)), ("final_layer_norm.bias", (d,))]
    return shapes


def numel_of(shape) -> int:
    return math.prod(shape)


def make_params(name, device, dtype, seed=0):
    """nn.Parameters with weights ~ N(0, 0.02) (norm weights 1), allocated in place (no temporaries)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    params = []
    for pname, shape in model_shapes(name):
        t = torch.empty(shape, device=device, dtype=dtype)
        if "layer_norm" in pname and pname.endswith("weight"):
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=gen)
        params.append((pname, torch.nn.Parameter(t)))
    return params


# ------------------------------------------------------------------------------------------------
# The reference: princeton-nlp/MeZO large_models/trainer.py (zo_step, zo_perturb_parameters,
# zo_update), restated without the Trainer around it. One torch.manual_seed per pass, then one
# torch.normal per parameter in the parameter's dtype and device, out-of-place updates through
# .data (so every pass allocates a z, the scaled z and a new parameter for every tensor).
# ------------------------------------------------------------------------------------------------


class ReferenceMeZO:
    def __init__(self, named_parameters, lr=LR, eps=EPS, weight_decay=WD):
        self.named_parameters_to_optim = [(n, p) for n, p in named_parameters if p.requires_grad]
        self.lr, self.zo_eps, self.weight_decay = lr, eps, weight_decay
        self.zo_random_seed = 0
        self.projected_grad = 0.0

    def zo_perturb_parameters(self, random_seed=None, scaling_factor=1):
        torch.manual_seed(random_seed if random_seed is not None else self.zo_random_seed)
        for name, param in self.named_parameters_to_optim:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device,
                             dtype=param.data.dtype)
            param.data = param.data + scaling_factor * z * self.zo_eps

    def zo_step(self, closure):
        self.zo_random_seed = random.randrange(1000000000)  # np.random.randint(1000000000)
        self.zo_perturb_parameters(scaling_factor=1)
        loss1 = closure()
        self.zo_perturb_parameters(scaling_factor=-2)
        loss2 = closure()
        self.projected_grad = ((loss1 - loss2) / (2 * self.zo_eps)).item()
        self.zo_perturb_parameters(scaling_factor=1)
        return loss1

    def zo_update(self):
        torch.manual_seed(self.zo_random_seed)
        for name, param in self.named_parameters_to_optim:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device,
                             dtype=param.data.dtype)
            if all(k not in name for k in NO_DECAY):
                param.data = param.data - self.lr * (self.projected_grad * z + self.weight_decay * param.data)
            else:
                param.data = param.data - self.lr * (self.projected_grad * z)

    def step(self, closure):
        loss = self.zo_step(closure)
        self.zo_update()
        return loss


def make_ftops(named_parameters, lr=LR, eps=EPS, weight_decay=WD, seed=1234, exact_restore=True):
    import ftops

    decay = [p for n, p in named_parameters if all(k not in n for k in NO_DECAY)]
    no_decay = [p for n, p in named_parameters if any(k in n for k in NO_DECAY)]
    groups = [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return ftops.MeZO(groups, lr=lr, eps=eps, weight_decay=weight_decay, seed=seed, keep_log=False,
                      exact_restore=exact_restore)


# The implementations compared: the reference, ftops.MeZO as it comes (exact restore) and
# ftops.MeZO(exact_restore=False) (the passes as written, restore within rounding).
IMPLS = ("reference", "ftops", "ftops_inexact")
LABELS = {"reference": "reference", "ftops": "ftops", "ftops_inexact": "ftops, exact_restore=False"}


def make_optimizer(impl, named_parameters, **kw):
    if impl == "reference":
        return ReferenceMeZO(named_parameters, **kw)
    return make_ftops(named_parameters, exact_restore=impl == "ftops", **kw)


# ------------------------------------------------------------------------------------------------
# Process memory (Linux /proc)
# ------------------------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------
# Worker: one implementation, one dtype, in a fresh process. Times the steps and measures memory.
# ------------------------------------------------------------------------------------------------


def worker(cfg: dict) -> dict:
    """Peak memory of one implementation (fresh process, so nothing else is on its heap), or with
    cfg["mode"] == "timing" the interleaved step timing of both (`time_steps`) in a fresh process."""
    if cfg.get("mode") == "timing":
        return time_steps(torch.device(cfg["device"]), DTYPES[cfg["dtype"]], cfg["model"],
                          cfg["steps"], cfg["warmup"])
    impl, device, dtype = cfg["impl"], torch.device(cfg["device"]), DTYPES[cfg["dtype"]]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    const = torch.zeros((), device=device, dtype=torch.float32)  # the "loss" of a skipped forward
    closure = lambda: const  # noqa: E731

    # Make libraries, thread pools and kernels resident before the baseline is taken.
    tiny = make_params("tiny", device, dtype)
    make_optimizer(impl, tiny).step(closure)
    del tiny
    gc.collect()
    sync(device)

    out = {"impl": impl, "device": str(device), "dtype": cfg["dtype"], "threads": torch.get_num_threads()}
    params = make_params(cfg["model"], device, dtype)
    sync(device)
    gc.collect()
    if device.type == "cpu":
        rss_weights = proc_status_kb("VmRSS")
    else:
        alloc_weights = torch.cuda.memory_allocated(device)
    opt = make_optimizer(impl, params)

    for _ in range(cfg["warmup"]):
        opt.step(closure)
    sync(device)
    gc.collect()
    if device.type == "cpu":
        meter = PeakMeter("cpu")
        meter.reset()
        out["hwm_reset"] = meter.hwm_reset
        if not out["hwm_reset"]:  # fall back to the process-lifetime peak (includes the warm-up)
            print("warning: cannot reset VmHWM; peak includes the warm-up steps", file=sys.stderr)
    else:
        torch.cuda.reset_peak_memory_stats(device)

    for _ in range(cfg["steps"]):
        opt.step(closure)
    sync(device)

    if device.type == "cpu":
        out["extra_peak_bytes"] = (proc_status_kb("VmHWM") - rss_weights) * 1024
        out["rss_after_over_weights_bytes"] = (proc_status_kb("VmRSS") - rss_weights) * 1024
        out["method"] = "VmHWM(measured steps) - VmRSS(weights allocated), HWM reset after warm-up"
    else:
        out["extra_peak_bytes"] = torch.cuda.max_memory_allocated(device) - alloc_weights
        out["method"] = "max_memory_allocated(measured steps) - memory_allocated(weights only)"
    out["largest_param_bytes"] = max(p.numel() * p.element_size() for _, p in params)
    return out


def time_steps(device, dtype, model, steps, warmup) -> dict:
    """Wall and CPU time per step of both implementations on one set of weights, interleaved
    (reference step, ftops step, ...) so that both see the same machine load."""
    params = make_params(model, device, dtype)
    const = torch.zeros((), device=device, dtype=torch.float32)
    closure = lambda: const  # noqa: E731
    opts = {impl: make_optimizer(impl, params) for impl in IMPLS}
    res = {impl: {"wall_s": [], "cpu_s": []} for impl in opts}
    for i in range(warmup + steps):
        for impl, opt in opts.items():
            sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            opt.step(closure)
            sync(device)
            t1, c1 = time.perf_counter(), time.process_time()
            if i >= warmup:
                res[impl]["wall_s"].append(t1 - t0)
                res[impl]["cpu_s"].append(c1 - c0)
    for r in res.values():
        r["median_s"] = statistics.median(r["wall_s"])
        r["median_cpu_s"] = statistics.median(r["cpu_s"])
    res["weight_bytes"] = sum(p.numel() * p.element_size() for _, p in params)
    del opts, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def run_worker(cfg: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise RuntimeError(f"worker {cfg} failed with exit code {proc.returncode}")
    if proc.stderr.strip():
        sys.stderr.write(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# CUDA bandwidth floor
# ------------------------------------------------------------------------------------------------


def copy_bandwidth(device, nbytes=1 << 30, reps=20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting the read and the write."""
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times)


# ------------------------------------------------------------------------------------------------
# Restore drift
# ------------------------------------------------------------------------------------------------


def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """16-bit floats mapped to integers that are consecutive for consecutive representable values."""
    b = t.view(torch.int16).to(torch.int32)
    return torch.where(b < 0, -(b & 0x7FFF), b)


def drift(impl, device, dtype, numel, cycles, seed=0) -> dict:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    p0 = torch.empty(numel, device=device, dtype=dtype).normal_(0.0, 0.02, generator=gen)
    param = torch.nn.Parameter(p0.clone())
    const = torch.zeros((), device=device)
    t0 = time.perf_counter()
    if impl != "reference":
        opt = make_optimizer(impl, [("weight", param)], lr=0.0, weight_decay=0.0)
        for _ in range(cycles):
            opt.step(lambda: const)
    else:
        ref = ReferenceMeZO([("weight", param)], lr=0.0, weight_decay=0.0)
        for _ in range(cycles):
            ref.zo_random_seed = random.randrange(1000000000)
            for scaling in (1, -2, 1):
                ref.zo_perturb_parameters(scaling_factor=scaling)
    sync(device)
    elapsed = time.perf_counter() - t0
    p = param.data
    ulps = (ordered_bits(p) - ordered_bits(p0)).abs()
    # Distance in units of the spacing at the initial value (equal to `ulps` unless the value
    # crossed a power of two), and the absolute error.
    a0 = p0.abs()
    spacing = (a0.view(torch.int16) + 1).view(dtype).float() - a0.float()  # next value up - |p0|
    return {
        "max_ulp": int(ulps.max().item()),
        "p999_ulp": float(torch.quantile(ulps.double().cpu()[: 1 << 24], 0.999).item()),
        "median_ulp": float(ulps.double().median().item()),
        "mean_ulp": float(ulps.double().mean().item()),
        "mean_abs_err": float((p.float() - p0.float()).abs().double().mean().item()),
        "max_err_in_spacing_at_p0": float(((p.float() - p0.float()).abs() / spacing).max().item()),
        "max_abs_err": float((p.float() - p0.float()).abs().max().item()),
        "changed_fraction": float((p != p0).double().mean().item()),
        "zeroed_fraction": float(((p == 0) & (p0 != 0)).double().mean().item()),
        "nonfinite": int((~torch.isfinite(p)).sum().item()),
        "seconds": elapsed,
    }


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def pass_times(device, numel, thread_counts, reps=7) -> dict:
    """Median time of each kind of MeZO pass on one tensor of `numel` elements, per dtype and
    CPU thread count: the perturbation (noise + ties-up rounding), the exact undo fused with the
    next perturbation (MeZO's second pass), and a plain zo_axpby_ (replay's pass). For scale,
    torch's own in-place ``Tensor.normal_`` (its generator: writes the tensor without reading
    it, with fast-math Box-Muller on CUDA) is timed last: how near the floor a pass that only
    generates Gaussian noise gets on this device."""
    from ftops import _ops

    passes = {
        "perturb": lambda p: _ops.zo_undo_axpby_([p], 7, [0.0], [7], [0], [EPS], [0.0], True),
        "undo+perturb": lambda p: _ops.zo_undo_axpby_([p], 7, [EPS], [7], [0], [-EPS], [0.0], True),
        "axpby": lambda p: _ops.zo_axpby_([p], [7], [0], [EPS], [0.0]),
        "torch.normal_": lambda p: p.normal_(),  # last: it overwrites the weights
    }
    old_threads = torch.get_num_threads()
    out = {}
    try:
        for threads in thread_counts if device.type == "cpu" else [old_threads]:
            torch.set_num_threads(threads)
            for dt in ("float32", "bfloat16", "float16"):
                p = (torch.randn(numel, device=device) * 0.02).to(DTYPES[dt])
                for name, fn in passes.items():
                    fn(p)
                    ts = []
                    for _ in range(reps):
                        sync(device)
                        t0 = time.perf_counter()
                        fn(p)
                        sync(device)
                        ts.append(time.perf_counter() - t0)
                    out[f"{name}/{dt}/{threads}"] = statistics.median(ts)
    finally:
        torch.set_num_threads(old_threads)
    return out


def fmt_bytes(n):
    return f"{n / 2**20:.2f} MiB"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--quick", action="store_true", help="small model, few steps (< 1 minute on CPU)")
    ap.add_argument("--dtypes", default=None,
                    help="comma-separated parameter dtypes for time/memory (default: float32 on CPU, "
                         "float32,bfloat16 on CUDA)")
    ap.add_argument("--model", choices=sorted(MODELS), default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per implementation")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--drift-cycles", type=int, default=None)
    ap.add_argument("--drift-numel", type=int, default=None)
    ap.add_argument("--pass-numel", type=int, default=None,
                    help="elements of the tensor for the per-pass timings (0: skip them)")
    ap.add_argument("--passes-only", action="store_true",
                    help="only the per-pass times (seconds; e.g. to compare FTOPS_ZO_UNDO_SHORTCUT=0)")
    ap.add_argument("--timing-runs", type=int, default=None,
                    help="fresh processes that each time the steps (default: 3 on CUDA, 1 on CPU); "
                         "the ratio judged is the median of theirs")
    ap.add_argument("--out", default=str(HERE / "results" / "mezo.json"))
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._worker is not None:
        print(json.dumps(worker(json.loads(args._worker))))
        return 0

    import ftops

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    model = args.model or {(False, False): "gpt-112m", (False, True): "quick-14m",
                           (True, False): "opt-1.3b", (True, True): "gpt-112m"}[(cuda, args.quick)]
    dtypes = (args.dtypes or ("float32,bfloat16" if cuda else "float32")).split(",")
    for d in dtypes:
        if d not in DTYPES:
            ap.error(f"unknown dtype {d!r}; choose from {sorted(DTYPES)}")
    steps = args.steps or (2 if args.quick else 3) * (4 if cuda else 1)
    warmup = args.warmup or (1 if not cuda else 3)
    mem_steps = 1 if not cuda else 3
    timing_runs = args.timing_runs or (3 if cuda else 1)
    if timing_runs < 1:
        ap.error("--timing-runs must be >= 1")
    # 1000 cycles as the issue specifies, also with --quick (on 2^15 elements it costs seconds):
    # ftops' drift settles within the first cycles while the reference's keeps growing, so
    # fewer cycles would compare an early snapshot.
    cycles = args.drift_cycles or 1000
    # 1000 cycles on 2^20 elements cost ~4 minutes on 2 CPU cores (mostly the reference's
    # torch.normal), so the CPU default is 2^17 elements; pass --drift-numel 1048576 for 1M.
    drift_numel = args.drift_numel or ((1 << 15) if args.quick else (1 << 17) if not cuda else (1 << 20))

    shapes = model_shapes(model)
    n_params = sum(numel_of(s) for _, s in shapes)
    largest = max(numel_of(s) for _, s in shapes)
    info = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "ftops_build": ftops.build_info(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "model": model, "n_params": n_params, "n_tensors": len(shapes), "largest_param_numel": largest,
        "lr": LR, "eps": EPS, "weight_decay": WD,
        "steps": steps, "warmup": warmup, "timing_runs": timing_runs, "memory_steps": mem_steps, "drift_cycles": cycles, "drift_numel": drift_numel,
        "quick": args.quick,
        "undo_shortcut": os.environ.get("FTOPS_ZO_UNDO_SHORTCUT") != "0",
    }
    print(f"MeZO benchmark: {device} ({info['device_name']}), torch {torch.__version__}, "
          f"torch.get_num_threads() = {info['threads']}")
    print(f"model {model}: {n_params / 1e6:.1f}M parameters in {len(shapes)} tensors, largest "
          f"{largest / 1e6:.1f}M elements; lr={LR} eps={EPS} wd={WD}; {warmup} warm-up + {steps} timed steps")

    results = {"info": info, "timing": {}, "drift": {}}
    if cuda:
        bw = copy_bandwidth(device)
        info["copy_bandwidth_Bps"] = bw
        print(f"device-to-device copy bandwidth: {bw / 1e9:.0f} GB/s (read + write)")

    for dt in [] if args.passes_only else dtypes:
        t0 = time.perf_counter()
        runs = [run_worker(dict(mode="timing", device=str(device), dtype=dt, model=model,
                                steps=steps, warmup=warmup)) for _ in range(timing_runs)]
        for k, tm in enumerate(runs):
            for impl in IMPLS:
                r = tm[impl]
                print(f"  [{dt}] process {k + 1}/{timing_runs} {LABELS[impl]:26s}: median "
                      f"{r['median_s'] * 1e3:7.1f} ms/step wall, {r['median_cpu_s'] * 1e3:7.1f} ms/step "
                      f"CPU (wall per step: {', '.join(f'{t * 1e3:.0f}' for t in r['wall_s'])} ms)")
            tm["time_ratio"] = tm["ftops"]["median_s"] / tm["reference"]["median_s"]
            tm["inexact_time_ratio"] = tm["ftops_inexact"]["median_s"] / tm["reference"]["median_s"]
            print(f"  [{dt}] process {k + 1}/{timing_runs} ratio to the reference: ftops "
                  f"{tm['time_ratio']:.3f}x, exact_restore=False {tm['inexact_time_ratio']:.3f}x")
        # The run whose ratio is the median (lower median for an even count) stands for all: for
        # each ftops variant its own median run, whose reference step it is compared with
        # ("vs_reference"); the reference's own entry is that of the default's median run.
        mid = sorted(runs, key=lambda tm: tm["time_ratio"])[(timing_runs - 1) // 2]
        mid_inexact = sorted(runs, key=lambda tm: tm["inexact_time_ratio"])[(timing_runs - 1) // 2]
        entry = {"reference": mid["reference"], "ftops": mid["ftops"],
                 "ftops_inexact": mid_inexact["ftops_inexact"], "weight_bytes": mid["weight_bytes"]}
        for impl, run in (("ftops", mid), ("ftops_inexact", mid_inexact)):
            entry[impl]["vs_reference"] = {k: run["reference"][k] for k in ("median_s", "median_cpu_s")}
        entry["timing_runs"] = [{**{f"{impl}_median_s": tm[impl]["median_s"] for impl in IMPLS},
                                 "time_ratio": tm["time_ratio"],
                                 "inexact_time_ratio": tm["inexact_time_ratio"]} for tm in runs]
        ratios = ", ".join(f"{tm['time_ratio']:.3f}" for tm in runs)
        inexact = ", ".join(f"{tm['inexact_time_ratio']:.3f}" for tm in runs)
        print(f"  [{dt}] timing took {time.perf_counter() - t0:.0f} s ({timing_runs} processes; "
              f"ratios {ratios}x, median {mid['time_ratio']:.3f}x; exact_restore=False {inexact}x, "
              f"median {mid_inexact['inexact_time_ratio']:.3f}x)")
        for impl in IMPLS:
            t0 = time.perf_counter()
            mem = run_worker(dict(impl=impl, device=str(device), dtype=dt, model=model,
                                  steps=mem_steps, warmup=1))
            entry[impl]["memory"] = mem
            entry["largest_param_bytes"] = mem["largest_param_bytes"]
            mem["extra_peak_pct_of_largest"] = 100.0 * mem["extra_peak_bytes"] / mem["largest_param_bytes"]
            print(f"  [{dt}] {LABELS[impl]:26s}: extra peak memory {fmt_bytes(mem['extra_peak_bytes'])} = "
                  f"{mem['extra_peak_pct_of_largest']:.2f}% of the largest parameter "
                  f"[{time.perf_counter() - t0:.0f} s in a fresh process]")
        for impl, key in (("ftops", ""), ("ftops_inexact", "inexact_")):
            ft = entry[impl]
            ref = ft["vs_reference"]
            entry[f"{key}time_ratio"] = ft["median_s"] / ref["median_s"]
            entry[f"{key}cpu_time_ratio"] = ft["median_cpu_s"] / ref["median_cpu_s"]
            if cuda:
                floor = 3 * 2 * entry["weight_bytes"] / info["copy_bandwidth_Bps"]
                entry["bandwidth_floor_s"] = floor
                entry[f"{key}ftops_over_floor"] = ft["median_s"] / floor
                entry[f"{key}reference_over_floor"] = ref["median_s"] / floor
        results["timing"][dt] = entry

    pass_numel = (1 << 26 if cuda else 1 << 21) if args.pass_numel is None else args.pass_numel
    if pass_numel:
        # each pass kind per dtype (and per thread count on CPU), against float32's same pass
        threads = sorted({1, info["threads"]})
        pt = pass_times(device, pass_numel, threads)
        results["passes"] = {"numel": pass_numel, "seconds": pt}
        print(f"  per-pass time on {pass_numel} elements (ms; x = ratio to the float32 pass):")
        for key, t in pt.items():
            name, dt, th = key.split("/")
            ratio = t / pt[f"{name}/float32/{th}"]
            # on CUDA also the ratio to one read + write of the tensor at copy bandwidth
            floor = (f"  {t * info['copy_bandwidth_Bps'] / (2 * pass_numel * DTYPES[dt].itemsize):5.2f}x floor"
                     if cuda else "")
            print(f"    {name:13s} {dt:9s} threads={th:>2s}: {t * 1e3:8.2f} ms "
                  f"{pass_numel / t / 1e6:8.1f} Melem/s  {ratio:5.2f}x{floor}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.passes_only:
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"\nJSON: {out}")
        return 0

    for dt in ("bfloat16", "float16"):
        entry = {}
        for impl in IMPLS:
            entry[impl] = drift(impl, device, DTYPES[dt], drift_numel, cycles)
            d = entry[impl]
            print(f"  drift [{dt}] {LABELS[impl]:26s}: max {d['max_ulp']} ulp, 99.9% {d['p999_ulp']:.0f} ulp, "
                  f"median {d['median_ulp']:.0f} ulp, mean |err| {d['mean_abs_err']:.3g}, "
                  f"max |err| {d['max_abs_err']:.3g}, {100 * d['zeroed_fraction']:.2f}% became 0, "
                  f"{100 * d['changed_fraction']:.2f}% changed  [{d['seconds']:.0f} s]")
        results["drift"][dt] = entry

    # ---- table ---------------------------------------------------------------------------------
    rows = []
    time_target = 0.33 if cuda else 0.25
    variants = (("ftops", "", ""), ("ftops_inexact", "inexact_", ", exact_restore=False"))
    for dt, e in results["timing"].items():
        rm = e["reference"]["memory"]
        for impl, key, tag in variants:
            ft = e[impl]
            fm = ft["memory"]
            ref = ft["vs_reference"]  # the reference's step in the same process
            rows.append((f"pass time / step ({dt}{tag})", f"{ref['median_s'] * 1e3:.1f} ms",
                         f"{ft['median_s'] * 1e3:.1f} ms", f"{e[key + 'time_ratio']:.3f}x",
                         f"<= {time_target}x", e[key + "time_ratio"] <= time_target))
            if cuda:
                rows.append((f"time / bandwidth floor ({dt}{tag})", f"{e[key + 'reference_over_floor']:.2f}x",
                             f"{e[key + 'ftops_over_floor']:.2f}x",
                             f"floor {e['bandwidth_floor_s'] * 1e3:.2f} ms", "ftops <= 1.25x",
                             e[key + "ftops_over_floor"] <= 1.25))
            rows.append((f"CPU time / step ({dt}{tag})", f"{ref['median_cpu_s'] * 1e3:.1f} ms",
                         f"{ft['median_cpu_s'] * 1e3:.1f} ms", f"{e[key + 'cpu_time_ratio']:.3f}x",
                         "(info)", None))
            rows.append((f"peak extra memory ({dt}{tag})",
                         f"{fmt_bytes(rm['extra_peak_bytes'])} ({rm['extra_peak_pct_of_largest']:.1f}%)",
                         f"{fmt_bytes(fm['extra_peak_bytes'])} ({fm['extra_peak_pct_of_largest']:.2f}%)",
                         f"{fm['extra_peak_bytes'] / rm['extra_peak_bytes']:.4f}x"
                         if rm["extra_peak_bytes"] > 0 else "-",
                         "ftops <= 1% of largest", fm["extra_peak_pct_of_largest"] <= 1.0))
    for dt, e in results["drift"].items():
        ref = e["reference"]
        for impl, _, tag in variants:
            ft = e[impl]
            # the target is the default's; exact_restore=False drifts as the reference does (its
            # rows are for information)
            judge = (lambda ok: ok) if impl == "ftops" else (lambda ok: None)
            rows.append((f"drift {dt}{tag}: max ulp", str(ref["max_ulp"]), str(ft["max_ulp"]),
                         f"{ft['max_ulp'] / ref['max_ulp']:.3f}x" if ref["max_ulp"] else "-",
                         "ftops <= ref" if impl == "ftops" else "(info)", judge(ft["max_ulp"] <= ref["max_ulp"])))
            rows.append((f"drift {dt}{tag}: 99.9th pct ulp", f"{ref['p999_ulp']:.0f}", f"{ft['p999_ulp']:.0f}",
                         f"{ft['p999_ulp'] / ref['p999_ulp']:.3f}x" if ref["p999_ulp"] else "-",
                         "(info)", None))
            rows.append((f"drift {dt}{tag}: mean |err|", f"{ref['mean_abs_err']:.3g}",
                         f"{ft['mean_abs_err']:.3g}",
                         f"{ft['mean_abs_err'] / ref['mean_abs_err']:.3f}x" if ref["mean_abs_err"] else "-",
                         "ftops <= ref" if impl == "ftops" else "(info)",
                         judge(ft["mean_abs_err"] <= ref["mean_abs_err"])))
            rows.append((f"drift {dt}{tag}: max |err|", f"{ref['max_abs_err']:.3g}", f"{ft['max_abs_err']:.3g}",
                         f"{ft['max_abs_err'] / ref['max_abs_err']:.3f}x" if ref["max_abs_err"] else "-",
                         "(info)", None))
            rows.append((f"drift {dt}{tag}: changed", f"{100 * ref['changed_fraction']:.2f}%",
                         f"{100 * ft['changed_fraction']:.2f}%",
                         f"{ft['changed_fraction'] / ref['changed_fraction']:.3f}x"
                         if ref["changed_fraction"] else "-",
                         "ftops <= ref" if impl == "ftops" else "(info)",
                         judge(ft["changed_fraction"] <= ref["changed_fraction"])))
    results["table"] = [dict(zip(("row", "reference", "ftops", "ratio", "target", "met"), r)) for r in rows]

    header = ("", "reference", "ftops", "ratio ftops/ref", "target", "met?")
    cells = [header] + [r[:5] + ("" if r[5] is None else "yes" if r[5] else "NO",) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    line = lambda c: "  ".join(s.ljust(w) for s, w in zip(c, widths))  # noqa: E731
    print()
    print(f"MeZO, {model} ({n_params / 1e6:.1f}M params), {device}, {info['threads']} threads, "
          f"drift: {cycles} cycles on {drift_numel} elements")
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for c in cells[1:]:
        print(line(c))

    print("ulp distances count representable values between final and initial value; their max and "
          "tail come from elements near 0 (tiny ulps), mean/max |err| compare absolute drift.")

    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
