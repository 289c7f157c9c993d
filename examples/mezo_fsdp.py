#!/usr/bin/env python
"""MeZO on several processes: FSDP2 (``fully_shard``) or DDP, on CPU with gloo or on GPUs with NCCL.

    torchrun --nproc-per-node 2 examples/mezo_fsdp.py                 # FSDP2, CPU, gloo
    torchrun --nproc-per-node 2 examples/mezo_fsdp.py --mode ddp      # DistributedDataParallel
    torchrun --nproc-per-node 2 examples/mezo_fsdp.py --check         # + compare with 1 process

Each rank holds 1/world of every weight (FSDP2) or a replica (DDP) and evaluates its own batch.
MeZO needs no gradients: per step, beyond FSDP's own all-gathers for the forwards, the ranks
exchange only ``n_samples`` loss differences (one all_reduce of float64 scalars). The script
counts MeZO's all_reduce traffic and prints it next to the bytes that a gradient all-reduce of the
same model would move. ``--check`` (FSDP2, same batch on every rank) trains the unsharded model in
rank 0 too and asserts that the weights agree bit for bit.
"""
from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist

import ftops
from tiny_model import local_device


def make_model(width: int, depth: int) -> torch.nn.Sequential:
    torch.manual_seed(0)  # the same initial weights on every rank
    layers = []
    for i in range(depth):
        layers += [torch.nn.Linear(width if i else 13, width), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))


def batch(rank: int, same: bool, n: int = 64):
    g = torch.Generator().manual_seed(1 if same else 1 + rank)
    X = torch.randn(n, 13, generator=g)
    return X, torch.sin(X.sum(1, keepdim=True))


def train(model, X, y, steps: int, lr: float, n_samples: int):
    opt = ftops.MeZO(model.parameters(), lr=lr, eps=1e-3, n_samples=n_samples, seed=0)
    loss = None
    for _ in range(steps):
        loss = opt.step(lambda: torch.nn.functional.mse_loss(model(X), y))
    return float(loss)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["fsdp", "ddp"], default="fsdp")
    ap.add_argument("--width", type=int, default=257)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n-samples", type=int, default=1)
    ap.add_argument("--check", action="store_true", help="compare with one process (FSDP2 mode)")
    args = ap.parse_args()

    device = local_device()
    reference = None
    if args.check and args.mode == "fsdp" and int(os.environ.get("RANK", 0)) == 0:
        # before the process group exists, so that this MeZO runs as a single process
        single = make_model(args.width, args.depth).to(device)
        X, y = (t.to(device) for t in batch(0, same=True))
        reference = (train(single, X, y, args.steps, args.lr, args.n_samples),
                     [p.detach() for p in single.parameters()])

    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    model = make_model(args.width, args.depth).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    if args.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    X, y = (t.to(device) for t in batch(rank, same=args.check))

    # count what MeZO itself sends: its all_reduce calls (FSDP2 uses all-gathers, not all_reduce)
    sent, real_all_reduce = [], dist.all_reduce

    def counting_all_reduce(tensor, *a, **kw):
        sent.append(tensor.numel() * tensor.element_size())
        return real_all_reduce(tensor, *a, **kw)

    dist.all_reduce = counting_all_reduce
    try:
        loss = train(model, X, y, args.steps, args.lr, args.n_samples)
    finally:
        dist.all_reduce = real_all_reduce

    full = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]
    if rank == 0:
        print(f"{args.mode}, {world} ranks, {n_params:,} parameters, {args.steps} steps: "
              f"final loss {loss:.5f}")
        print(f"MeZO all_reduce traffic: {len(sent)} calls, {sum(sent)} bytes in all "
              f"({sum(sent) // max(len(sent), 1)} bytes per step); a fp32 gradient all-reduce "
              f"would send {4 * n_params:,} bytes per step")
        if reference is not None:
            ref_loss, ref_params = reference
            same = all(torch.equal(a, b) for a, b in zip(full, ref_params))
            print(f"one process: final loss {ref_loss:.5f}; weights bit-identical: {same}")
            assert same and ref_loss == loss
    # the sharded model goes before the process group, every rank done communicating before it
    # goes (see tiny_model.teardown)
    del model, full
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
