"""SaRA under DistributedDataParallel.   torchrun --nproc-per-node 2 examples/sara_ddp.py

With torch.distributed initialized, SaRA registers each weight's trainable values on its module
(`<module>.sara_values`), so the DDP wrapper built afterwards averages their gradients. The
progressive reselection shrinks the trainable set (new value Parameters): wrap the model again
right after the step that reselected.
"""
import os
import tempfile

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import ftops
from tiny_model import TinyLM, batches, lm_loss, run


def main(rank, world, device):
    model = TinyLM().to(device)
    opt = ftops.SaRA(model, threshold=2e-2, lr=1e-2, lambda_rank=5e-4, progressive_iter=6)
    ddp = DDP(model)
    for step, tokens in enumerate(batches(model, 12, rank)):
        loss = lm_loss(ddp, tokens.to(device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if opt.param_groups[0]["sara_step"] == opt.param_groups[0]["progressive_iter"]:
            ddp = DDP(model, init_sync=False)  # the trainable values were re-selected
        if rank == 0:
            print(f"step {step:2d}  trainable {opt.num_trainable()}  loss {loss.item():.4f}")
    if rank == 0:
        path = os.path.join(tempfile.gettempdir(), "sara_delta.pt")
        torch.save(opt.delta(), path)
        print(f"saved {path}")


if __name__ == "__main__":
    run(main)
