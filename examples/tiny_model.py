"""A tiny Llama-style language model and the torchrun plumbing shared by the examples.

The module paths follow transformers' Llama (`layers.N.self_attn.{q,k,v,o}_proj`,
`layers.N.mlp.{gate,up,down}_proj`), so ftops.s2ft and ftops.owlore find its blocks as they
find a real model's. Swap in any transformers model; nothing else in the examples changes.
"""
import gc
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.head_dim = hidden // heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(hidden, hidden, bias=False) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(a.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, hidden, heads, inter):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(hidden)
        self.self_attn = Attention(hidden, heads)
        self.post_attention_layernorm = nn.LayerNorm(hidden)
        self.mlp = MLP(hidden, inter)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLM(nn.Module):
    def __init__(self, vocab=256, hidden=128, heads=4, inter=352, layers=4):
        super().__init__()
        self.vocab = vocab
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Block(hidden, heads, inter) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed_tokens(tokens)
        for blk in self.layers:
            x = blk(x)
        return self.lm_head(self.norm(x))


def lm_loss(model, tokens):
    """Next-token cross-entropy of `tokens` ([batch, seq + 1])."""
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def local_device() -> torch.device:
    """This process's device under torchrun: GPU number LOCAL_RANK when the machine has a GPU for
    each of its processes, else the CPU, with a notice (2 processes on a 1-GPU machine would
    otherwise fail in torch.cuda.set_device with "invalid device ordinal")."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus >= local_world:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device
    if gpus and local_rank == 0:
        print(f"{local_world} processes but {gpus} GPU(s) on this machine: running on the CPU (gloo)")
    return torch.device("cpu")


def setup():
    """Join the torchrun process group (nccl on GPUs, gloo on the CPU); returns (rank, world, device)."""
    device = local_device()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial model on every rank
    return rank, world, device


def teardown():
    """Leave the process group cleanly: wait until every rank is done communicating, then destroy
    it (without the barrier, gloo's worker threads can abort the exit of a rank that finished
    first). Call it after the DDP wrappers are gone (see `run`): a wrapper alive at exit keeps
    the group and its pending work until interpreter shutdown, where gloo can abort the process."""
    gc.collect()  # wrappers replaced at a re-wrap may sit in reference cycles
    dist.barrier()
    dist.destroy_process_group()


def run(main):
    """setup(), main(rank, world, device), teardown(): whatever main builds (the DDP wrappers,
    the optimizer) is freed when it returns, before the process group is destroyed."""
    rank, world, device = setup()
    main(rank, world, device)
    teardown()


def batches(model, steps, rank, batch=8, seq=32):
    """This rank's shard of a learnable synthetic stream: each sequence starts at a random token
    and follows t -> (5 t + 3) mod vocab (each rank gets different sequences)."""
    g = torch.Generator().manual_seed(1000 + rank)
    for _ in range(steps):
        t = torch.randint(0, model.vocab, (batch, 1), generator=g)
        cols = [t]
        for _ in range(seq):
            cols.append((5 * cols[-1] + 3) % model.vocab)
        yield torch.cat(cols, dim=1)


def no_buffer_sync() -> dict:
    """DDP keyword that stops the broadcast of buffers before every forward (its name changed in
    torch 2.14: forward_sync_buffers; broadcast_buffers before)."""
    import inspect
    from torch.nn.parallel import DistributedDataParallel as DDP
    if "forward_sync_buffers" in inspect.signature(DDP).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}
