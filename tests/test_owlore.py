"""OwLore: OWL outlier ratios and the outlier-weighted / uniform (LISA) block sampler."""
import io
import itertools
import os

import pytest
import torch
from torch import nn

import ftops
from ftops.owlore import OwLore, find_blocks, galore_param_groups, outlier_ratios

transformers = pytest.importorskip("transformers")

# Upper 0.1% quantiles of the chi-square distribution (scipy.stats.chi2.ppf(0.999, df)).
CHI2_999 = {4: 18.4668, 9: 27.8772}


def tiny_llama(layers=4, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def tiny_bert(layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=layers, num_attention_heads=4,
                                  max_position_embeddings=64)
    return cfg


class Block(nn.Module):
    """Two bias-free Linear layers applied to the same input (like q/k projections)."""

    def __init__(self, w1, w2):
        super().__init__()
        self.a = nn.Linear(w1.shape[1], w1.shape[0], bias=False)
        self.b = nn.Linear(w2.shape[1], w2.shape[0], bias=False)
        with torch.no_grad():
            self.a.weight.copy_(w1)
            self.b.weight.copy_(w2)
        self.norm = nn.LayerNorm(w1.shape[1])  # not a Linear: must not count

    def forward(self, x):
        return self.a(x).sum() + self.b(x).sum()


class Stack(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.stages = nn.ModuleList(blocks)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return sum(blk(x) for blk in self.stages) + self.head(x).sum()


# ---------------------------------------------------------------------------------------------
# outlier_ratios


def test_outlier_ratios_hand_made():
    # Calibration tokens: two batches whose rows give column norms n = [1, 1, 1, 10]
    # (columns 0..2 from the first batch, column 3 split 6^2 + 8^2 = 10^2 across both batches).
    x1 = torch.tensor([[1.0, 0, 0, 6], [0, 1, 0, 0], [0, 0, 1, 0]])
    x2 = torch.tensor([[[0.0, 0, 0, 8]]])  # 3-D input: flattened to tokens
    # Block 0, layer a (3x4): all ones except a -100 in column 0 -> A = [100,1,1,10] pattern
    #   row 0: [100, 1, 1, 10], rows 1,2: [1, 1, 1, 10]; mean = (100 + 1 + 1 + 10 + 2 * 13) / 12
    #   = 11.5; M = 2 -> threshold 23: one outlier (the 100).
    w0a = torch.ones(3, 4)
    w0a[0, 0] = -100.0
    # Block 0, layer b (2x4): ones -> A rows [1, 1, 1, 10]; mean 3.25, threshold 6.5: column 3
    # is an outlier in both rows -> 2.
    w0b = torch.ones(2, 4)
    # Block 1, layer a: ones but column 3 is 0.01 -> A rows [1, 1, 1, 0.1]: no outlier;
    # layer b: zero weights but one 50 at [1, 2] -> A = 50 there; mean 50/8, threshold 12.5: 1.
    w1a = torch.ones(3, 4)
    w1a[:, 3] = 0.01
    w1b = torch.zeros(2, 4)
    w1b[1, 2] = 50.0
    model = Stack([Block(w0a, w0b), Block(w1a, w1b)])
    per_layer = dict(blocks=model.stages, mean_over="layer")
    ratios = outlier_ratios(model, [x1, x2], M=2.0, **per_layer)
    assert ratios == [pytest.approx((1 + 2) / 20, abs=0), pytest.approx(1 / 20, abs=0)]
    # With only the first batch, column 3 has norm 6: block 0 layer b still has 2 outliers
    # (mean 9/4, threshold 4.5), layer a: mean (100+1+1+6+2*9)/12 = 10.5, threshold 21 -> 1.
    assert outlier_ratios(model, [x1], M=2.0, **per_layer)[0] == pytest.approx(3 / 20, abs=0)
    # A larger M leaves only the 100 (threshold 11.5 * 8 = 92) and the 50 (6.25 * 8 = 50: not > 50).
    assert outlier_ratios(model, [x1, x2], M=8.0, **per_layer) == [1 / 20, 0.0]
    # tuple batches are unpacked as positional arguments; a generator of batches works
    assert outlier_ratios(model, ((x,) for x in (x1, x2)), M=2.0, **per_layer) == \
        pytest.approx([3 / 20, 1 / 20], abs=0)
    # Over the block (OWL, the default): block 0's 20 scores sum to 138 + 26 = 164, mean 8.2,
    # threshold 16.4: only the 100 (layer b's 10s are below it). Block 1: 9.3 + 50 = 59.3, mean
    # 2.965, threshold 5.93: the 50.
    assert outlier_ratios(model, [x1, x2], blocks=model.stages, M=2.0) == [1 / 20, 1 / 20]
    # mean 8.2 * M=1.2 -> 9.84: the 100 and block 0's five 10s; block 1: 3.558, the 50 only
    assert outlier_ratios(model, [x1, x2], blocks=model.stages, M=1.2) == [6 / 20, 1 / 20]


def test_outlier_ratios_mean_over_block():
    # Layer a holds the block's large scores, layer b only small ones. Per layer: a has no outlier
    # (uniform), b has one (a 10 among ones). Over the block: mean = (12*100 + 7 + 10)/20 = 60.85,
    # threshold 2 * 60.85 = 121.7: nothing; with M = 1.5 (91.3) all of a's 12 entries are above.
    x = torch.eye(4)
    wa = torch.full((3, 4), 100.0)
    wb = torch.ones(2, 4)
    wb[0, 1] = 10.0
    model = Stack([Block(wa, wb)])
    assert outlier_ratios(model, [x], blocks=model.stages, M=2.0, mean_over="layer") == [1 / 20]
    assert outlier_ratios(model, [x], blocks=model.stages, M=2.0, mean_over="block") == [0.0]
    assert outlier_ratios(model, [x], blocks=model.stages, M=2.0) == [0.0]  # the default: block
    assert outlier_ratios(model, [x], blocks=model.stages, M=1.5, mean_over="block") == [12 / 20]


def _bruteforce_ratios(model, blocks, batches, M, mean_over):
    """Stores every input (float64), then applies the OWL definition literally."""
    inputs = {}
    hooks = []
    for blk in blocks:
        for m in blk.modules():
            if isinstance(m, nn.Linear):
                hooks.append(m.register_forward_hook(
                    lambda mod, args, out: inputs.setdefault(mod, []).append(
                        args[0].detach().double().reshape(-1, mod.in_features))))
    with torch.no_grad():
        for b in batches:
            model(**{k: v.to(next(model.parameters()).device) for k, v in b.items()})
    for h in hooks:
        h.remove()
    ratios = []
    for blk in blocks:
        scores = []
        for m in blk.modules():
            if isinstance(m, nn.Linear):
                X = torch.cat(inputs[m])
                scores.append(m.weight.detach().double().abs() * X.norm(dim=0))
        if mean_over == "block":
            mu = torch.cat([s.flatten() for s in scores]).mean()
            count = sum(int((s > M * mu).sum()) for s in scores)
        else:
            count = sum(int((s > M * s.mean()).sum()) for s in scores)
        ratios.append(count / sum(s.numel() for s in scores))
    return ratios


@pytest.mark.parametrize("mean_over", ["layer", "block"])
def test_outlier_ratios_llama_matches_bruteforce(mean_over, device):
    model = tiny_llama(layers=3).to(device)
    with torch.no_grad():  # heavy-tailed weights so that the counts are not all zero
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape).pow(3))
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 64, (2, 9), generator=g)} for _ in range(3)]
    got = outlier_ratios(model, batches, M=5.0, mean_over=mean_over)
    want = _bruteforce_ratios(model, model.model.layers, batches, 5.0, mean_over)
    assert len(got) == 3
    assert any(r > 0 for r in want)
    # the same float64 scores summed in another order: allow one borderline entry per block
    numel = sum(m.weight.numel() for m in model.model.layers[0].modules()
                if isinstance(m, nn.Linear))
    for a, b in zip(got, want):
        assert abs(a - b) <= 1 / numel + 1e-15


def test_find_blocks_transformers_models():
    llama = tiny_llama(layers=2)
    assert find_blocks(llama) is llama.model.layers
    assert find_blocks(llama.model) is llama.model.layers
    cfg = tiny_bert(layers=3)
    bert = transformers.BertModel(cfg)
    assert find_blocks(bert) is bert.encoder.layer
    clf = transformers.BertForSequenceClassification(cfg)
    assert find_blocks(clf) is clf.bert.encoder.layer
    assert len(find_blocks(clf)) == 3
    # default blocks= in outlier_ratios: one ratio per layer, BERT batches as dicts
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    r = outlier_ratios(clf, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], M=3.0)
    assert len(r) == 3 and all(0.0 <= x <= 1.0 for x in r)
    with pytest.raises(ValueError, match="could not find the transformer blocks"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="pass blocks="):
        outlier_ratios(nn.Linear(2, 2), [torch.zeros(1, 2)])


def test_outlier_ratios_restores_modes_no_grad_and_removes_hooks():
    model = tiny_llama(layers=2)
    model.train()
    model.model.layers[1].mlp.eval()  # mixed modes must come back as they were
    modes = {n: m.training for n, m in model.named_modules()}
    seen = []
    probe = model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda m, a, o: seen.append((m.training, torch.is_grad_enabled())))
    ids = torch.randint(0, 64, (1, 5))
    outlier_ratios(model, [{"input_ids": ids}])
    assert seen == [(False, False)]
    assert {n: m.training for n, m in model.named_modules()} == modes
    probe.remove()
    hooks = lambda: sum(len(m._forward_hooks) for m in model.modules())  # noqa: E731
    assert hooks() == 0
    # a batch that makes the forward raise: hooks removed and modes restored all the same
    with pytest.raises(Exception):
        outlier_ratios(model, [{"input_ids": ids}, {"input_ids": ids.float()}])
    assert hooks() == 0
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())


def test_outlier_ratios_errors():
    model = Stack([Block(torch.ones(3, 4), torch.ones(2, 4))])
    x = torch.eye(4)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="M must be"):
            outlier_ratios(model, [x], blocks=model.stages, M=bad)
    with pytest.raises(TypeError, match="M must be a real number"):
        outlier_ratios(model, [x], blocks=model.stages, M="7")
    with pytest.raises(ValueError, match="batches is empty"):
        outlier_ratios(model, [], blocks=model.stages)
    with pytest.raises(ValueError, match="mean_over"):
        outlier_ratios(model, [x], blocks=model.stages, mean_over="model")
    with pytest.raises(ValueError, match="no non-empty nn.Linear"):
        outlier_ratios(model, [x], blocks=[model.stages[0].norm])
    with pytest.raises(ValueError, match="empty"):
        outlier_ratios(model, [x], blocks=[])
    # a block in which one Linear layer never runs: left out, with a warning
    class HalfBlock(Block):
        def forward(self, x):
            return self.a(x).sum()

    w = torch.ones(3, 4)
    w[0, 0] = 100.0
    half = Stack([HalfBlock(w, torch.full((2, 4), 1e6))])
    with pytest.warns(UserWarning, match="1 of its 2 Linear layers received no input"):
        assert outlier_ratios(half, [x], blocks=half.stages, M=2.0) == [1 / 12]
    # a block of the model that does not take part in the forward
    model.unused = Block(torch.ones(3, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"blocks\[1\]: none of its Linear layers ran"):
        outlier_ratios(model, [x], blocks=[model.stages[0], model.unused])


# ---------------------------------------------------------------------------------------------
# the sampler


def _blocks(n, dim=3):
    return nn.ModuleList(nn.Linear(dim, dim) for _ in range(n))


def test_gamma1_frequencies_follow_ratios_chi_square():
    ratios = [1.0, 2.0, 3.0, 4.0, 10.0]
    s = OwLore(_blocks(5), ratios, gamma=1, period=1, seed=123)
    n = 4000
    counts = torch.zeros(5)
    for _ in range(n):
        s.step()
        assert len(s.active) == 1
        counts[s.active[0]] += 1
    p = torch.tensor(ratios) / sum(ratios)
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert chi2 < CHI2_999[4], (counts, chi2)
    # the same counts are far from uniform (so the test above can tell the two apart)
    u = torch.full((5,), n / 5)
    assert float(((counts - u) ** 2 / u).sum()) > 100 * CHI2_999[4]


def test_gamma2_pairs_follow_successive_sampling():
    """Pairs drawn without replacement: P({i,j}) = p_i p_j / (1 - p_i) + p_j p_i / (1 - p_j)."""
    ratios = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])
    p = ratios / ratios.sum()
    s = OwLore(_blocks(5), ratios, gamma=2, period=1, seed=7)
    n = 4000
    pairs = list(itertools.combinations(range(5), 2))
    counts = dict.fromkeys(pairs, 0)
    for _ in range(n):
        s.step()
        assert len(s.active) == 2 and s.active == sorted(set(s.active))
        counts[tuple(s.active)] += 1
    chi2 = 0.0
    for i, j in pairs:
        e = n * float(p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j]))
        chi2 += (counts[(i, j)] - e) ** 2 / e
    assert chi2 < CHI2_999[9], (counts, chi2)


def test_uniform_is_lisa_and_zero_ratio_never_sampled():
    s = OwLore(_blocks(4), None, gamma=1, period=1, seed=0)
    counts = torch.zeros(4)
    for _ in range(2000):
        s.step()
        counts[s.active[0]] += 1
    assert float(((counts - 500) ** 2 / 500).sum()) < 16.27  # chi2.ppf(0.999, 3)
    s = OwLore(_blocks(4), [0.0, 1.0, 0.0, 1.0], gamma=2, period=1)
    for _ in range(200):
        s.step()
        assert s.active == [1, 3]
    with pytest.raises(ValueError, match="only 1 block"):
        OwLore(_blocks(4), [0.0, 1.0, 0.0, 0.0], gamma=2)


def test_requires_grad_gamma_active_period_and_outside_untouched():
    model = tiny_llama(layers=6)
    outside = [p for n, p in model.named_parameters() if not n.startswith("model.layers.")]
    model.model.norm.weight.requires_grad_(False)  # a user's choice outside the blocks stays
    s = OwLore(model.model.layers, gamma=2, period=3, seed=5)
    assert s.active == []
    assert all(p.requires_grad for p in model.model.layers.parameters())  # nothing before step()
    seen = []
    for step in range(12):
        s.step()
        if step % 3:
            assert s.active == seen[-1]  # no redraw inside a period
        seen.append(list(s.active))
        assert len(s.active) == 2 and s.active == sorted(s.active)
        for b, layer in enumerate(model.model.layers):
            assert all(p.requires_grad == (b in s.active) for p in layer.parameters())
        assert [p.requires_grad for p in outside] == \
            [p is not model.model.norm.weight for p in outside]
    assert s.history == [seen[k] for k in (0, 3, 6, 9)]
    assert len({tuple(a) for a in s.history}) > 1


def _state_bytes(opt):
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if torch.is_tensor(t))


def _train(model, sampler, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        sampler.step()
        ids = torch.randint(0, 64, (2, 8), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _optimizers():
    out = [pytest.param(lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1),
                        id="torch-AdamW")]
    galore = getattr(ftops, "GaLoreAdamW", None)
    out.append(pytest.param(
        lambda ps: galore(ps, lr=1e-3, weight_decay=0.1), id="ftops-GaLoreAdamW",
        marks=pytest.mark.skipif(galore is None, reason="ftops.GaLoreAdamW not in this build")))
    return out


@pytest.mark.parametrize("make_opt", _optimizers())
@pytest.mark.parametrize("keep_state", [False, True])
def test_optimizer_state_freed_or_kept(make_opt, keep_state):
    model = tiny_llama(layers=6)
    blocks = model.model.layers
    groups = galore_param_groups(model, blocks, rank=4, update_proj_gap=5, scale=1.0,
                                 proj_type="std")
    opt = make_opt(groups)
    s = OwLore(blocks, gamma=2, period=2, seed=3, optimizer=opt, keep_state=keep_state)
    outside = {p for n, p in model.named_parameters() if not n.startswith("model.layers.")}
    ever = set()
    for k in range(6):
        before = {b: [p.detach().clone() for p in blocks[b].parameters()] for b in range(6)}
        _train(model, s, opt, 2, seed=k)
        ever |= set(s.active)
        with_state = {b for b in range(6) if any(p in opt.state for p in blocks[b].parameters())}
        assert with_state == (ever if keep_state else set(s.active))
        assert outside <= set(opt.state)  # outside the blocks: always trained, state never freed
        for b in range(6):  # inactive blocks neither move nor hold gradients
            if b not in s.active:
                assert all(torch.equal(p, q) for p, q in zip(blocks[b].parameters(), before[b]))
                assert all(p.grad is None for p in blocks[b].parameters())
            else:
                assert not all(torch.equal(p, q) for p, q in zip(blocks[b].parameters(), before[b]))
    assert len(ever) > 2  # the run visited more blocks than gamma, so freeing made a difference
    if not keep_state:
        assert set(opt.state) == outside | {p for b in s.active for p in blocks[b].parameters()}


@pytest.mark.skipif(not hasattr(ftops, "layerwise"), reason="ftops.layerwise not in this build")
def test_layerwise_optimizer_state_freed():
    """Per-parameter optimizers stepped during backward (ftops.layerwise): its `state` view."""
    model = tiny_llama(layers=4)
    blocks = model.model.layers
    lw = ftops.layerwise(model, lambda p: torch.optim.AdamW([p], lr=1e-3))
    s = OwLore(blocks, gamma=1, period=1, seed=2, optimizer=lw)
    outside = {p for n, p in model.named_parameters() if not n.startswith("model.layers.")}
    visited = set()
    for k in range(4):
        _train(model, s, lw, 1, seed=k)
        visited |= set(s.active)
        assert set(lw.state) == outside | set(s.block_parameters(s.active[0]))
    assert len(visited) > 1


def test_stale_gradients_dropped_on_switch():
    blocks = _blocks(3)
    opt = torch.optim.SGD(blocks.parameters(), lr=1.0)
    s = OwLore(blocks, gamma=1, period=1, seed=0, optimizer=opt)
    s.step()
    for p in blocks.parameters():
        p.grad = torch.ones_like(p)
    first = s.active
    while s.active == first:
        s.step()
    # the block that was active holds a stale gradient no more: SGD must leave it alone
    saved = [p.detach().clone() for p in blocks[first[0]].parameters()]
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(blocks[first[0]].parameters(), saved))
    assert all(p.grad is None for b in range(3) if b not in s.active
               for p in blocks[b].parameters())
    assert all(p.grad is not None for p in blocks[s.active[0]].parameters())


def test_optimizer_list_and_state_keys():
    blocks = _blocks(3)
    opts = [torch.optim.Adam([p], lr=0.1) for p in blocks.parameters()]
    for o in opts:
        o.param_groups[0]["params"][0].grad = torch.ones_like(o.param_groups[0]["params"][0])
        o.step()
    s = OwLore(blocks, gamma=1, period=1, seed=0, optimizer=opts)
    s.step()
    kept = {p for b in s.active for p in blocks[b].parameters()}
    for o in opts:
        p = o.param_groups[0]["params"][0]
        assert (p in o.state) == (p in kept)
    # a dict {param: optimizer}, as per-parameter (layerwise) training keeps them
    by_param = {o.param_groups[0]["params"][0]: o for o in opts}
    for p, o in by_param.items():
        p.requires_grad_(True)
        p.grad = torch.ones_like(p)
        o.step()
    s = OwLore(blocks, gamma=1, period=1, seed=1, optimizer=by_param)
    s.step()
    kept = {p for b in s.active for p in blocks[b].parameters()}
    assert {p for p, o in by_param.items() if p in o.state} == kept


def test_resume_same_samples_and_active_set():
    ratios = [0.5, 1.0, 2.0, 0.1, 3.0, 1.5]
    ref = OwLore(_blocks(6), ratios, gamma=2, period=3, seed=11)
    seq = []
    for _ in range(30):
        ref.step()
        seq.append(list(ref.active))

    a = OwLore(_blocks(6), ratios, gamma=2, period=3, seed=11)
    for _ in range(13):  # mid-period
        a.step()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    blocks = _blocks(6)
    b = OwLore(blocks, ratios, gamma=2, period=3, seed=999)  # another seed: the state decides
    b.load_state_dict(state)
    assert b.active == seq[12] and b.steps == 13
    for i, blk in enumerate(blocks):  # the active set is applied on load
        assert all(p.requires_grad == (i in b.active) for p in blk.parameters())
    for k in range(13, 30):
        b.step()
        assert b.active == seq[k], k
    # a fresh sampler's state round-trips too (nothing drawn yet)
    c = OwLore(_blocks(6), ratios, gamma=2, period=3, seed=11)
    c.load_state_dict(OwLore(_blocks(6), ratios, gamma=2, period=3, seed=11).state_dict())
    c.step()
    assert c.active == seq[0]


def test_load_state_dict_mismatch():
    s = OwLore(_blocks(4), [1, 2, 3, 4], gamma=2, period=3)
    s.step()
    st = s.state_dict()
    with pytest.raises(ValueError, match="gamma=2"):
        OwLore(_blocks(4), [1, 2, 3, 4], gamma=1, period=3).load_state_dict(st)
    with pytest.raises(ValueError, match="period=3"):
        OwLore(_blocks(4), [1, 2, 3, 4], gamma=2, period=2).load_state_dict(st)
    with pytest.raises(ValueError, match="num_blocks=4"):
        OwLore(_blocks(5), None, gamma=2, period=3).load_state_dict(st)
    with pytest.raises(ValueError, match="different ratios"):
        OwLore(_blocks(4), None, gamma=2, period=3).load_state_dict(st)
    with pytest.raises(KeyError, match="rng_state"):
        OwLore(_blocks(4), [1, 2, 3, 4], gamma=2, period=3).load_state_dict(
            {k: v for k, v in st.items() if k != "rng_state"})


def test_sampler_errors():
    bl = _blocks(4)
    for gamma in (0, 5, -1):
        with pytest.raises(ValueError, match="gamma"):
            OwLore(bl, gamma=gamma)
    for gamma in (1.5, True):
        with pytest.raises(TypeError, match="gamma"):
            OwLore(bl, gamma=gamma)
    for period in (0, -2):
        with pytest.raises(ValueError, match="period"):
            OwLore(bl, gamma=1, period=period)
    with pytest.raises(TypeError, match="period"):
        OwLore(bl, gamma=1, period=2.0)
    with pytest.raises(ValueError, match="3 entries but there are 4 blocks"):
        OwLore(bl, [1, 2, 3], gamma=1)
    for bad in ([1, -1, 2, 3], [1, float("nan"), 2, 3], [1, float("inf"), 1, 1]):
        with pytest.raises(ValueError, match="finite and >= 0"):
            OwLore(bl, bad, gamma=1)
    with pytest.raises(ValueError, match="fewer than gamma=3"):
        OwLore(bl, [0, 0, 1, 1], gamma=3)
    shared = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="share a parameter"):
        OwLore([nn.Sequential(shared), nn.Sequential(shared, nn.Linear(3, 3))], gamma=1)
    with pytest.raises(TypeError, match="sequence of modules"):
        OwLore(nn.Linear(3, 3), gamma=1)
    with pytest.raises(TypeError, match="not an nn.Module"):
        OwLore([nn.Linear(3, 3), 4], gamma=1)
    with pytest.raises(TypeError, match="optimizer"):
        OwLore(bl, gamma=1, optimizer=42)


def test_galore_param_groups():
    model = tiny_llama(layers=2)
    groups = galore_param_groups(model, rank=8, update_proj_gap=50, scale=0.25, proj_type="std")
    rest, proj = groups
    assert {k: proj[k] for k in ("rank", "update_proj_gap", "scale", "proj_type")} == \
        dict(rank=8, update_proj_gap=50, scale=0.25, proj_type="std")
    names = {id(p): n for n, p in model.named_parameters()}
    proj_names = sorted(names[id(p)] for p in proj["params"])
    assert len(proj_names) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert all((".self_attn." in n or ".mlp." in n) and n.endswith("weight") for n in proj_names)
    rest_names = {names[id(p)] for p in rest["params"]}
    assert {"model.embed_tokens.weight", "model.norm.weight"} <= rest_names
    assert len(rest["params"]) + len(proj["params"]) == len(list(model.parameters()))


# ---------------------------------------------------------------------------------------------
# the reference's definitions: OWL's ratio, OwLore's probabilities and draws


class _WandaScaler:
    """OWL's per-layer input statistic (Wanda's ``scaler_row``): a running mean over the batch
    dimension of the squared column norms, in float32."""

    def __init__(self, cols):
        self.row = torch.zeros(cols)
        self.n = 0

    def add(self, inp):
        inp = inp.unsqueeze(0) if inp.dim() == 2 else inp
        t = inp.shape[0]
        cols = inp.reshape(-1, inp.shape[-1]).t().float()
        self.row *= self.n / (self.n + t)
        self.n += t
        self.row += cols.norm(p=2, dim=1) ** 2 / self.n


def _owl_reference_percent(model, blocks, batches, M):
    """OWL's ratio as luuyin/OWL computes it: per block, the float32 scores |W| * sqrt(scaler_row)
    of every Linear flattened and concatenated; percent of them above M times their mean."""
    scalers, hooks = {}, []
    for blk in blocks:
        for m in blk.modules():
            if isinstance(m, nn.Linear):
                scalers[m] = _WandaScaler(m.in_features)
                hooks.append(m.register_forward_hook(
                    lambda mod, args, out: scalers[mod].add(args[0].detach())))
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    out = []
    for blk in blocks:
        scores = torch.cat([(m.weight.detach().abs() * scalers[m].row.sqrt().reshape(1, -1))
                            .flatten() for m in blk.modules() if isinstance(m, nn.Linear)])
        out.append(float((scores > scores.mean() * M).sum()) / scores.numel() * 100)
    return out


def test_default_ratio_is_owls():
    """The default (block mean, M=13) is OWL's check_outlier_mean over the block's concatenated
    scores, in fractions where OWL prints percents; the per-layer variant differs."""
    model = tiny_llama(layers=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape).pow(3))
    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(0, 64, (3, 11), generator=g)} for _ in range(2)]
    got = outlier_ratios(model, batches)
    assert got == outlier_ratios(model, batches, M=13.0, mean_over="block")
    want = _owl_reference_percent(model, model.model.layers, batches, 13.0)
    assert all(r > 0 for r in want)
    numel = sum(m.weight.numel() for m in model.model.layers[0].modules()
                if isinstance(m, nn.Linear))
    for a, b in zip(got, want):  # float64 against OWL's float32: one borderline entry at most
        assert abs(100 * a - b) <= 100 / numel + 1e-12
    assert outlier_ratios(model, batches, mean_over="layer") != got


def _reference_draws(ratios, n, gamma, period, steps):
    """pixeli99/OwLore's DynamicLayerActivationCallback: at every global step that is a multiple
    of the interval, p = ratio / (the sum of the ratios, added left to right) (None: uniform),
    then numpy.random.choice(range(n), gamma, replace=False, p=p) from numpy's global RNG."""
    import numpy as np

    draws = []
    for step in range(steps):
        if step % period == 0:
            p = None
            if ratios is not None:
                total = 0.0
                for r in ratios:
                    total += r
                p = np.array([r / total for r in ratios])
            draws.append(sorted(int(i) for i in np.random.choice(range(n), gamma, replace=False,
                                                                  p=p)))
    return draws


@pytest.mark.parametrize("ratios", [None, [2.678e-1, 2.953e-1, 1.274e-1, 1.145e-1, 9.88e-2,
                                           8.84e-2, 8.78e-2]], ids=["uniform", "owl"])
def test_seed_none_draws_as_the_reference(ratios):
    """seed=None: numpy's global RNG, the reference's call: the same blocks, draw for draw."""
    np = pytest.importorskip("numpy")
    np.random.seed(111)
    want = _reference_draws(ratios, 7, 3, 4, 40)
    np.random.seed(111)
    s = OwLore(_blocks(7), ratios, gamma=3, period=4, seed=None)
    for _ in range(40):
        s.step()
    assert s.history == want and len(want) == 10
    if ratios is not None:  # the reference's p, to the bit: the sum is added left to right
        total = 0.0
        for r in ratios:
            total += r
        assert s.probs.tolist() == [r / total for r in ratios]
    st = s.state_dict()
    assert st["rng_state"].numel() == 0  # numpy's RNG is the program's: saved by the Trainer
    with pytest.raises(ValueError, match="seed=None"):
        OwLore(_blocks(7), ratios, gamma=3, period=4, seed=0).load_state_dict(st)
    with pytest.raises(ValueError, match="numpy's global RNG"):
        OwLore(_blocks(7), ratios, gamma=3, period=4, seed=None).load_state_dict(
            OwLore(_blocks(7), ratios, gamma=3, period=4, seed=0).state_dict())
    resumed = OwLore(_blocks(7), ratios, gamma=3, period=4, seed=None)
    resumed.load_state_dict(st)
    assert resumed.active == s.active and resumed.steps == 40


def _numpy_draws_body(rank, world, out_dir):
    import numpy as np

    np.random.seed(100 + rank)  # another seed on every rank: rank 0's draws must win
    s = OwLore(_blocks(5), [1.0, 2.0, 3.0, 4.0, 5.0], gamma=2, period=2, seed=None)
    for _ in range(12):
        s.step()
    torch.save(s.history, os.path.join(out_dir, f"draws_{rank}.pt"))


def test_seed_none_distributed_ranks_draw_rank0s_blocks(tmp_path):
    np = pytest.importorskip("numpy")
    from _dist import spawn

    spawn(_numpy_draws_body, 2, tmp_path)
    h0, h1 = (torch.load(tmp_path / f"draws_{r}.pt", weights_only=True) for r in (0, 1))
    np.random.seed(100)
    assert h0 == h1 == _reference_draws([1.0, 2.0, 3.0, 4.0, 5.0], 5, 2, 2, 12)
    np.random.seed(101)
    assert _reference_draws([1.0, 2.0, 3.0, 4.0, 5.0], 5, 2, 2, 12) != h0  # rank 1's own seed


def test_reference_configuration():
    """pixeli99/OwLore's released configuration (owlore_scripts/run_owlore_low_rank.sh and its
    finetuner): gamma 5 (lisa_activated_layers), period 50 (lisa_interval_steps), GaLore rank 256,
    update_proj_gap 100, scale 1.0, proj_type std on the attention and MLP Linears, lr 3e-4,
    probabilities from OWL ratios at M=13; run through ftops on a small Llama-shaped model whose
    projections are all larger than the rank."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=384, intermediate_size=768,
                                   num_hidden_layers=8, num_attention_heads=6,
                                   num_key_value_heads=6, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # heavy-tailed weights: outliers above 13x the mean in every block
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape).pow(3) * 0.02)
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, 128, (2, 16), generator=g)} for _ in range(2)]
    blocks = find_blocks(model)
    names = {id(p): n for n, p in model.named_parameters()}

    ratios = outlier_ratios(model, calib)  # M=13 over the block's scores
    assert ratios == outlier_ratios(model, calib, M=13.0, mean_over="block")
    assert all(r > 0 for r in ratios)

    # GaLore on exactly the weights the reference's name rule picks, with its settings
    groups = galore_param_groups(model)
    rest, proj = groups
    assert [id(p) for p in proj["params"]] == \
        [id(p) for p in galore_param_groups(model, targets=("attn", "mlp"))[1]["params"]]
    assert {k: proj[k] for k in ("rank", "update_proj_gap", "scale", "proj_type")} == \
        dict(rank=256, update_proj_gap=100, scale=1.0, proj_type="std")
    kinds = sorted({names[id(p)].split(".", 3)[3] for p in proj["params"]})
    assert kinds == ["mlp.down_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                     "self_attn.k_proj.weight", "self_attn.o_proj.weight",
                     "self_attn.q_proj.weight", "self_attn.v_proj.weight"]
    assert len(proj["params"]) == 7 * 8
    rest_names = {names[id(p)] for p in rest["params"]}  # full-rank AdamW
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
            "model.layers.0.input_layernorm.weight"} <= rest_names
    opt = ftops.GaLoreAdamW(groups, lr=3e-4)
    assert [grp["lr"] for grp in opt.param_groups] == [3e-4, 3e-4]

    sampler = OwLore(blocks, ratios, gamma=5, period=50, seed=111, optimizer=opt)
    assert torch.allclose(sampler.probs, torch.tensor(ratios, dtype=torch.float64) / sum(ratios),
                          rtol=1e-15, atol=0)
    outside = [p for n, p in model.named_parameters() if not n.startswith("model.layers.")]

    def train_step():
        ids = torch.randint(0, 128, (2, 16), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    drew_at = []
    for step in range(150):
        if sampler.step():
            drew_at.append(step)
        assert len(sampler.active) == 5  # 5 blocks train at once, the others are frozen
        assert [b for b in range(8) if all(p.requires_grad for p in blocks[b].parameters())] \
            == sampler.active
        assert not any(p.requires_grad for b in range(8) if b not in sampler.active
                       for p in blocks[b].parameters())
        assert all(p.requires_grad for p in outside)  # always trained
        if step in (0, 50):
            frozen = {b: [p.detach().clone() for p in blocks[b].parameters()]
                      for b in range(8) if b not in sampler.active}
            train_step()
            for b, saved in frozen.items():
                assert all(torch.equal(p, q) for p, q in zip(blocks[b].parameters(), saved))
            trained = {p for b in sampler.active for p in blocks[b].parameters()}
            assert set(opt.state) == set(outside) | trained  # left blocks' state freed
            for p in proj["params"]:
                if p in trained:  # low-rank moments: right side for out >= in, left otherwise
                    m, n = p.shape
                    want = (m, 256) if m >= n else (256, n)
                    assert opt.state[p]["exp_avg"].shape == want, names[id(p)]
            for p in outside:
                assert opt.state[p]["exp_avg"].shape == p.shape
    assert drew_at == [0, 50, 100]  # the first step, then every 50
    assert len(sampler.history) == 3 and len({tuple(a) for a in sampler.history}) > 1


# ---------------------------------------------------------------------------------------------
# the hostile-input probe: every public OwLore entry point, bad arguments and faults


def _hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


class TestOwLoreHostileInputs:
    """Wrong types, values, shapes, NaN, empty inputs, duplicates, a failing forward and states
    from elsewhere: each raises a clear error naming the argument, and changes nothing."""

    # --- outlier_ratios -----------------------------------------------------------------------

    def test_outlier_ratios_arguments(self):
        model = Stack([Block(torch.ones(3, 4), torch.ones(2, 4))])
        x = torch.eye(4)
        kw = dict(blocks=model.stages)
        with pytest.raises(TypeError, match="outlier_ratios: model must be a torch.nn.Module"):
            outlier_ratios("model", [x], **kw)
        for bad in (None, 5):
            with pytest.raises(TypeError, match="outlier_ratios: batches must be an iterable"):
                outlier_ratios(model, bad, **kw)
        for bad in (x, {"x": x}, "text"):  # one batch instead of an iterable of batches
            with pytest.raises(TypeError, match=r"outlier_ratios: batches .* pass \[batch\]"):
                outlier_ratios(model, bad, **kw)
        for empty in ([], iter(())):
            with pytest.raises(ValueError, match="outlier_ratios: batches is empty"):
                outlier_ratios(model, empty, **kw)
        with pytest.raises(TypeError, match="M must be a real number"):
            outlier_ratios(model, [x], M=None, **kw)
        with pytest.raises(TypeError, match="M must be a real number"):
            outlier_ratios(model, [x], M=True, **kw)
        with pytest.raises(ValueError, match="mean_over must be 'block' or 'layer'"):
            outlier_ratios(model, [x], mean_over=None, **kw)
        with pytest.raises(TypeError, match="blocks must be a sequence of modules"):
            outlier_ratios(model, [x], blocks=model.stages[0])
        with pytest.raises(TypeError, match=r"blocks\[0\] is a int"):
            outlier_ratios(model, [x], blocks=[1, 2])
        with pytest.raises(TypeError, match="blocks must be a sequence of nn.Module"):
            outlier_ratios(model, [x], blocks="stages")
        with pytest.raises(ValueError, match="the same module more than once"):
            outlier_ratios(model, [x], blocks=[model.stages[0], model.stages[0]])
        with pytest.raises(ValueError, match=r"blocks\[0\] \(Block\) is not a submodule of model"):
            outlier_ratios(model, [x], blocks=[Block(torch.ones(3, 4), torch.ones(2, 4))])
        # a model without blocks (none found, none given)
        with pytest.raises(ValueError, match="could not find the transformer blocks"):
            outlier_ratios(nn.Sequential(nn.Linear(4, 4)), [x])
        with pytest.raises(TypeError, match="find_blocks: model must be"):
            find_blocks([nn.Linear(2, 2)])
        assert _hooks(model) == 0

    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
    def test_outlier_ratios_non_finite_weight(self, bad):
        model = tiny_llama(layers=3)
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[2, 5] = bad
        ids = torch.randint(0, 64, (2, 5))
        with pytest.raises(ValueError, match=r"weight of blocks\[1\] layer "
                                             r"'model.layers.1.mlp.down_proj' holds NaN or inf"):
            outlier_ratios(model, [{"input_ids": ids}])
        assert _hooks(model) == 0

    @pytest.mark.parametrize("bad", [float("nan"), float("inf")])
    def test_outlier_ratios_non_finite_activation(self, bad):
        # block 1's first layer sees a NaN/inf in the second batch only
        model = Stack([Block(torch.ones(3, 4), torch.ones(2, 4)),
                       Block(torch.ones(3, 4), torch.ones(2, 4))])
        model.train()
        x = torch.eye(4)
        y = x.clone()
        y[1, 2] = bad
        calls = []

        def poison(mod, args):
            calls.append(1)
            return (y,) if len(calls) == 2 else None

        h = model.stages[1].a.register_forward_pre_hook(poison)
        with pytest.raises(ValueError, match=r"calibration input of blocks\[1\] layer 'stages.1.a' "
                                             "holds NaN or inf"):
            outlier_ratios(model, [x, x], blocks=model.stages)
        h.remove()
        assert _hooks(model) == 0 and model.training and model.stages[1].a.training

    def test_outlier_ratios_failing_forward_removes_hooks(self):
        model = tiny_llama(layers=2)
        model.train()
        ids = torch.randint(0, 64, (1, 5))
        with pytest.raises(RuntimeError) as info:  # float ids: the embedding raises
            outlier_ratios(model, [{"input_ids": ids}, {"input_ids": ids.float()}])
        assert any("calibration batch 1" in n for n in getattr(info.value, "__notes__", []))
        assert _hooks(model) == 0
        assert all(m.training for m in model.modules())
        assert all(p.grad is None for p in model.parameters())

    def test_outlier_ratios_meta_and_integer_weights(self):
        model = Stack([Block(torch.ones(3, 4), torch.ones(2, 4))])
        model.stages[0].b.weight = nn.Parameter(torch.ones(2, 4, dtype=torch.int8),
                                                requires_grad=False)
        with pytest.raises(TypeError, match="has dtype torch.int8"):
            outlier_ratios(model, [torch.eye(4)], blocks=model.stages)
        with torch.device("meta"):
            meta = Stack([Block(torch.ones(3, 4), torch.ones(2, 4))])
        with pytest.raises(ValueError, match="is on the meta device"):
            outlier_ratios(meta, [torch.eye(4)], blocks=meta.stages)

    @pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
    def test_outlier_ratios_zero_size_linear_left_out(self):
        model = Stack([Block(torch.ones(3, 4), torch.ones(2, 4))])
        model.stages[0].empty = nn.Linear(4, 0)  # registered, never run, no entries
        w = torch.ones(3, 4)
        w[0, 0] = 100.0
        model.stages[0].a.weight.data.copy_(w)
        assert outlier_ratios(model, [torch.eye(4)], blocks=model.stages, M=2.0) == [1 / 20]

    # --- galore_param_groups -------------------------------------------------------------------

    def test_galore_param_groups_arguments(self):
        model = tiny_llama(layers=2)
        with pytest.raises(TypeError, match="galore_param_groups: model must be"):
            galore_param_groups(None)
        for key, bad, err in (("rank", 0, ValueError), ("rank", 1.5, TypeError),
                              ("rank", "8", TypeError), ("update_proj_gap", 0, ValueError),
                              ("scale", float("nan"), ValueError), ("scale", -1.0, ValueError),
                              ("scale", "1", TypeError)):
            with pytest.raises(err, match=f"galore_param_groups: {key} must be"):
                galore_param_groups(model, **{key: bad})
        with pytest.raises(ValueError, match="proj_type must be one of"):
            galore_param_groups(model, proj_type="diagonal")
        with pytest.raises(ValueError, match="'params' is not an option"):
            galore_param_groups(model, params=[])
        for bad in ("attn", (), ("attn", 3), ("",)):
            with pytest.raises(TypeError, match="targets must be a non-empty sequence"):
                galore_param_groups(model, targets=bad)
        with pytest.raises(ValueError, match=r"no trainable nn.Linear .* \('q_lin',\)"):
            galore_param_groups(model, targets=("q_lin",))
        with pytest.raises(ValueError, match="the blocks contain no trainable nn.Linear"):
            galore_param_groups(model, [model.model.layers[0].input_layernorm])
        with pytest.raises(ValueError, match="could not find the transformer blocks"):
            galore_param_groups(nn.Sequential(nn.Linear(2, 2)))
        with pytest.raises(ValueError, match="is not a submodule of model"):
            galore_param_groups(model, tiny_llama(layers=1).model.layers)
        # the user's options override the reference's; unknown keys pass through
        g = galore_param_groups(model, rank=8, projector="randomized")[1]
        assert (g["rank"], g["update_proj_gap"], g["projector"]) == (8, 100, "randomized")

    # --- the sampler ---------------------------------------------------------------------------

    def test_sampler_constructor_arguments(self):
        bl = _blocks(4)
        with pytest.raises(ValueError, match=r"gamma must be <= 4 \(the number of blocks\)"):
            OwLore(bl, gamma=5)
        with pytest.raises(ValueError, match="OwLore: gamma must be >= 1"):
            OwLore(bl, gamma=0)
        for bad in ("2", None, 2.0):
            with pytest.raises(TypeError, match="OwLore: gamma must be an int"):
                OwLore(bl, gamma=bad)
        with pytest.raises(ValueError, match="OwLore: period must be >= 1"):
            OwLore(bl, gamma=1, period=0)
        for bad in (None, "50", 1.0):
            with pytest.raises(TypeError, match="OwLore: period must be an int"):
                OwLore(bl, gamma=1, period=bad)
        for bad in (1.5, "0", True):
            with pytest.raises(TypeError, match="OwLore: seed must be an int"):
                OwLore(bl, gamma=1, seed=bad)
        with pytest.raises(ValueError, match="OwLore: seed must be"):
            OwLore(bl, gamma=1, seed=1 << 64)
        for bad in (1, "yes", None):
            with pytest.raises(TypeError, match="keep_state must be a bool"):
                OwLore(bl, gamma=1, keep_state=bad)
        # ratios: length, values, types
        with pytest.raises(ValueError, match="ratios has 5 entries but there are 4 blocks"):
            OwLore(bl, [1, 2, 3, 4, 5], gamma=1)
        with pytest.raises(ValueError, match="ratios has 0 entries"):
            OwLore(bl, [], gamma=1)
        for bad, i in (([1, -1e-9, 2, 3], 1), ([1, 2, float("nan"), 3], 2),
                       ([1, 1, 1, float("-inf")], 3), (torch.tensor([1.0, 2, 3, float("inf")]), 3)):
            with pytest.raises(ValueError, match=rf"finite and >= 0, got ratios\[{i}\]"):
                OwLore(bl, bad, gamma=1)
        for bad in ([1, "2", 3, 4], [1, None, 3, 4], [1, True, 1, 1], [1, 2j, 1, 1]):
            with pytest.raises(TypeError, match=r"ratios\[1\] must be a real number"):
                OwLore(bl, bad, gamma=1)
        for bad in ({"a": 1}, "1234", 7, torch.ones(2, 2), torch.ones(4, dtype=torch.bool),
                    torch.tensor(3.0)):
            with pytest.raises(TypeError, match="ratios must be"):
                OwLore(bl, bad, gamma=1)
        with pytest.raises(ValueError, match="only 0 block"):
            OwLore(bl, [0, 0, 0, 0], gamma=1)
        # blocks
        for bad, err, msg in (([], ValueError, "blocks is empty"),
                              (nn.Linear(3, 3), TypeError, "sequence of modules"),
                              (None, TypeError, "sequence of nn.Module"),
                              ([bl[0], bl[0]], ValueError, "same module more than once"),
                              ([bl[0], nn.ReLU()], ValueError,
                               r"blocks\[1\] \(ReLU\) has no parameter")):
            with pytest.raises(err, match=msg):
                OwLore(bad, gamma=1)
        # optimizer
        for bad in (42, "adam", [torch.optim.SGD(bl.parameters(), lr=1.0), 3]):
            with pytest.raises(TypeError, match="optimizer"):
                OwLore(bl, gamma=1, optimizer=bad)
        assert all(p.requires_grad for p in bl.parameters())  # nothing was touched

    def test_ratios_whose_sum_overflows(self):
        s = OwLore(_blocks(3), [1e308, 1e308, 1e308], gamma=2, period=1, seed=0)
        assert torch.equal(s.probs, torch.full((3,), 1 / 3, dtype=torch.float64))
        s2 = OwLore(_blocks(3), [1.7e308, 0.0, 1.7e308], gamma=2, period=1, seed=0)
        for _ in range(5):
            s.step()
            s2.step()
            assert len(s.active) == 2
            assert s2.active == [0, 2]
        tiny = OwLore(_blocks(3), [5e-324, 1e-323, 5e-324], gamma=1, period=1)  # subnormal sum
        assert torch.allclose(tiny.probs, torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64))
        tiny.step()

    def test_gamma_all_blocks_and_block_parameters(self):
        bl = _blocks(3)
        s = OwLore(bl, gamma=3, period=2)
        s.step()
        assert s.active == [0, 1, 2]
        assert s.block_parameters(2) == list(bl[2].parameters())
        for bad, err in ((3, ValueError), (-1, ValueError), (1.0, TypeError), ("0", TypeError)):
            with pytest.raises(err, match="block_parameters: index must be"):
                s.block_parameters(bad)

    def _state(self, s, model, opt):
        return (s.steps, list(s.active), s._gen.get_state().clone(),
                [p.requires_grad for p in model.parameters()],
                [p.grad is None for p in model.parameters()], set(map(id, opt.state)))

    def test_load_state_dict_refuses_and_changes_nothing(self):
        blocks = _blocks(4)
        opt = torch.optim.AdamW(blocks.parameters(), lr=0.1)
        s = OwLore(blocks, [1, 2, 3, 4], gamma=2, period=3, seed=1, optimizer=opt)
        for _ in range(4):
            s.step()
            for p in blocks.parameters():
                if p.requires_grad:
                    p.grad = torch.ones_like(p)
            opt.step()
        good = s.state_dict()
        before = self._state(s, blocks, opt)
        other = [b for b in range(4) if b not in s.active]

        def bad(**changes):
            st = dict(good)
            st.update(changes)
            return st

        cases = [
            (bad(active=torch.tensor([other[0], other[0]])), ValueError, "holds a block twice"),
            (bad(active=torch.tensor([0, 4])), ValueError, r"outside \[0, 3\]"),
            (bad(active=torch.tensor([-1, 0])), ValueError, r"outside \[0, 3\]"),
            (bad(active=torch.tensor([0.0, 1.0])), ValueError, "1-D integer tensor"),
            (bad(active=["0", "1"]), ValueError, "1-D integer tensor"),
            (bad(active=torch.tensor([[0, 1]])), ValueError, "1-D integer tensor"),
            (bad(active=torch.tensor([0])), ValueError, "inconsistent state_dict"),
            (bad(steps=0), ValueError, "inconsistent state_dict"),
            (bad(steps=-1), ValueError, r"state_dict\['steps'\] must be >= 0"),
            (bad(steps="4"), TypeError, r"state_dict\['steps'\] must be an int"),
            (bad(steps=4.0), TypeError, r"state_dict\['steps'\] must be an int"),
            (bad(gamma="2"), TypeError, r"state_dict\['gamma'\] must be an int"),
            (bad(gamma=3), ValueError, "saved with gamma=3"),
            (bad(num_blocks=5), ValueError, "saved with num_blocks=5"),
            (bad(period=1), ValueError, "saved with period=1"),
            (bad(rng_state=torch.zeros(7, dtype=torch.uint8)), ValueError, "not a CPU generator"),
            (bad(rng_state=good["rng_state"].float()), ValueError, "1-D uint8 tensor"),
            (bad(rng_state=[1, 2]), ValueError, "1-D uint8 tensor"),
            (bad(probs="uniform"), ValueError, r"state_dict\['probs'\] must be a float tensor"),
            (bad(probs=torch.ones(3) / 3), ValueError, r"float tensor of shape \[4\]"),
            (bad(probs=torch.full((4,), 0.25)), ValueError, "different ratios"),
            ({k: v for k, v in good.items() if k != "active"}, KeyError, "missing.*active"),
            (opt.state_dict(), KeyError, "is it an OwLore sampler's"),
            ([("steps", 4)], TypeError, "state_dict must be a dict"),
            (None, TypeError, "state_dict must be a dict"),
        ]
        for st, err, msg in cases:
            with pytest.raises(err, match=msg):
                s.load_state_dict(st)
            after = self._state(s, blocks, opt)
            assert after[:2] == before[:2] and torch.equal(after[2], before[2]) \
                and after[3:] == before[3:], msg
        s.load_state_dict(good)  # the good one still loads
        assert s.active == before[1]

    def test_state_from_a_fresh_or_other_sampler(self):
        a = OwLore(_blocks(4), [1, 2, 3, 4], gamma=2, period=3, seed=1)
        fresh = OwLore(_blocks(4), [1, 2, 3, 4], gamma=2, period=3, seed=9).state_dict()
        a.load_state_dict(fresh)  # a fresh state: nothing active yet, the saved generator
        assert a.steps == 0 and a.active == []
        with pytest.raises(ValueError, match="saved with gamma=1"):
            a.load_state_dict(OwLore(_blocks(4), [1, 2, 3, 4], gamma=1, period=3).state_dict())

    # --- OwLoreCallback ------------------------------------------------------------------------

    def test_callback_arguments_and_resume_warning(self):
        integrations = pytest.importorskip("ftops.integrations")
        from transformers import TrainerControl, TrainerState

        for bad in (None, "sampler", [OwLore(_blocks(2), gamma=1)]):
            with pytest.raises(TypeError, match="OwLoreCallback: sampler must be a ftops.OwLore"):
                integrations.OwLoreCallback(bad)
        s = OwLore(_blocks(3), gamma=1, period=2)
        cb = integrations.OwLoreCallback(s)
        state = TrainerState()
        state.global_step = 0
        import warnings as w
        with w.catch_warnings():
            w.simplefilter("error")
            cb.on_train_begin(None, state, TrainerControl())  # a fresh run: no warning
        state.global_step = 40  # a resumed Trainer, a sampler whose state was not loaded
        with pytest.warns(UserWarning, match="at global_step 40 but the sampler has taken 0"):
            cb.on_train_begin(None, state, TrainerControl())
