"""GaLoreAdamW under DistributedDataParallel.   torchrun --nproc-per-node 2 examples/galore_ddp.py

DDP averages the full gradients; every rank then refreshes the same projector from the same
averaged gradient (the randomized projector is seeded per parameter and step, not by the global
RNG), so the ranks stay identical. Checkpoint: rank 0 saves, every rank can load.
"""
import os
import tempfile

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import ftops
from ftops.owlore import galore_param_groups
from tiny_model import TinyLM, batches, lm_loss, run


def main(rank, world, device):
    model = TinyLM().to(device)
    groups = galore_param_groups(model, model.layers, rank=32, update_proj_gap=5, scale=0.25,
                                 projector="randomized")  # block matrices projected, the rest plain
    opt = ftops.GaLoreAdamW(groups, lr=1e-2)
    ddp = DDP(model)
    for step, tokens in enumerate(batches(model, 12, rank)):
        loss = lm_loss(ddp, tokens.to(device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rank == 0:
            print(f"step {step:2d}  loss {loss.item():.4f}")
    if rank == 0:
        path = os.path.join(tempfile.gettempdir(), "galore_ckpt.pt")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
        print(f"saved {path}")


if __name__ == "__main__":
    run(main)
