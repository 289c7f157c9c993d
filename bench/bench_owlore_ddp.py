"""OwLore under DistributedDataParallel: three ways to follow the sampled blocks, measured.

    python bench/bench_owlore_ddp.py [--quick] [--out results/owlore_ddp.json]

OwLore changes which blocks train every `period` steps; a DDP wrapper fixes its buckets (the
parameters with requires_grad) when it is built. Two gloo ranks on the CPU (whatever --device
says: two ranks need two devices) train the same model with GaLoreAdamW + OwLore three ways:

* rebuild:     OwLore flips requires_grad; the model is wrapped again at each draw
               (`DDP(model, init_sync=False)`): buckets hold the active blocks + the always-trained
               parameters only. (What ftops recommends.)
* find_unused: one wrapper built over every candidate parameter, find_unused_parameters=True;
               OwLore flips requires_grad, DDP finds the unused ones by walking the graph each step
               and still all-reduces their (zero) bucket slots.
* all_grads:   one wrapper over every parameter, all keep requires_grad=True (full backward), and
               the gradients of the unsampled blocks are dropped after the all-reduce.

Per option: time per training step (median on rank 0, including the rebuilds; the fastest of
`--rounds` interleaved runs, since a shared machine's load varies), the bytes DDP
all-reduces per step, the gradient memory, and the largest difference of the final weights from
the `rebuild` run (all three compute the same update).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
from tiny_model import TinyLM  # noqa: E402


def worker(rank, world, option, cfg, out_dir, tag):
    import ftops
    from ftops.owlore import galore_param_groups
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'rdv_' + tag)}",
                            rank=rank, world_size=world)
    torch.manual_seed(0)
    model = TinyLM(hidden=cfg["hidden"], layers=cfg["layers"], inter=cfg["inter"])
    opt = ftops.GaLoreAdamW(galore_param_groups(model, model.layers, rank=16, update_proj_gap=10),
                            lr=1e-3)
    sampler = ftops.OwLore(model.layers, gamma=cfg["gamma"], period=cfg["period"], seed=0,
                           optimizer=opt)
    g = torch.Generator().manual_seed(100 + rank)
    tokens = torch.randint(0, model.vocab, (cfg["steps"], cfg["batch"], cfg["seq"] + 1), generator=g)
    ddp, rebuild_s, covered = None, [], []
    if option != "rebuild":
        ddp = DDP(model, find_unused_parameters=(option == "find_unused"))
        covered.append(sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad))
    times = []
    for i in range(cfg["steps"]):
        dist.barrier()
        t0 = time.perf_counter()
        drew = sampler.step()
        if option == "all_grads":
            for b in range(len(model.layers)):
                for p in sampler.block_parameters(b):
                    p.requires_grad_(True)
        if option == "rebuild" and drew:
            t1 = time.perf_counter()
            ddp = DDP(model, init_sync=ddp is None)
            rebuild_s.append(time.perf_counter() - t1)
            covered.append(sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad))
        x = tokens[i]
        logits = ddp(x[:, :-1])
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
        grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                         if p.grad is not None)
        if option == "all_grads":
            active = set(sampler.active)
            for b in range(len(model.layers)):
                if b not in active:
                    for p in sampler.block_parameters(b):
                        p.grad = None
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        torch.save({"times": times, "rebuild_s": rebuild_s, "covered": covered,
                    "grad_bytes": grad_bytes, "final": [p.detach().clone() for p in model.parameters()]},
                   os.path.join(out_dir, f"{option}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu", help="ignored: two gloo ranks on the CPU")
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=None,
                    help="runs of each option, interleaved; the fastest median counts (default 3, 1 quick)")
    args = ap.parse_args()
    cfg = dict(hidden=128, inter=352, layers=8, gamma=2, period=5, batch=4, seq=32,
               steps=10 if args.quick else 20)
    rounds = args.rounds or (1 if args.quick else 3)
    options = ["rebuild", "find_unused", "all_grads"]
    res = {}
    with tempfile.TemporaryDirectory() as d:
        for rnd in range(rounds):  # interleaved, so that a busy moment does not hit one option
            for option in options:
                mp.spawn(worker, args=(2, option, cfg, d, f"{option}{rnd}"), nprocs=2, join=True)
                r = torch.load(os.path.join(d, f"{option}.pt"))
                if option not in res or statistics.median(r["times"]) < statistics.median(res[option]["times"]):
                    res[option] = r
                os.remove(os.path.join(d, f"{option}.pt"))
    base = res["rebuild"]
    rows = []
    print(f"OwLore + DDP, 2 gloo ranks on CPU, {cfg['layers']} blocks, gamma={cfg['gamma']}, "
          f"period={cfg['period']}, {cfg['steps']} steps, fastest of {rounds} interleaved rounds")
    print(f"{'option':<12} {'step ms':>9} {'ratio':>6} {'all-reduce MB/step':>19} {'grad MB':>8} "
          f"{'rebuild ms':>11} {'max |dw| vs rebuild':>20}")
    t_base = statistics.median(base["times"])
    for option in options:
        r = res[option]
        t = statistics.median(r["times"])
        mb = statistics.mean(r["covered"]) / 2**20
        diff = max(float((a - b).abs().max()) for a, b in zip(r["final"], base["final"]))
        rb = 1e3 * statistics.mean(r["rebuild_s"]) if r["rebuild_s"] else 0.0
        rows.append(dict(option=option, step_ms=1e3 * t, ratio=t / t_base, allreduce_mb=mb,
                         grad_mb=r["grad_bytes"] / 2**20, rebuild_ms=rb, max_diff=diff))
        print(f"{option:<12} {1e3 * t:>9.1f} {t / t_base:>6.2f} {mb:>19.2f} "
              f"{r['grad_bytes'] / 2**20:>8.2f} {rb:>11.1f} {diff:>20.2e}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"config": cfg, "rounds": rounds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
