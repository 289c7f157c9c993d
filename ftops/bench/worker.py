"""One method of the main job in its own process (so its peak memory is its own).

    python -m ftops.bench.worker --method NAME --data data.json --config config.json --out result.json

Started by ``python -m ftops.bench``; not meant to be run by hand. Reads the dataset written by
the parent (texts and labels), tokenizes it, fine-tunes the model with the method and writes its
measurements as JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from types import SimpleNamespace

import torch

from . import methods
from .memory import PeakMeter

log = logging.getLogger("ftops.bench")


def tokenize(tokenizer, texts, max_len):
    return tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]


def make_batch(tokenizer, ids, labels, device) -> methods.Batch:
    enc = tokenizer.pad({"input_ids": ids}, return_tensors="pt")  # to the longest in the batch
    return methods.Batch(enc["input_ids"].to(device), enc["attention_mask"].to(device),
                         torch.tensor(labels, dtype=torch.long, device=device))


def train_order(lengths: list[int], steps: int, batch: int, seed: int) -> list[list[int]]:
    """Indices of each step's batch, the same for every method (a method with more steps sees
    the same sequence, continued): seeded epochs of permutations, grouped by length as
    transformers' ``group_by_length`` does (each run of 16 batches is sorted by length, cut into
    batches, and the batches shuffled), so that batches carry little padding."""
    g = torch.Generator().manual_seed(seed)
    mega = 16 * batch
    batches: list[list[int]] = []
    while len(batches) < steps:
        perm = torch.randperm(len(lengths), generator=g).tolist()
        for s in range(0, len(perm), mega):
            chunk = sorted(perm[s:s + mega], key=lambda i: lengths[i])
            group = [chunk[i:i + batch] for i in range(0, len(chunk), batch)]
            batches += [group[j] for j in torch.randperm(len(group), generator=g).tolist()]
    return batches[:steps]


def run(method: str, data: dict, cfg: dict) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()  # no load report for the dropped pooler
    device = torch.device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    tok = transformers.AutoTokenizer.from_pretrained(methods.model_path())
    train_ids = tokenize(tok, [e["text"] for e in data["train"]], cfg["max_len"])
    train_y = [e["label"] for e in data["train"]]
    test_ids = tokenize(tok, [e["text"] for e in data["test"]], cfg["max_len"])
    test_y = [e["label"] for e in data["test"]]
    steps = cfg["mezo_steps"] if method == "mezo" else cfg["steps"]
    order = train_order([len(x) for x in train_ids], steps, cfg["batch_size"], cfg["seed"])

    def batch_at(idx):
        return make_batch(tok, [train_ids[i] for i in idx], [train_y[i] for i in idx], device)

    # Held-out batches of similar lengths (less padding; accuracy does not depend on grouping).
    eb = cfg["eval_batch_size"]
    by_len = sorted(range(len(test_ids)), key=lambda i: (len(test_ids[i]), i))
    test_batches = [make_batch(tok, [test_ids[i] for i in by_len[s:s + eb]],
                               [test_y[i] for i in by_len[s:s + eb]], device)
                    for s in range(0, len(by_len), eb)]

    mem = PeakMeter(device)
    mem_base = mem.reset()
    model = methods.load_model(len(data["families"]), cfg["seed"], device)
    model_params = sum(p.numel() for p in model.parameters())
    calib = [batch_at(order[i]) for i in range(min(4, len(order)))]
    hp = SimpleNamespace(lr=cfg["lrs"][method], steps=steps, seed=cfg["seed"], calib=calib,
                         mezo_target=cfg.get("mezo_target", "head"))
    trainer = methods.setup(method, model, hp)
    del calib

    from tqdm.auto import tqdm

    losses, times = [], []
    bar = tqdm(total=steps, desc=f"{method:>7}", file=sys.stderr, mininterval=1.0,
               dynamic_ncols=True, disable=cfg.get("no_progress", False))
    for idx in order:
        b = batch_at(idx)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss = trainer.step(b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    bar.close()
    peak = max(0, mem.peak() - mem_base)
    acc, test_loss = methods.evaluate(trainer.model, test_batches)
    # The first steps include lazy allocations (optimizer state, projector refreshes at step 0);
    # the median over the rest is the steady-state step.
    warm = times[min(3, len(times) - 1):]
    tail = losses[-max(1, len(losses) // 10):]
    return {
        "method": method, "lr": hp.lr, "steps": steps, "batch_size": cfg["batch_size"],
        "accuracy": acc, "test_loss": test_loss,
        "final_train_loss": sum(tail) / len(tail),  # mean over the last 10% of steps
        "step_time_s": statistics.median(warm), "train_time_s": sum(times),
        "peak_memory_bytes": peak, "trainable_params": trainer.trainable,
        "model_params": model_params,
        "notes": trainer.notes, "losses": losses, "step_times_s": times,
        "device": str(device), "threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", required=True, choices=methods.METHODS)
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with open(a.data) as f:
        data = json.load(f)
    with open(a.config) as f:
        cfg = json.load(f)
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    result = run(a.method, data, cfg)
    with open(a.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
