"""Run a test body in several gloo processes (torch.distributed on CPU).

`spawn(body, world, tmp_path, *args)` starts `world` processes; each joins a process group through
a file rendezvous in `tmp_path` (no TCP port to race other tests for), runs
`body(rank, world, out_dir, *args)`, waits at a barrier so no collective is still in flight, tears
the group down, and leaves with `os._exit(0)`. Skipping the interpreter's finalization avoids a
rare gloo abort ("terminate called without an active exception") when its worker threads outlive
the group. An exception in `body` still reaches the parent as a test failure.
"""
import os
import sys

import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, out_dir, body, args):
    import torch
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}",
                            rank=rank, world_size=world)
    body(rank, world, out_dir, *args)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(body, world, tmp_path, *args):
    """Run `body(rank, world, out_dir, *args)` on `world` gloo ranks; `out_dir` is `tmp_path`."""
    mp.spawn(_worker, args=(world, str(tmp_path), body, args), nprocs=world, join=True)
