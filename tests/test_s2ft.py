"""S²FT: selection, co-permutation, partial backprop, in-place updates, adapters.

Every gradient is checked against the dense autograd gradient of an untouched copy of the model
(float64), restricted to the trained slice, with indices computed here from the selection, not
by the code under test.

Models: a small pure-PyTorch Llama-style model defined here (grouped-query attention, biases;
runs everywhere, including CUDA machines without transformers) and, when transformers is
installed, tiny transformers Llama (GQA + biases) and BERT models built from configs.
"""
import copy
import io

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


class MiniLlama(nn.Module):
    """Llama-style decoder in plain PyTorch, with the module paths of transformers' Llama."""

    def __init__(self, hidden=HIDDEN, heads=4, kv_heads=2, head_dim=16, inter=INTER, layers=3,
                 bias=True):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(VOCAB, hidden)
        self.model.layers = nn.ModuleList(
            Block(hidden, heads, inter, head_dim, bias, kv_heads) for _ in range(layers))
        self.model.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, VOCAB, bias=False)

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


def expected_slices(arch, sel):
    """(module path, mode, original indices) for every trained projection, from the selection."""
    a = ARCH[arch]
    hd, rep = a["hd"], a["rep"]
    res = []
    for path, groups in sel.heads.items():
        rows = [g * hd + i for g in groups for i in range(hd)]
        cols = [g * rep * hd + i for g in groups for i in range(rep * hd)]
        res.append((f"{path}.{a['v']}", "row", rows))
        res.append((f"{path}.{a['o']}", "col", cols))
    for path, chans in sel.channels.items():
        res.append((f"{path}.{a['up']}", "row", list(chans)))
        res.append((f"{path}.{a['down']}", "col", list(chans)))
    return res


@pytest.fixture(params=["mini", pytest.param("llama", marks=needs_hf),
                        pytest.param("bert", marks=needs_hf)])
def arch(request):
    return request.param


# --- function preserved --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_apply_preserves_function(arch, device, dtype, tol):
    model = ARCH[arch]["make"](dtype, device)
    ref = copy.deepcopy(model)
    sel = s2ft.select(model, heads=0.5, channels=0.3, seed=4)
    assert sel.num_heads > 0 and sel.num_channels > 0
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

@pytest.mark.parametrize("heads,channels,seed", [(0.5, 0.3, 4), (0.25, 0.05, 9), (1.0, 1.0, 0)])
def test_slice_gradients_match_dense(arch, device, heads, channels, seed):
    model = ARCH[arch]["make"](torch.float64, device)
    ref = copy.deepcopy(model)
    sel = s2ft.select(model, heads=heads, channels=channels, seed=seed)
    s2ft.apply(model, sel)
    ids = inputs(device)

    loss_ref = loss_fn(out(ref, ids))
    loss_ref.backward()
    loss = loss_fn(out(model, ids))
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)

    slices = expected_slices(arch, sel)
    trained = set()
    for name, mode, idx in slices:
        mod, rmod = model.get_submodule(name), ref.get_submodule(name)
        idx = torch.tensor(idx, device=device)
        if mode == "row":
            assert isinstance(mod, s2ft.RowSliceLinear)
            torch.testing.assert_close(mod.weight_slice.grad, rmod.weight.grad[idx], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(mod.bias_slice.grad, rmod.bias.grad[idx], rtol=1e-10, atol=1e-12)
            trained |= {f"{name}.weight_slice", f"{name}.bias_slice"}
        else:
            assert isinstance(mod, s2ft.ColumnSliceLinear)
            torch.testing.assert_close(mod.weight_slice.grad, rmod.weight.grad[:, idx].t(), rtol=1e-10, atol=1e-12)
            trained.add(f"{name}.weight_slice")
    # Exactly the slices train; nothing else has or needs a gradient.
    req = {n for n, p in model.named_parameters() if p.requires_grad}
    assert req == trained
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trained)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    a = ARCH[arch]
    per_head = a["hd"] * HIDDEN + a["hd"] + a["rep"] * a["hd"] * HIDDEN
    assert n_trainable == sel.num_heads * per_head + sel.num_channels * (2 * HIDDEN + 1)


def test_train_bias_false(device):
    model = tiny_mini(torch.float64, device)
    ref = copy.deepcopy(model)
    sel = s2ft.select(model, heads=0.5, channels=0.3, seed=4)
    s2ft.apply(model, sel, train_bias=False)
    assert not any(n.endswith("bias_slice") for n, p in model.named_parameters())
    ids = inputs(device)
    loss_fn(out(model, ids)).backward()
    loss_fn(out(ref, ids)).backward()
    for name, mode, idx in expected_slices("mini", sel):
        r = ref.get_submodule(name).weight.grad
        r = r[idx] if mode == "row" else r[:, idx].t()
        torch.testing.assert_close(model.get_submodule(name).weight_slice.grad, r, rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match="train_bias"):
        s2ft.apply(tiny_mini(), sel, train_bias=1)


def test_float32_and_bfloat16_gradients(device):
    ids = inputs(device)
    ref = tiny_mini(torch.float64, device)
    sel = s2ft.select(ref, heads=0.5, channels=0.3, seed=2)
    dense = copy.deepcopy(ref)
    loss_fn(out(dense, ids)).backward()
    for dtype, rtol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        model = s2ft.apply(copy.deepcopy(ref).to(dtype), sel)
        loss_fn(out(model, ids)).backward()
        for name, mode, idx in expected_slices("mini", sel):
            g = model.get_submodule(name).weight_slice.grad
            assert g.dtype == dtype
            r = dense.get_submodule(name).weight.grad
            r = r[idx] if mode == "row" else r[:, idx].t()
            err = (g.double() - r).norm() / r.norm()
            assert err < rtol, (name, dtype, err.item())


def test_autocast_bfloat16(device):
    """float32 weights under bf16 autocast: the slice gradients match dense autocast autograd."""
    model = tiny_mini(torch.float32, device)
    ref = copy.deepcopy(model)
    sel = s2ft.select(model, heads=0.5, channels=0.3, seed=1)
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
        r = ref.get_submodule(name).weight.grad
        r = r[idx] if mode == "row" else r[:, idx].t()
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
    sel = s2ft.select(model, heads=0.5, channels=0.3)
    sel = s2ft.Selection(
        heads={"model.layers.0.self_attn": (1,), "model.layers.1.self_attn": (0,)},
        channels={"model.layers.0.mlp": (3, 5, 7), "model.layers.2.mlp": tuple(range(10))},
        head_counts=sel.head_counts, channel_counts=sel.channel_counts)
    s2ft.apply(model, sel)
    ids = inputs("cpu")
    for mdl, should_see in ((ref, True), (model, False)):
        loss = loss_fn(out(mdl, ids))
        with _ShapeLog() as log:
            loss.backward()
        seen = {(shape, op) for shape, op in log.shapes if shape in weight_shapes}
        # The dense model (positive control) does form them; the S²FT model must not.
        assert bool(seen) == should_see, seen
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_column_layer_saves_only_selected_columns():
    lin = nn.Linear(40, 24, bias=True).double()
    layer = s2ft.ColumnSliceLinear(copy.deepcopy(lin), cols=5)
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
    torch.testing.assert_close(layer.weight_slice.grad, lin.weight.grad[:, :5].t())
    torch.testing.assert_close(x.grad, x2.grad)


def test_row_layer_input_gradient_and_frozen_input():
    lin = nn.Linear(40, 24, bias=True).double()
    layer = s2ft.RowSliceLinear(copy.deepcopy(lin), rows=7)
    x = torch.randn(2, 9, 40, dtype=torch.float64, requires_grad=True)
    layer(x).sin().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    lin(x2).sin().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.weight_slice.grad, lin.weight.grad[:7])
    torch.testing.assert_close(layer.bias_slice.grad, lin.bias.grad[:7])
    # An input that needs no gradient gets none and the slice still gets its gradient.
    layer.weight_slice.grad = None
    xf = x.detach()
    layer(xf).sin().sum().backward()
    torch.testing.assert_close(layer.weight_slice.grad, lin.weight.grad[:7])


# --- in-place updates, accumulation ------------------------------------------------------------

def test_optimizer_step_updates_weights_in_place(arch, device):
    model = ARCH[arch]["make"](torch.float64, device)
    sel = s2ft.select(model, heads=0.5, channels=0.3, seed=4)
    s2ft.apply(model, sel)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    slices = {n: (mode, len(idx)) for n, mode, idx in expected_slices(arch, sel)}
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
        mode, n = slices[mod_name]
        if attr in ("weight", "weight_t", "bias"):
            # Only the slice part of the frozen buffer moved.
            assert torch.equal(v[n:], after[k][n:]), k
            assert not torch.equal(v[:n], after[k][:n]), k
    for name, (mode, n) in slices.items():
        mod = model.get_submodule(name)
        full = mod.weight if mode == "row" else mod.weight_t
        assert mod.weight_slice.data_ptr() == full.data_ptr()
        assert f"{name}.{'weight' if mode == 'row' else 'weight_t'}" in changed
        # Adam state is sized to the slice.
        assert opt.state[mod.weight_slice]["exp_avg"].shape == mod.weight_slice.shape


def test_gradient_accumulation(device):
    model = tiny_mini(torch.float64, device)
    ref = copy.deepcopy(model)
    sel = s2ft.select(model, heads=0.5, channels=0.3, seed=7)
    s2ft.apply(model, sel)
    a, b = inputs(device, seed=1), inputs(device, seed=2)
    loss_fn(out(model, a)).backward()
    first = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    loss_fn(out(model, b), seed=6).backward()
    (loss_fn(out(ref, a)) + loss_fn(out(ref, b), seed=6)).backward()
    for name, mode, idx in expected_slices("mini", sel):
        g = model.get_submodule(name).weight_slice.grad
        r = ref.get_submodule(name).weight.grad
        r = r[idx] if mode == "row" else r[:, idx].t()
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(g, first[f"{name}.weight_slice"])


def _train(model, device, steps=3, seed=0, lr=5e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for i in range(steps):
        opt.zero_grad()
        loss_fn(out(model, inputs(device, seed=seed * 100 + i)), seed=seed + i).backward()
        opt.step()
    return model


# --- merge, export, load, switching ----------------------------------------------------------------

def test_merge_gives_plain_model_with_same_function(arch, device):
    base = ARCH[arch]["make"](torch.float64, device)
    model = copy.deepcopy(base)
    sel = s2ft.select(model, heads=0.5, channels=0.3, seed=4)
    _train(s2ft.apply(model, sel), device)
    ids = inputs(device, seed=42)
    with torch.no_grad():
        y_trained = out(model, ids)
    merged = s2ft.merge(model)
    assert merged is model
    assert not any(isinstance(m, (s2ft.RowSliceLinear, s2ft.ColumnSliceLinear)) for m in merged.modules())
    assert all(p.requires_grad for p in merged.parameters())  # flags as before apply
    sd, base_sd = merged.state_dict(), base.state_dict()
    assert sd.keys() == base_sd.keys()
    with torch.no_grad():
        torch.testing.assert_close(out(merged, ids), y_trained, rtol=1e-12, atol=1e-12)
    # Only the selected rows/columns of the trained projections differ from the base.
    slices = {n: (mode, idx) for n, mode, idx in expected_slices(arch, sel)}
    for k, v in base_sd.items():
        mod_name, _, attr = k.rpartition(".")
        if mod_name not in slices or (attr == "bias" and slices[mod_name][0] == "col"):
            assert torch.equal(v, sd[k]), k
            continue
        mode, idx = slices[mod_name]
        dim = 0 if mode == "row" else 1
        mask = torch.zeros(v.shape[dim], dtype=torch.bool, device=device)
        mask[idx] = True
        diff = (v != sd[k])
        diff = diff if diff.dim() == 1 else diff.any(dim=1 - dim)
        assert diff[mask].all() and not diff[~mask].any(), k


def test_export_load_round_trip(arch, device):
    base = ARCH[arch]["make"](torch.float64, device)
    model = copy.deepcopy(base)
    _train(s2ft.apply(model, s2ft.select(model, heads=0.5, channels=0.3, seed=4)), device)
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
        torch.testing.assert_close(again["deltas"][k]["delta"], adapter["deltas"][k]["delta"], rtol=0, atol=1e-15)
    # The adapter is self-describing: index_add_ on the original weights gives the merged model.
    manual = copy.deepcopy(base)
    msd = manual.state_dict()
    with torch.no_grad():
        for name, d in adapter2["deltas"].items():
            msd[name].index_add_(d["dim"], d["index"].to(device), d["delta"].to(device))
    merged = s2ft.merge(model).state_dict()
    for k in merged:
        torch.testing.assert_close(msd[k], merged[k], rtol=1e-12, atol=1e-14)


def test_switching_adapters(device):
    base = tiny_mini(torch.float64, device)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    sel_a = s2ft.select(base, heads=0.5, channels=0.3, seed=1)
    sel_b = s2ft.select(base, heads=0.5, channels=0.3, seed=2)
    assert sel_a != sel_b
    trained = {}
    for tag, sel, seed, tb in (("a", sel_a, 0, True), ("a2", sel_a, 1, True), ("b", sel_b, 2, True),
                               ("a_nobias", sel_a, 3, False)):
        m = _train(s2ft.apply(copy.deepcopy(base), sel, train_bias=tb), device, seed=seed)
        trained[tag] = (s2ft.export(m), m)
    ids = inputs(device, seed=5)
    model = copy.deepcopy(base)
    s2ft.load(model, trained["a"][0])
    slice_params = [p for p in model.parameters() if p.requires_grad]
    for tag in ("a2", "b", "a", "a2", "a_nobias", "b", "a_nobias"):
        same_selection = s2ft._state(model).selection == s2ft.Selection.from_dict(trained[tag][0]["selection"])
        s2ft.load(model, trained[tag][0])
        with torch.no_grad():
            torch.testing.assert_close(out(model, ids), out(trained[tag][1], ids), rtol=1e-12, atol=1e-12)
        now = [p for p in model.parameters() if p.requires_grad]
        if same_selection and tag != "a_nobias":  # fast path: same parameters, new values
            assert len(now) == len(slice_params) and all(p is q for p, q in zip(now, slice_params))
        want = {n for n, p in trained[tag][1].named_parameters() if p.requires_grad}
        assert {n for n, p in model.named_parameters() if p.requires_grad} == want
        slice_params = now
    s2ft.unload(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, base_sd[k]), k  # bit-exact base model back


def test_deepcopy_and_dtype_conversion_keep_storage_sharing():
    model = s2ft.apply(tiny_mini(), s2ft.select(tiny_mini(), heads=0.5, channels=0.3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clone = _train(copy.deepcopy(model), "cpu", steps=1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # training the copy left the original untouched
    # The copy's updates landed in its own frozen weights.
    changed = [k for k, v in clone.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith(".weight") for k in changed) and any(k.endswith(".weight_t") for k in changed)
    model.to(torch.float32)
    for mdl in (clone, model):
        for m in mdl.modules():
            if isinstance(m, s2ft.RowSliceLinear):
                assert m.weight_slice.data_ptr() == m.weight.data_ptr()
                assert m.weight_slice.dtype == m.weight.dtype
            if isinstance(m, s2ft.ColumnSliceLinear):
                assert m.weight_slice.data_ptr() == m.weight_t.data_ptr()
                assert m.weight_slice.dtype == m.weight_t.dtype
    _train(model, "cpu", steps=1)  # float32 training works after the conversion
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k].float())]
    assert any(k.endswith(".weight_t") for k in changed)


# --- selection --------------------------------------------------------------------------------------

def test_select_counts_and_determinism():
    model = tiny_mini()
    s1 = s2ft.select(model, heads=0.5, channels=0.1, seed=3)
    assert s1 == s2ft.select(model, heads=0.5, channels=0.1, seed=3)
    assert s1 != s2ft.select(model, heads=0.5, channels=0.1, seed=4)
    assert s1.num_heads == 3  # 0.5 * (3 blocks * 2 kv heads)
    assert s1.num_channels == round(0.1 * 3 * INTER)
    # Channel draw independent of the head ratio.
    assert s2ft.select(model, heads=None, channels=0.1, seed=3).channels == s1.channels
    full = s2ft.select(model, heads=1.0, channels=1.0)
    assert full.num_heads == 6 and full.num_channels == 3 * INTER
    assert s2ft.Selection.from_dict(s1.to_dict()) == s1


def test_select_weight_norm_picks_largest():
    model = tiny_mini()
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[13].mul_(10)
        model.model.layers[1].self_attn.v_proj.weight[16:32].mul_(10)  # kv head 1 of block 1
    sel = s2ft.select(model, heads=1 / 6, channels=1 / 240, strategy="weight_norm")
    assert sel.channels == {"model.layers.2.mlp": (13,)}
    assert sel.heads == {"model.layers.1.self_attn": (1,)}
    assert sel.seed is None


# --- errors -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["heads", "channels"])
@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_ratio_out_of_range(name, bad):
    with pytest.raises(ValueError, match=name):
        s2ft.select(tiny_mini(), **{name: bad})


@pytest.mark.parametrize("bad", [True, "0.1", [0.1]])
def test_ratio_wrong_type(bad):
    with pytest.raises(TypeError, match="heads"):
        s2ft.select(tiny_mini(), heads=bad)


def test_other_errors():
    model = tiny_mini()
    with pytest.raises(ValueError, match="model: no attention or feed-forward"):
        s2ft.select(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    with pytest.raises(TypeError, match="model"):
        s2ft.select("not a model")
    with pytest.raises(ValueError, match="heads=0.01 selects none"):
        s2ft.select(model, heads=0.01, channels=None)
    with pytest.raises(ValueError, match="heads, channels"):
        s2ft.select(model, heads=None, channels=None)
    with pytest.raises(ValueError, match="strategy"):
        s2ft.select(model, strategy="magnitude")
    with pytest.raises(ValueError, match="seed"):
        s2ft.select(model, seed=-1)
    with pytest.raises(ValueError, match="heads=0.5: model has no attention"):
        mlp_only = nn.Module()
        mlp_only.mlp = model.model.layers[0].mlp
        s2ft.select(mlp_only, heads=0.5)
    sel = s2ft.select(model, heads=0.5, channels=0.3)
    empty = s2ft.Selection({}, {}, sel.head_counts, sel.channel_counts)
    with pytest.raises(ValueError, match="selection: selects no heads"):
        s2ft.apply(model, empty)
    with pytest.raises(TypeError, match="selection"):
        s2ft.apply(model, sel.to_dict())
    other_sel = s2ft.select(tiny_mini(layers=2), heads=0.5, channels=0.3)
    with pytest.raises(ValueError, match="selection: .*different model structure"):
        s2ft.apply(model, other_sel)
    bad_idx = s2ft.Selection({"model.layers.0.self_attn": (0, 2)}, {}, sel.head_counts, sel.channel_counts)
    with pytest.raises(ValueError, match=r"selection: heads\['model.layers.0.self_attn'\]"):
        s2ft.apply(model, bad_idx)
    with pytest.raises(ValueError, match="not applied"):
        s2ft.export(model)
    with pytest.raises(ValueError, match="not applied"):
        s2ft.merge(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # None of the failures above modified the model.
    s2ft.apply(model, sel)
    with pytest.raises(ValueError, match="already applied"):
        s2ft.apply(model, sel)
    with pytest.raises(ValueError, match="already applied"):
        s2ft.select(model)
    s2ft.unload(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_bad_adapter_leaves_model_unchanged():
    base = tiny_mini()
    model = _train(s2ft.apply(copy.deepcopy(base), s2ft.select(base, heads=0.5, channels=0.3)), "cpu")
    adapter = s2ft.export(model)
    target = copy.deepcopy(base)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(TypeError, match="adapter"):
        s2ft.load(target, [1, 2])
    with pytest.raises(ValueError, match="adapter: not an S²FT adapter"):
        s2ft.load(target, {**adapter, "format": "peft"})
    with pytest.raises(ValueError, match="adapter: unsupported version"):
        s2ft.load(target, {**adapter, "version": 99})
    name = next(iter(adapter["deltas"]))
    broken = copy.deepcopy(adapter)
    broken["deltas"][name]["delta"] = broken["deltas"][name]["delta"][:-1]
    with pytest.raises(ValueError, match=f"adapter: delta '{name}'"):
        s2ft.load(target, broken)
    broken = copy.deepcopy(adapter)
    del broken["deltas"][name]
    with pytest.raises(ValueError, match="adapter: its deltas do not match"):
        s2ft.load(target, broken)
    with pytest.raises(ValueError, match="selection: .*different model structure"):
        s2ft.load(tiny_mini(inter=64), adapter)
    assert s2ft._state(target) is None
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k])


def test_ftops_exports_s2ft():
    assert "s2ft" in ftops.__all__ and ftops.s2ft is s2ft
    for fn in (s2ft.select, s2ft.apply, s2ft.export, s2ft.merge, s2ft.load, s2ft.unload):
        assert fn.__doc__ and len(fn.__doc__) > 80


def test_ftops_fused_adamw_updates_slices_in_place(device):
    """The slices are contiguous parameters, so ftops' fused AdamW kernel trains them directly."""
    from ftops import _adamw

    model = s2ft.apply(tiny_mini(torch.float32, device), s2ft.select(tiny_mini(), heads=0.5, channels=0.3))
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
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight,
                           tiny_mini(torch.float32, device).model.layers[0].mlp.up_proj.weight)


def test_state_dict_checkpoint_resume(device):
    """A training checkpoint (model + optimizer state_dict) resumes on a freshly applied model."""
    base = tiny_mini(torch.float64, device)
    sel = s2ft.select(base, heads=0.5, channels=0.3, seed=8)
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
    # Still one storage per weight after load_state_dict.
    up = resumed.model.layers[0].mlp.up_proj
    if isinstance(up, s2ft.RowSliceLinear):
        assert up.weight_slice.data_ptr() == up.weight.data_ptr()
    # Exports agree, and are relative to the base model.
    a, b = s2ft.export(model), s2ft.export(resumed)
    for k in a["deltas"]:
        torch.testing.assert_close(a["deltas"][k]["delta"], b["deltas"][k]["delta"], rtol=1e-12, atol=1e-14)
