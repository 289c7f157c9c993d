#!/usr/bin/env python
"""SaRA benchmark: ftops.SaRA against full fine-tuning, LoRA (peft) and a reference-style SaRA.

What is measured:

* One training step of a Llama-style model (``transformers.LlamaForCausalLM`` from a
  ``LlamaConfig``, random weights with the default init std 0.02, float32) on random tokens, for
  four methods, each in its own fresh subprocess:

  - ``full``: every parameter trainable, ``torch.optim.AdamW``.
  - ``lora``: ``peft`` LoRA on q/k/v/o/gate/up/down (dropout 0, its leanest setting: the targets
    are checked against this one), rank chosen so that the trainable count is about ftops SaRA's;
    ``torch.optim.AdamW`` on the adapters. ``lora_do0.05``: the same with lora_dropout 0.05, a
    common recipe setting (each adapter then keeps its own dropped copy of its input), for context.
  - ``ref_sara``: the reference implementation's scheme (sjtuplayer/SaRA, design.md section 4):
    per-weight boolean mask + 1-D trainable values, the weight rebuilt as
    ``W0 + scatter(values)`` in the forward (and again in the backward), the *dense* weight
    gradient ``dY^T X`` computed and gathered at the mask; the nuclear norm of the scattered
    delta of one random eligible matrix added to the loss (autograd through the SVD);
    ``torch.optim.AdamW`` on the values.
  - ``ftops_sara``: ``ftops.SaRA`` (indices + values, the plain layer forward, SDDMM weight
    gradient, the nuclear-norm gradient added in ``step()``, fused AdamW, then
    ``W[idx] = W0[idx] + values`` written into the model).
  - ``ftops_sara_l0`` (not with ``--quick``): the same with ``lambda_rank=0``, which shows what the
    nuclear norm's per-step SVD costs.

  Both SaRA variants use the paper's threshold 2e-3 (|w| < 2e-3, about 8% of the entries with std
  0.02) and lambda_rank 5e-4 on the same projections LoRA adapts (q/k/v/o/gate/up/down).
  Memory: peak beyond the weights. CPU: ``VmHWM`` minus ``VmRSS`` right after the model was built
  (before any method-specific setup); the high-water mark is reset (``echo 5 >
  /proc/self/clear_refs``) after one warm-up step, so the number is the steady-state step peak
  (including optimizer state, which exists by then). CUDA: ``max_memory_allocated`` over the
  measured steps (stats reset after warm-up) minus ``memory_allocated`` with the model built.
  On CPU the workers run with ``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0``: glibc's
  default threshold is dynamic (it rises to the size of the largest freed block, after which freed
  tensors stay in the heap and keep counting in RSS), which makes RSS depend on each method's
  allocation history rather than on its live tensors; with a fixed threshold every tensor of
  64 KiB or more is returned to the system when freed. ``--malloc-default`` measures with glibc's
  default instead.
  A step: forward, backward, ``step``, ``zero_grad``; CUDA synchronizes around each step.
  Memory rounds: every method runs in its own process once per round (``--rounds``), in an order
  rotated from round to round; the table shows the median peak over rounds.
  Time: one more process holds every method's model and runs one step of each in turn
  (``--time-rounds`` rounds after a warm-up round, the order rotated every round), so that
  background load that comes and goes hits all methods alike; the table shows each method's
  median step. (The per-process step times are kept in the JSON as ``own_process_step_s``.)
* SDDMM vs the dense weight-gradient GEMM ``dY^T X`` at 1%, 10%, 20% density, on the model's
  projection shapes, same process, interleaved, median of repeats: ``ftops.sddmm_csr`` on the
  row-compressed layout that ftops.SaRA keeps (int16 columns).

Targets: ftops SaRA at or below LoRA in step time and in peak memory, peak <= 0.6x full FT;
SDDMM at 10% density <= 0.5x the dense dW GEMM time.

Usage::

    python bench/bench_sara.py [--device cpu|cuda] [--quick] [--threads N] [--rounds R]
                               [--out bench/results/sara.json]

On a shared CPU (more runnable threads than cores) pass ``--threads 1``: every parallel region of
torch and of ftops then waits for descheduled threads, and timings measure the scheduler.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ftops.bench.memory import PeakMeter

HERE = Path(__file__).resolve().parent
THRESHOLD = 2e-3
LAMBDA_RANK = 5e-4
# CPU workers: glibc mmap threshold fixed (and no trimming delay), as in bench_s2ft.py: see the
# module docstring.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# hidden, intermediate, layers, heads, vocab, batch, seq
CONFIGS = {
    "quick": (256, 688, 2, 4, 2048, 2, 128),
    "cpu": (512, 1408, 4, 8, 4096, 2, 256),
    "cuda": (1024, 2816, 6, 16, 32000, 4, 512),
}


# ------------------------------------------------------------------------------------------------
# Reference-style SaRA (the scheme of sjtuplayer/SaRA, reimplemented for the comparison)
# ------------------------------------------------------------------------------------------------

class _RefSparseLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w0, values, mask):
        w = w0.clone()
        w[mask] += values  # the weight rebuilt from frozen weight + values
        ctx.save_for_backward(x, w0, values, mask)
        return torch.nn.functional.linear(x, w)

    @staticmethod
    def backward(ctx, gy):
        x, w0, values, mask = ctx.saved_tensors
        w = w0.clone()
        w[mask] += values
        gx = gy @ w
        dw = gy.reshape(-1, gy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])  # dense dW
        return gx, None, dw[mask], None  # gathered at the mask, dW freed after


class RefSaRALinear(torch.nn.Module):
    def __init__(self, lin: torch.nn.Linear, threshold: float):
        super().__init__()
        self.weight = lin.weight
        self.weight.requires_grad_(False)
        self.bias = lin.bias
        self.register_buffer("mask", lin.weight.detach().abs() < threshold)
        self.values = torch.nn.Parameter(torch.zeros(int(self.mask.sum()), dtype=lin.weight.dtype,
                                                     device=lin.weight.device))

    def delta_matrix(self):
        d = torch.zeros_like(self.weight)
        return d.masked_scatter(self.mask, self.values)

    def forward(self, x):
        y = _RefSparseLinearFn.apply(x, self.weight, self.values, self.mask)
        return y if self.bias is None else y + self.bias


def build_ref_sara(model, threshold):
    for p in model.parameters():
        p.requires_grad_(False)
    layers = []
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear) and child_name in TARGETS:
                new = RefSaRALinear(child, threshold)
                setattr(mod, child_name, new)
                layers.append(new)
    return layers


# ------------------------------------------------------------------------------------------------
# One method in this process
# ------------------------------------------------------------------------------------------------

def make_model(cfg, device, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, vocab, _, seq = cfg
    conf = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                       max_position_embeddings=seq, tie_word_embeddings=False)
    conf._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(conf).to(device)


def sara_count(model, threshold):
    return sum(int((m.weight.detach().abs() < threshold).sum())
               for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in TARGETS)


def lora_rank_for(model, count):
    per_rank = sum(m.in_features + m.out_features for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in TARGETS)
    return max(1, round(count / per_rank))


def setup(method: str, model, ids):
    """(model, one training step, trainable count) of ``method`` on ``model``."""
    rank_term = None
    if method == "full":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    elif method in ("lora", "lora_do0.05"):
        from peft import LoraConfig, get_peft_model

        r = lora_rank_for(model, sara_count(model, THRESHOLD))
        dropout = 0.0 if method == "lora" else 0.05
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout,
                                                 target_modules=list(TARGETS)))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    elif method == "ref_sara":
        ref_layers = build_ref_sara(model, THRESHOLD)
        eligible = [m for m in ref_layers if min(m.weight.shape) > 64]
        gen = torch.Generator().manual_seed(0)
        opt = torch.optim.AdamW([m.values for m in ref_layers],
                                lr=1e-3 * math.exp(-350 * THRESHOLD))

        def rank_term():
            m = eligible[int(torch.randint(len(eligible), (1,), generator=gen))]
            return LAMBDA_RANK * torch.linalg.matrix_norm(m.delta_matrix(), ord="nuc")
    elif method in ("ftops_sara", "ftops_sara_l0"):
        import ftops

        opt = ftops.SaRA(model, threshold=THRESHOLD,
                         lambda_rank=LAMBDA_RANK if method == "ftops_sara" else 0.0,
                         modules=lambda n, m: n.split(".")[-1] in TARGETS)
    else:
        raise ValueError(method)
    trainable = (opt.num_trainable() if method.startswith("ftops_sara") else
                 sum(p.numel() for grp in opt.param_groups for p in grp["params"]))

    def one_step():
        loss = model(input_ids=ids, labels=ids).loss
        if rank_term is not None:
            loss = loss + rank_term()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return model, one_step, trainable


def _prepare(device: str, threads: int):
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    # Every worker imports the same libraries before the baseline is taken, so that library code
    # and data do not count as one method's training memory.
    import ftops  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    if threads:
        torch.set_num_threads(threads)
    # Warm up code paths and thread pools on a tiny model first (not counted as memory).
    tiny = make_model((64, 128, 1, 2, 128, 1, 16), dev)
    ids = torch.randint(0, 128, (1, 16), device=dev)
    tiny(input_ids=ids, labels=ids).loss.backward()
    return dev, sync


def _ids(cfg, dev):
    hidden, inter, layers, heads, vocab, batch, seq = cfg
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(dev)


def worker(method: str, cfg, device: str, steps: int, threads: int = 0) -> dict:
    """One method alone in this process: its peak memory beyond the model, and its step time."""
    dev, sync = _prepare(device, threads)
    model = make_model(cfg, dev)
    ids = _ids(cfg, dev)
    sync()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    meter = PeakMeter(dev)
    base_bytes = meter.current()
    n_params = sum(p.numel() for p in model.parameters())
    model, one_step, trainable = setup(method, model, ids)
    one_step()  # warm-up: optimizer state allocated, SVD/kernels warmed up
    meter.reset()
    hwm_ok = meter.hwm_reset
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        one_step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = meter.peak()
    return {"method": method, "params": n_params, "trainable": trainable,
            "extra_peak_bytes": peak - base_bytes, "peak_bytes": peak, "base_bytes": base_bytes,
            "step_s": statistics.median(times), "step_times_s": times, "hwm_reset": hwm_ok}


def interleaved_times(methods, cfg, device: str, rounds: int, threads: int = 0) -> dict:
    """Every method's model in this one process, one training step of each in turn (the order
    rotated every round), ``rounds`` times after a warm-up round: background load that comes and
    goes hits all methods alike. Returns each method's step times."""
    dev, sync = _prepare(device, threads)
    ids = _ids(cfg, dev)
    steps = {m: setup(m, make_model(cfg, dev), ids)[1] for m in methods}
    for step in steps.values():
        step()
    times = {m: [] for m in methods}
    for r in range(rounds):
        for m in methods[r % len(methods):] + methods[:r % len(methods)]:
            sync()
            t0 = time.perf_counter()
            steps[m]()
            sync()
            times[m].append(time.perf_counter() - t0)
    return times


# ------------------------------------------------------------------------------------------------
# SDDMM vs dense dW GEMM
# ------------------------------------------------------------------------------------------------

def bench_sddmm(device: str, T: int, shapes, densities, repeats: int) -> list[dict]:
    import ftops
    from ftops.sara import _to_csr

    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    rows_out = []
    for (m, n) in shapes:
        g = torch.Generator().manual_seed(0)
        dy = torch.randn(T, m, generator=g).to(dev)
        x = torch.randn(T, n, generator=g).to(dev)
        for d in densities:
            nnz = int(round(d * m * n))
            flat = torch.randperm(m * n, generator=g)[:nnz].sort().values
            # SaRA's layout: row pointers and 2-byte columns (ftops.sara._to_csr)
            row_ptr, cols = (t.to(dev) for t in _to_csr(flat, m, n))
            flat = flat.to(dev)
            t_s, t_g, t_gg = [], [], []
            for _ in range(repeats):  # interleaved, so background load hits all alike
                sync(); t0 = time.perf_counter()
                ftops.sddmm_csr(dy, x, row_ptr, cols)
                sync(); t_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                dy.t() @ x
                sync(); t_g.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                (dy.t() @ x).view(-1)[flat]
                sync(); t_gg.append(time.perf_counter() - t0)
            s, gm, gg = (statistics.median(v) for v in (t_s, t_g, t_gg))
            rows_out.append({"T": T, "m": m, "n": n, "density": d, "nnz": nnz, "sddmm_s": s,
                             "gemm_s": gm, "gemm_gather_s": gg, "ratio_sddmm_gemm": s / gm,
                             "sddmm_min_s": min(t_s), "gemm_min_s": min(t_g),
                             "ratio_min": min(t_s) / min(t_g)})
    return rows_out


# ------------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "sara.json"))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds of one process per method, for memory (default 3, --quick 1)")
    ap.add_argument("--time-rounds", type=int, default=None,
                    help="rounds of the interleaved step timing (default 9, --quick 3)")
    ap.add_argument("--methods", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads (torch.set_num_threads) in every measurement; 0: torch's "
                         "default")
    ap.add_argument("--malloc-default", action="store_true",
                    help="CPU: keep glibc's dynamic mmap threshold in the workers (RSS then also "
                         "counts freed memory the allocator keeps)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    cfg_name = args.config or ("quick" if args.quick else args.device)
    cfg = CONFIGS[cfg_name]
    steps = args.steps or (2 if args.quick else 3)
    if args.worker == "interleaved":
        print(json.dumps(interleaved_times(args.methods.split(","), cfg, args.device, steps,
                                           args.threads)))
        return 0
    if args.worker:
        print(json.dumps(worker(args.worker, cfg, args.device, steps, args.threads)))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    hidden, inter, layers, heads, vocab, batch, seq = cfg
    print(f"SaRA benchmark on {args.device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), Llama config {cfg_name}: hidden {hidden}, "
          f"intermediate {inter}, layers {layers}, vocab {vocab}, batch {batch} x seq {seq}; "
          f"threshold {THRESHOLD}, lambda_rank {LAMBDA_RANK}", flush=True)
    methods = ["full", "lora", "ref_sara", "ftops_sara"]
    if not args.quick:
        methods.insert(2, "lora_do0.05")
        methods.append("ftops_sara_l0")
    rounds = args.rounds or (1 if args.quick else 3)
    args.time_rounds = args.time_rounds or (3 if args.quick else 9)
    per_round = {m: [] for m in methods}
    for r in range(rounds):
        order = methods[r % len(methods):] + methods[:r % len(methods)]
        for method in order:
            cmd = [sys.executable, __file__, "--device", args.device, "--worker", method,
                   "--config", cfg_name, "--steps", str(steps), "--threads", str(args.threads)]
            t0 = time.perf_counter()
            env = dict(os.environ)
            if args.device == "cpu" and not args.malloc_default:
                env.update(MALLOC_ENV)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"{method}: worker failed\n{proc.stderr[-3000:]}", file=sys.stderr)
                return 1
            per_round[method].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  round {r + 1}/{rounds} {method}: done in {time.perf_counter() - t0:.0f} s",
                  flush=True)
    cmd = [sys.executable, __file__, "--device", args.device, "--worker", "interleaved",
           "--config", cfg_name, "--steps", str(args.time_rounds), "--threads", str(args.threads),
           "--methods", ",".join(methods)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"interleaved timing failed\n{proc.stderr[-3000:]}", file=sys.stderr)
        return 1
    step_times = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  interleaved timing ({args.time_rounds} rounds): done in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    results = {}
    for method, runs in per_round.items():
        res = dict(runs[0])
        res["step_s"] = statistics.median(step_times[method])
        res["step_times_s"] = step_times[method]
        res["own_process_step_s"] = statistics.median(x["step_s"] for x in runs)
        res["extra_peak_bytes"] = statistics.median(x["extra_peak_bytes"] for x in runs)
        res["rounds"] = [{k: x[k] for k in ("step_s", "extra_peak_bytes")} for x in runs]
        results[method] = res

    mib = 1 / 2**20
    full = results["full"]
    print(f"\nOne training step: time = median of {args.time_rounds} interleaved rounds in one "
          f"process; memory = peak beyond the model's weights "
          f"({'VmHWM - VmRSS' if args.device == 'cpu' else 'max_memory_allocated - allocated'}), "
          f"median of {rounds} rounds of one process per method")
    print(f"{'method':<12}{'trainable':>12}{'peak MiB':>10}{'x full':>8}{'x lora':>8}"
          f"{'step s':>9}{'x full':>8}")
    for name, r in results.items():
        print(f"{name:<12}{r['trainable']:>12,}{r['extra_peak_bytes'] * mib:>10.1f}"
              f"{r['extra_peak_bytes'] / full['extra_peak_bytes']:>8.2f}"
              f"{r['extra_peak_bytes'] / results['lora']['extra_peak_bytes']:>8.2f}"
              f"{r['step_s']:>9.3f}{r['step_s'] / full['step_s']:>8.2f}")
    fs = results["ftops_sara"]
    checks = {
        "ftops_sara_peak_le_lora": fs["extra_peak_bytes"] <= results["lora"]["extra_peak_bytes"],
        "ftops_sara_step_le_lora": fs["step_s"] <= results["lora"]["step_s"],
        "ftops_sara_peak_le_0.6_full": fs["extra_peak_bytes"] <= 0.6 * full["extra_peak_bytes"],
    }

    T = batch * seq
    shapes = [(hidden, hidden), (inter, hidden)]
    sd = bench_sddmm(args.device, T, shapes, (0.01, 0.10, 0.20), repeats=7 if args.quick else 21)
    print(f"\nSDDMM vs dense dW = dY^T X (T = {T}), median of repeats, interleaved")
    print(f"{'m x n':<12}{'density':>8}{'sddmm ms':>10}{'gemm ms':>9}{'gemm+gather':>12}"
          f"{'ratio':>7}"
          f"{'ratio of mins':>15}")
    for r in sd:
        print(f"{str(r['m']) + 'x' + str(r['n']):<12}{r['density']:>8.0%}"
              f"{r['sddmm_s'] * 1e3:>10.2f}{r['gemm_s'] * 1e3:>9.2f}"
              f"{r['gemm_gather_s'] * 1e3:>12.2f}{r['ratio_sddmm_gemm']:>7.2f}"
              f"{r['ratio_min']:>15.2f}")
    checks["sddmm_10pct_le_0.5_gemm"] = all(r["ratio_sddmm_gemm"] <= 0.5 for r in sd
                                            if r["density"] == 0.10)
    print("\nTargets:", ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in checks.items()))

    out = {"device": args.device, "config": cfg_name, "threads": torch.get_num_threads(),
           "worker_malloc_env": None if (args.device != "cpu" or args.malloc_default)
           else MALLOC_ENV,
           "torch": torch.__version__, "threshold": THRESHOLD, "lambda_rank": LAMBDA_RANK,
           "rounds": rounds, "time_rounds": args.time_rounds,
           "train_step": results, "sddmm": sd, "targets": checks}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
