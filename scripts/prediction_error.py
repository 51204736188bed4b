"""Prediction error of the proxy by load level, with and without its knowledge terms.

Runs ``loadgen compare`` once per (load level, variant) on the Azure conversation study
(8 emulated H100s) and prints one JSON object: for each run the proxy's mean absolute
relative error of predicted TTFT, E2E and output length, the P99 TTFT, and the emulators'
pacing lateness (a starved emulator makes every figure meaningless).  Variants:

* ``before``: no expected future arrivals, no learned per-request overhead (the
  simulator replays only the requests it knows of);
* ``overhead``: the learned per-request overhead only;
* ``after``: both (the defaults).

Policies ending in ``*`` are told the true output length (isolating the simulator).

    python scripts/prediction_error.py --loads 20,40,59 --policy 'block*' \\
        --json results/prediction_error.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

VARIANTS = {
    "before": ["--future-arrivals=0", "--no-learn-overhead"],
    "overhead": ["--future-arrivals=0"],
    "after": [],
    "window10": ["--arrival-window=10"],
    "limit1024": ["--future-arrivals=1024"],
}


def run(load: float, variant: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "loadgen.cli", "compare", "--policies", args.policy,
           "--trace", args.trace, "--instances", str(args.instances),
           "--time-scale", str(args.time_scale), "--num-requests", str(args.num_requests),
           "--rate-multiplier", str(load), "--seed", str(args.seed), "--json", str(out)]
    cmd += [f"--proxy-arg={a}" for a in VARIANTS[variant]]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    data = json.loads(out.read_text())
    entry = data["runs"][0]["policies"][args.policy]
    metrics = entry["metrics"]
    emu = entry["proxy"].get("emulator", {})
    return {"load": load, "variant": variant, "policy": args.policy,
            **{f"{k}_error": v for k, v in entry["proxy"]["prediction_error"].items()},
            "p99_ttft_ms": metrics.get("p99_ttft_ms"), "mean_e2e_ms": metrics.get("mean_e2el_ms"),
            "completed": metrics.get("completed"), "emulator": emu}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", default="20,40,59",
                        help="rate multipliers (the study's capacity is ~66x)")
    parser.add_argument("--variants", default="before,overhead,after")
    parser.add_argument("--policy", default="block*")
    parser.add_argument("--trace", default="azure-conv")
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--time-scale", type=float, default=6.0)
    parser.add_argument("--num-requests", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for load in (float(x) for x in args.loads.split(",")):
            for variant in args.variants.split(","):
                row = run(load, variant, args, Path(tmp) / f"{load}-{variant}.json")
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    text = json.dumps({"runs": rows}, indent=1)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
