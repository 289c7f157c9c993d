"""GaLore benchmark: ftops.GaLoreAdamW vs galore_torch.GaLoreAdamW vs torch.optim.AdamW.

    python bench/bench_galore.py [--device cpu|cuda] [--quick] [--out results/galore.json]

1. Optimizer step on a Llama-style model (transformers ``LlamaConfig``, random weights, random
   gradients; no forward/backward, so only the optimizer is measured). The attention and MLP
   Linear weights are projected (rank, proj_type std, scale 0.25, a gap longer than the run so only
   the first step refreshes); embeddings, norms and the LM head get plain AdamW. Each optimizer
   runs in its own process; reported: the first step (state allocation + projector refresh), the
   median steady step, and the peak memory of the steps above what model + gradients hold
   (CPU: VmHWM after resetting it through /proc/self/clear_refs once the model, the gradients and
   the optimizer exist, with glibc's mmap threshold fixed at 64 KiB so freed buffers leave the
   RSS at once; CUDA: max_memory_allocated minus memory_allocated at that point).
2. Projector refresh of one gradient matrix: exact ``torch.linalg.svd`` in float32 (what
   galore_torch does; its cost does not depend on the rank, so it is timed once per shape) vs
   ftops's randomized range finder, cold (no previous basis) and warm (previous basis after a
   perturbation of the gradient), with the share of the exact top-r energy it captures.

galore_torch is optional: when it is not importable its column is skipped. When transformers is
missing, the model's parameters are built with the same names and shapes by hand.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
import types
import warnings

import torch

from ftops.bench.memory import PeakMeter

HERE = os.path.dirname(os.path.abspath(__file__))

FULL_MODEL = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=12)
QUICK_MODEL = dict(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=4)
CUDA_MODEL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                  num_attention_heads=16, num_key_value_heads=16)
OPTIMIZERS = ["torch AdamW", "galore_torch", "ftops svd", "ftops randomized"]


# --- helpers --------------------------------------------------------------------------------------

def load_galore_torch():
    """galore_torch.adamw.AdamW without the package __init__ (which imports bitsandbytes); None if absent."""
    try:
        spec = importlib.util.find_spec("galore_torch")
        if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("transformers") is None:
            return None
        root = list(spec.submodule_search_locations)[0]
        pkg = types.ModuleType("galore_torch")
        pkg.__path__ = [root]
        sys.modules.setdefault("galore_torch", pkg)
        for name in ("galore_projector", "adamw"):
            s = importlib.util.spec_from_file_location(f"galore_torch.{name}", os.path.join(root, f"{name}.py"))
            mod = importlib.util.module_from_spec(s)
            sys.modules[f"galore_torch.{name}"] = mod
            s.loader.exec_module(mod)
        return sys.modules["galore_torch.adamw"].AdamW
    except Exception as e:  # noqa: BLE001  (report and skip the column)
        print(f"[galore] galore_torch not usable: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def llama_named_params(cfg: dict, device) -> list[tuple[str, torch.nn.Parameter]]:
    if importlib.util.find_spec("transformers") is not None:
        from transformers import LlamaConfig, LlamaForCausalLM
        conf = LlamaConfig(**cfg, tie_word_embeddings=False)
        with torch.device(device):
            model = LlamaForCausalLM(conf)
        return list(model.named_parameters())
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kvh = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    shapes = [("model.embed_tokens.weight", (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{layer}."
        shapes += [(pre + "self_attn.q_proj.weight", (h, h)), (pre + "self_attn.k_proj.weight", (kvh, h)),
                   (pre + "self_attn.v_proj.weight", (kvh, h)), (pre + "self_attn.o_proj.weight", (h, h)),
                   (pre + "mlp.gate_proj.weight", (i, h)), (pre + "mlp.up_proj.weight", (i, h)),
                   (pre + "mlp.down_proj.weight", (h, i)), (pre + "input_layernorm.weight", (h,)),
                   (pre + "post_attention_layernorm.weight", (h,))]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return [(n, torch.nn.Parameter(torch.randn(s, device=device) * 0.02)) for n, s in shapes]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device) -> int:
    return PeakMeter(device).reset()


def peak(device) -> int:
    return PeakMeter(device).peak()


# --- 1. optimizer step (worker process) -------------------------------------------------------------

def worker(name: str, device: str, cfg: dict, steps: int, rank: int) -> dict:
    torch.manual_seed(0)
    named = llama_named_params(cfg, device)
    params = [p for _, p in named]
    n_params = sum(p.numel() for p in params)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    proj = [p for n, p in named if p.dim() == 2 and ("attn" in n or "mlp" in n)]
    proj_ids = {id(p) for p in proj}
    rest = [p for p in params if id(p) not in proj_ids]
    galore = dict(rank=rank, update_proj_gap=10_000, scale=0.25, proj_type="std")
    if name == "torch AdamW":
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    elif name == "galore_torch":
        cls = load_galore_torch()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = cls([{"params": proj, **galore}, {"params": rest}], lr=1e-4)
    else:
        import ftops
        projector = name.split()[1]
        opt = ftops.GaLoreAdamW([{"params": proj, **galore, "projector": projector}, {"params": rest}], lr=1e-4)
    # load the linear-algebra libraries before timing (their first call can take seconds)
    torch.linalg.svd(torch.randn(8, 8, device=device))
    torch.linalg.qr(torch.randn(8, 8, device=device))
    base = reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    opt.step()
    sync(device)
    first = time.perf_counter() - t0
    times, cpu_times = [], []
    for _ in range(steps):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak_bytes = peak(device) - base
    state_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                      if torch.is_tensor(v))
    for s in opt.state.values():  # galore_torch keeps the basis inside a projector object
        pr = s.get("projector")
        if pr is not None and pr.ortho_matrix is not None:
            om = pr.ortho_matrix if isinstance(pr.ortho_matrix, list) else [pr.ortho_matrix]
            state_bytes += sum(t.untyped_storage().nbytes() for t in om)
    return dict(optimizer=name, params=n_params, projected=sum(p.numel() for p in proj),
                first_step_s=first, step_s=statistics.median(times),
                step_cpu_s=statistics.median(cpu_times), peak_bytes=peak_bytes,
                state_bytes=state_bytes)


def run_workers(args, cfg, steps, rank) -> list[dict]:
    rows = []
    have_gt = load_galore_torch() is not None
    if not have_gt:
        print("[galore] galore-torch is not importable here: skipping the galore_torch column "
              "(pip install galore-torch transformers)")
    for name in OPTIMIZERS:
        if name == "galore_torch" and not have_gt:
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--device", args.device,
               "--config", json.dumps(cfg), "--steps", str(steps), "--rank", str(rank)]
        # glibc: serve every allocation above 64 KiB by mmap, so freed temporaries go back to the
        # OS at once and VmHWM tracks live memory (not what malloc keeps cached after a free)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            print(f"[galore] worker {name!r} failed:\n{out.stderr[-3000:]}")
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"[galore]   {name}: done", flush=True)
    return rows


# --- 2. projector refresh -------------------------------------------------------------------------

def test_gradient(m, n, device, seed, k=None):
    """A gradient-like matrix: sum of k Gaussian outer products with weights i^-1/2 (a slowly
    decaying spectrum: the top 128 of 1024 directions hold about 90% of the energy), plus noise."""
    gen = torch.Generator(device=device).manual_seed(seed)
    k = k or min(m, n) // 4
    X = torch.randn(m, k, device=device, generator=gen)
    Y = torch.randn(k, n, device=device, generator=gen)
    w = torch.arange(1, k + 1, device=device, dtype=torch.float32) ** -0.5
    return (X * w) @ Y / math.sqrt(m * n) + 1e-3 * torch.randn(m, n, device=device, generator=gen) / math.sqrt(n)


def timed(fn, device, repeats=1):
    best, out = float("inf"), None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def refresh_bench(device, shapes, ranks, repeats, svd_repeats) -> list[dict]:
    from ftops.galore import randomized_basis
    rows = []
    for m, n in shapes:
        G = test_gradient(m, n, device, 0)
        G2 = G + 0.3 * test_gradient(m, n, device, 1)
        # side as proj_type "std" picks it: the smaller dimension is projected
        side = "right" if m >= n else "left"
        t_svd, (U, S, Vh) = timed(lambda: torch.linalg.svd(G, full_matrices=False), device, svd_repeats)
        S2 = torch.linalg.svdvals(G2)
        for r in ranks:
            best = float(S[:r].square().sum())
            best2 = float(S2[:r].square().sum())
            gen = torch.Generator(device=device)

            def cold():
                gen.manual_seed(1)
                return randomized_basis(G, r, side, generator=gen)
            t_cold, (L, R) = timed(cold, device, repeats)
            B = L if side == "left" else R.t()
            e_cold = float((B.t() @ G if side == "left" else G @ B).square().sum()) / best

            def warm():
                gen.manual_seed(2)
                return randomized_basis(G2, r, side, L, R, generator=gen)
            t_warm, (L2, R2) = timed(warm, device, repeats)
            B2 = L2 if side == "left" else R2.t()
            e_warm = float((B2.t() @ G2 if side == "left" else G2 @ B2).square().sum()) / best2
            rows.append(dict(shape=[m, n], rank=r, svd_s=t_svd, randomized_cold_s=t_cold,
                             randomized_warm_s=t_warm, speedup_cold=t_svd / t_cold,
                             speedup_warm=t_svd / t_warm, energy_cold=e_cold, energy_warm=e_warm,
                             top_r_energy_share=best / float(S.square().sum())))
            print(f"[galore]   refresh {m}x{n} rank {r}: done", flush=True)
        del U, S, Vh, G, G2
        gc.collect()
    return rows


# --- main -----------------------------------------------------------------------------------------

def mib(b):
    return f"{b / 2**20:9.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "galore.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=128, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.device, json.loads(args.config), args.steps, args.rank)))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("[galore] --device cuda but CUDA is not available")
        return 1

    if args.quick:
        cfg, rank, steps = QUICK_MODEL, 32, 5
        shapes, ranks, repeats, svd_repeats = [(1024, 1024), (1024, 2752)], [32, 128], 2, 2
    else:
        cfg = CUDA_MODEL if args.device == "cuda" else FULL_MODEL
        rank, steps = (512 if args.device == "cuda" else 128), (10 if args.device == "cuda" else 4)
        shapes, ranks = [(4096, 4096), (4096, 11008)], [128, 512]
        repeats = 3 if args.device == "cuda" else 2
        svd_repeats = 3 if args.device == "cuda" else 1   # a CPU SVD at 4096x11008 takes ~30-100 s
    print(f"[galore] device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"model {cfg}, rank {rank}", flush=True)
    start = time.perf_counter()
    steps_rows = run_workers(args, cfg, steps, rank)
    refresh_rows = refresh_bench(args.device, shapes, ranks, repeats, svd_repeats)

    ref = next((r for r in steps_rows if r["optimizer"] == "galore_torch"), None)
    print(f"\nOptimizer step, Llama-style model with {steps_rows[0]['params'] / 1e6:.1f}M parameters "
          f"({steps_rows[0]['projected'] / 1e6:.1f}M projected, rank {rank}), {args.device}"
          if steps_rows else "\n(no optimizer rows)")
    print(f"{'optimizer':18s} {'first step s':>12s} {'step s':>9s} {'cpu s':>8s} {'peak MiB':>9s}"
          f" {'state MiB':>9s} {'step/gt':>8s} {'peak/gt':>8s}")
    for r in steps_rows:
        rs = f"{r['step_s'] / ref['step_s']:8.2f}" if ref else f"{'-':>8s}"
        rp = f"{r['peak_bytes'] / ref['peak_bytes']:8.2f}" if ref and ref["peak_bytes"] > 0 else f"{'-':>8s}"
        print(f"{r['optimizer']:18s} {r['first_step_s']:12.3f} {r['step_s']:9.4f}"
              f" {r.get('step_cpu_s', float('nan')):8.4f} {mib(r['peak_bytes'])}"
              f" {mib(r['state_bytes'])} {rs} {rp}")
    print("(gt = galore_torch; step s = median wall time of a steady step, cpu s = its process CPU "
          "time; peak = memory of the optimizer steps above model + gradients)")
    print(f"\nProjector refresh ({args.device}): exact SVD vs ftops randomized (cold / warm start)")
    print(f"{'shape':>12s} {'rank':>5s} {'svd s':>8s} {'rand s':>8s} {'warm s':>8s} {'x cold':>7s}"
          f" {'x warm':>7s} {'energy':>7s} {'e warm':>7s}")
    for r in refresh_rows:
        print(f"{r['shape'][0]:>5d}x{r['shape'][1]:<6d} {r['rank']:5d} {r['svd_s']:8.3f}"
              f" {r['randomized_cold_s']:8.3f} {r['randomized_warm_s']:8.3f} {r['speedup_cold']:7.1f}"
              f" {r['speedup_warm']:7.1f} {r['energy_cold']:7.4f} {r['energy_warm']:7.4f}")
    print("(energy = share of the exact top-r energy captured; svd time is rank-independent, timed once per "
          f"shape; times are the best of {repeats} (svd: of {svd_repeats}))")
    result = dict(device=args.device, quick=args.quick, torch=torch.__version__, repeats=repeats,
                  svd_repeats=svd_repeats,
                  loadavg=os.getloadavg(),
                  threads=torch.get_num_threads(), model=cfg, rank=rank,
                  galore_torch_available=ref is not None, steps=steps_rows, refresh=refresh_rows,
                  wall_s=time.perf_counter() - start)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\n[galore] wrote {args.out} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
