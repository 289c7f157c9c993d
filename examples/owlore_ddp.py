"""OwLore under DistributedDataParallel.   torchrun --nproc-per-node 2 examples/owlore_ddp.py

A DDP wrapper fixes its gradient buckets (the parameters with requires_grad) when it is built,
and OwLore changes which blocks train at every draw: wrap the model again when `sampler.step()`
reports a draw. The parameters are identical on every rank, so the new wrapper skips the initial
broadcast (`init_sync=False`); buckets then hold only the sampled blocks and the always-trained
parts. Every rank draws rank 0's blocks (the sampler broadcasts rank 0's generator state once).
"""
from torch.nn.parallel import DistributedDataParallel as DDP

import ftops
from ftops.owlore import galore_param_groups
from tiny_model import TinyLM, batches, lm_loss, run


def main(rank, world, device):
    model = TinyLM(layers=6).to(device)
    opt = ftops.GaLoreAdamW(galore_param_groups(model, model.layers, rank=32, update_proj_gap=5),
                            lr=1e-2)  # built over every parameter, before the first draw
    sampler = ftops.OwLore(model.layers, ratios=None, gamma=2, period=4, seed=0, optimizer=opt)
    ddp = None
    for step, tokens in enumerate(batches(model, 12, rank)):
        if sampler.step():  # a new draw: wrap again so that DDP reduces exactly the trainable set
            ddp = DDP(model, init_sync=ddp is None)
        loss = lm_loss(ddp, tokens.to(device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rank == 0:
            print(f"step {step:2d}  blocks {sampler.active}  loss {loss.item():.4f}")


if __name__ == "__main__":
    run(main)
