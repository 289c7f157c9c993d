"""OwLore: optimizer memory of layerwise block sampling vs training all blocks.

    python bench/bench_owlore.py [--device cpu|cuda] [--quick] [--out results/owlore.json]

A Llama-style model built from a transformers LlamaConfig (random weights, no download) trains a
few steps of causal-LM loss on random tokens in each configuration, each in a fresh process:

  adamw-all     torch.optim.AdamW on every parameter (reference)
  galore-all    ftops.GaLoreAdamW on every parameter, blocks' Linear weights projected
                (only when ftops has GaLoreAdamW)
  owlore        the same optimizer as the all-blocks baseline (GaLoreAdamW if available, else
                torch AdamW), ftops.OwLore sampling gamma of the blocks by outlier ratio, the
                state of blocks leaving the sample freed
  owlore-keep   the same with keep_state=True (LISA's behaviour: state of every block ever
                sampled stays, so the memory grows with the number of distinct blocks visited)

Reported per configuration: optimizer state bytes (sum of the tensors in optimizer.state, max
over steps and at the end, split into blocks / outside the blocks), peak memory during training
above the memory held after building the model (CPU: the process's peak RSS, VmHWM after
resetting it through /proc/self/clear_refs; CUDA: torch.cuda.max_memory_allocated), step time.
Target: OwLore's optimizer state <= (gamma/depth + outside share) x the all-blocks baseline's,
where the outside share is the fraction of the baseline's state held by parameters outside the
blocks (embeddings, final norm, LM head).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

from ftops.bench.memory import PeakMeter

CONFIGS = {
    # name: (hidden, intermediate, layers, heads, vocab, batch, seq, steps, period, gamma)
    "quick": (192, 512, 8, 6, 4000, 2, 32, 10, 2, 2),
    "cpu": (256, 688, 12, 8, 8000, 2, 64, 16, 2, 3),
    "cuda": (1024, 2752, 16, 16, 32000, 8, 512, 24, 3, 2),
}


def build_model(c, device, seed=0):
    import transformers
    hidden, inter, layers, heads, vocab = c[:5]
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=heads,
                                   num_key_value_heads=heads, max_position_embeddings=2048,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).to(device)


def galore_cls():
    import ftops
    return getattr(ftops, "GaLoreAdamW", None)


def make_optimizer(kind, model, blocks, hidden):
    from ftops.owlore import galore_param_groups
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-4)
    groups = galore_param_groups(model, blocks, rank=max(8, hidden // 8), update_proj_gap=50,
                                 scale=1.0, proj_type="std")
    return galore_cls()(groups, lr=1e-4)


def reset_peak(device):
    return PeakMeter(device).reset()


def peak(device):
    return PeakMeter(device).peak()


def state_bytes(opt, block_params):
    inside = outside = 0
    for p, st in opt.state.items():
        n = sum(t.numel() * t.element_size() for t in st.values() if torch.is_tensor(t))
        if p in block_params:
            inside += n
        else:
            outside += n
    return inside, outside


def worker(spec):
    """One configuration in this (fresh) process; prints one JSON line."""
    import ftops
    from ftops.owlore import find_blocks
    device, c, name, kind = spec["device"], spec["config"], spec["name"], spec["optimizer"]
    hidden, batch, seq, steps, period, gamma = c[0], c[5], c[6], c[7], c[8], c[9]
    torch.set_num_threads(spec["threads"])
    model = build_model(c, device)
    blocks = find_blocks(model)
    block_params = {p for b in blocks for p in b.parameters()}
    opt = make_optimizer(kind, model, blocks, hidden)
    sampler = None
    if name.startswith("owlore"):
        sampler = ftops.OwLore(blocks, spec["ratios"], gamma=gamma, period=period, seed=0,
                               optimizer=opt, keep_state=name == "owlore-keep")
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, c[4], (batch, seq), generator=g) for _ in range(steps)]
    base = reset_peak(device)
    max_inside = max_outside = max_total = 0
    times, series = [], []
    for ids in data:
        ids = ids.to(device)
        t0 = time.perf_counter()
        if sampler is not None:
            sampler.step()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        inside, outside = state_bytes(opt, block_params)
        series.append(inside + outside)
        if inside + outside > max_total:
            max_total, max_inside, max_outside = inside + outside, inside, outside
    final_inside, final_outside = state_bytes(opt, block_params)
    print(json.dumps({
        "name": name, "optimizer": "ftops.GaLoreAdamW" if kind == "galore" else "torch.optim.AdamW",
        "state_bytes_max": max_total, "state_bytes_max_blocks": max_inside,
        "state_bytes_max_outside": max_outside, "state_bytes_final": final_inside + final_outside,
        "peak_bytes": peak(device) - base,
        "step_s": sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0],
        "distinct_blocks_visited": (len({b for a in sampler.history for b in a}) if sampler
                                    else len(blocks)),
        "loss_final": float(loss), "state_bytes_per_step": series,
        "active_per_draw": sampler.history if sampler else None,
    }), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true",
                    help="a small model, about a minute on 2 CPU cores")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: memory does not depend on it, and on a loaded "
                    "2-core machine 2 threads made every op ~30 ms slower)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker(json.loads(args.worker))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no GPU here")

    import ftops
    from ftops.owlore import find_blocks
    c = CONFIGS["quick" if args.quick else args.device]
    hidden, inter, layers, heads, vocab, batch, seq, steps, period, gamma = c
    torch.set_num_threads(args.threads)
    have_galore = galore_cls() is not None
    base_kind = "galore" if have_galore else "adamw"
    print(f"ftops {ftops.__version__} ({os.path.dirname(ftops.__file__)}), "
          f"torch {torch.__version__}, device {args.device}, {args.threads} threads")
    fallback = "torch.optim.AdamW (ftops.GaLoreAdamW not available)"
    print(f"optimizer for all-blocks and OwLore runs: "
          f"{'ftops.GaLoreAdamW' if have_galore else fallback}")

    # outlier ratios of the (random) model from random calibration tokens
    model = build_model(c, args.device)
    nparams = sum(p.numel() for p in model.parameters())
    blocks = find_blocks(model)
    nblock = sum(p.numel() for b in blocks for p in b.parameters())
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)} for _ in range(2)]
    t0 = time.perf_counter()
    # OWL's definition; M=5 (OWL's pruning scripts): the default 13 finds no outlier in a
    # randomly initialised model, whose scores are not heavy-tailed
    ratios = ftops.outlier_ratios(model, calib, M=5.0)
    t_ratios = time.perf_counter() - t0
    if sum(r > 0 for r in ratios) < gamma:  # a random model can have too few outliers at M=5
        ratios = [r + 1e-6 for r in ratios]
    del model
    print(f"model: Llama hidden {hidden}, intermediate {inter}, {layers} blocks, vocab {vocab}: "
          f"{nparams / 1e6:.1f} M parameters, {nblock / nparams:.1%} in the blocks; "
          f"batch {batch}x{seq}, {steps} steps, OwLore gamma {gamma}, period {period}")
    print(f"outlier ratios (M=5, {len(calib)} calibration batches, {t_ratios:.2f} s): "
          + ", ".join(f"{r:.2e}" for r in ratios))
    p = torch.tensor(ratios, dtype=torch.float64)
    print("sampling probabilities: " + ", ".join(f"{x:.3f}" for x in (p / p.sum()).tolist()))

    runs = [("adamw-all", "adamw")]
    if have_galore:
        runs.append(("galore-all", "galore"))
    runs += [("owlore", base_kind), ("owlore-keep", base_kind)]
    results = []
    for name, kind in runs:
        spec = dict(device=args.device, config=c, name=name, optimizer=kind, ratios=ratios,
                    threads=args.threads)
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker",
                              json.dumps(spec)], capture_output=True, text=True)
        if out.returncode != 0:
            sys.stderr.write(out.stderr)
            raise SystemExit(f"worker {name} failed (exit {out.returncode})")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))

    ref = results[1] if have_galore else results[0]
    share = ref["state_bytes_max_outside"] / ref["state_bytes_max"]
    bound = gamma / layers + share
    mib = lambda b: b / 2**20  # noqa: E731
    print(f"\n{'config':<12} {'optimizer':<18} {'state MiB':>9} {'blocks':>8} {'outside':>8} "
          f"{'x ref':>6} {'peak MiB':>9} {'x ref':>6} {'step s':>7} {'visited':>7}")
    for r in results:
        print(f"{r['name']:<12} {r['optimizer']:<18} {mib(r['state_bytes_max']):9.1f} "
              f"{mib(r['state_bytes_max_blocks']):8.1f} {mib(r['state_bytes_max_outside']):8.1f} "
              f"{r['state_bytes_max'] / ref['state_bytes_max']:6.3f} {mib(r['peak_bytes']):9.1f} "
              f"{r['peak_bytes'] / ref['peak_bytes']:6.3f} {r['step_s']:7.3f} "
              f"{r['distinct_blocks_visited']:>4}/{layers}")
    ow = next(r for r in results if r["name"] == "owlore")
    ratio = ow["state_bytes_max"] / ref["state_bytes_max"]
    ok = ratio <= bound
    peak = "peak RSS" if args.device == "cpu" else "max allocated"
    print(f"\nreference (all blocks): {ref['name']}; state MiB and peak MiB are maxima over the "
          f"steps; peak = {peak} above the built model")
    print(f"target: OwLore state / all-blocks state = {ratio:.3f} <= gamma/depth + outside share = "
          f"{gamma}/{layers} + {share:.3f} = {bound:.3f}: {'PASS' if ok else 'FAIL'}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"bench": "owlore", "device": args.device, "quick": args.quick,
                       "host": platform.node(), "torch": torch.__version__, "threads": args.threads,
                       "model": dict(hidden=hidden, intermediate=inter, layers=layers, vocab=vocab,
                                     params=nparams, block_share=nblock / nparams),
                       "batch": batch, "seq": seq, "steps": steps, "gamma": gamma, "period": period,
                       "ratios": ratios, "ratio_seconds": t_ratios, "reference": ref["name"],
                       "results": results, "owlore_state_ratio": ratio, "target_bound": bound,
                       "target_met": ok}, f, indent=2)
        print(f"JSON: {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
