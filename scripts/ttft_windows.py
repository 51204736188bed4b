#!/usr/bin/env python3
"""TTFT over time, per router, from ``loadgen compare --json`` results.

    python scripts/ttft_windows.py results/het_known.json results/het_hidden.json \\
        --window 2 [--json OUT]

Each run's requests are grouped by when they were sent (real-GPU seconds since the run
began: wall seconds over the time scale) into windows of ``--window`` seconds, and each
window's mean and P99 TTFT (real-GPU ms) are printed per router, with the router's label
taken from the file (``POLICY`` or ``POLICY [hidden profiles]`` when the run hid the
instances' profiles).  This shows how long a router that learns the instances' speed
online (calibration) takes to route as well as one told the right profiles: the first
window where its figures meet the informed router's.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def windows(rows: Sequence[dict], time_scale: float, width: float) -> list[dict]:
    """Mean and P99 TTFT (real ms) of the requests sent in each window that got a first
    token: finished ones and those a first-token run cut after it (no error either way)."""
    buckets: dict[int, list[float]] = {}
    for row in rows:
        if row.get("ttft_ms") is None or row.get("error"):
            continue
        index = int(row["start_s"] / time_scale // width)
        buckets.setdefault(index, []).append(row["ttft_ms"] / time_scale)
    return [{"from_s": i * width, "to_s": (i + 1) * width, "n": len(v),
             "mean_ttft_ms": sum(v) / len(v),
             # as loadgen.measure computes every P99 (numpy's, as vLLM's benchmark)
             "p99_ttft_ms": float(np.percentile(v, 99))}
            for i, v in sorted(buckets.items())]


def runs(path: Path) -> list[tuple[str, float, list[dict]]]:
    """(label, time scale, per-request rows) of every run in a compare result file."""
    data = json.loads(path.read_text())
    scale = float(data.get("time_scale") or 1.0)
    hidden = bool(data.get("config", {}).get("hide_profiles"))
    out = []
    for seed_run in data["runs"]:
        for name, entry in seed_run["policies"].items():
            rows = entry["metrics"].get("per_request") or []
            label = f"{name}{' [hidden profiles]' if hidden else ''} seed {seed_run['seed']}"
            out.append((label, scale, rows))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="loadgen compare --json files")
    parser.add_argument("--window", type=float, default=2.0, help="window, real seconds")
    parser.add_argument("--json", type=Path, help="also write the windows here")
    args = parser.parse_args(argv)
    report: dict[str, list[dict]] = {}
    for path in args.results:
        for label, scale, rows in runs(path):
            if not rows:
                print(f"{path}: {label} has no per-request rows", file=sys.stderr)
                continue
            report[label] = windows(rows, scale, args.window)
    for label, rows in report.items():
        print(label)
        print(f"  {'window (s)':>12} {'n':>5} {'mean TTFT':>10} {'P99 TTFT':>10}")
        for w in rows:
            print(f"  {w['from_s']:5.0f}-{w['to_s']:<6.0f} {w['n']:5d} "
                  f"{w['mean_ttft_ms']:10.0f} {w['p99_ttft_ms']:10.0f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
