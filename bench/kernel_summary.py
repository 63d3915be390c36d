#!/usr/bin/env python3
"""Sum Nsight Compute's per-kernel durations (ncu --csv --metrics gpu__time_duration.sum) by kernel.

usage: kernel_summary.py [--grid] FILE.csv   prints one line per kernel (total, share, count, mean), largest first,
and the time per engine step when the argmax kernel (one launch per step) is among them."""
import csv
import re
import sys
from collections import defaultdict


def short(name: str) -> str:
    name = re.sub(r"\(anonymous namespace\)::", "", name)
    name = re.sub(r"qf::cuda::", "", name)
    name = re.sub(r"\(.*$", "", name)  # arguments
    name = re.sub(r"^void ", "", name)
    return name[:90]


def main() -> int:
    args = sys.argv[1:]
    by_grid = "--grid" in args  # one line per kernel and launch shape
    args = [a for a in args if a != "--grid"]
    if len(args) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    with open(args[0], newline="") as f:
        lines = [l for l in f if l.startswith('"')]
    total = defaultdict(float)
    count = defaultdict(int)
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}.get(row.get("Metric Unit", ""), 1.0)
        value = float(row["Metric Value"].replace(",", "")) * scale
        key = short(row["Kernel Name"]) + (f" grid {row.get('Grid Size', '')}" if by_grid else "")
        total[key] += value
        count[key] += 1
    grand = sum(total.values())
    if grand == 0:
        print("no kernel durations in", args[0])
        return 1
    steps = sum(c for k, c in count.items() if "argmax" in k)
    print(f"{sum(count.values())} kernels, {grand / 1e3:.2f} ms" + (f", {steps} steps: {grand / steps / 1e3:.2f} ms per step" if steps else ""))
    print(f"{'total us':>10} {'share':>6} {'count':>6} {'mean us':>8}  kernel")
    for k in sorted(total, key=total.get, reverse=True)[:30]:
        print(f"{total[k]:10.1f} {100 * total[k] / grand:5.1f}% {count[k]:6d} {total[k] / count[k]:8.2f}  {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
