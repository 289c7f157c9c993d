"""S²FT: selection, co-permutation, partial backprop, in-place updates, master weights, adapters,
the reference's released configuration, and a hostile-input probe of every public entry point.

Every gradient is checked against the dense autograd gradient of an untouched copy of the model
(float64), restricted to the trained slice, with indices computed here from the selection and the
documented unit order ("rows only, both, columns only"), not by the code under test.

Models: a small pure-PyTorch Llama-style model defined here (grouped-query attention, biases;
runs everywhere, including CUDA machines without transformers) and, when transformers is
installed, tiny transformers Llama (GQA + biases) and BERT models built from configs.
"""
import copy
import io
import math
import random

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import ftops
from _models import Block
from ftops import s2ft

try:
    import transformers
except ImportError:  # the transformers-model tests are skipped; the pure-torch ones still run
    transformers = None
needs_hf = pytest.mark.skipif(transformers is None, reason="transformers is not installed")

HIDDEN, INTER, VOCAB = 48, 80, 61
# Every projection trained, with overlapping and distinct units (exercises all slice layouts).
ALL = dict(v_ratio=0.5, o_ratio=0.5, u_ratio=0.3, d_ratio=0.3)


class MiniLlama(nn.Module):
    """Llama-style decoder in plain PyTorch, with the module paths of transformers' Llama."""

    def __init__(self, hidden=HIDDEN, heads=4, kv_heads=2, head_dim=16, inter=INTER, layers=3,
                 bias=True, vocab=VOCAB):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, hidden)
        self.model.layers = nn.ModuleList(
            Block(hidden, heads, inter, head_dim, bias, kv_heads) for _ in range(layers))
        self.model.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids):
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(self.model.norm(x))


def tiny_mini(dtype=torch.float64, device="cpu", seed=0, **kw):
    """3 blocks; grouped-query attention (4 query heads, 2 key/value heads, head_dim 16 so the
    attention width 64 differs from hidden 48); biases everywhere."""
    torch.manual_seed(seed)
    m = MiniLlama(**kw).to(device=device, dtype=dtype)
    _randomize(m, seed)
    return m.eval()


def tiny_llama(dtype=torch.float64, device="cpu", seed=0, **overrides):
    """3 blocks; grouped-query attention (4 query heads, 2 key/value heads, head_dim 16 so the
    attention width 64 differs from hidden 48); biases everywhere."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
              mlp_bias=True, max_position_embeddings=64)
    kw.update(overrides)
    cfg = transformers.LlamaConfig(**kw)
    m = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    _randomize(m, seed)
    return m.eval()


def tiny_bert(dtype=torch.float64, device="cpu", seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=INTER, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        max_position_embeddings=32)
    m = transformers.BertModel(cfg).to(device=device, dtype=dtype)
    _randomize(m, seed)
    return m.eval()


def _randomize(model, seed):
    # Biases are zero after init; give every parameter nonzero, distinct values so that a wrong
    # permutation of a bias or a norm cannot go unnoticed.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p))


# What each architecture trains, and how its units map to weight rows/columns.
ARCH = {
    "mini": dict(make=tiny_mini, hd=16, rep=2, v="v_proj", o="o_proj", up="up_proj",
                 down="down_proj"),
    "llama": dict(make=tiny_llama, hd=16, rep=2, v="v_proj", o="o_proj", up="up_proj",
                  down="down_proj"),
    "bert": dict(make=tiny_bert, hd=12, rep=1, v="self.value", o="output.dense",
                 up="intermediate.dense", down="output.dense"),
}


def inputs(device, seed=3, batch=2, seq=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g).to(device)


def out(model, ids):
    o = model(input_ids=ids)
    if isinstance(o, torch.Tensor):
        return o
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def loss_fn(y, seed=5):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y)
    return (y * w).sum() + 0.1 * (y * y).sum()


def _order(rows, cols):
    """The documented unit order of a block: rows only, both, columns only (each sorted)."""
    r, c = set(rows), set(cols)
    only_r, both, only_c = sorted(r - c), sorted(r & c), sorted(c - r)
    return only_r + both, both + only_c


def expected_slices(arch, sel):
    """(module path, mode, original indices in slice order) for every trained projection."""
    a = ARCH[arch]
    hd, rep = a["hd"], a["rep"]
    res = []
    for path in set(sel.v_heads) | set(sel.o_heads):
        v_units, o_units = _order(sel.v_heads.get(path, ()), sel.o_heads.get(path, ()))
        if v_units:
            res.append((f"{path}.{a['v']}", "row",
                        [g * hd + i for g in v_units for i in range(hd)]))
        if o_units:
            res.append((f"{path}.{a['o']}", "col",
                        [g * rep * hd + i for g in o_units for i in range(rep * hd)]))
    for path in set(sel.u_channels) | set(sel.d_channels):
        u_units, d_units = _order(sel.u_channels.get(path, ()), sel.d_channels.get(path, ()))
        if u_units:
            res.append((f"{path}.{a['up']}", "row", u_units))
        if d_units:
            res.append((f"{path}.{a['down']}", "col", d_units))
    return res


def dense_slice(ref, name, mode, idx, attr="weight"):
    t = getattr(ref.get_submodule(name), attr)
    t = t.grad if isinstance(t, nn.Parameter) and t.grad is not None else t
    idx = torch.tensor(idx, device=t.device)
    if attr == "bias":
        return t[idx]
    return t[idx] if mode == "row" else t[:, idx].t()


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, snap):
    sd = model.state_dict()
    assert sd.keys() == snap.keys()
    for k, v in snap.items():
        assert torch.equal(sd[k], v), k


@pytest.fixture(params=["mini", pytest.param("llama", marks=needs_hf),
                        pytest.param("bert", marks=needs_hf)])
def arch(request):
    return request.param


def _train(model, device, steps=3, seed=0, lr=5e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for i in range(steps):
        opt.zero_grad()
        loss_fn(out(model, inputs(device, seed=seed * 100 + i)), seed=seed + i).backward()
        opt.step()
    return model


# --- function preserved --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("ratios", [ALL, s2ft.PAPER_RATIOS], ids=["all", "paper"])
def test_apply_preserves_function(arch, device, dtype, tol, ratios):
    model = ARCH[arch]["make"](dtype, device)
    ref = copy.deepcopy(model)
    ratios = ratios if ratios is ALL else dict(o_ratio=0.5, d_ratio=0.1)  # the paper's kinds
    sel = s2ft.select(model, **ratios, seed=4)
    ids = inputs(device)
    s2ft.apply(model, sel)
    with torch.no_grad():
        y, y_ref = out(model, ids), out(ref, ids)
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    # And the weights really were permuted (otherwise this test would prove nothing).
    moved = [n for (n, t) in ref.state_dict().items()
             if n in model.state_dict() and not torch.equal(t, model.state_dict()[n])]
    assert moved, "apply did not permute anything"


# --- gradients ----------------------------------------------------------------------------------

@pytest.mark.parametrize("ratios,seed", [
    (ALL, 4),
    (dict(v_ratio=0.25, o_ratio=0.5, u_ratio=0.05, d_ratio=0.2), 9),
    (dict(o_ratio=0.5, d_ratio=0.1), 1),               # the paper's kinds: o and down only
    (dict(v_ratio=0.5, o_ratio=0, u_ratio=0.2, d_ratio=0), 2),  # rows only
    (dict(v_ratio=1.0, o_ratio=1.0, u_ratio=1.0, d_ratio=1.0), 0),
])
@pytest.mark.parametrize("train_bias", [False, True])
def test_slice_gradients_match_dense(arch, device, ratios, seed, train_bias):
    model = ARCH[arch]["make"](torch.float64, device)
    ref = copy.deepcopy(model)
    sel = s2ft.select(model, **ratios, seed=seed)
    s2ft.apply(model, sel, train_bias=train_bias)
    ids = inputs(device)

    loss_ref = loss_fn(out(ref, ids))
    loss_ref.backward()
    loss = loss_fn(out(model, ids))
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)

    trained = set()
    n_expected = 0
    for name, mode, idx in expected_slices(arch, sel):
        mod = model.get_submodule(name)
        assert isinstance(mod, s2ft.RowSliceLinear if mode == "row" else s2ft.ColumnSliceLinear)
        torch.testing.assert_close(mod.weight_slice.grad, dense_slice(ref, name, mode, idx),
                                   rtol=1e-10, atol=1e-12)
        trained.add(f"{name}.weight_slice")
        n_expected += mod.weight_slice.numel()
        if mode == "row" and train_bias:
            torch.testing.assert_close(mod.bias_slice.grad,
                                       dense_slice(ref, name, mode, idx, "bias"),
                                       rtol=1e-10, atol=1e-12)
            trained.add(f"{name}.bias_slice")
            n_expected += len(idx)
        elif mode == "row":
            assert mod.bias_slice is None
    # Exactly the slices train; nothing else has or needs a gradient.
    req = {n for n, p in model.named_parameters() if p.requires_grad}
    assert req == trained
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trained)
    a = ARCH[arch]
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per = {"v": a["hd"] * HIDDEN + (a["hd"] if train_bias else 0), "o": a["rep"] * a["hd"] * HIDDEN,
           "u": HIDDEN + (1 if train_bias else 0), "d": HIDDEN}
    assert n_trainable == n_expected == (
        sel.num_v_heads * per["v"] + sel.num_o_heads * per["o"]
        + sel.num_u_channels * per["u"] + sel.num_d_channels * per["d"])


def test_float32_and_half_gradients(device):
    ids = inputs(device)
    ref = tiny_mini(torch.float64, device)
    sel = s2ft.select(ref, **ALL, seed=2)
    dense = copy.deepcopy(ref)
    loss_fn(out(dense, ids)).backward()
    for dtype, rtol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2), (torch.float16, 1e-2)):
        model = s2ft.apply(copy.deepcopy(ref).to(dtype), sel)
        loss_fn(out(model, ids).double()).backward()
        for name, mode, idx in expected_slices("mini", sel):
            g = model.get_submodule(name).weight_slice.grad
            assert g.dtype == torch.float32  # half-precision weights: float32 master slices
            r = dense_slice(dense, name, mode, idx)
            err = (g.double() - r).norm() / r.norm()
            assert err < rtol, (name, dtype, err.item())


def test_autocast_bfloat16(device):
    """float32 weights under bf16 autocast: the slice gradients match dense autocast autograd."""
    model = tiny_mini(torch.float32, device)
    ref = copy.deepcopy(model)
    sel = s2ft.select(model, **ALL, seed=1)
    s2ft.apply(model, sel)
    ids = inputs(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y, y_ref = out(model, ids), out(ref, ids)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    loss_fn(y.float()).backward()
    loss_fn(y_ref.float()).backward()
    for name, mode, idx in expected_slices("mini", sel):
        g = model.get_submodule(name).weight_slice.grad
        r = dense_slice(ref, name, mode, idx)
        assert g.dtype == torch.float32
        assert (g - r).norm() <= 1e-2 * r.norm(), name


class _ShapeLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        res = func(*args, **kwargs)
        flat_in = torch.utils._pytree.tree_leaves((args, kwargs))
        inputs = {t.untyped_storage().data_ptr() for t in flat_in if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(res):
            # Record freshly allocated results only (views and in-place results share storage).
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.shapes.add((tuple(t.shape), str(func)))
        return res


def test_no_full_weight_gradient_is_formed():
    """No tensor the size of a projection weight is allocated during backward.

    Sizes chosen so that no activation, slice or slice gradient has the shape of a full weight
    (hidden 42; 6 query heads and 2 key/value heads of width 8; 72 channels; 14 tokens)."""
    model = tiny_mini(hidden=42, heads=6, kv_heads=2, head_dim=8, inter=72)
    ref = copy.deepcopy(model)
    weight_shapes = set()
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.weight.shape[0] != VOCAB:
            weight_shapes |= {tuple(m.weight.shape), tuple(m.weight.shape[::-1])}
    sel = s2ft.select(model, **ALL)
    sel = s2ft.Selection(
        v_heads={"model.layers.0.self_attn": (1,)},
        o_heads={"model.layers.0.self_attn": (0,), "model.layers.1.self_attn": (0,)},
        u_channels={"model.layers.0.mlp": (3, 5, 7)},
        d_channels={"model.layers.0.mlp": (5, 9), "model.layers.2.mlp": tuple(range(10))},
        head_counts=sel.head_counts, channel_counts=sel.channel_counts)
    s2ft.apply(model, sel, train_bias=True)
    ids = inputs("cpu")
    for mdl, should_see in ((ref, True), (model, False)):
        loss = loss_fn(out(mdl, ids))
        with _ShapeLog() as log:
            loss.backward()
        seen = {(shape, op) for shape, op in log.shapes if shape in weight_shapes}
        # The dense model (positive control) does form them; the S²FT model must not.
        assert bool(seen) == should_see, seen
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("start", [0, 9])
def test_column_layer_saves_only_selected_columns(start):
    lin = nn.Linear(40, 24, bias=True).double()
    layer = s2ft.ColumnSliceLinear(copy.deepcopy(lin), cols=5, start=start)
    x = torch.randn(3, 11, 40, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    big = [t.shape for t in saved if t.numel() >= x.numel()]
    assert not big, f"column-trained layer saved a full-size tensor: {big}"
    assert any(t.shape == (3, 11, 5) for t in saved)
    y.pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    lin.weight.requires_grad_(True)
    lin(x2).pow(2).sum().backward()
    torch.testing.assert_close(layer.weight_slice.grad, lin.weight.grad[:, start:start + 5].t())
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("start", [0, 6])
def test_row_layer_input_gradient_and_frozen_input(start):
    lin = nn.Linear(40, 24, bias=True).double()
    layer = s2ft.RowSliceLinear(copy.deepcopy(lin), rows=7, start=start, train_bias=True)
    x = torch.randn(2, 9, 40, dtype=torch.float64, requires_grad=True)
    layer(x).sin().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    lin(x2).sin().sum().backward()
    rows = slice(start, start + 7)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.weight_slice.grad, lin.weight.grad[rows])
    torch.testing.assert_close(layer.bias_slice.grad, lin.bias.grad[rows])
    # An input that needs no gradient gets none and the slice still gets its gradient.
    layer.weight_slice.grad = None
    layer(x.detach()).sin().sum().backward()
    torch.testing.assert_close(layer.weight_slice.grad, lin.weight.grad[rows])
    assert s2ft.RowSliceLinear(lin, rows=3).bias_slice is None  # biases frozen by default


# --- in-place updates, accumulation ------------------------------------------------------------

def test_optimizer_step_updates_weights_in_place(arch, device):
    model = ARCH[arch]["make"](torch.float64, device)
    sel = s2ft.select(model, **ALL, seed=4)
    s2ft.apply(model, sel, train_bias=True)
    before = snapshot(model)
    slices = {n: mode for n, mode, idx in expected_slices(arch, sel)}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    loss_fn(out(model, inputs(device))).backward()
    opt.step()
    after = model.state_dict()
    changed = set()
    for k, v in before.items():
        if torch.equal(v, after[k]):
            continue
        changed.add(k)
        mod_name, _, attr = k.rpartition(".")
        assert mod_name in slices, f"{k} changed but is not trained"
        mod = model.get_submodule(mod_name)
        n = mod.rows if slices[mod_name] == "row" else mod.cols
        if attr in ("weight", "weight_t", "bias"):
            # Only the slice part of the frozen buffer moved.
            part = slice(mod.start, mod.start + n)
            keep = torch.ones(v.shape[0], dtype=torch.bool, device=v.device)
            keep[part] = False
            assert torch.equal(v[keep], after[k][keep]), k
            assert not torch.equal(v[part], after[k][part]), k
    for name, mode in slices.items():
        mod = model.get_submodule(name)
        full = mod.weight if mode == "row" else mod.weight_t
        assert mod.weight_slice.data_ptr() == full[mod.start].data_ptr()  # a view, no copy
        assert f"{name}.{'weight' if mode == 'row' else 'weight_t'}" in changed
        # Adam state is sized to the slice.
        assert opt.state[mod.weight_slice]["exp_avg"].shape == mod.weight_slice.shape


def test_gradient_accumulation(device):
    model = tiny_mini(torch.float64, device)
    ref = copy.deepcopy(model)
    sel = s2ft.select(model, **ALL, seed=7)
    s2ft.apply(model, sel)
    a, b = inputs(device, seed=1), inputs(device, seed=2)
    loss_fn(out(model, a)).backward()
    first = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    loss_fn(out(model, b), seed=6).backward()
    (loss_fn(out(ref, a)) + loss_fn(out(ref, b), seed=6)).backward()
    for name, mode, idx in expected_slices("mini", sel):
        g = model.get_submodule(name).weight_slice.grad
        torch.testing.assert_close(g, dense_slice(ref, name, mode, idx), rtol=1e-10, atol=1e-12)
        assert not torch.allclose(g, first[f"{name}.weight_slice"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_two_forwards_then_one_backward(dtype):
    """Accumulation written as one backward over two forwards: the second forward must not
    invalidate what the first saved (the master is written into the weight at each forward)."""
    model = s2ft.apply(tiny_mini(dtype), s2ft.select(tiny_mini(), **ALL, seed=3))
    ref = s2ft.apply(tiny_mini(dtype), s2ft.select(tiny_mini(), **ALL, seed=3))
    a, b = inputs("cpu", seed=1), inputs("cpu", seed=2)
    (loss_fn(out(model, a)) + loss_fn(out(model, b), seed=6)).backward()
    loss_fn(out(ref, a)).backward()
    loss_fn(out(ref, b), seed=6).backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-6, msg=n)


# --- half precision: float32 master slices ------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_small_updates(device, dtype):
    """A bf16/fp16 run trains the same delta as a float32 run, although each update is far below
    the weights' rounding step; writing each update into the half weight in place (the positive
    control) loses most of it."""
    lr, steps = 2e-5, 20
    base = tiny_mini(torch.float32, device).to(dtype).float()  # representable in half precision
    sel = s2ft.select(base, **ALL, seed=5)
    runs = {}
    for name, dt in (("fp32", torch.float32), ("half", dtype)):
        m = s2ft.apply(copy.deepcopy(base).to(dt), sel)
        params = [p for p in m.parameters() if p.requires_grad]
        assert all(p.dtype == torch.float32 for p in params)
        opt = torch.optim.Adam(params, lr=lr)
        history = []
        for i in range(steps):
            opt.zero_grad()
            loss_fn(out(m, inputs(device, seed=i)).float(), seed=i).backward()
            opt.step()
            history.append([p.detach().clone() for p in params])
        runs[name] = (m, history)
    ref = s2ft.export(runs["fp32"][0])["deltas"]
    got = s2ft.export(runs["half"][0])["deltas"]
    for k, d in ref.items():
        assert got[k]["delta"].dtype == torch.float32
        err = (got[k]["delta"] - d["delta"]).norm() / d["delta"].norm()
        assert err < 0.1, (k, err.item())
    # The forward computes with the master's values (rounded into the half weight).
    m = runs["half"][0]
    with torch.no_grad():
        out(m, inputs(device))
    for mod in m.modules():
        if isinstance(mod, s2ft.ColumnSliceLinear):
            view = mod.weight_t[mod.start:mod.start + mod.cols]
            assert torch.equal(view, mod.weight_slice.detach().to(dtype))
    # Positive control: the fp32 run's updates applied in place to half-precision slices.
    fp32_hist = runs["fp32"][1]
    start = [p.detach().to(dtype) for p in s2ft.apply(copy.deepcopy(base), sel).parameters()
             if p.requires_grad]
    inplace = [p.clone() for p in start]
    prev = [p.detach().clone() for p in s2ft.apply(copy.deepcopy(base), sel).parameters()
            if p.requires_grad]
    for step in fp32_hist:
        for w, now, before in zip(inplace, step, prev):
            w.add_((now - before).to(dtype))
        prev = step
    lost = [((w.float() - s.float()) - (f - s.float())).norm() / (f - s.float()).norm()
            for w, s, f in zip(inplace, start, fp32_hist[-1])]
    assert min(lost) > 0.5, [x.item() for x in lost]


def test_half_precision_state_dict_merge_unload():
    base = tiny_mini(torch.bfloat16)
    base_sd = snapshot(base)
    model = _train(s2ft.apply(copy.deepcopy(base), s2ft.select(base, **ALL, seed=1)), "cpu",
                   lr=1e-3)
    sd = model.state_dict()  # written from the masters, although no forward ran since the step
    for name, mod in model.named_modules():
        if isinstance(mod, s2ft.ColumnSliceLinear):
            assert sd[f"{name}.weight_slice"].dtype == torch.float32
            assert torch.equal(sd[f"{name}.weight_t"][mod.start:mod.start + mod.cols],
                               mod.weight_slice.detach().bfloat16())
    ids = inputs("cpu")
    with torch.no_grad():
        y = out(model, ids)
    merged = s2ft.merge(copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(out(merged, ids), y, rtol=0, atol=0)
    s2ft.unload(model)
    assert_same_state(model, base_sd)


# --- conversions, meta device, load_state_dict ----------------------------------------------------

def _reference_training(base, sel, steps=3):
    ref = _train(s2ft.apply(copy.deepcopy(base), sel), "cpu", steps=steps)
    return s2ft.merge(ref)


def test_meta_to_empty_load_then_apply_train_merge():
    base = tiny_mini(torch.float64)
    sel = s2ft.select(base, **ALL, seed=3)
    with torch.device("meta"):
        model = MiniLlama().double()
    model.to_empty(device="cpu")
    model.load_state_dict(base.state_dict())
    _train(s2ft.apply(model, sel), "cpu")
    s2ft.merge(model)
    assert_same_state(model, snapshot(_reference_training(base, sel)))


def test_apply_on_meta_then_to_empty_and_load_checkpoint():
    """apply on the meta device, materialise, load an S²FT checkpoint: trains, exports, merges."""
    base = tiny_mini(torch.float64)
    sel = s2ft.select(base, **ALL, seed=3)
    trained = _train(s2ft.apply(copy.deepcopy(base), sel), "cpu", steps=2)
    ckpt = io.BytesIO()
    torch.save(trained.state_dict(), ckpt)
    with torch.device("meta"):
        model = MiniLlama().double()
    s2ft.apply(model, sel)
    model.to_empty(device="cpu")
    for mod in model.modules():
        if isinstance(mod, s2ft.ColumnSliceLinear):
            assert mod.weight_slice.data_ptr() == mod.weight_t[mod.start].data_ptr()
    with pytest.raises(RuntimeError, match="base values .* unknown"):
        s2ft.export(model)  # the slices' base values are not known before loading
    ckpt.seek(0)
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    _train(model, "cpu", steps=1, seed=7)
    _train(trained, "cpu", steps=1, seed=7)
    a, b = s2ft.export(model), s2ft.export(trained)
    for k in b["deltas"]:
        torch.testing.assert_close(a["deltas"][k]["delta"], b["deltas"][k]["delta"])
    s2ft.merge(model)
    assert_same_state(model, snapshot(s2ft.merge(trained)))


@pytest.mark.parametrize("mode", ["set_data", "overwrite", "swap"])
def test_conversions_keep_training(mode):
    """apply -> .to(dtype) (any of torch's conversion modes) -> train -> merge has the training."""
    base = tiny_mini(torch.float64)
    sel = s2ft.select(base, **ALL, seed=3)
    model = s2ft.apply(copy.deepcopy(base), sel)
    flag = {"overwrite": "overwrite_module_params_on_conversion",
            "swap": "swap_module_params_on_conversion"}.get(mode)
    if flag:
        getattr(torch.__future__, f"set_{flag}")(True)
    try:
        model.float()
        model.double()
    finally:
        if flag:
            getattr(torch.__future__, f"set_{flag}")(False)
    for mod in model.modules():
        if isinstance(mod, s2ft.RowSliceLinear):
            assert mod.weight_slice.data_ptr() == mod.weight.data_ptr()
    _train(model, "cpu")
    s2ft.merge(model)
    ref = _reference_training(base.float().double(), sel)
    for k, v in snapshot(ref).items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-12, atol=1e-12, msg=k)


def test_half_conversion_keeps_master_precision():
    model = _train(s2ft.apply(tiny_mini(torch.float32), s2ft.select(tiny_mini(), **ALL)), "cpu")
    slices = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.bfloat16()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32 and torch.equal(p.detach(), slices[n]), n
    model.float()  # back to views, with the master's values
    for name, mod in model.named_modules():
        if isinstance(mod, s2ft.RowSliceLinear):
            assert mod.weight_slice.data_ptr() == mod.weight.data_ptr()
            assert torch.equal(mod.weight_slice.detach(), slices[f"{name}.weight_slice"])


def test_load_state_dict_assign_keeps_training():
    base = tiny_mini(torch.float64)
    sel = s2ft.select(base, **ALL, seed=3)
    sd = {k: v.clone() for k, v in s2ft.apply(copy.deepcopy(base), sel).state_dict().items()}
    with torch.device("meta"):
        model = MiniLlama().double()
    s2ft.apply(model, sel)
    model.load_state_dict(sd, assign=True)  # no storage shared between the loaded tensors
    for mod in model.modules():
        if isinstance(mod, s2ft.ColumnSliceLinear):
            assert mod.weight_slice.data_ptr() == mod.weight_t[mod.start].data_ptr()
    _train(model, "cpu")
    s2ft.merge(model)  # right after the last step: no forward has run since
    assert_same_state(model, snapshot(_reference_training(base, sel)))


def test_deepcopy_keeps_storage_sharing():
    model = s2ft.apply(tiny_mini(), s2ft.select(tiny_mini(), **ALL))
    before = snapshot(model)
    clone = _train(copy.deepcopy(model), "cpu", steps=1)
    assert_same_state(model, before)  # training the copy left the original untouched
    changed = [k for k, v in clone.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith(".weight") for k in changed) and any(k.endswith(".weight_t")
                                                               for k in changed)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("how", ["forward", "no_grad", "inference_mode", "trained", "assign"])
def test_unload_restores_base_bit_exactly(dtype, how):
    base = tiny_mini(dtype)
    base_sd = snapshot(base)
    model = s2ft.apply(copy.deepcopy(base), s2ft.select(base, **ALL, seed=2), train_bias=True)
    ids = inputs("cpu")
    if how == "forward":
        loss_fn(out(model, ids)).backward()
    elif how == "no_grad":
        with torch.no_grad():
            out(model, ids)
    elif how == "inference_mode":
        with torch.inference_mode():
            out(model, ids)
    elif how == "trained":
        _train(model, "cpu")
        with torch.no_grad():
            out(model, ids)
    else:
        _train(model, "cpu", steps=1)
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
        _train(model, "cpu", steps=1)
        out(model, ids)
    s2ft.unload(model)
    assert_same_state(model, base_sd)


# --- merge, export, load, switching ---------------------------------------------------------------

def test_merge_gives_plain_model_with_same_function(arch, device):
    base = ARCH[arch]["make"](torch.float64, device)
    model = copy.deepcopy(base)
    sel = s2ft.select(model, **ALL, seed=4)
    _train(s2ft.apply(model, sel, train_bias=True), device)
    ids = inputs(device, seed=42)
    with torch.no_grad():
        y_trained = out(model, ids)
    merged = s2ft.merge(model)
    assert merged is model
    assert not any(isinstance(m, (s2ft.RowSliceLinear, s2ft.ColumnSliceLinear))
                   for m in merged.modules())
    assert all(p.requires_grad for p in merged.parameters())  # flags as before apply
    sd, base_sd = merged.state_dict(), base.state_dict()
    assert sd.keys() == base_sd.keys()
    with torch.no_grad():
        torch.testing.assert_close(out(merged, ids), y_trained, rtol=1e-12, atol=1e-12)
    # Only the selected rows/columns of the trained projections differ from the base.
    trained = {}
    for n, mode, idx in expected_slices(arch, sel):
        trained.setdefault(n, []).append((mode, idx))
    for k, v in base_sd.items():
        mod_name, _, attr = k.rpartition(".")
        mask = torch.zeros(v.shape, dtype=torch.bool, device=device)
        for mode, idx in trained.get(mod_name, []):
            if attr == "weight":
                if mode == "row":
                    mask[idx] = True
                else:
                    mask[:, idx] = True
            elif attr == "bias" and mode == "row":
                mask[idx] = True
        diff = v != sd[k]
        assert not diff[~mask].any(), k
        for mode, idx in trained.get(mod_name, []):
            if attr == "weight":  # every trained row / column moved
                assert (diff[idx].any(dim=1) if mode == "row" else diff[:, idx].any(dim=0)).all(), k


def test_export_load_round_trip(arch, device):
    base = ARCH[arch]["make"](torch.float64, device)
    model = copy.deepcopy(base)
    _train(s2ft.apply(model, s2ft.select(model, **ALL, seed=4), train_bias=True), device)
    adapter = s2ft.export(model)
    buf = io.BytesIO()
    torch.save(adapter, buf)
    buf.seek(0)
    adapter2 = torch.load(buf, weights_only=True)

    fresh = copy.deepcopy(base)
    loaded = s2ft.load(fresh, adapter2)
    assert loaded is fresh
    ids = inputs(device, seed=11)
    with torch.no_grad():
        torch.testing.assert_close(out(loaded, ids), out(model, ids), rtol=1e-12, atol=1e-12)
    # Same trainable parameters, same values: training can continue from the loaded model.
    p1 = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    p2 = dict((n, p) for n, p in loaded.named_parameters() if p.requires_grad)
    assert p1.keys() == p2.keys()
    for n in p1:
        torch.testing.assert_close(p1[n], p2[n], rtol=0, atol=1e-15)
    # Re-exporting gives the same adapter (deltas stay relative to the base).
    again = s2ft.export(loaded)
    assert again["deltas"].keys() == adapter["deltas"].keys()
    for k in adapter["deltas"]:
        torch.testing.assert_close(again["deltas"][k]["delta"], adapter["deltas"][k]["delta"],
                                   rtol=0, atol=1e-15)
    # The adapter is self-describing: index_add_ on the original weights gives the merged model.
    manual = copy.deepcopy(base)
    msd = manual.state_dict()
    with torch.no_grad():
        for name, d in adapter2["deltas"].items():
            msd[name].index_add_(d["dim"], d["index"].to(device), d["delta"].to(device))
    merged = s2ft.merge(model).state_dict()
    for k in merged:
        torch.testing.assert_close(msd[k], merged[k], rtol=1e-12, atol=1e-14)


def test_version_1_adapter_loads():
    """ftops' first adapter form (heads/channels: a head trained its value rows and output
    columns) is the same layout as v_heads = o_heads, u_channels = d_channels."""
    base = tiny_mini()
    sel = s2ft.select(base, v_ratio=0.5, o_ratio=0.5, u_ratio=0.2, d_ratio=0.2, seed=1)
    same = s2ft.Selection(sel.v_heads, sel.v_heads, sel.u_channels, sel.u_channels,
                          sel.head_counts, sel.channel_counts)
    model = _train(s2ft.apply(copy.deepcopy(base), same, train_bias=True), "cpu")
    v2 = s2ft.export(model)
    v1 = {**v2, "version": 1, "selection": {
        "heads": v2["selection"]["v_heads"], "channels": v2["selection"]["u_channels"],
        "head_counts": v2["selection"]["head_counts"],
        "channel_counts": v2["selection"]["channel_counts"], "strategy": "random", "seed": 0}}
    loaded = s2ft.load(copy.deepcopy(base), v1)
    ids = inputs("cpu")
    with torch.no_grad():
        torch.testing.assert_close(out(loaded, ids), out(model, ids), rtol=1e-12, atol=1e-12)


def test_switching_adapters(device):
    base = tiny_mini(torch.float64, device)
    base_sd = snapshot(base)
    sel_a = s2ft.select(base, **ALL, seed=1)
    sel_b = s2ft.select(base, **ALL, seed=2)
    sel_c = s2ft.select(base, o_ratio=0.5, d_ratio=0.1, seed=3)  # the paper's kinds
    assert sel_a != sel_b
    trained = {}
    for tag, sel, seed, tb in (("a", sel_a, 0, True), ("a2", sel_a, 1, True), ("b", sel_b, 2, True),
                               ("a_nobias", sel_a, 3, False), ("c", sel_c, 4, False)):
        m = _train(s2ft.apply(copy.deepcopy(base), sel, train_bias=tb), device, seed=seed)
        trained[tag] = (s2ft.export(m), m)
    ids = inputs(device, seed=5)
    model = copy.deepcopy(base)
    s2ft.load(model, trained["a"][0])
    slice_params = [p for p in model.parameters() if p.requires_grad]
    for tag in ("a2", "b", "a", "a2", "a_nobias", "c", "b", "a_nobias", "c"):
        st = s2ft._state(model)
        same = (st.selection == s2ft.Selection.from_dict(trained[tag][0]["selection"])
                and st.train_bias == trained[tag][0]["train_bias"])
        s2ft.load(model, trained[tag][0])
        with torch.no_grad():
            torch.testing.assert_close(out(model, ids), out(trained[tag][1], ids),
                                       rtol=1e-12, atol=1e-12)
        now = [p for p in model.parameters() if p.requires_grad]
        if same:  # fast path: same parameters, new values
            assert len(now) == len(slice_params) and all(p is q for p, q in zip(now, slice_params))
        want = {n for n, p in trained[tag][1].named_parameters() if p.requires_grad}
        assert {n for n, p in model.named_parameters() if p.requires_grad} == want
        slice_params = now
    s2ft.unload(model)
    assert_same_state(model, base_sd)  # bit-exact base model back


# --- selection ------------------------------------------------------------------------------------

def test_select_counts_determinism_and_independence():
    model = tiny_mini()
    s1 = s2ft.select(model, **ALL, seed=3)
    assert s1 == s2ft.select(model, **ALL, seed=3)
    assert s1 != s2ft.select(model, **ALL, seed=4)
    assert s1.num_v_heads == s1.num_o_heads == 3  # floor(0.5 * (3 blocks * 2 kv heads))
    assert s1.num_u_channels == s1.num_d_channels == math.floor(0.3 * 3 * INTER)
    full = s2ft.select(model, v_ratio=1.0, o_ratio=1.0, u_ratio=1.0, d_ratio=1.0)
    assert full.num_v_heads == 6 and full.num_d_channels == 3 * INTER
    assert s2ft.Selection.from_dict(s1.to_dict()) == s1
    # floor, as the reference counts, without floating-point artefacts (0.29 * 100 < 29)
    wide = tiny_mini(inter=100, layers=1)
    assert s2ft.select(wide, o_ratio=0, d_ratio=0.29).num_d_channels == 29
    assert s2ft.select(wide, o_ratio=0, d_ratio=0.299).num_d_channels == 29
    # The default is the paper's: output and down columns only.
    big = tiny_mini(inter=400, heads=8, kv_heads=8, head_dim=6, layers=4)
    d = s2ft.select(big)
    assert (d.num_v_heads, d.num_o_heads, d.num_u_channels, d.num_d_channels) == (0, 1, 0, 32)


def test_select_draws_as_the_reference():
    """The reference's finetune.py: random.seed(seed); for v then o, sample int(ratio * heads *
    layers) of all heads (flattened layer-major), then for u then d of all channels."""
    layers, heads, inter = 4, 8, 40
    model = tiny_mini(hidden=48, heads=heads, kv_heads=heads, head_dim=6, inter=inter,
                      layers=layers)
    for seed, ratios in ((0, dict(v_ratio=0.0, o_ratio=0.1, u_ratio=0.0, d_ratio=0.05)),
                         (5, dict(v_ratio=0.2, o_ratio=0.1, u_ratio=0.1, d_ratio=0.3))):
        rng = random.Random(seed)
        want = {}
        for field, ratio, per in (("v_heads", "v_ratio", heads), ("o_heads", "o_ratio", heads),
                                  ("u_channels", "u_ratio", inter),
                                  ("d_channels", "d_ratio", inter)):
            picked = sorted(rng.sample(list(range(per * layers)), int(per * layers *
                                                                      ratios[ratio])))
            kind = "self_attn" if field.endswith("heads") else "mlp"
            by_layer = {}
            for i in picked:
                by_layer.setdefault(f"model.layers.{i // per}.{kind}", []).append(i % per)
            want[field] = {k: tuple(v) for k, v in by_layer.items()}
        sel = s2ft.select(model, **ratios, seed=seed)
        for field in want:
            assert getattr(sel, field) == want[field], field


def test_select_weight_norm_picks_largest():
    model = tiny_mini()
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[13].mul_(10)
        model.model.layers[0].mlp.down_proj.weight[:, 7].mul_(10)
        model.model.layers[1].self_attn.v_proj.weight[16:32].mul_(10)  # kv head 1 of block 1
        model.model.layers[2].self_attn.o_proj.weight[:, 0:32].mul_(10)  # group 0 of block 2
    sel = s2ft.select(model, v_ratio=1 / 6, o_ratio=1 / 6, u_ratio=1 / 240, d_ratio=1 / 240,
                      strategy="weight_norm")
    assert sel.u_channels == {"model.layers.2.mlp": (13,)}
    assert sel.d_channels == {"model.layers.0.mlp": (7,)}
    assert sel.v_heads == {"model.layers.1.self_attn": (1,)}
    assert sel.o_heads == {"model.layers.2.self_attn": (0,)}
    assert sel.seed is None


# --- the reference's released configuration -------------------------------------------------------

@pytest.mark.parametrize("script,ratios", [
    ("llama2", dict(v_ratio=0.0, o_ratio=0.052, u_ratio=0.0, d_ratio=0.02)),
    ("llama3", dict(v_ratio=0.0, o_ratio=0.0, u_ratio=0.0, d_ratio=0.03)),
])
def test_reference_released_configuration(script, ratios):
    """The released scripts' ratios (finetune_*_{llama2,llama3}_s2.sh, seed 0, weight decay 0)
    on a small Llama-shaped model with multi-head attention: only output-projection and
    down-projection columns train, as many as the ratios imply; q, k, v, gate, up, biases, norms
    and embeddings stay bit-exact; the trained units are the reference's draw."""
    layers, heads, hd, inter, hidden = 4, 8, 8, 176, 64
    base = tiny_mini(hidden=hidden, heads=heads, kv_heads=heads, head_dim=hd, inter=inter,
                     layers=layers)
    if script == "llama2":
        assert ratios == s2ft.PAPER_RATIOS  # select()'s default
    sel = s2ft.select(base, **ratios, seed=0)
    n_o = math.floor(ratios["o_ratio"] * heads * layers)
    n_d = math.floor(ratios["d_ratio"] * inter * layers)
    assert (sel.num_v_heads, sel.num_o_heads, sel.num_u_channels, sel.num_d_channels) == \
        (0, n_o, 0, n_d)
    model = s2ft.apply(copy.deepcopy(base), sel)
    kinds = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (s2ft.RowSliceLinear, s2ft.ColumnSliceLinear)):
            kinds.setdefault(type(mod).__name__, set()).add(name.rpartition(".")[2])
    assert kinds == {"ColumnSliceLinear": {"o_proj", "down_proj"} if n_o else {"down_proj"}}
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(("o_proj.weight_slice", "down_proj.weight_slice")) for n in trainable)
    assert sum(trainable.values()) == n_o * hd * hidden + n_d * hidden
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                            weight_decay=0.0)
    for i in range(3):
        opt.zero_grad()
        loss_fn(out(model, inputs("cpu", seed=i))).backward()
        opt.step()
    merged, base_sd = s2ft.merge(model).state_dict(), base.state_dict()
    cols = {f"{p}.o_proj.weight": [g * hd + i for g in u for i in range(hd)]
            for p, u in sel.o_heads.items()}
    cols.update({f"{p}.down_proj.weight": list(u) for p, u in sel.d_channels.items()})
    for k, v in base_sd.items():
        diff = (merged[k] != v)
        if k in cols:
            trained_cols = torch.zeros(v.shape[1], dtype=torch.bool)
            trained_cols[cols[k]] = True
            assert diff[:, trained_cols].any(dim=0).all() and not diff[:, ~trained_cols].any(), k
        else:
            assert not diff.any(), k  # q, k, v, gate, up, biases, norms, embeddings: frozen


# --- hostile inputs -------------------------------------------------------------------------------

class TestHostileInputsS2FT:
    """The hostile-input probe for S²FT: every public entry point given wrong types, values out
    of range, NaN, empty or unsupported models, duplicates, foreign or malformed adapters, a
    failing backward, a second apply. Each raises a clear error naming the argument and leaves
    the model bit-for-bit as it was."""

    @pytest.fixture
    def model(self):
        return tiny_mini()

    @pytest.mark.parametrize("name", ["v_ratio", "o_ratio", "u_ratio", "d_ratio"])
    @pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf"), -float("inf")])
    def test_select_ratio_out_of_range(self, model, name, bad):
        before = snapshot(model)
        with pytest.raises(ValueError, match=f"select: {name} must be"):
            s2ft.select(model, **{name: bad})
        assert_same_state(model, before)

    @pytest.mark.parametrize("bad", [True, "0.1", [0.1], None, torch.ones(2)])
    def test_select_ratio_wrong_type(self, model, bad):
        with pytest.raises(TypeError, match="o_ratio"):
            s2ft.select(model, o_ratio=bad)

    @pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
    def test_select_other_arguments(self, model):
        with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
            s2ft.select("not a model")
        with pytest.raises(ValueError, match="no attention or feed-forward"):
            s2ft.select(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
        with pytest.raises(ValueError, match="no attention or feed-forward"):
            s2ft.select(nn.Module())  # empty
        with pytest.raises(ValueError, match="o_ratio=0.01 selects none"):
            s2ft.select(model, o_ratio=0.01, d_ratio=0)
        with pytest.raises(ValueError, match="all 0"):
            s2ft.select(model, o_ratio=0, d_ratio=0)
        with pytest.raises(ValueError, match="strategy"):
            s2ft.select(model, strategy="magnitude")
        with pytest.raises(ValueError, match="strategy"):
            s2ft.select(model, strategy=["random"])
        with pytest.raises(ValueError, match="seed"):
            s2ft.select(model, seed=-1)
        with pytest.raises(TypeError, match="seed"):
            s2ft.select(model, seed=1.5)
        with pytest.raises(TypeError, match="heads.*v_ratio"):
            s2ft.select(model, heads=0.05, channels=0.02)  # the former keywords
        with pytest.raises(TypeError):
            s2ft.select(model, 0.05)  # ratios are keyword-only
        mlp_only = nn.Module()
        mlp_only.mlp = copy.deepcopy(model.model.layers[0].mlp)
        with pytest.raises(ValueError, match="o_ratio=0.5 but the model has no attention"):
            s2ft.select(mlp_only, o_ratio=0.5)
        assert s2ft.select(mlp_only, o_ratio=0).num_d_channels == 1  # floor(0.02 * 80)
        zero = tiny_mini(inter=0, layers=1)  # zero-size feed-forward
        with pytest.raises(ValueError, match="d_ratio=0.02 selects none of the model's 0"):
            s2ft.select(zero, o_ratio=0)
        nan = tiny_mini()
        with torch.no_grad():
            nan.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
        with pytest.raises(ValueError, match="non-finite"):
            s2ft.select(nan, o_ratio=0, strategy="weight_norm")
        with torch.device("meta"):
            meta = MiniLlama()
        assert s2ft.select(meta, o_ratio=0.5).num_o_heads == 3  # random: no weights needed
        with pytest.raises(ValueError, match="meta device"):
            s2ft.select(meta, o_ratio=0.5, strategy="weight_norm")

    def test_apply_bad_arguments_leave_model_unchanged(self, model):
        before = snapshot(model)
        sel = s2ft.select(model, **ALL)
        with pytest.raises(TypeError, match="model must be"):
            s2ft.apply([model], sel)
        with pytest.raises(TypeError, match="selection must be an ftops.s2ft.Selection.*from_dict"):
            s2ft.apply(model, sel.to_dict())
        with pytest.raises(TypeError, match="selection"):
            s2ft.apply(model, None)
        with pytest.raises(TypeError, match="train_bias"):
            s2ft.apply(model, sel, train_bias=1)
        empty = s2ft.Selection({}, {}, {}, {}, sel.head_counts, sel.channel_counts)
        with pytest.raises(ValueError, match="selects no units"):
            s2ft.apply(model, empty)
        other = s2ft.select(tiny_mini(layers=2), **ALL)
        with pytest.raises(ValueError, match="different model structure"):
            s2ft.apply(model, other)
        with pytest.raises(ValueError, match="different model structure"):
            s2ft.apply(model, s2ft.select(tiny_mini(inter=64), **ALL))
        path = "model.layers.0.self_attn"
        for bad in ((1, 1), (1, 0), (0, 2), (-1,)):  # duplicates, unsorted, out of range
            s = s2ft.Selection({path: bad}, {}, {}, {}, sel.head_counts, sel.channel_counts)
            with pytest.raises(ValueError, match=r"selection.v_heads\['model.layers.0.self_"):
                s2ft.apply(model, s)
        s = s2ft.Selection({}, {path: (0.5,)}, {}, {}, sel.head_counts, sel.channel_counts)
        with pytest.raises(TypeError, match="selection.o_heads"):
            s2ft.apply(model, s)
        s = s2ft.Selection({}, {}, {"model.layers.9.mlp": (0,)}, {}, sel.head_counts,
                           sel.channel_counts)
        with pytest.raises(ValueError, match="selection.u_channels names 'model.layers.9.mlp'"):
            s2ft.apply(model, s)
        assert s2ft._state(model) is None
        assert_same_state(model, before)
        assert all(p.requires_grad for p in model.parameters())

    def test_apply_twice_and_select_on_applied(self, model):
        sel = s2ft.select(model, **ALL)
        s2ft.apply(model, sel)
        before = snapshot(model)
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        with pytest.raises(ValueError, match="already has S²FT applied"):
            s2ft.apply(model, sel)
        with pytest.raises(ValueError, match="already has S²FT applied"):
            s2ft.select(model)
        assert_same_state(model, before)
        assert flags == {n: p.requires_grad for n, p in model.named_parameters()}

    def test_shared_projections_are_refused(self, model):
        shared = tiny_mini(layers=2)
        shared.model.layers[1].mlp.down_proj = shared.model.layers[0].mlp.down_proj
        before = snapshot(shared)
        sel = s2ft.select(shared, o_ratio=0, d_ratio=1.0)
        with pytest.raises(ValueError, match="is shared"):
            s2ft.apply(shared, sel)
        tied = tiny_mini(layers=2)
        tied.model.layers[1].self_attn.q_proj.weight = tied.model.layers[0].self_attn.q_proj.weight
        with pytest.raises(ValueError, match="is shared"):
            s2ft.apply(tied, s2ft.select(tied, o_ratio=1.0, d_ratio=0))
        assert_same_state(shared, before)
        # A whole block used twice is one set of weights: permuting it is consistent.
        twice = tiny_mini(layers=1)
        twice.model.layers.append(twice.model.layers[0])
        ref = copy.deepcopy(twice)
        s2ft.apply(twice, s2ft.select(twice, **ALL))
        with torch.no_grad():
            torch.testing.assert_close(out(twice, inputs("cpu")), out(ref, inputs("cpu")))

    def test_non_floating_weights_are_refused(self, model):
        with torch.no_grad():
            q = model.model.layers[0].self_attn.q_proj
            q.weight = nn.Parameter(q.weight.detach().to(torch.int32), requires_grad=False)
        before = snapshot(model)
        with pytest.raises(TypeError, match="floating"):
            s2ft.apply(model, s2ft.select(model, o_ratio=1.0, d_ratio=0))
        assert_same_state(model, before)

    def test_export_merge_unload_without_apply(self, model):
        for fn in (s2ft.export, s2ft.merge, s2ft.unload):
            with pytest.raises(ValueError, match="does not have S²FT applied"):
                fn(model)
            with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
                fn({"not": "a model"})

    def test_replaced_layer_is_detected(self, model):
        s2ft.apply(model, s2ft.select(model, **ALL, seed=1))
        name = next(n for n, m in model.named_modules() if isinstance(m, s2ft.ColumnSliceLinear))
        parent, _, child = name.rpartition(".")
        old = model.get_submodule(name)
        setattr(model.get_submodule(parent), child,
                nn.Linear(old.in_features, old.out_features).double())
        before = snapshot(model)
        for fn in (s2ft.export, s2ft.merge, s2ft.unload):
            with pytest.raises(RuntimeError, match="no longer the S²FT layer"):
                fn(model)
        assert_same_state(model, before)

    def test_load_bad_adapters_leave_model_unchanged(self, model):
        base = copy.deepcopy(model)
        trained = _train(s2ft.apply(copy.deepcopy(base), s2ft.select(base, **ALL)), "cpu")
        adapter = s2ft.export(trained)
        name = next(iter(adapter["deltas"]))

        def broken(edit):
            a = copy.deepcopy(adapter)
            edit(a)
            return a

        cases = [
            (TypeError, "adapter must be the dict", [1, 2]),
            (ValueError, "not an S²FT adapter", {**adapter, "format": "peft"}),
            (ValueError, "unsupported version", {**adapter, "version": 99}),
            (ValueError, "unsupported version", {**adapter, "version": True}),
            (ValueError, "missing key 'deltas'", {k: v for k, v in adapter.items()
                                                  if k != "deltas"}),
            (TypeError, r"adapter\['train_bias'\] must be a bool", {**adapter, "train_bias": 1}),
            (TypeError, "selection must be a dict", {**adapter, "selection": "x"}),
            (ValueError, "missing keys", {**adapter, "selection": {"v_heads": {}}}),
            (TypeError, r"selection\['o_heads'\]", broken(
                lambda a: a["selection"].update(o_heads={"model.layers.0.self_attn": "0"}))),
            (TypeError, r"selection\['head_counts'\]", broken(
                lambda a: a["selection"].update(head_counts=[2, 2, 2]))),
            (ValueError, "strategy", broken(lambda a: a["selection"].update(strategy="x"))),
            (ValueError, "seed", broken(lambda a: a["selection"].update(seed=-3))),
            (ValueError, f"deltas'\\]\\['{name}'\\] does not fit", broken(
                lambda a: a["deltas"][name].update(delta=a["deltas"][name]["delta"][:-1]))),
            (ValueError, f"deltas'\\]\\['{name}'\\] does not fit", broken(
                lambda a: a["deltas"][name].update(index=a["deltas"][name]["index"].flip(0)))),
            (ValueError, f"deltas'\\]\\['{name}'\\] does not fit", broken(
                lambda a: a["deltas"][name].update(delta=a["deltas"][name]["delta"].long()))),
            (ValueError, f"deltas'\\]\\['{name}'\\] does not fit", broken(
                lambda a: a["deltas"][name].update(dim=5))),
            (ValueError, "non-finite", broken(
                lambda a: a["deltas"][name]["delta"].view(-1)[0].fill_(float("nan")))),
            (ValueError, "deltas do not match", broken(lambda a: a["deltas"].pop(name))),
            (ValueError, "deltas do not match", broken(
                lambda a: a["deltas"].update(extra=a["deltas"][name]))),
            (ValueError, "permutations", broken(
                lambda a: a["permutations"].update({k: v.flip(0) for k, v in
                                                    a["permutations"].items()}))),
        ]
        for target in (copy.deepcopy(base), _train(s2ft.apply(
                copy.deepcopy(base), s2ft.select(base, **ALL, seed=9)), "cpu")):
            before = snapshot(target)
            state = s2ft._state(target)
            for exc, msg, bad in cases:
                with pytest.raises(exc, match=msg):
                    s2ft.load(target, bad)
            with pytest.raises(TypeError, match="base_model must be"):
                s2ft.load("model", adapter)
            # An adapter from another model (other structure, or other widths).
            with pytest.raises(ValueError, match="different model structure"):
                s2ft.load(target, s2ft.export(s2ft.apply(tiny_mini(layers=2), s2ft.select(
                    tiny_mini(layers=2), **ALL))))
            with pytest.raises(ValueError, match="does not fit"):
                wide = tiny_mini(hidden=40, head_dim=16)
                s2ft.load(target, s2ft.export(s2ft.apply(wide, s2ft.select(wide, **ALL))))
            assert s2ft._state(target) is state
            assert_same_state(target, before)

    @pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
    def test_slice_modules_bad_arguments(self):
        lin = nn.Linear(10, 6)
        for cls, n_name, limit in ((s2ft.RowSliceLinear, "rows", 6),
                                   (s2ft.ColumnSliceLinear, "cols", 10)):
            with pytest.raises(TypeError, match="linear must be a torch.nn.Linear"):
                cls(nn.Conv1d(3, 3, 1), 1)
            with pytest.raises(TypeError, match="linear.weight must be floating"):
                bad = nn.Linear(4, 4)
                bad.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int64),
                                          requires_grad=False)
                cls(bad, 1)
            for bad in (0, -1, limit + 1):
                with pytest.raises(ValueError, match=n_name):
                    cls(lin, bad)
            with pytest.raises(TypeError, match=n_name):
                cls(lin, 2.0)
            with pytest.raises(ValueError, match="start"):
                cls(lin, 1, start=limit)
            with pytest.raises(ValueError, match=n_name):
                cls(lin, 3, start=limit - 2)  # runs past the end
            with pytest.raises(TypeError, match="start"):
                cls(lin, 1, start=None)
            with pytest.raises(ValueError, match="start"):
                cls(nn.Linear(0, 0), 1)  # zero-size layer: nothing to train
        with pytest.raises(TypeError, match="train_bias"):
            s2ft.RowSliceLinear(lin, 2, train_bias="yes")

    def test_selection_from_dict_malformed(self):
        good = s2ft.select(tiny_mini(), **ALL).to_dict()
        with pytest.raises(TypeError, match="selection must be a dict"):
            s2ft.Selection.from_dict([("v_heads", {})])
        with pytest.raises(TypeError, match="list of ints"):
            s2ft.Selection.from_dict({**good, "v_heads": {"a": [True]}})
        with pytest.raises(TypeError, match="keys must be module paths"):
            s2ft.Selection.from_dict({**good, "u_channels": {3: [1]}})
        with pytest.raises(ValueError, match="channel_counts"):
            s2ft.Selection.from_dict({**good, "channel_counts": {"model.layers.0.mlp": 0}})

    def test_failing_backward_leaves_model_and_recovers(self, model):
        """A backward that raises midway (here a hook; out of memory alike) changes no weight,
        and once the gradients are cleared the next step is the one a clean run takes."""
        sel = s2ft.select(model, **ALL, seed=2)
        s2ft.apply(model, sel)
        ref = copy.deepcopy(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ropt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
        before = snapshot(model)

        def boom(_):
            raise RuntimeError("simulated failure in backward")

        handle = model.model.layers[1].register_full_backward_hook(lambda *a: boom(a))
        with pytest.raises(RuntimeError, match="simulated failure"):
            loss_fn(out(model, inputs("cpu"))).backward()
        handle.remove()
        assert_same_state(model, before)
        assert any(p.grad is not None for p in model.parameters() if p.requires_grad)
        with pytest.raises(IndexError):
            out(model, torch.full((2, 3), VOCAB + 5))  # a failing forward, too
        assert_same_state(model, before)
        for m, o in ((model, opt), (ref, ropt)):
            o.zero_grad()
            loss_fn(out(m, inputs("cpu"))).backward()
            o.step()
        for k, v in ref.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k


def test_ftops_exports_s2ft():
    assert "s2ft" in ftops.__all__ and ftops.s2ft is s2ft
    for fn in (s2ft.select, s2ft.apply, s2ft.export, s2ft.merge, s2ft.load, s2ft.unload):
        assert fn.__doc__ and len(fn.__doc__) > 80


def test_ftops_fused_adamw_updates_slices_in_place(device):
    """The slices are contiguous parameters, so ftops' fused AdamW kernel trains them directly."""
    from ftops import _adamw

    model = s2ft.apply(tiny_mini(torch.float32, device), s2ft.select(tiny_mini(), **ALL),
                       train_bias=True)
    twin = copy.deepcopy(model)
    ids = inputs(device)
    for m in (model, twin):
        loss_fn(out(m, ids)).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.is_contiguous() for p in params)
    m1 = [_adamw.zeros_moment(p) for p in params]
    m2 = [_adamw.zeros_moment(p) for p in params]
    _adamw.fused_adamw(params, [p.grad for p in params], m1, m2, lr=1e-2, beta1=0.9, beta2=0.999,
                       eps=1e-8, weight_decay=0.01, step=1)
    torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2,
                      weight_decay=0.01).step()
    for (n, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    with torch.no_grad():
        y, y_twin = out(model, ids), out(twin, ids)
    torch.testing.assert_close(y, y_twin, rtol=1e-5, atol=1e-5)


def test_state_dict_checkpoint_resume(device):
    """A training checkpoint (model + optimizer state_dict) resumes on a freshly applied model."""
    base = tiny_mini(torch.float64, device)
    sel = s2ft.select(base, **ALL, seed=8)
    model = s2ft.apply(copy.deepcopy(base), sel)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = inputs(device)
    loss_fn(out(model, ids)).backward()
    opt.step()
    opt.zero_grad()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = s2ft.apply(copy.deepcopy(base), sel)
    resumed.load_state_dict(ckpt["model"])
    opt2 = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2)
    opt2.load_state_dict(ckpt["opt"])
    for m, o in ((model, opt), (resumed, opt2)):
        loss_fn(out(m, ids), seed=9).backward()
        o.step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-12, atol=1e-14)
    up = resumed.model.layers[0].mlp.up_proj
    if isinstance(up, s2ft.RowSliceLinear):
        assert up.weight_slice.data_ptr() == up.weight.data_ptr()  # still one storage
    a, b = s2ft.export(model), s2ft.export(resumed)
    for k in a["deltas"]:
        torch.testing.assert_close(a["deltas"][k]["delta"], b["deltas"][k]["delta"],
                                   rtol=1e-12, atol=1e-14)
