"""GaLoreAdamW, OwLore, S²FT and SaRA under torch.distributed (2 gloo processes on the CPU).

DDP: two ranks, each on half of the batch, must end with the same parameters as one process on
the whole batch (the loss is a mean over equal halves, so DDP's averaged gradient is the full-batch
gradient up to float64 rounding), bit-identical to each other, over steps that include a GaLore
projector refresh, an OwLore redraw and a SaRA reselection. Checkpoints: rank 0 saves the model's
and the optimizer's state_dict mid-run, every rank loads them into a fresh model and optimizer,
and the resumed run must end bit-identical to the uninterrupted one.

FSDP2 (fully_shard): S²FT and SaRA must match one process; GaLore must refuse a sharded parameter
in a projected group with a clear error (and work as plain AdamW in groups without a rank).

Each method runs in one spawn (a module-scoped fixture) whose results several tests read.
"""
import inspect
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import ftops
from ftops import s2ft
from ftops.owlore import galore_param_groups
from _dist import spawn
from _models import Block

STEPS, RESUME_AT = 6, 4
TOL = dict(rtol=1e-9, atol=1e-11)  # float64: one process vs two ranks (summation order only)


# --- a tiny Llama-style model (S²FT finds its blocks; OwLore its `layers`) ---------------------------

class Tiny(nn.Module):
    # hidden 72 / inter 80: every block matrix has min(m, n) > 64, so SaRA's nuclear norm applies
    def __init__(self, d_in=16, hidden=72, heads=4, inter=80, layers=2, d_out=5):
        super().__init__()
        self.embed = nn.Linear(d_in, hidden)
        self.layers = nn.ModuleList(Block(hidden, heads, inter) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x):
        x = self.embed(x)
        for blk in self.layers:
            x = blk(x)
        return self.head(self.norm(x))


def tiny(layers=2):
    torch.manual_seed(0)
    return Tiny(layers=layers).double()


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, 16, generator=g, dtype=torch.float64), \
        torch.randn(8, 6, 5, generator=g, dtype=torch.float64)


def batch(rank, world):
    """This rank's half of the batch (world 1: the whole batch)."""
    x, y = data()
    n = x.shape[0] // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def loss_fn(model, x, y):
    return F.mse_loss(model(x), y)


# --- the methods: the same build and loop for one process and for DDP ranks -------------------------

def galore_build(model):
    # attention matrices with the exact SVD, MLP matrices with the seeded randomized projector
    attn = [p for n, p in model.named_parameters() if "self_attn" in n and p.dim() == 2]
    mlp = [p for n, p in model.named_parameters() if "_proj" in n and "self_attn" not in n
           and p.dim() == 2]
    ids = {id(p) for p in attn + mlp}
    rest = [p for p in model.parameters() if id(p) not in ids]
    opt = ftops.GaLoreAdamW([
        {"params": rest},
        {"params": attn, "rank": 6, "update_proj_gap": 2, "scale": 0.5},
        {"params": mlp, "rank": 5, "update_proj_gap": 2, "projector": "randomized", "seed": 3},
    ], lr=1e-2, weight_decay=0.01)
    return {"opt": opt}


def owlore_build(model, seed=0):
    opt = ftops.GaLoreAdamW(galore_param_groups(model, model.layers, rank=6, update_proj_gap=2),
                            lr=1e-2)
    sampler = ftops.OwLore(model.layers, ratios=[1.0, 2.0, 3.0], gamma=1, period=2, seed=seed,
                           optimizer=opt)
    return {"opt": opt, "sampler": sampler}


def s2ft_build(model):
    s2ft.apply(model, s2ft.select(model, v_ratio=0.5, o_ratio=0.5, u_ratio=0.25, d_ratio=0.25,
                                  seed=0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return {"opt": opt}


def sara_build(model, **kw):
    opt = ftops.SaRA(model, fraction=0.2, lr=2e-2, lambda_rank=1e-3, progressive_iter=3, **kw)
    return {"opt": opt}


BUILDS = {"galore": galore_build, "owlore": owlore_build, "s2ft": s2ft_build, "sara": sara_build}


def new_model(method):
    return tiny(3 if method == "owlore" else 2)


def run(parts, net_for, x, y, start, stop, before_step=None):
    """Training steps start..stop-1. `net_for(changed)` returns what to call for the forward;
    `changed` is True at the first step and whenever the set of trainable parameters changed
    (an OwLore draw, a SaRA reselection): a DDP wrapper must then be built again."""
    opt, sampler = parts["opt"], parts.get("sampler")
    changed = True
    for i in range(start, stop):
        if before_step is not None:
            before_step(i)
        if sampler is not None and sampler.step():  # before the forward
            changed = True
        loss_fn(net_for(changed), x, y).backward()
        changed = False
        opt.step()
        opt.zero_grad(set_to_none=True)
        g = opt.param_groups[0]
        if isinstance(opt, ftops.SaRA) and g["sara_step"] == g["progressive_iter"]:
            changed = True


def single_process(method, steps=STEPS):
    model = new_model(method)
    parts = BUILDS[method](model)
    run(parts, lambda changed: model, *batch(0, 1), 0, steps)
    return model, parts


def final_params(model):
    """Every parameter and buffer, by state_dict name (SaRA's values are in the weights)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- DDP ---------------------------------------------------------------------------------------------

# named forward_sync_buffers from torch 2.14 (broadcast_buffers, now deprecated, before)
NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                  if "forward_sync_buffers" in inspect.signature(DDP).parameters
                  else {"broadcast_buffers": False})


class Wrapper:
    """The DDP wrapper of a model, built again when the trainable set changed."""

    def __init__(self, model, opt, **kw):
        self.model, self.opt, self.kw, self.ddp, self.builds = model, opt, kw, None, 0
        self.covers_opt = True  # DDP reduces exactly what the optimizer steps on (and has a grad)

    def __call__(self, changed):
        if self.ddp is None or changed:
            # After the first wrap the ranks are identical already: no initial broadcast.
            self.ddp = DDP(self.model, init_sync=self.ddp is None, **self.kw)
            self.builds += 1
            covered = {id(p) for p in self.model.parameters() if p.requires_grad}
            stepped = {id(p) for g in self.opt.param_groups for p in g["params"] if p.requires_grad}
            self.covers_opt &= covered == stepped
        return self.ddp


def _ddp_run(method, rank, world, out_dir, resume_from=None, save_at=None):
    model = new_model(method)
    # OwLore's draws and SaRA's nuclear-norm picks: another seed on rank 1; rank 0's must win
    seeded = {"owlore": owlore_build, "sara": sara_build}
    parts = seeded[method](model, seed=7 * rank) if method in seeded else BUILDS[method](model)
    start = 0
    if resume_from is not None:  # every rank loads what rank 0 saved
        ck = torch.load(resume_from, weights_only=True)
        model.load_state_dict(ck["model"])
        parts["opt"].load_state_dict(ck["opt"])
        if "sampler" in parts:
            parts["sampler"].load_state_dict(ck["sampler"])
        start = ck["step"]

    def save(i):
        if i == save_at:
            if rank == 0:
                ck = {"model": model.state_dict(), "opt": parts["opt"].state_dict(), "step": i}
                if "sampler" in parts:
                    ck["sampler"] = parts["sampler"].state_dict()
                torch.save(ck, os.path.join(out_dir, "ckpt.pt"))
            dist.barrier()

    # S²FT's frozen weights are buffers: do not broadcast them at every forward
    wrapper = Wrapper(model, parts["opt"], **(NO_BUFFER_SYNC if method == "s2ft" else {}))
    run(parts, wrapper, *batch(rank, world), start, STEPS, before_step=save)
    return model, parts, wrapper


def _ddp_body(rank, world, out_dir, method):
    model, parts, wrapper = _ddp_run(method, rank, world, out_dir, save_at=RESUME_AT)
    info = {"builds": wrapper.builds, "covers_opt": wrapper.covers_opt}
    if method == "sara":
        info["num_trainable"] = parts["opt"].num_trainable()
    if method == "owlore":
        info["draws"] = parts["sampler"].history
    torch.save({"params": final_params(model), "info": info},
               os.path.join(out_dir, f"{method}_rank{rank}.pt"))
    dist.barrier()
    resumed, _, _ = _ddp_run(method, rank, world, out_dir, resume_from=os.path.join(out_dir, "ckpt.pt"))
    torch.save(final_params(resumed), os.path.join(out_dir, f"{method}_resumed_rank{rank}.pt"))


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    cache = {}

    def get(method):
        if method not in cache:
            d = tmp_path_factory.mktemp(f"ddp_{method}")
            spawn(_ddp_body, 2, d, method)
            cache[method] = {
                "ranks": [torch.load(d / f"{method}_rank{r}.pt") for r in range(2)],
                "resumed": [torch.load(d / f"{method}_resumed_rank{r}.pt") for r in range(2)],
            }
        return cache[method]
    return get


METHODS = ["galore", "owlore", "s2ft", "sara"]


@pytest.mark.parametrize("method", METHODS)
def test_ddp_matches_one_process(ddp_runs, method):
    run = ddp_runs(method)
    r0, r1 = (r["params"] for r in run["ranks"])
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks diverged at {k}"
    ref_model, ref_parts = single_process(method)
    ref = final_params(ref_model)
    base = final_params(new_model(method))
    assert r0.keys() == ref.keys()
    for k, v in ref.items():
        torch.testing.assert_close(r0[k], v, **TOL, msg=lambda m: f"{method} {k}: {m}")
    # training did change weights
    assert any(k in base and not torch.equal(v, base[k]) for k, v in ref.items())
    info = run["ranks"][0]["info"]
    assert info["covers_opt"]  # DDP's buckets hold exactly the optimizer's trainable tensors
    if method == "sara":  # the reselection happened, and the DDP wrapper was built again for it
        assert info["num_trainable"] == ref_parts["opt"].num_trainable()
        assert info["num_trainable"] < sum(mg.values.numel() + mg.frozen_values.numel()
                                           for mg in ref_parts["opt"]._managed)
        assert info["builds"] == 2
    if method == "owlore":  # rank 1 (another seed) drew rank 0's blocks; one wrap per draw
        assert info["draws"] == run["ranks"][1]["info"]["draws"] == ref_parts["sampler"].history
        assert info["builds"] == 3


@pytest.mark.parametrize("method", METHODS)
def test_ddp_checkpoint_resume(ddp_runs, method):
    run = ddp_runs(method)
    for r in range(2):
        full, resumed = run["ranks"][r]["params"], run["resumed"][r]
        assert full.keys() == resumed.keys()
        for k in full:
            assert torch.equal(full[k], resumed[k]), f"{method} rank {r}: {k} differs after resume"


def test_sara_values_are_module_parameters():
    """Registered (for DDP), the values are what model.parameters() trains, and not in the model's
    state_dict; with register_values=False the model keeps only its own parameters."""
    model = tiny()
    opt = ftops.SaRA(model, fraction=0.2, register_values=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == len(opt.param_groups[0]["params"])
    assert all(a is b for a, b in zip(trainable, opt.param_groups[0]["params"]))
    assert not any("sara_values" in k for k in model.state_dict())
    model.load_state_dict(tiny().state_dict())  # strict: the values are not missing keys
    # a reselection that drops entries makes new, smaller value Parameters, registered in place
    n0 = opt.num_trainable()
    for v in opt.param_groups[0]["params"]:
        v.grad = torch.ones_like(v)
    opt.param_groups[0]["lr"] = 1.0
    opt.step()
    with pytest.warns(UserWarning, match="DistributedDataParallel again"):
        opt.reselect()
    assert opt.num_trainable() < n0
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(a is b for a, b in zip(trainable, opt.param_groups[0]["params"]))
    assert all(a.shape == opt.state[a]["exp_avg"].shape for a in trainable)
    opt.unwrap()
    assert not any("sara_values" in n for n, _ in model.named_parameters())
    plain = tiny()
    ftops.SaRA(plain, fraction=0.2)  # not distributed here: not registered by default
    assert not any(p.requires_grad for p in plain.parameters())


def test_owlore_step_reports_draws():
    model = tiny(3)
    s = ftops.OwLore(model.layers, gamma=1, period=2)
    assert [s.step() for _ in range(5)] == [True, False, True, False, True]


# --- FSDP2 -------------------------------------------------------------------------------------------

def _shard(model, mesh, **kw):
    from torch.distributed.fsdp import fully_shard
    for blk in model.layers:
        fully_shard(blk, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _fsdp_case(name, out_dir, rank, fn):
    try:
        result = fn()
    except Exception:  # reported by the test of this case, not by the whole spawn
        result = {"error": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"fsdp_{name}_rank{rank}.pt"))
    dist.barrier()


def _fsdp_body(rank, world, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    x, y = batch(rank, world)

    def galore():
        out = {}
        model = tiny()
        _shard(model, mesh)
        try:
            galore_build(model)
        except ValueError as e:
            out["construct_error"] = str(e)
        # plain (rank-less) groups are elementwise AdamW: exact on the local shards
        model = tiny()
        _shard(model, mesh)
        opt = ftops.GaLoreAdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
        for _ in range(3):
            loss_fn(model, x, y).backward()
            opt.step()
            opt.zero_grad()
        out["plain"] = {k: _full(v).clone() for k, v in model.state_dict().items()}
        return out

    def s2ft_case():
        model = tiny()
        s2ft.apply(model, s2ft.select(model, v_ratio=0.5, o_ratio=0.5, u_ratio=0.25,
                                      d_ratio=0.25, seed=0))
        _shard(model, mesh)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(STEPS):
            loss_fn(model, x, y).backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():  # a forward copies the current slices into the frozen buffers
            out = model(data()[0])
        slices = {n: _full(p).clone() for n, p in model.named_parameters() if p.requires_grad}
        # export: gather the slices first (unshard), then the adapter is the one-process one
        from torch.distributed.fsdp import FSDPModule
        fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for m in fsdp:
            m.unshard()
        adapter = s2ft.export(model)
        for m in fsdp:
            m.reshard()
        return {"out": out, "slices": slices, "adapter": adapter}

    def sara_case():
        model = tiny()
        opt = ftops.SaRA(model, fraction=0.2, lr=2e-2, lambda_rank=1e-3, progressive_iter=3,
                         register_values=False, seed=7 * rank)
        _shard(model, mesh)
        for _ in range(STEPS):
            loss_fn(model, x, y).backward()
            opt.step()
            opt.zero_grad()
        weights = {k: _full(v).clone() for k, v in model.state_dict().items()}
        # the optimizer state alone restores the fine-tune on a pretrained sharded model
        fresh = tiny()
        fopt = ftops.SaRA(fresh, fraction=0.2, lr=2e-2, lambda_rank=1e-3, progressive_iter=3,
                          register_values=False)
        _shard(fresh, mesh)
        fopt.load_state_dict(opt.state_dict())
        reloaded = {k: _full(v).clone() for k, v in fresh.state_dict().items()}
        return {"weights": weights, "delta": opt.delta(), "num_trainable": opt.num_trainable(),
                "reloaded": reloaded}

    _fsdp_case("galore", out_dir, rank, galore)
    _fsdp_case("s2ft", out_dir, rank, s2ft_case)
    _fsdp_case("sara", out_dir, rank, sara_case)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp")
    spawn(_fsdp_body, 2, d)

    def get(name):
        res = [torch.load(d / f"fsdp_{name}_rank{r}.pt") for r in range(2)]
        for r in res:
            assert "error" not in r, r["error"]
        return res
    return get


def test_fsdp2_galore_refuses_sharded_projection(fsdp_run):
    for r in fsdp_run("galore"):
        assert "DTensor" in r["construct_error"] and "projected group" in r["construct_error"]
    # plain AdamW groups on DTensors: the same as one process
    model = tiny()
    opt = ftops.GaLoreAdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    x, y = batch(0, 1)
    for _ in range(3):
        loss_fn(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fsdp_run("galore")[0]["plain"][k], v, **TOL)


def test_fsdp2_s2ft_matches_one_process(fsdp_run):
    res = fsdp_run("s2ft")
    model, _ = single_process("s2ft")
    with torch.no_grad():
        out = model(data()[0])
    for r in res:
        torch.testing.assert_close(r["out"], out, **TOL)
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(r["slices"][n], p.detach(), **TOL)
        ref_deltas = s2ft.export(model)["deltas"]
        for name, d in ref_deltas.items():
            assert torch.equal(r["adapter"]["deltas"][name]["index"], d["index"])
            torch.testing.assert_close(r["adapter"]["deltas"][name]["delta"], d["delta"], **TOL)
    assert not torch.allclose(out, tiny()(data()[0]))  # it trained


def test_fsdp2_sara_matches_one_process(fsdp_run):
    res = fsdp_run("sara")
    model, parts = single_process("sara")
    ref = final_params(model)
    delta = parts["opt"].delta()
    for r in res:
        assert r["num_trainable"] == parts["opt"].num_trainable()
        for k, v in ref.items():
            torch.testing.assert_close(r["weights"][k], v, **TOL)
            assert torch.equal(r["reloaded"][k], r["weights"][k]), k
        for k, v in delta.items():
            if v.is_floating_point():
                torch.testing.assert_close(r["delta"][k], v, **TOL)
            else:
                assert torch.equal(r["delta"][k], v)
