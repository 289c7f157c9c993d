"""OwLore: OWL outlier ratios and the outlier-weighted / uniform (LISA) block sampler."""
import io
import itertools

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
    ratios = outlier_ratios(model, [x1, x2], blocks=model.stages, M=2.0)
    assert ratios == [pytest.approx((1 + 2) / 20, abs=0), pytest.approx(1 / 20, abs=0)]
    # With only the first batch, column 3 has norm 6: block 0 layer b still has 2 outliers
    # (mean 9/4, threshold 4.5), layer a: mean (100+1+1+6+2*9)/12 = 10.5, threshold 21 -> 1.
    assert outlier_ratios(model, [x1], blocks=model.stages, M=2.0)[0] == pytest.approx(3 / 20, abs=0)
    # A larger M leaves only the 100 (threshold 11.5 * 8 = 92) and the 50 (6.25 * 8 = 50: not > 50).
    assert outlier_ratios(model, [x1, x2], blocks=model.stages, M=8.0) == [1 / 20, 0.0]
    # tuple batches are unpacked as positional arguments; a generator of batches works
    assert outlier_ratios(model, ((x,) for x in (x1, x2)), blocks=model.stages, M=2.0) == \
        pytest.approx([3 / 20, 1 / 20], abs=0)


def test_outlier_ratios_mean_over_block():
    # Layer a holds the block's large scores, layer b only small ones. Per layer: a has no outlier
    # (uniform), b has one (a 10 among ones). Over the block: mean = (12*100 + 7 + 10)/20 = 60.85,
    # threshold 2 * 60.85 = 121.7: nothing; with M = 1.5 (91.3) all of a's 12 entries are above.
    x = torch.eye(4)
    wa = torch.full((3, 4), 100.0)
    wb = torch.ones(2, 4)
    wb[0, 1] = 10.0
    model = Stack([Block(wa, wb)])
    assert outlier_ratios(model, [x], blocks=model.stages, M=2.0) == [1 / 20]
    assert outlier_ratios(model, [x], blocks=model.stages, M=2.0, mean_over="block") == [0.0]
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
            model(**b)
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
def test_outlier_ratios_llama_matches_bruteforce(mean_over):
    model = tiny_llama(layers=3)
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
    # float32 scores vs float64: allow one borderline entry per block
    numel = sum(m.weight.numel() for m in model.model.layers[0].modules() if isinstance(m, nn.Linear))
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
    for bad in (0.0, -1.0, float("nan"), float("inf"), "7"):
        with pytest.raises(ValueError, match="M must be"):
            outlier_ratios(model, [x], blocks=model.stages, M=bad)
    with pytest.raises(ValueError, match="batches is empty"):
        outlier_ratios(model, [], blocks=model.stages)
    with pytest.raises(ValueError, match="mean_over"):
        outlier_ratios(model, [x], blocks=model.stages, mean_over="model")
    with pytest.raises(ValueError, match="no nn.Linear"):
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
    # a block that does not take part in the forward
    unused = Block(torch.ones(3, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="none of its Linear layers ran"):
        outlier_ratios(model, [x], blocks=[model.stages[0], unused])


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
        assert [p.requires_grad for p in outside] == [p is not model.model.norm.weight for p in outside]
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
    out = [pytest.param(lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1), id="torch-AdamW")]
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
    groups = galore_param_groups(model, blocks, rank=4, update_proj_gap=5, scale=1.0, proj_type="std")
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
    assert all(p.grad is None for b in range(3) if b not in s.active for p in blocks[b].parameters())
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
    for gamma in (0, 5, -1, 1.5, True):
        with pytest.raises(ValueError, match="gamma"):
            OwLore(bl, gamma=gamma)
    for period in (0, -2, 2.0):
        with pytest.raises(ValueError, match="period"):
            OwLore(bl, gamma=1, period=period)
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
