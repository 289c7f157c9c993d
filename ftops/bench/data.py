"""The main job's dataset: docstrings of the Python standard library, labelled by module family.

Real English text that ships with every Python: the docstrings (module, class and function) of
the standard library's source files, read with :mod:`ast` (nothing is imported or executed).
Each docstring is labelled with the family of its top-level module (:data:`FAMILIES`: file
system, networking, concurrency, data formats, numbers and dates, testing and debugging). The
task is to tell, from a docstring alone, which part of the standard library it documents.

Determinism: the split is a hash, not a random draw. A docstring's key is
``"<path relative to the stdlib>:<qualified name>"``; ``sha256(key)`` decides whether it is held
out (:data:`TEST_FRACTION`) and orders the examples. Texts that occur more than once (inherited
or copied docstrings) are dropped everywhere, so no text is in both splits and no text has two
labels. Both splits are then balanced by keeping the same number of examples per family (the
first by hash order). The dataset depends only on the stdlib's source, i.e. on the Python
version (record it with the results: :func:`describe`).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import os
import sysconfig
from dataclasses import dataclass, field

# Top-level stdlib modules per family. Families are chosen to have a few hundred distinct
# docstrings each on CPython 3.10-3.13; modules whose family is ambiguous are left out.
FAMILIES: dict[str, tuple[str, ...]] = {
    "files & os": ("os", "pathlib", "shutil", "tempfile", "posixpath", "ntpath", "genericpath",
                   "stat", "fileinput", "fnmatch", "filecmp", "glob", "_pyio", "io",
                   "linecache", "zipimport"),
    "networking & email": ("email", "mailbox", "http", "urllib", "imaplib", "xmlrpc", "nntplib",
                           "ssl", "smtplib", "ftplib", "socketserver", "socket", "telnetlib",
                           "poplib", "wsgiref", "mimetypes", "ipaddress", "smtpd", "webbrowser"),
    "concurrency": ("asyncio", "multiprocessing", "threading", "concurrent", "subprocess", "queue",
                    "selectors", "sched", "_threading_local", "asyncore", "asynchat"),
    "data formats": ("xml", "tarfile", "zipfile", "configparser", "json", "bz2", "lzma", "gzip",
                     "base64", "pickle", "pickletools", "csv", "plistlib", "tomllib", "shelve",
                     "dbm", "quopri", "html", "wave", "chunk", "uu", "binhex", "netrc", "sqlite3"),
    "numbers & dates": ("_pydecimal", "decimal", "statistics", "numbers", "random", "fractions",
                        "datetime", "_pydatetime", "calendar", "zoneinfo", "_strptime", "time",
                        "math", "cmath", "bisect", "heapq"),
    "testing & debugging": ("unittest", "doctest", "bdb", "pdb", "traceback", "trace",
                            "tracemalloc", "timeit", "pstats", "profile", "cProfile",
                            "faulthandler", "cgitb", "code", "codeop"),
}
TEST_FRACTION = 0.2
MIN_CHARS = 20      # shorter docstrings ("Return x.") carry almost no signal
MAX_CHARS = 2000    # the tokenizer truncates anyway; keeps the corpus small in memory


@dataclass(frozen=True)
class Example:
    key: str      # "<path relative to the stdlib>:<qualified name>"
    text: str
    label: int


@dataclass
class Dataset:
    families: tuple[str, ...]
    train: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)

    @property
    def chance(self) -> float:
        """Accuracy of a constant guess on the balanced held-out split."""
        return 1.0 / len(self.families)


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def _docstrings(path: str):
    """(qualified name, docstring) of the module, classes and functions of one source file."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    yield name, doc
                yield from walk(child, name + ".")

    doc = ast.get_docstring(tree)
    if doc:
        yield "<module>", doc
    yield from walk(tree, "")


def _family_of(relpath: str, top_to_family: dict[str, int]) -> int | None:
    top = relpath.split(os.sep)[0]
    if top.endswith(".py"):
        top = top[:-3]
    return top_to_family.get(top)


def collect(root: str | None = None) -> dict[int, tuple[Example, ...]]:
    """All usable docstrings per family label, deduplicated, in hash order (cached per root:
    parsing a few hundred files takes seconds)."""
    return _collect(root or stdlib_dir())


@functools.lru_cache(maxsize=2)
def _collect(root: str) -> dict[int, tuple[Example, ...]]:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"standard library source not found at {root!r}")
    top_to_family = {m: i for i, mods in enumerate(FAMILIES.values()) for m in mods}
    found: list[Example] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir != "." and _family_of(rel_dir, top_to_family) is None:
            dirnames[:] = []  # not a package of a family (this also skips test/, site-packages/)
            continue
        dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "test", "tests"))
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            rel = os.path.normpath(os.path.join(rel_dir, fn))
            label = _family_of(rel, top_to_family)
            if label is None:
                continue
            try:
                docs = list(_docstrings(os.path.join(dirpath, fn)))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # e.g. a deliberately broken file; not worth failing the job for
            for qual, doc in docs:
                text = " ".join(doc.split())  # one line: tokenizers ignore layout anyway
                if len(text) >= MIN_CHARS:
                    found.append(Example(f"{rel.replace(os.sep, '/')}:{qual}", text[:MAX_CHARS], label))
    counts: dict[str, int] = {}
    for ex in found:
        counts[ex.text] = counts.get(ex.text, 0) + 1
    per_family: dict[int, list[Example]] = {i: [] for i in range(len(FAMILIES))}
    for ex in sorted(found, key=lambda e: (_hash(e.key), e.key)):
        if counts[ex.text] == 1:
            per_family[ex.label].append(ex)
    return {f: tuple(exs) for f, exs in per_family.items()}


def build(max_train_per_class: int | None = None, max_test_per_class: int | None = None,
          root: str | None = None) -> Dataset:
    """The balanced train / held-out split (see the module docstring).

    ``max_*_per_class`` cap the per-family counts (``--quick`` uses small caps); without caps each
    split keeps as many examples per family as its smallest family has.
    """
    per_family = collect(root)
    cut = int(TEST_FRACTION * 2**64)
    splits = {f: ([e for e in exs if _hash(e.key) >= cut], [e for e in exs if _hash(e.key) < cut])
              for f, exs in per_family.items()}
    n_train = min(len(tr) for tr, _ in splits.values())
    n_test = min(len(te) for _, te in splits.values())
    if max_train_per_class is not None:
        n_train = min(n_train, max_train_per_class)
    if max_test_per_class is not None:
        n_test = min(n_test, max_test_per_class)
    if n_train < 1 or n_test < 1:
        raise RuntimeError(f"too few docstrings per family in {root or stdlib_dir()!r} "
                           f"(train {n_train}, test {n_test})")
    ds = Dataset(tuple(FAMILIES))
    for f in sorted(splits):
        tr, te = splits[f]
        ds.train += tr[:n_train]
        ds.test += te[:n_test]
    # Interleave the families deterministically (hash order) so any prefix is near-balanced.
    ds.train.sort(key=lambda e: (_hash("order:" + e.key), e.key))
    ds.test.sort(key=lambda e: (_hash("order:" + e.key), e.key))
    return ds


def describe(ds: Dataset) -> str:
    import sys

    n_tr, n_te = len(ds.train), len(ds.test)
    return (f"{n_tr} train / {n_te} held-out docstrings ({n_tr // len(ds.families)} / "
            f"{n_te // len(ds.families)} per family) from the standard library of Python "
            f"{sys.version.split()[0]}; families: {', '.join(ds.families)}")
