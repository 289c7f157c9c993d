"""S²FT under DistributedDataParallel.   torchrun --nproc-per-node 2 examples/s2ft_ddp.py

The trainable slices are ordinary parameters (views of frozen buffers), so DDP covers exactly
them. The frozen weights are buffers: turn off DDP's buffer sync, or DDP broadcasts the whole
frozen model from rank 0 before every forward (correct, but as costly as full fine-tuning).
"""
import os
import tempfile

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ftops import s2ft
from tiny_model import TinyLM, batches, lm_loss, no_buffer_sync, run


def main(rank, world, device):
    model = TinyLM().to(device)
    # the paper's kinds (output and down columns); the same seed on every rank: one selection
    s2ft.apply(model, s2ft.select(model, o_ratio=0.25, d_ratio=0.05, seed=0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ddp = DDP(model, **no_buffer_sync())  # forward_sync_buffers=False (broadcast_buffers before 2.14)
    for step, tokens in enumerate(batches(model, 12, rank)):
        loss = lm_loss(ddp, tokens.to(device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rank == 0:
            print(f"step {step:2d}  loss {loss.item():.4f}")
    if rank == 0:
        path = os.path.join(tempfile.gettempdir(), "s2ft_adapter.pt")
        torch.save(s2ft.export(model), path)
        print(f"saved {path}")


if __name__ == "__main__":
    run(main)
