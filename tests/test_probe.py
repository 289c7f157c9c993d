"""A hostile user's probe of the public API: bad arguments, bad states and faults, each of which
must raise an error that names what is wrong, and leave everything it was given as it was.

Every row of ``CASES`` is ``Case(name, make, exc, words)``: ``make()`` builds fresh objects and
returns ``(call, observe)``; ``call()`` must raise ``exc`` with every string of ``words`` in its
message, and ``observe()`` (parameters, optimizer state dicts, ...) must give the same values,
bit for bit, before and after the call. Other methods' probes go in the same form (append rows).
"""
from __future__ import annotations

import copy
import math
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

import ftops
from ftops import _ops
from ftops.galore import GaLoreAdamW, layerwise, randomized_basis, svd_basis
from ftops.mezo import MeZO, noise_like, param_groups, replay

NAN, INF = float("nan"), float("inf")


@dataclass
class Case:
    name: str
    make: Callable[[], tuple[Callable[[], Any], Callable[[], Any]]]
    exc: type | tuple[type, ...]
    words: tuple[str, ...]
    # tensors compared to within this (absolute) tolerance instead of bit for bit: for faults
    # raised after the parameters were perturbed, which are then restored to within rounding
    atol: float = 0.0


# --- comparing states bit for bit -----------------------------------------------------------------

def snapshot(obj):
    """A deep copy of nested dicts/lists/tuples of tensors and plain values."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj) if not hasattr(obj, "_fields") \
            else type(obj)(*(snapshot(v) for v in obj))
    return copy.deepcopy(obj)


def assert_same(a, b, path="observed", atol=0.0):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        if atol and a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=lambda m: f"{path}: {m}")
        elif a.numel():
            same = torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
            assert same, f"{path} changed"
        return
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys changed"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]", atol)
        return
    if isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{path}: length changed"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]", atol)
        return
    if isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{path}: {a!r} -> {b!r}"
        return
    assert a == b, f"{path}: {a!r} -> {b!r}"


def nothing():
    return None


# --- fixtures the rows build on -------------------------------------------------------------------

def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 3)).to(dtype)


def _loss(model):
    x = torch.linspace(-1, 1, 24).reshape(4, 6)
    return model(x.to(next(model.parameters()).dtype)).float().square().mean()


def mezo_setup(steps=1):
    """A MeZO over two groups (weights, biases) that has taken `steps` steps."""
    model = _model()
    params = list(model.parameters())
    opt = MeZO([{"params": params[0::2], "weight_decay": 0.1}, {"params": params[1::2]}],
               lr=1e-2, eps=1e-3, seed=0)
    for _ in range(steps):
        opt.step(lambda: _loss(model))
    return model, params, opt


def observe_mezo(params, opt):
    return lambda: (list(params), opt.state_dict(), opt.n_samples, opt.exact_restore)


def galore_setup(steps=1):
    """A GaLoreAdamW with a projected group (the 2-D weights) and a plain one (the biases)."""
    model = _model()
    params = list(model.parameters())
    opt = GaLoreAdamW([{"params": params[0::2], "rank": 2, "update_proj_gap": 2, "scale": 0.5},
                       {"params": params[1::2]}], lr=1e-2, weight_decay=0.01)
    for _ in range(steps):
        _loss(model).backward()
        opt.step()
    _loss(model).backward()  # gradients ready for the next step
    return model, params, opt


def observe_galore(params, opt):
    return lambda: (list(params), [p.grad for p in params], opt.state_dict())


def mezo_call(mutate, call=None):
    """MeZO after one step, `mutate(opt, params, model)` applied, then step (or `call`)."""
    def make():
        model, params, opt = mezo_setup()
        mutate(opt, params, model)
        obs = observe_mezo(params, opt)
        return (lambda: (call or (lambda o, m: o.step(lambda: _loss(m))))(opt, model)), obs
    return make


def galore_call(mutate):
    def make():
        model, params, opt = galore_setup()
        mutate(opt, params, model)
        return opt.step, observe_galore(params, opt)
    return make


def ctor(fn):
    """A failing constructor: nothing to observe."""
    return lambda: (fn, nothing)


def p4():
    return torch.nn.Parameter(torch.randn(4, 3))


def set_group(i, key, value):
    def mutate(opt, params, model):
        opt.param_groups[i][key] = value
    return mutate


def closure_returning(value, at=1):
    """A closure whose `at`-th evaluation returns `value` (the others a real loss)."""
    def call(opt, model):
        count = [0]

        def closure():
            count[0] += 1
            return value if count[0] == at else _loss(model)
        return opt.step(closure)
    return call


def closure_raising(at=1):
    """A closure whose `at`-th evaluation raises (the parameters are perturbed then)."""
    def call(opt, model):
        count = [0]

        def closure():
            count[0] += 1
            if count[0] == at:
                raise KeyError("boom")
            return _loss(model)
        return opt.step(closure)
    return call


def nan_scheduler(opt, params, model):
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: NAN if s >= 1 else 1.0)
    with warnings.catch_warnings():  # (the scheduler was built after the optimizer's last step)
        warnings.simplefilter("ignore", UserWarning)
        sched.step()


# --- MeZO -----------------------------------------------------------------------------------------

def mezo_sd(mutate):
    """load_state_dict of a MeZO state dict edited by `mutate(sd)` into an optimizer that stepped
    once (with other seeds, so a partial load would show)."""
    def make():
        _, _, src = mezo_setup(steps=2)
        sd = copy.deepcopy(src.state_dict())
        mutate(sd)
        model, params, opt = mezo_setup()
        return (lambda: opt.load_state_dict(sd)), observe_mezo(params, opt)
    return make


def _drop(key):
    return lambda sd: sd.pop(key)


def _set_mezo(key, value):
    def f(sd):
        sd["mezo"][key] = value
    return f


def _set_log(key, value):
    def f(sd):
        sd["mezo"]["log"][key] = value
    return f


def _torch_state(cls, **kw):
    def make():
        model = _model()
        other = cls(model.parameters(), **kw)
        _loss(model).backward()
        other.step()
        sd = other.state_dict()
        _, params, opt = mezo_setup()
        return (lambda: opt.load_state_dict(sd)), observe_mezo(params, opt)
    return make


def replay_call(edit_params=None, edit_log=None, dtype=None):
    """replay on fresh base weights (optionally edited) of a log (optionally edited)."""
    def make():
        model, params, opt = mezo_setup(steps=3)
        base = [p.detach().clone() for p in _model().parameters()]
        if dtype is not None:
            base = [b.to(dtype) for b in base]
        groups = [{"params": base[0::2]}, {"params": base[1::2]}]
        log = list(opt.log)
        if edit_params is not None:
            groups = edit_params(groups)
        if edit_log is not None:
            log = edit_log(log)
        return (lambda: replay(groups, log)), (lambda: base)
    return make


def _nan_lr_log(log):
    return [log[0], log[1]._replace(lrs=(NAN, 0.1)), log[2]]


def _other_model_groups(groups):
    w = torch.zeros(5, 7)
    return [{"params": [w, groups[0]["params"][1]]}, groups[1]]


MEZO_CASES = [
    Case("MeZO lr NaN", ctor(lambda: MeZO([p4()], lr=NAN)), ValueError, ("lr", "finite")),
    Case("MeZO lr negative", ctor(lambda: MeZO([p4()], lr=-1e-3)), ValueError, ("lr", ">= 0")),
    Case("MeZO lr string", ctor(lambda: MeZO([p4()], lr="1e-3")), TypeError, ("lr",)),
    Case("MeZO eps 0", ctor(lambda: MeZO([p4()], eps=0.0)), ValueError, ("eps", "> 0")),
    Case("MeZO eps inf", ctor(lambda: MeZO([p4()], eps=INF)), ValueError, ("eps",)),
    Case("MeZO weight_decay negative", ctor(lambda: MeZO([p4()], weight_decay=-0.1)),
         ValueError, ("weight_decay",)),
    Case("MeZO weight_decay NaN", ctor(lambda: MeZO([p4()], weight_decay=NAN)), ValueError,
         ("weight_decay",)),
    Case("MeZO group eps negative", ctor(lambda: MeZO([{"params": [p4()], "eps": -1.0}])),
         ValueError, ("param_groups[0]['eps']",)),
    Case("MeZO n_samples 0", ctor(lambda: MeZO([p4()], n_samples=0)), ValueError, ("n_samples",)),
    Case("MeZO n_samples float", ctor(lambda: MeZO([p4()], n_samples=2.0)), TypeError,
         ("n_samples",)),
    Case("MeZO seed string", ctor(lambda: MeZO([p4()], seed="0")), TypeError, ("seed",)),
    Case("MeZO seed too large", ctor(lambda: MeZO([p4()], seed=2**70)), ValueError, ("seed",)),
    Case("MeZO exact_restore int", ctor(lambda: MeZO([p4()], exact_restore=1)), TypeError,
         ("exact_restore",)),
    Case("MeZO keep_log string", ctor(lambda: MeZO([p4()], keep_log="no")), TypeError,
         ("keep_log",)),
    Case("MeZO params not tensors", ctor(lambda: MeZO(["w"])), TypeError, ("params[0]", "str")),
    Case("MeZO same parameter twice in a group",
         ctor(lambda: (lambda p: MeZO([p, p]))(p4())), ValueError, ("appears twice",)),
    Case("MeZO same parameter in two groups",
         ctor(lambda: (lambda p: MeZO([{"params": [p]}, {"params": [p]}]))(p4())), ValueError,
         ("appears twice", "param_groups[0]")),
    Case("MeZO add_param_group with a parameter it has",
         mezo_call(lambda o, p, m: None, lambda o, m: o.add_param_group({"params": [m[0].weight]})),
         ValueError, ("appears twice",)),
    Case("MeZO add_param_group with lr NaN",
         mezo_call(lambda o, p, m: None,
                   lambda o, m: o.add_param_group({"params": [p4()], "lr": NAN})),
         ValueError, ("param_groups[2]['lr']",)),
    Case("MeZO step without closure", mezo_call(lambda o, p, m: None, lambda o, m: o.step(None)),
         TypeError, ("closure",)),
    Case("MeZO step closure not callable",
         mezo_call(lambda o, p, m: None, lambda o, m: o.step(1.0)), TypeError, ("closure",)),
    Case("MeZO group lr NaN set after construction", mezo_call(set_group(1, "lr", NAN)),
         ValueError, ("MeZO.step", "param_groups[1]['lr']")),
    Case("MeZO group lr inf", mezo_call(set_group(0, "lr", INF)), ValueError,
         ("param_groups[0]['lr']",)),
    Case("MeZO group lr negative", mezo_call(set_group(1, "lr", -1e-3)), ValueError,
         ("param_groups[1]['lr']",)),
    Case("MeZO group eps 0", mezo_call(set_group(1, "eps", 0.0)), ValueError,
         ("param_groups[1]['eps']",)),
    Case("MeZO group weight_decay inf", mezo_call(set_group(0, "weight_decay", INF)), ValueError,
         ("param_groups[0]['weight_decay']",)),
    Case("MeZO group lr string", mezo_call(set_group(0, "lr", "0.1")), TypeError,
         ("param_groups[0]['lr']",)),
    Case("MeZO LR scheduler makes lr NaN", mezo_call(nan_scheduler), ValueError, ("'lr'",)),
    Case("MeZO n_samples set to 0 by hand",
         mezo_call(lambda o, p, m: setattr(o, "n_samples", 0)), ValueError, ("n_samples",)),
    # the closure runs with the parameters perturbed: they come back to within rounding
    Case("MeZO closure returns a string", mezo_call(lambda o, p, m: None, closure_returning("1.0")),
         TypeError, ("scalar loss", "str"), atol=1e-6),
    Case("MeZO closure returns a string at L-",
         mezo_call(lambda o, p, m: None, closure_returning("1.0", at=2)), TypeError,
         ("scalar loss",), atol=1e-6),
    Case("MeZO closure returns a bool", mezo_call(lambda o, p, m: None, closure_returning(True)),
         TypeError, ("scalar loss", "bool"), atol=1e-6),
    Case("MeZO closure returns a bool tensor",
         mezo_call(lambda o, p, m: None, closure_returning(torch.tensor(True))), TypeError,
         ("scalar loss",), atol=1e-6),
    Case("MeZO closure returns several elements",
         mezo_call(lambda o, p, m: None, closure_returning(torch.ones(3))), TypeError,
         ("scalar loss", "[3]"), atol=1e-6),
    Case("MeZO closure returns a complex number",
         mezo_call(lambda o, p, m: None, closure_returning(1 + 2j)), TypeError, ("scalar loss",),
         atol=1e-6),
    Case("MeZO closure returns a complex tensor",
         mezo_call(lambda o, p, m: None, closure_returning(torch.tensor(1 + 2j))), TypeError,
         ("scalar loss",), atol=1e-6),
    Case("MeZO closure returns None", mezo_call(lambda o, p, m: None, closure_returning(None)),
         TypeError, ("scalar loss",), atol=1e-6),
    Case("MeZO closure raises at L+",
         mezo_call(lambda o, p, m: None, closure_raising(at=1)), KeyError, ("boom",), atol=1e-6),
    Case("MeZO closure raises at L-",
         mezo_call(lambda o, p, m: None, closure_raising(at=2)), KeyError, ("boom",), atol=1e-6),
    Case("MeZO load: torch.optim.SGD state", _torch_state(torch.optim.SGD, lr=0.1), ValueError,
         ("'mezo'",)),
    Case("MeZO load: torch.optim.AdamW state", _torch_state(torch.optim.AdamW), ValueError,
         ("'mezo'",)),
    Case("MeZO load: per-parameter state", mezo_sd(lambda sd: sd["state"].update(
        {0: {"exp_avg": torch.zeros(5, 6)}})), ValueError, ("per-parameter state",)),
    Case("MeZO load: group count", mezo_sd(lambda sd: sd["param_groups"].pop()), ValueError,
         ("param groups",)),
    Case("MeZO load: group size", mezo_sd(lambda sd: sd["param_groups"][1]["params"].pop()),
         ValueError, ("param_groups'][1]",)),
    Case("MeZO load: group lr NaN", mezo_sd(lambda sd: sd["param_groups"][0].update(lr=NAN)),
         ValueError, ("param_groups[0]['lr']",)),
    Case("MeZO load: group without eps", mezo_sd(lambda sd: sd["param_groups"][0].pop("eps")),
         ValueError, ("eps",)),
    Case("MeZO load: n_samples 0", mezo_sd(_set_mezo("n_samples", 0)), ValueError,
         ("n_samples",)),
    Case("MeZO load: n_samples string", mezo_sd(_set_mezo("n_samples", "2")), TypeError,
         ("n_samples",)),
    Case("MeZO load: skipped_steps negative", mezo_sd(_set_mezo("skipped_steps", -1)),
         ValueError, ("skipped_steps",)),
    Case("MeZO load: exact_restore string", mezo_sd(_set_mezo("exact_restore", "yes")),
         TypeError, ("exact_restore",)),
    Case("MeZO load: generator state a string", mezo_sd(_set_mezo("generator", "abc")),
         ValueError, ("generator",)),
    Case("MeZO load: generator state truncated",
         mezo_sd(lambda sd: sd["mezo"].update(generator=sd["mezo"]["generator"][:10])),
         ValueError, ("generator",)),
    Case("MeZO load: log seeds 1-D",
         mezo_sd(lambda sd: sd["mezo"]["log"].update(seeds=sd["mezo"]["log"]["seeds"][:, 0])),
         ValueError, ("seeds",)),
    Case("MeZO load: log lrs with another step count",
         mezo_sd(lambda sd: sd["mezo"]["log"].update(lrs=sd["mezo"]["log"]["lrs"][:1])),
         ValueError, ("lrs",)),
    Case("MeZO load: log entry a string", mezo_sd(_set_log("eps", "1e-3")), ValueError, ("eps",)),
    Case("MeZO load: log layout refers to nothing",
         mezo_sd(lambda sd: sd["mezo"]["log"]["layout_of_step"].fill_(5)), ValueError,
         ("layout",)),
    Case("MeZO load: log without 'mezo' keys", mezo_sd(lambda sd: sd["mezo"].pop("n_samples")),
         ValueError, ("n_samples",)),
    Case("MeZO load: a list", mezo_call(lambda o, p, m: None,
                                        lambda o, m: o.load_state_dict([1])), TypeError,
         ("state_dict must be a dict",)),
    Case("replay onto another model", replay_call(edit_params=_other_model_groups), ValueError,
         ("parameter 0", "shape [5, 7]", "[5, 6]")),
    Case("replay onto another grouping",
         replay_call(edit_params=lambda g: [{"params": g[0]["params"] + g[1]["params"]}]),
         ValueError, ("groups",)),
    Case("replay with a trained parameter None",
         replay_call(edit_params=lambda g: [{"params": [None, g[0]["params"][1]]}, g[1]]),
         ValueError, ("parameter 0", "None")),
    Case("replay onto other dtypes", replay_call(dtype=torch.float64), ValueError,
         ("dtype", "float64", "float32")),
    Case("replay a log with a NaN lr", replay_call(edit_log=_nan_lr_log), ValueError,
         ("log entry 1", "lrs[0]")),
    Case("replay a log that is a string", replay_call(edit_log=lambda log: "log"), TypeError,
         ("log",)),
    Case("replay a log of tuples",
         replay_call(edit_log=lambda log: [tuple(e) for e in log]), TypeError, ("MeZOStep",)),
    Case("replay params a tensor",
         lambda: ((lambda: replay(torch.zeros(3), [])), nothing), TypeError, ("params",)),
    Case("replay params with a string",
         lambda: ((lambda: replay(["w"], [])), nothing), TypeError, ("parameter 0",)),
    Case("noise_like seed float", ctor(lambda: noise_like(torch.zeros(3), 1.5, 0)), TypeError,
         ("seed",)),
    Case("noise_like index negative", ctor(lambda: noise_like(torch.zeros(3), 1, -1)),
         ValueError, ("index",)),
    Case("noise_like index 2^32", ctor(lambda: noise_like(torch.zeros(3), 1, 2**32)),
         ValueError, ("index",)),
    Case("noise_like not a tensor", ctor(lambda: noise_like([0.0], 1, 0)), TypeError,
         ("tensor",)),
    Case("noise_like offset negative", ctor(lambda: noise_like(torch.zeros(3), 1, 0, -4)),
         ValueError, ("offset",)),
    Case("mezo.param_groups not a model", ctor(lambda: param_groups([p4()], 0.1)), TypeError,
         ("model",)),
    Case("mezo.param_groups weight_decay NaN", ctor(lambda: param_groups(_model(), NAN)),
         ValueError, ("weight_decay",)),
    Case("mezo.param_groups no_decay a string",
         ctor(lambda: param_groups(_model(), 0.1, no_decay="bias")), TypeError, ("no_decay",)),
]


# --- MeZOTrainer ----------------------------------------------------------------------------------

def trainer_case(build):
    def make():
        transformers = pytest.importorskip("transformers")
        from ftops.integrations import MeZOTrainer

        model = _model()
        args = transformers.TrainingArguments(output_dir=tempfile.mkdtemp(), report_to=[],
                                              use_cpu=True, save_strategy="no")
        return (lambda: build(MeZOTrainer, model, args)), (lambda: list(model.parameters()))
    return make


MEZO_TRAINER_CASES = [
    Case("MeZOTrainer with torch SGD",
         trainer_case(lambda T, m, a: T(model=m, args=a, optimizers=(
             torch.optim.SGD(m.parameters(), lr=0.1), None))), TypeError, ("ftops.MeZO",)),
    Case("MeZOTrainer scheduler on another optimizer",
         trainer_case(lambda T, m, a: T(model=m, args=a, optimizers=(
             MeZO(m.parameters()), torch.optim.lr_scheduler.LambdaLR(
                 torch.optim.SGD(m.parameters(), lr=0.1), lambda s: 1.0)))), ValueError,
         ("scheduler",)),
    Case("MeZOTrainer unknown mezo_kwargs",
         trainer_case(lambda T, m, a: T(model=m, args=a, mezo_kwargs={"epsilon": 1e-3})),
         TypeError, ("epsilon",)),
    Case("MeZOTrainer mezo_kwargs with a MeZO given",
         trainer_case(lambda T, m, a: T(model=m, args=a, optimizers=(MeZO(m.parameters()), None),
                                        mezo_kwargs={"eps": 1e-3})), ValueError,
         ("mezo_kwargs",)),
]


# --- GaLore ---------------------------------------------------------------------------------------

def galore_sd(mutate, target=None):
    """load_state_dict of a GaLoreAdamW state dict (two steps) edited by `mutate(sd)` into an
    optimizer that stepped once."""
    def make():
        _, _, src = galore_setup(steps=2)
        sd = copy.deepcopy(src.state_dict())
        mutate(sd)
        model, params, opt = galore_setup() if target is None else target()
        return (lambda: opt.load_state_dict(sd)), observe_galore(params, opt)
    return make


def _other_shapes():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    params = list(model.parameters())
    opt = GaLoreAdamW([{"params": params[0::2], "rank": 2, "update_proj_gap": 2, "scale": 0.5},
                       {"params": params[1::2]}], lr=1e-2, weight_decay=0.01)
    return model, params, opt


def _unprojected():
    model = _model()
    params = list(model.parameters())
    return model, params, GaLoreAdamW([{"params": params[0::2]}, {"params": params[1::2]}])


def _state(i, key, value):
    def f(sd):
        sd["state"][i][key] = value
    return f


def _torch_adamw_into_galore():
    model = _model()
    ps = list(model.parameters())
    other = torch.optim.AdamW([{"params": ps[0::2]}, {"params": ps[1::2]}])
    _loss(model).backward()
    other.step()
    sd = other.state_dict()
    _, params, opt = galore_setup()
    return (lambda: opt.load_state_dict(sd)), observe_galore(params, opt)


def _failing_svd():
    """The projector raises on the second weight of a refresh step (after the first got its
    new basis)."""
    def make():
        model, params, opt = galore_setup(steps=2)  # the next step refreshes (gap 2)
        calls = [0]
        real = ftops.galore.svd_basis

        def svd(grad, rank, side):
            calls[0] += 1
            if calls[0] == 2:
                raise torch.linalg.LinAlgError("simulated SVD failure")
            return real(grad, rank, side)
        obs = observe_galore(params, opt)

        def call():
            ftops.galore.svd_basis = svd
            try:
                opt.step()
            finally:
                ftops.galore.svd_basis = real
        return call, obs
    return make


def _noncontiguous_plain():
    model, params, opt = galore_setup()
    w = torch.nn.Parameter(torch.randn(3, 4).t())
    w.grad = torch.ones_like(w)
    opt.add_param_group({"params": [w]})
    return opt.step, observe_galore(params + [w], opt)


def _moved_state(opt, params, model):
    st = opt.state[params[1]]  # a plain (bias) parameter
    st["exp_avg"] = st["exp_avg"].double()


def layerwise_case(build):
    def make():
        model = _model()
        return (lambda: build(model)), (lambda: list(model.parameters()))
    return make


def _mk(p):
    if p.dim() == 2:
        return GaLoreAdamW([{"params": [p], "rank": 2, "update_proj_gap": 2}], lr=1e-2)
    return GaLoreAdamW([p], lr=1e-2)


def _layerwise_load(edit, make_optimizer=_mk):
    """Layerwise.load_state_dict of a state edited by `edit(sd)`; every inner optimizer must keep
    its state when one refuses."""
    def make():
        model = _model()
        lw = layerwise(model, make_optimizer)
        for _ in range(2):
            _loss(model).backward()
        sd = copy.deepcopy(lw.state_dict())
        edit(sd)
        lw.load_state_dict(lw.state_dict())  # a valid load works
        _loss(model).backward()              # and the state moves on from there
        return (lambda: lw.load_state_dict(sd)), \
            (lambda: (list(model.parameters()), lw.state_dict()))
    return make


def _swap_inner_state(sd):
    """A state made for other shapes in the last inner optimizer (so the others load first)."""
    sd["optimizers"][-1]["state"][0]["exp_avg"] = torch.zeros(7)


GALORE_CASES = [
    Case("GaLore lr NaN", ctor(lambda: GaLoreAdamW([p4()], lr=NAN)), ValueError, ("lr",)),
    Case("GaLore lr negative", ctor(lambda: GaLoreAdamW([p4()], lr=-1.0)), ValueError, ("lr",)),
    Case("GaLore betas[1] = 1", ctor(lambda: GaLoreAdamW([p4()], betas=(0.9, 1.0))), ValueError,
         ("betas[1]",)),
    Case("GaLore betas a string", ctor(lambda: GaLoreAdamW([p4()], betas="ab")), TypeError,
         ("betas",)),
    Case("GaLore betas one number", ctor(lambda: GaLoreAdamW([p4()], betas=0.9)), TypeError,
         ("betas",)),
    Case("GaLore eps negative", ctor(lambda: GaLoreAdamW([p4()], eps=-1e-8)), ValueError,
         ("eps",)),
    Case("GaLore eps inf", ctor(lambda: GaLoreAdamW([p4()], eps=INF)), ValueError, ("eps",)),
    Case("GaLore weight_decay negative", ctor(lambda: GaLoreAdamW([p4()], weight_decay=-0.1)),
         ValueError, ("weight_decay",)),
    Case("GaLore weight_decay NaN", ctor(lambda: GaLoreAdamW([p4()], weight_decay=NAN)),
         ValueError, ("weight_decay",)),
    Case("GaLore correct_bias string", ctor(lambda: GaLoreAdamW([p4()], correct_bias="yes")),
         TypeError, ("correct_bias",)),
    Case("GaLore rank 0", ctor(lambda: GaLoreAdamW([{"params": [p4()], "rank": 0}])), ValueError,
         ("rank",)),
    Case("GaLore rank float", ctor(lambda: GaLoreAdamW([{"params": [p4()], "rank": 2.0}])),
         TypeError, ("rank",)),
    Case("GaLore update_proj_gap 0",
         ctor(lambda: GaLoreAdamW([{"params": [p4()], "rank": 2, "update_proj_gap": 0}])),
         ValueError, ("update_proj_gap",)),
    Case("GaLore proj_type unknown",
         ctor(lambda: GaLoreAdamW([{"params": [p4()], "rank": 2, "proj_type": "diag"}])),
         ValueError, ("proj_type",)),
    Case("GaLore scale NaN",
         ctor(lambda: GaLoreAdamW([{"params": [p4()], "rank": 2, "scale": NAN}])), ValueError,
         ("scale",)),
    Case("GaLore scale negative",
         ctor(lambda: GaLoreAdamW([{"params": [p4()], "rank": 2, "scale": -0.25}])), ValueError,
         ("scale",)),
    Case("GaLore oversample negative",
         ctor(lambda: GaLoreAdamW([{"params": [p4()], "rank": 2, "oversample": -1}])),
         ValueError, ("oversample",)),
    Case("GaLore same parameter twice",
         ctor(lambda: (lambda p: GaLoreAdamW([p, p]))(p4())), ValueError, ("appears twice",)),
    Case("GaLore same parameter in two groups",
         ctor(lambda: (lambda p: GaLoreAdamW([{"params": [p], "rank": 2}, {"params": [p]}]))(p4())),
         ValueError, ("appears twice",)),
    Case("GaLore add_param_group with a parameter it has",
         lambda: (lambda m, ps, o: ((lambda: o.add_param_group({"params": [ps[0]]})),
                                    observe_galore(ps, o)))(*galore_setup()),
         ValueError, ("appears twice",)),
    Case("GaLore group lr NaN set after construction", galore_call(set_group(1, "lr", NAN)),
         ValueError, ("GaLoreAdamW.step", "param_groups[1]['lr']")),
    Case("GaLore group lr inf", galore_call(set_group(0, "lr", INF)), ValueError,
         ("param_groups[0]['lr']",)),
    Case("GaLore group eps negative", galore_call(set_group(1, "eps", -1.0)), ValueError,
         ("param_groups[1]['eps']",)),
    Case("GaLore group weight_decay negative", galore_call(set_group(1, "weight_decay", -0.1)),
         ValueError, ("param_groups[1]['weight_decay']",)),
    Case("GaLore group betas (0.9, 1.0)", galore_call(set_group(1, "betas", (0.9, 1.0))),
         ValueError, ("param_groups[1]['betas'][1]",)),
    Case("GaLore group betas NaN", galore_call(set_group(0, "betas", (NAN, 0.999))), ValueError,
         ("param_groups[0]['betas'][0]",)),
    Case("GaLore group rank 0 set later", galore_call(set_group(0, "rank", 0)), ValueError,
         ("param_groups[0]['rank']",)),
    Case("GaLore group proj_type set later", galore_call(set_group(0, "proj_type", "x")),
         ValueError, ("param_groups[0]['proj_type']",)),
    Case("GaLore group scale inf set later", galore_call(set_group(0, "scale", INF)), ValueError,
         ("param_groups[0]['scale']",)),
    Case("GaLore group correct_bias string", galore_call(set_group(1, "correct_bias", "no")),
         TypeError, ("param_groups[1]['correct_bias']",)),
    Case("GaLore LR scheduler makes lr NaN", galore_call(nan_scheduler), ValueError, ("'lr'",)),
    Case("GaLore a non-contiguous plain parameter in a later group", _noncontiguous_plain,
         ValueError, ("not contiguous",)),
    Case("GaLore state in another dtype (model converted)", galore_call(_moved_state),
         ValueError, ("exp_avg", "float64")),
    Case("GaLore SVD fails on the second refresh", _failing_svd(), torch.linalg.LinAlgError,
         ("simulated SVD failure",)),
    Case("GaLore load: torch.optim.AdamW state", _torch_adamw_into_galore, ValueError,
         ("correct_bias",)),
    Case("GaLore load: state of a model with other shapes", galore_sd(lambda sd: None,
                                                                      _other_shapes),
         ValueError, ("shape",)),
    Case("GaLore load: projected state into plain groups", galore_sd(lambda sd: None,
                                                                     _unprojected),
         ValueError, ("projected",)),
    Case("GaLore load: group count", galore_sd(lambda sd: sd["param_groups"].pop()), ValueError,
         ("param groups",)),
    Case("GaLore load: group lr NaN", galore_sd(lambda sd: sd["param_groups"][1].update(lr=NAN)),
         ValueError, ("param_groups[1]['lr']",)),
    Case("GaLore load: rank 0", galore_sd(lambda sd: sd["param_groups"][0].update(rank=0)),
         ValueError, ("rank",)),
    Case("GaLore load: a string for a moment", galore_sd(_state(1, "exp_avg", "zeros")),
         TypeError, ("exp_avg", "tensor")),
    Case("GaLore load: a string for step", galore_sd(_state(0, "step", "2")), TypeError,
         ("step",)),
    Case("GaLore load: negative step", galore_sd(_state(0, "step", -1)), ValueError, ("step",)),
    Case("GaLore load: an integer moment", galore_sd(
        _state(1, "exp_avg", torch.zeros(5, dtype=torch.int64))), TypeError, ("exp_avg",)),
    Case("GaLore load: plain moment of another shape",
         galore_sd(_state(2, "exp_avg", torch.zeros(6))), ValueError, ("exp_avg", "[6]", "[5]")),
    Case("GaLore load: projected moment of another shape",
         galore_sd(_state(1, "exp_avg_sq", torch.zeros(3, 5))), ValueError,
         ("exp_avg_sq", "[3, 5]", "[2, 5]")),
    Case("GaLore load: basis of another shape", galore_sd(
        _state(0, "proj_left", torch.zeros(5, 3))), ValueError, ("proj_left", "[5, 2]")),
    Case("GaLore load: basis for the other side", galore_sd(
        _state(0, "proj_right", torch.zeros(2, 6))), ValueError, ("proj_right", "left")),
    Case("GaLore load: a key GaLore does not keep", galore_sd(
        _state(1, "max_exp_avg_sq", torch.zeros(5))), ValueError, ("max_exp_avg_sq",)),
    Case("GaLore load: state for a parameter no group lists",
         galore_sd(lambda sd: sd["state"].update({99: {"step": 1}})), ValueError, ("99",)),
    Case("GaLore load: not an optimizer state dict", galore_sd(lambda sd: sd.pop("state")),
         ValueError, ("'state'",)),
    Case("layerwise same parameter twice",
         layerwise_case(lambda m: layerwise([m[0].weight, m[0].weight], _mk)), ValueError,
         ("same tensor",)),
    Case("layerwise a parameter without requires_grad",
         layerwise_case(lambda m: layerwise([torch.zeros(3)], _mk)), ValueError,
         ("requires_grad",)),
    Case("layerwise a non-leaf tensor",
         layerwise_case(lambda m: layerwise([m[0].weight * 2], _mk)), ValueError, ("leaf",)),
    Case("layerwise a string", layerwise_case(lambda m: layerwise(["w"], _mk)), TypeError,
         ("params[0]",)),
    Case("layerwise accumulation_steps 0",
         layerwise_case(lambda m: layerwise(m, _mk, accumulation_steps=0)), ValueError,
         ("accumulation_steps",)),
    Case("layerwise make_optimizer not callable",
         layerwise_case(lambda m: layerwise(m, "adamw")), TypeError, ("make_optimizer",)),
    Case("layerwise make_optimizer over other parameters",
         layerwise_case(lambda m: layerwise(m, lambda p: GaLoreAdamW(m.parameters()))),
         ValueError, ("exactly [p]",)),
    Case("layerwise make_scheduler returns a number",
         layerwise_case(lambda m: layerwise(m, _mk, make_scheduler=lambda o: 1.0)), TypeError,
         ("make_scheduler",)),
    Case("layerwise load: one inner state of other shapes", _layerwise_load(_swap_inner_state),
         ValueError, ("optimizers[3]", "exp_avg")),
    Case("layerwise load: the last torch.optim.Adam refuses (the others are rolled back)",
         _layerwise_load(lambda sd: sd["optimizers"][-1]["param_groups"].append(
             dict(sd["optimizers"][-1]["param_groups"][0])),
             lambda p: torch.optim.Adam([p], lr=1e-2)), ValueError, ("parameter groups",)),
    Case("layerwise load: one inner state too few",
         _layerwise_load(lambda sd: sd["optimizers"].pop()), ValueError, ("3 optimizer states",)),
    Case("layerwise load: micro out of range", _layerwise_load(lambda sd: sd.update(micro=1)),
         ValueError, ("micro",)),
    Case("layerwise load: a GaLore state dict",
         _layerwise_load(lambda sd: (sd.clear(), sd.update(state={}, param_groups=[]))),
         ValueError, ("optimizers",)),
    Case("svd_basis 1-D grad", ctor(lambda: svd_basis(torch.randn(5), 2, "left")), TypeError,
         ("grad",)),
    Case("svd_basis rank 0", ctor(lambda: svd_basis(torch.randn(5, 4), 0, "left")), ValueError,
         ("rank",)),
    Case("svd_basis side unknown", ctor(lambda: svd_basis(torch.randn(5, 4), 2, "up")),
         ValueError, ("side",)),
    Case("svd_basis integer grad",
         ctor(lambda: svd_basis(torch.ones(5, 4, dtype=torch.int64), 2, "left")), TypeError,
         ("grad",)),
    Case("randomized_basis power_iters negative",
         ctor(lambda: randomized_basis(torch.randn(5, 4), 2, "left", power_iters=-1)),
         ValueError, ("power_iters",)),
    Case("randomized_basis oversample float",
         ctor(lambda: randomized_basis(torch.randn(5, 4), 2, "left", oversample=2.5)), TypeError,
         ("oversample",)),
    Case("randomized_basis generator not a Generator",
         ctor(lambda: randomized_basis(torch.randn(5, 4), 2, "left", generator=0)), TypeError,
         ("generator",)),
]


# --- raw ops --------------------------------------------------------------------------------------

def op_case(call_with):
    """A raw op on fresh tensors: `call_with(a, b)` with a, b two float32 vectors of 8."""
    def make():
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
        return (lambda: call_with(a, b)), (lambda: (a, b))
    return make


def _adamw(params, grads, m, v):
    _ops.adamw_(params, grads, m, v, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                weight_decay=0.0, step=1)


META = torch.zeros(8, device="meta")

OP_CASES = [
    Case("zo_axpby_ NaN coefficient",
         op_case(lambda a, b: _ops.zo_axpby_([a, b], [1], [0, 1], [1.0, NAN], [0.0, 0.0])),
         RuntimeError, ("coeffs[1]", "finite")),
    Case("zo_axpby_ inf decay",
         op_case(lambda a, b: _ops.zo_axpby_([a, b], [1], [0, 1], [1.0, 1.0], [INF, 0.0])),
         RuntimeError, ("decay[0]", "finite")),
    Case("zo_undo_axpby_ NaN undo coefficient",
         op_case(lambda a, b: _ops.zo_undo_axpby_([a, b], 1, [0.0, NAN], [2], [0, 1],
                                                  [1.0, 1.0], [0.0, 0.0])),
         RuntimeError, ("undo_coeffs[1]",)),
    Case("zo_axpby_ CPU and meta tensors",
         op_case(lambda a, b: _ops.zo_axpby_([a, META], [1], [0, 1], [1.0, 1.0], [0.0, 0.0])),
         RuntimeError, ("params[1]", "meta", "cpu")),
    Case("zo_axpby_ a tensor twice",
         op_case(lambda a, b: _ops.zo_axpby_([a, a], [1], [0, 1], [1.0, 1.0], [0.0, 0.0])),
         RuntimeError, ("params[0] and params[1] share memory",)),
    Case("zo_axpby_ overlapping views",
         op_case(lambda a, b: _ops.zo_axpby_([a[:5], a[4:]], [1], [0, 1], [1.0, 1.0],
                                             [0.0, 0.0])),
         RuntimeError, ("share memory",)),
    Case("adamw_ parameter is its own moment",
         op_case(lambda a, b: _adamw([a], [b], [a], [torch.zeros(8)])), RuntimeError,
         ("params[0] and exp_avgs[0] share memory",)),
    Case("adamw_ parameter is its own gradient",
         op_case(lambda a, b: _adamw([a], [a], [torch.zeros(8)], [torch.zeros(8)])), RuntimeError,
         ("params[0] and grads[0] share memory",)),
    Case("adamw_ moment overlaps the parameter (views)",
         op_case(lambda a, b: _adamw([a[:4]], [b[:4]], [a[2:6]], [torch.zeros(4)])), RuntimeError,
         ("params[0] and exp_avgs[0] share memory",)),
    Case("adamw_ parameter is another's moment",
         op_case(lambda a, b: _adamw([a, b], [torch.ones(8), torch.ones(8)],
                                     [torch.zeros(8), a], [torch.zeros(8), torch.zeros(8)])),
         RuntimeError, ("params[0] and exp_avgs[1] share memory",)),
    Case("adamw_ CPU and meta tensors",
         op_case(lambda a, b: _adamw([a], [META], [torch.zeros(8)], [torch.zeros(8)])),
         RuntimeError, ("grads[0]", "meta")),
    Case("adamw_ NaN lr",
         op_case(lambda a, b: _ops.adamw_([a], [b], [torch.zeros(8)], [torch.zeros(8)], lr=NAN,
                                          beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                                          step=1)), RuntimeError, ("lr",)),
    Case("adam_direction_ out is the moment",
         op_case(lambda a, b: _ops.adam_direction_([b], [a], [torch.zeros(8)], [a], beta1=0.9,
                                                   beta2=0.999, eps=1e-8, step=1)),
         RuntimeError, ("exp_avgs[0] and out[0] share memory",)),
    Case("adam_direction_ grad is the second moment",
         op_case(lambda a, b: _ops.adam_direction_([a], [torch.zeros(8)], [a], [b], beta1=0.9,
                                                   beta2=0.999, eps=1e-8, step=1)),
         RuntimeError, ("grads[0] and exp_avg_sqs[0] share memory",)),
    Case("sddmm CPU and meta tensors",
         op_case(lambda a, b: ftops.sddmm(a.view(2, 4), torch.zeros(2, 3, device="meta"),
                                          torch.tensor([0]), torch.tensor([0]))),
         RuntimeError, ("x is on meta",)),
    Case("sddmm index out of range",
         op_case(lambda a, b: ftops.sddmm(a.view(2, 4), b.view(2, 4), torch.tensor([4]),
                                          torch.tensor([0]))), RuntimeError, ("rows",)),
    Case("sddmm float indices",
         op_case(lambda a, b: ftops.sddmm(a.view(2, 4), b.view(2, 4), torch.tensor([0.0]),
                                          torch.tensor([0.0]))), RuntimeError, ("int32",)),
    Case("sddmm_csr row_ptr not ending at nnz",
         op_case(lambda a, b: ftops.sddmm_csr(a.view(2, 4), b.view(2, 4),
                                              torch.tensor([0, 1, 1, 1, 1]), torch.tensor([0, 1]))),
         RuntimeError, ("row_ptr",)),
]

CASES = MEZO_CASES + MEZO_TRAINER_CASES + GALORE_CASES + OP_CASES


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_probe(case):
    call, observe = case.make()
    before = snapshot(observe())
    with pytest.raises(case.exc) as info:
        call()
    message = str(info.value)
    for word in case.words:
        assert word in message, f"{case.name}: {word!r} not in the message: {message}"
    assert_same(before, snapshot(observe()), atol=case.atol)


def test_case_names_are_unique():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
