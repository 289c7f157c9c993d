"""One training step of a Llama-style model: full fine-tuning vs LoRA (peft) vs ftops S²FT.

S²FT runs the paper's configuration by default (output-projection columns of 5.2% of the heads
and down-projection columns of 2% of the FFN channels, ftops.s2ft.PAPER_RATIOS); ``--v-ratio``,
``--o-ratio``, ``--u-ratio``, ``--d-ratio`` choose another (e.g. ``--v-ratio 0.05 --o-ratio 0.05
--u-ratio 0.02 --d-ratio 0.02`` also trains the value rows and up rows).

Every method trains the same randomly initialised model built from a transformers LlamaConfig
(nothing is downloaded; without transformers, or with --model builtin, a plain-PyTorch
Llama-style model with the same module names): forward with a causal-LM loss, backward, AdamW
step, zero_grad. Reported per method:

* peak memory, measured with each method alone in a fresh subprocess over the same steps: on CPU
  the process's peak resident set (VmHWM, ftops/bench/memory.py; glibc set to mmap every
  allocation of 64 KiB or more, so that it follows the live tensors) minus its resident set just
  before the model was created, i.e. weights + gradients + optimizer state + activations +
  temporaries; on CUDA ``torch.cuda.max_memory_allocated`` minus what was allocated before the
  model was created;
* step time: median over the timed steps, after warm-up steps, with forward / backward /
  optimizer split; measured in one separate process that holds all methods' models and runs
  their steps interleaved, round by round, so that all see the same machine conditions; the
  median over rounds of S²FT's step time over the other method's in the same round is printed
  too (robust to load that changes between rounds);
* trainable parameters. LoRA's rank is chosen so its trainable-parameter count is as close as
  possible to S²FT's (adapters on q/k/v/o/gate/up/down; peft when installed and the model is
  transformers', otherwise an equivalent builtin LoRA layer).

The timing worker also times switching S²FT adapters on one model (``ftops.s2ft.load``): to an
adapter with the same selection (only the slices are rewritten) and to one with a different
selection (the blocks are re-permuted from one layout to the other, one pass per weight).

A table with ratios to full fine-tuning is printed and JSON is written to
bench/results/s2ft.json (or --out). Usage::

    python bench/bench_s2ft.py                 # CPU: 8 blocks, hidden 1024, seq 256 (~168M params)
    python bench/bench_s2ft.py --quick         # CPU: 4 blocks, hidden 512, seq 128
    python bench/bench_s2ft.py --device cuda   # 12 blocks, hidden 2048, seq 1024, batch 2
    python bench/bench_s2ft.py --threads 1     # on a busy shared CPU machine
    python bench/bench_s2ft.py --layers 4 --seq 128 --batch 2 --steps 7   # median of 7 rounds
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types

from ftops.bench.memory import PeakMeter, rss_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
# For the CPU memory workers: glibc serves every allocation of 64 KiB or more with its own mmap
# and returns it on free, so the resident set follows the live tensors and its high-water mark is
# their peak, not an artefact of heap fragmentation (which varied the result by +-30% between
# runs).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
METHODS = ("full", "lora", "s2ft")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# Model sizes: (layers, hidden, intermediate, heads, kv_heads, vocab, seq, batch, warmup, steps)
SIZES = {
    ("cpu", False): (8, 1024, 2816, 16, 16, 32000, 256, 1, 1, 3),     # ~168M parameters
    ("cpu", True): (4, 512, 1408, 8, 8, 8000, 128, 1, 1, 2),          # --quick
    ("cuda", False): (12, 2048, 5632, 16, 16, 32000, 1024, 2, 2, 5),  # ~740M parameters
    ("cuda", True): (8, 1024, 2816, 16, 16, 32000, 512, 2, 2, 5),
}
SIZE_ARGS = ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "seq", "batch",
             "warmup", "steps")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--quick", action="store_true", help="a small model (well under a minute per "
                   "method on 2 CPU cores)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--model", default="auto", choices=["auto", "transformers", "builtin"],
                   help="transformers' LlamaForCausalLM (auto: when installed) or the "
                        "plain-PyTorch Llama-style model in this script")
    for name in SIZE_ARGS:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help="default: by device and --quick (see SIZES)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; on a busy shared machine "
                        "--threads 1 avoids OpenMP stalls that distort the timings)")
    for k in ("v", "o", "u", "d"):
        p.add_argument(f"--{k}-ratio", type=float, default=None,
                       help=f"S²FT {k}_ratio (default: the paper's, ftops.s2ft.PAPER_RATIOS)")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="default: match S²FT's trainable count")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default=os.path.join(HERE, "results", "s2ft.json"))
    p.add_argument("--worker", choices=METHODS + ("time",), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    for name, default in zip(SIZE_ARGS, SIZES[(a.device, a.quick)]):
        if getattr(a, name) is None:
            setattr(a, name, default)
    if a.model == "auto":
        a.model = "transformers" if has_module("transformers") else "builtin"
    from ftops.s2ft import PAPER_RATIOS

    for k in ("v", "o", "u", "d"):
        if getattr(a, f"{k}_ratio") is None:
            setattr(a, f"{k}_ratio", PAPER_RATIOS[f"{k}_ratio"])
    a.lora_impl = "peft" if has_module("peft") and a.model == "transformers" else "builtin"
    return a


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def build_model(a):
    """The Llama-style causal LM to train: transformers' LlamaForCausalLM or the builtin one."""
    if a.model == "transformers":
        import transformers

        cfg = transformers.LlamaConfig(
            vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
            num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
            max_position_embeddings=max(a.seq, 128), tie_word_embeddings=False)
        return transformers.LlamaForCausalLM(cfg)
    return BuiltinLlama(a)


def _builtin_classes():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self, n, eps=1e-6):
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.ones(n)), eps

        def forward(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    class Attention(nn.Module):
        def __init__(self, a):
            super().__init__()
            self.head_dim = a.hidden // a.heads
            self.q_proj = nn.Linear(a.hidden, a.heads * self.head_dim, bias=False)
            self.k_proj = nn.Linear(a.hidden, a.kv_heads * self.head_dim, bias=False)
            self.v_proj = nn.Linear(a.hidden, a.kv_heads * self.head_dim, bias=False)
            self.o_proj = nn.Linear(a.heads * self.head_dim, a.hidden, bias=False)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2)
                       for p in (self.q_proj, self.k_proj, self.v_proj))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                 enable_gqa=q.shape[1] != k.shape[1])
            return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    class MLP(nn.Module):
        def __init__(self, a):
            super().__init__()
            self.gate_proj = nn.Linear(a.hidden, a.intermediate, bias=False)
            self.up_proj = nn.Linear(a.hidden, a.intermediate, bias=False)
            self.down_proj = nn.Linear(a.intermediate, a.hidden, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class Block(nn.Module):
        def __init__(self, a):
            super().__init__()
            self.input_layernorm, self.self_attn = RMSNorm(a.hidden), Attention(a)
            self.post_attention_layernorm, self.mlp = RMSNorm(a.hidden), MLP(a)

        def forward(self, x):
            x = x + self.self_attn(self.input_layernorm(x))
            return x + self.mlp(self.post_attention_layernorm(x))

    class Llama(nn.Module):
        """Llama without rotary embeddings (elementwise, negligible cost), same module paths."""

        def __init__(self, a):
            super().__init__()
            self.model = nn.Module()
            self.model.embed_tokens = nn.Embedding(a.vocab, a.hidden)
            self.model.layers = nn.ModuleList(Block(a) for _ in range(a.layers))
            self.model.norm = RMSNorm(a.hidden)
            self.lm_head = nn.Linear(a.hidden, a.vocab, bias=False)
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)

        def forward(self, input_ids, labels):
            x = self.model.embed_tokens(input_ids)
            for layer in self.model.layers:
                x = layer(x)
            logits = self.lm_head(self.model.norm(x)).float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1))
            return types.SimpleNamespace(loss=loss, logits=logits)

    class LoraLinear(nn.Module):
        """y = base(x) + scale * B(A(x)), A and B trainable (peft's LoRA without dropout)."""

        def __init__(self, base, r, alpha):
            super().__init__()
            self.base, self.scale = base, alpha / r
            self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device,
                                    dtype=base.weight.dtype)
            self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device,
                                    dtype=base.weight.dtype)
            nn.init.kaiming_uniform_(self.lora_A.weight, a=5 ** 0.5)
            nn.init.zeros_(self.lora_B.weight)

        def forward(self, x):
            return self.base(x) + self.lora_B(self.lora_A(x)) * self.scale

    return Llama, LoraLinear


def BuiltinLlama(a):
    return _builtin_classes()[0](a)


def add_lora(a, model, r):
    """LoRA on q/k/v/o/gate/up/down: peft when installed (and the model is transformers'), else
    the builtin LoraLinear."""
    if a.lora_impl == "peft":
        import peft

        lcfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=LORA_TARGETS)
        return peft.get_peft_model(model, lcfg)
    LoraLinear = _builtin_classes()[1]
    for p in model.parameters():
        p.requires_grad_(False)
    for name, mod in list(model.named_modules()):
        if name.rpartition(".")[2] in LORA_TARGETS:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, LoraLinear(mod, r, 2 * r))
    return model


def s2ft_ratios(a) -> dict:
    return {f"{k}_ratio": getattr(a, f"{k}_ratio") for k in ("v", "o", "u", "d")}


def s2ft_trainable(a) -> int:
    """S²FT's trainable-parameter count: ftops.s2ft on the model built on the meta device."""
    import torch

    import ftops

    with torch.device("meta"):
        model = build_model(a)
    ftops.s2ft.apply(model, ftops.s2ft.select(model, **s2ft_ratios(a), seed=0))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_rank(a) -> int:
    if a.lora_rank:
        return a.lora_rank
    hd = a.hidden // a.heads
    q, kv = a.heads * hd, a.kv_heads * hd
    per_rank = a.layers * ((a.hidden + q) * 2 + (a.hidden + kv) * 2
                           + (a.hidden + a.intermediate) * 3)
    return max(1, round(s2ft_trainable(a) / per_rank))


# --------------------------------------------------------------------------------------------------
# workers
# --------------------------------------------------------------------------------------------------

class Trainer:
    """One method's model, optimizer and training step."""

    def __init__(self, a, method):
        import torch

        self.a, self.method, self.info = a, method, {"method": method}
        self.device = torch.device(a.device)
        torch.manual_seed(0)
        with torch.device(self.device):
            model = build_model(a).to(getattr(torch, a.dtype))
        model.train()
        if method == "full":
            params = list(model.parameters())
        elif method == "lora":
            r = lora_rank(a)
            model = add_lora(a, model, r)
            params = [p for p in model.parameters() if p.requires_grad]
            self.info["lora_rank"], self.info["lora_impl"] = r, a.lora_impl
        else:
            import ftops

            sel = ftops.s2ft.select(model, **s2ft_ratios(a), seed=0)
            ftops.s2ft.apply(model, sel)
            params = [p for p in model.parameters() if p.requires_grad]
            self.info["s2ft_units"] = {"v_heads": sel.num_v_heads, "o_heads": sel.num_o_heads,
                                       "u_channels": sel.num_u_channels,
                                       "d_channels": sel.num_d_channels}
        self.model, self.params = model, params
        self.info["trainable_params"] = sum(p.numel() for p in params)
        self.opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(self.device)

    def sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step(self) -> dict:
        """One step; seconds for forward, backward, optimizer, and the loss."""
        t = [time.perf_counter()]
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        self.sync()
        t.append(time.perf_counter())
        loss.backward()
        self.sync()
        t.append(time.perf_counter())
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sync()
        t.append(time.perf_counter())
        return {"fwd": t[1] - t[0], "bwd": t[2] - t[1], "opt": t[3] - t[2], "step": t[3] - t[0],
                "loss": loss.item()}


def set_threads(a):
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)


def memory_worker(a) -> dict:
    """Peak memory of one method (this process runs only that method)."""
    import torch

    if a.model == "transformers":
        import transformers  # noqa: F401  (imported before the memory baseline)
    if a.lora_impl == "peft":
        import peft  # noqa: F401
    set_threads(a)
    cuda = a.device == "cuda"
    meter = PeakMeter(a.device)
    base = meter.reset()
    tr = Trainer(a, a.worker)
    res = dict(tr.info)
    if not cuda:
        res["setup_rss_bytes"] = rss_bytes() - base
    steps = [tr.step() for _ in range(a.warmup + a.steps)]
    res["peak_bytes"] = meter.peak() - base
    res["losses"] = [s["loss"] for s in steps]
    return res


def timing_worker(a, methods) -> dict:
    """Step times of all methods, interleaved round by round in one process.

    Interleaving makes every method see the same machine conditions (on a shared or thermally
    throttling machine, separate runs drift by more than the differences measured)."""
    set_threads(a)
    trainers = {m: Trainer(a, m) for m in methods}
    rows: dict[str, list[dict]] = {m: [] for m in methods}
    for r in range(a.warmup + a.steps):
        order = methods[r % len(methods):] + methods[: r % len(methods)]
        for m in order:
            out = trainers[m].step()
            if r >= a.warmup:
                rows[m].append(out)
    res = {}
    for m in methods:
        med = {k: statistics.median(x[k] for x in rows[m]) for k in ("fwd", "bwd", "opt", "step")}
        res[m] = {"step_time_s": med["step"], "fwd_s": med["fwd"], "bwd_s": med["bwd"],
                  "opt_s": med["opt"], "step_times_s": [x["step"] for x in rows[m]]}
    if "s2ft" in trainers:
        # Per round, S²FT's step over the other method's step in the same round: the median of
        # these ratios is robust to load that drifts between rounds.
        for m in methods:
            if m != "s2ft":
                res["s2ft"][f"paired_ratio_vs_{m}"] = statistics.median(
                    s["step"] / o["step"] for s, o in zip(rows["s2ft"], rows[m]))
        res["s2ft"]["switch"] = time_switching(a, trainers["s2ft"])
    return res


def time_switching(a, tr) -> dict:
    """Seconds per ftops.s2ft.load between adapters on one model (medians)."""
    import ftops

    s2ft, model = ftops.s2ft, tr.model
    adapter_a = s2ft.export(model)
    adapter_a2 = {**adapter_a, "deltas": {k: {**v, "delta": 0.5 * v["delta"]}
                                          for k, v in adapter_a["deltas"].items()}}
    # A second adapter with another selection, trained for one step.
    s2ft.unload(model)
    s2ft.apply(model, s2ft.select(model, **s2ft_ratios(a), seed=1))
    tr.opt = __import__("torch").optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                             lr=1e-5)
    tr.step()
    adapter_b = s2ft.export(model)

    def timed(pairs):
        ts = []
        for src, dst in pairs:
            s2ft.load(model, src)
            tr.sync()
            t0 = time.perf_counter()
            s2ft.load(model, dst)
            tr.sync()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    return {"same_selection_s": timed([(adapter_a, adapter_a2), (adapter_a2, adapter_a)] * 3),
            "other_selection_s": timed([(adapter_a, adapter_b), (adapter_b, adapter_a)] * 2)}


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------

def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main(argv=None):
    a = parse_args(argv)
    if a.worker:
        res = (timing_worker(a, a.methods.split(",")) if a.worker == "time" else memory_worker(a))
        with open(a.worker_out, "w") as f:
            json.dump(res, f)
        return

    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: unknown method {m!r} (choose from {METHODS})")
    print(f"Llama-style model: {a.layers} blocks, hidden {a.hidden}, intermediate "
          f"{a.intermediate}, heads {a.heads}/{a.kv_heads} kv, vocab {a.vocab}; batch {a.batch} "
          f"x seq {a.seq}; "
          f"{a.dtype} on {a.device}; {a.warmup} warm-up + {a.steps} timed steps per method; "
          f"model: {a.model}, LoRA: {a.lora_impl}")
    load1 = os.getloadavg()[0]
    if a.device == "cpu" and load1 > (os.cpu_count() or 1):
        print(f"note: load average {load1:.1f} exceeds the {os.cpu_count()} CPUs; timings will be "
              "noisy" + ("" if a.threads == 1 else " (consider --threads 1)"))
    ratios = ", ".join(f"{k}={v:g}" for k, v in s2ft_ratios(a).items())
    print(f"S²FT {ratios}; LoRA rank {lora_rank(a)} (S²FT trainable {s2ft_trainable(a):,})",
          flush=True)

    results = {}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    passthrough = list(argv if argv is not None else sys.argv[1:])

    def run_worker(kind):
        tmp = f"{a.out}.{kind}.tmp"
        cmd = [sys.executable, os.path.abspath(__file__), *passthrough, "--device", a.device,
               "--methods", ",".join(methods), "--worker", kind, "--worker-out", tmp]
        t0 = time.perf_counter()
        env = dict(os.environ)
        if kind != "time" and a.device == "cpu":
            env.update(MALLOC_ENV)
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{kind}: worker failed with exit status {proc.returncode}")
        with open(tmp) as f:
            res = json.load(f)
        os.remove(tmp)
        print(f"  {kind}: done in {time.perf_counter() - t0:.1f} s", flush=True)
        return res

    for m in methods:  # peak memory: a fresh process per method
        results[m] = run_worker(m)
    for m, r in run_worker("time").items():  # step times: all methods interleaved, one process
        results[m].update(r)

    ref = results.get("full")
    hdr = (f"{'method':<9}{'trainable':>13}{'peak memory':>14}{'x full':>8}{'step time':>11}"
           f"{'x full':>8}{'fwd':>8}{'bwd':>8}{'opt':>8}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for m, r in results.items():
        if ref:
            r["peak_ratio_vs_full"] = r["peak_bytes"] / ref["peak_bytes"]
            r["time_ratio_vs_full"] = r["step_time_s"] / ref["step_time_s"]
        mem_ratio = f"{r['peak_ratio_vs_full']:.2f}" if ref else "-"
        time_ratio = f"{r['time_ratio_vs_full']:.2f}" if ref else "-"
        label = m if m != "lora" else f"lora r{r['lora_rank']}"
        print(f"{label:<9}{r['trainable_params']:>13,}{fmt_bytes(r['peak_bytes']):>14}"
              f"{mem_ratio:>8}{r['step_time_s'] * 1e3:>9.0f}ms{time_ratio:>8}" +
              "".join(f"{r[k] * 1e3:>6.0f}ms" for k in ("fwd_s", "bwd_s", "opt_s")))
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
            targets["time<lora"] = s["paired_ratio_vs_lora"] < 1.0
        paired = ", ".join(f"{k[len('paired_ratio_vs_'):]} {v:.2f}" for k, v in s.items()
                           if k.startswith("paired_ratio_vs_"))
        if paired:
            print(f"S²FT step / other step in the same round (median over rounds): {paired}")
        print("targets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}"
                                      for k, v in targets.items()))
        results["targets"] = targets

    import torch

    meta = {"args": {k: v for k, v in vars(a).items() if not k.startswith("worker")},
            "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "threads": a.threads or torch.get_num_threads(),
            "loadavg_at_end": os.getloadavg(),
            "gpu": torch.cuda.get_device_name() if a.device == "cuda" else None,
            "memory_metric": ("torch.cuda.max_memory_allocated minus allocation before model "
                              "creation"
                              if a.device == "cuda" else
                              "VmHWM minus VmRSS before model creation (fresh process per "
                              f"method, environment {MALLOC_ENV})")}
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
