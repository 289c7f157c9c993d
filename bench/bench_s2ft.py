"""One training step of a Llama-style model: full fine-tuning vs LoRA (peft) vs ftops S²FT.

Each method runs in a fresh subprocess (so peak memory is not polluted by the others) on the same
randomly initialised model built from a transformers LlamaConfig (nothing is downloaded):
forward with a causal-LM loss, backward, AdamW step, zero_grad. Reported per method:

* peak memory: on CPU the process's peak resident set (ru_maxrss) minus its resident set just
  before the model was created, i.e. weights + gradients + optimizer state + activations +
  temporaries; on CUDA ``torch.cuda.max_memory_allocated`` minus what was allocated before the
  model was created;
* step time: median over the timed steps, after warm-up steps;
* trainable parameters. LoRA's rank is chosen so its trainable-parameter count is as close as
  possible to S²FT's (adapters on q/k/v/o/gate/up/down).

The S²FT worker also times switching adapters on one model (``ftops.s2ft.load``): to an adapter
with the same selection (only the slices are rewritten) and to one with a different selection
(unload + co-permute + load).

A table with ratios to full fine-tuning is printed and JSON is written to
bench/results/s2ft.json (or --out). Usage::

    python bench/bench_s2ft.py                   # CPU defaults: 8 blocks, hidden 1024, seq 256
    python bench/bench_s2ft.py --device cuda --layers 16 --hidden 2048 --seq 1024 --batch 4
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("full", "lora", "s2ft")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--s2ft-heads", type=float, default=0.05, help="S²FT heads ratio")
    p.add_argument("--s2ft-channels", type=float, default=0.02, help="S²FT channels ratio")
    p.add_argument("--lora-rank", type=int, default=None, help="default: match S²FT's trainable count")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default=os.path.join(HERE, "results", "s2ft.json"))
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def build_config(a):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
        num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
        max_position_embeddings=max(a.seq, 128), tie_word_embeddings=False)


def s2ft_trainable(a) -> int:
    """S²FT's trainable-parameter count, from the ratios (the same rounding as ftops.s2ft.select)."""
    hd = a.hidden // a.heads
    rep = a.heads // a.kv_heads
    heads = int(a.s2ft_heads * a.layers * a.kv_heads + 0.5)
    chans = int(a.s2ft_channels * a.layers * a.intermediate + 0.5)
    return heads * (hd * a.hidden + rep * hd * a.hidden) + chans * 2 * a.hidden


def lora_rank(a) -> int:
    if a.lora_rank:
        return a.lora_rank
    hd = a.hidden // a.heads
    q, kv = a.heads * hd, a.kv_heads * hd
    per_rank = a.layers * ((a.hidden + q) * 2 + (a.hidden + kv) * 2 + (a.hidden + a.intermediate) * 3)
    return max(1, round(s2ft_trainable(a) / per_rank))


# --------------------------------------------------------------------------------------------------
# worker: one method in this process
# --------------------------------------------------------------------------------------------------

def worker(a) -> dict:
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    import transformers  # noqa: F401  (imported before the memory baseline)

    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    cuda = device.type == "cuda"
    cfg = build_config(a)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    else:
        base_mem = rss_bytes()

    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model.train()
    res: dict = {"method": a.worker}

    if a.worker == "full":
        params = [p for p in model.parameters()]
    elif a.worker == "lora":
        import peft

        r = lora_rank(a)
        lcfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=LORA_TARGETS)
        model = peft.get_peft_model(model, lcfg)
        params = [p for p in model.parameters() if p.requires_grad]
        res["lora_rank"] = r
    else:
        import ftops

        sel = ftops.s2ft.select(model, heads=a.s2ft_heads, channels=a.s2ft_channels, seed=0)
        ftops.s2ft.apply(model, sel)
        params = [p for p in model.parameters() if p.requires_grad]
        res["s2ft_heads"], res["s2ft_channels"] = sel.num_heads, sel.num_channels
    res["trainable_params"] = sum(p.numel() for p in params)
    res["total_params"] = sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if n.endswith((".weight", ".weight_t", ".bias")))
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    times, losses = [], []
    for i in range(a.warmup + a.steps):
        sync()
        t0 = time.perf_counter()
        losses.append(step())
        sync()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base_mem
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_mem
    res.update(step_time_s=statistics.median(times), step_times_s=times, peak_bytes=peak,
               losses=losses)

    if a.worker == "s2ft":
        res["switch"] = time_switching(a, model, sel, step, sync)
    return res


def time_switching(a, model, sel_a, step, sync) -> dict:
    """Seconds per ftops.s2ft.load between adapters on one model (median of a few switches)."""
    import torch
    import ftops

    s2ft = ftops.s2ft
    adapter_a = s2ft.export(model)
    adapter_a2 = {**adapter_a, "deltas": {k: {**v, "delta": 0.5 * v["delta"]}
                                          for k, v in adapter_a["deltas"].items()}}
    s2ft.unload(model)
    sel_b = s2ft.select(model, heads=a.s2ft_heads, channels=a.s2ft_channels, seed=1)
    s2ft.apply(model, sel_b)
    opt_b = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    loss = model(input_ids=torch.zeros(1, 8, dtype=torch.long, device=model.device),
                 labels=torch.zeros(1, 8, dtype=torch.long, device=model.device)).loss
    loss.backward()
    opt_b.step()
    adapter_b = s2ft.export(model)

    def timed(adapter, reps=3):
        ts = []
        for _ in range(reps):
            s2ft.load(model, adapter_a if adapter is not adapter_a else adapter_b)  # start elsewhere
            sync()
            t0 = time.perf_counter()
            s2ft.load(model, adapter)
            sync()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    # Same selection: switch a -> a2 (only slice values change).
    same = []
    s2ft.load(model, adapter_a)
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        s2ft.load(model, adapter_a2)
        sync()
        same.append(time.perf_counter() - t0)
        s2ft.load(model, adapter_a)
    return {"same_selection_s": statistics.median(same), "other_selection_s": timed(adapter_a)}


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------

def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main(argv=None):
    a = parse_args(argv)
    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.worker:
        res = worker(a)
        with open(a.worker_out, "w") as f:
            json.dump(res, f)
        return

    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: unknown method {m!r} (choose from {METHODS})")
    print(f"Llama-style model: {a.layers} blocks, hidden {a.hidden}, intermediate {a.intermediate}, "
          f"heads {a.heads}/{a.kv_heads} kv, vocab {a.vocab}; batch {a.batch} x seq {a.seq}; "
          f"{a.dtype} on {a.device}; {a.warmup} warm-up + {a.steps} timed steps per method")
    print(f"S²FT heads={a.s2ft_heads} channels={a.s2ft_channels}; LoRA rank {lora_rank(a)} "
          f"(S²FT trainable ≈ {s2ft_trainable(a):,})", flush=True)

    results = {}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    passthrough = [x for x in (argv if argv is not None else sys.argv[1:])]
    for m in methods:
        tmp = f"{a.out}.{m}.tmp"
        cmd = [sys.executable, os.path.abspath(__file__), *passthrough, "--device", a.device,
               "--worker", m, "--worker-out", tmp]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd)
        if proc.returncode != 0:
            raise SystemExit(f"{m}: worker failed with exit status {proc.returncode}")
        with open(tmp) as f:
            results[m] = json.load(f)
        os.remove(tmp)
        print(f"  {m}: done in {time.perf_counter() - t0:.1f} s", flush=True)

    ref = results.get("full")
    hdr = f"{'method':<8}{'trainable':>14}{'peak memory':>14}{'x full':>8}{'step time':>12}{'x full':>8}"
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for m, r in results.items():
        if ref:
            r["peak_ratio_vs_full"] = r["peak_bytes"] / ref["peak_bytes"]
            r["time_ratio_vs_full"] = r["step_time_s"] / ref["step_time_s"]
        mem_ratio = f"{r['peak_ratio_vs_full']:.2f}" if ref else "-"
        time_ratio = f"{r['time_ratio_vs_full']:.2f}" if ref else "-"
        label = m if m != "lora" else f"lora r{r['lora_rank']}"
        print(f"{label:<8}{r['trainable_params']:>14,}{fmt_bytes(r['peak_bytes']):>14}{mem_ratio:>8}"
              f"{r['step_time_s'] * 1e3:>10.0f}ms{time_ratio:>8}")
    if "s2ft" in results:
        sw = results["s2ft"]["switch"]
        print(f"\nS²FT adapter switch: same selection {sw['same_selection_s'] * 1e3:.2f} ms, "
              f"different selection {sw['other_selection_s'] * 1e3:.1f} ms")
        targets = {}
        s = results["s2ft"]
        if ref:
            targets["peak<=0.5x_full"] = s["peak_ratio_vs_full"] <= 0.5
            targets["time<=0.7x_full"] = s["time_ratio_vs_full"] <= 0.7
        if "lora" in results:
            targets["peak<lora"] = s["peak_bytes"] < results["lora"]["peak_bytes"]
            targets["time<lora"] = s["step_time_s"] < results["lora"]["step_time_s"]
        print("targets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in targets.items()))
        results["targets"] = targets

    import torch

    meta = {"args": {k: v for k, v in vars(a).items() if not k.startswith("worker")},
            "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "threads": a.threads or torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if a.device == "cuda" else None,
            "memory_metric": ("torch.cuda.max_memory_allocated minus allocation before model creation"
                              if a.device == "cuda" else
                              "ru_maxrss minus VmRSS before model creation (fresh process per method)")}
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
