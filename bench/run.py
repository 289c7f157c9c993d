"""Runs every benchmark script in bench/ (bench_<name>.py) in its own process.

    python bench/run.py [--quick] [--device cpu|cuda] [--only NAME ...]

Each script compares ftops against the reference implementation in the same run, prints a table
with ratios and peak memory, and writes JSON to bench/results/<name>.json.
"""
import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, a few minutes in all on 2 CPU cores")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--only", nargs="*", default=None, help="benchmark names, e.g. mezo")
    ap.add_argument("--timeout", type=float, default=None, help="seconds allowed per benchmark")
    args = ap.parse_args()

    names = sorted(f[len("bench_"):-3] for f in os.listdir(HERE) if f.startswith("bench_") and f.endswith(".py"))
    if args.only:
        unknown = set(args.only) - set(names)
        if unknown:
            ap.error(f"unknown benchmark(s) {sorted(unknown)}; available: {names}")
        names = [n for n in names if n in args.only]
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    failed = []
    for name in names:
        cmd = [sys.executable, os.path.join(HERE, f"bench_{name}.py"), "--device", args.device,
               "--out", os.path.join(HERE, "results", f"{name}.json")]
        if args.quick:
            cmd.append("--quick")
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        try:
            rc = subprocess.call(cmd, cwd=HERE, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"=== {name}: stopped after {args.timeout:.0f} s (--timeout)", flush=True)
            rc = "timeout"
        print(f"=== {name}: exit {rc} after {time.perf_counter() - start:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    print(f"\nbenchmarks run: {len(names)}, failed: {failed or 'none'}; JSON in {os.path.join(HERE, 'results')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
