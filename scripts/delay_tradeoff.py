"""What ``block --delay-weight`` trades: mean end-to-end latency against the tails.

Serves one workload file (``loadgen workload``: arrivals in real-GPU seconds, true
lengths) on the cluster model that ``blockproxy train-router`` trains against (N
compiled simulators stepped through the arrivals, :class:`~blockproxy.train_router.
ClusterModel`), once per router: round robin, the Intelligent Router's heuristic (with
each request's true length bucket, and with every answer taken as the median's length),
``block``, and ``block`` with each delay weight and slack asked for (their simulations
include each instance's expected arrivals, decayed over ``--arrival-window`` seconds as
the proxy's ``--arrival-window`` does), and ``block --prefill-stall`` with each weight in
``--stalls``.  Prints one JSON object per router (real-GPU
ms), then a table.  A run of 4,000 requests takes a few
seconds per router; on the Azure study the model's round robin and ``block`` are within
1% of the emulated cluster's mean E2E.

    LOADGEN_TRACE_PATH=../shared/traces loadgen workload --trace azure-conv \\
        --rate-multiplier 53 --num-requests 8000 --out results/azure53.jsonl
    python scripts/delay_tradeoff.py --requests results/azure53.jsonl --num-requests 4000 \\
        --weights 1,2 --slacks 0.2,0.5,1,inf
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from blockproxy.profile import load_profile
from blockproxy.train_router import (
    Chooser,
    ClusterModel,
    Decision,
    block,
    heuristic,
    read_requests,
    rebase,
    round_robin,
    run_episode,
    summarize,
)


def one_bucket(tokens: int) -> Chooser:
    """The heuristic with every request's answer taken as ``tokens`` long (the trace's
    median): what is left of it when its length classifier knows nothing."""
    def choose(cluster: ClusterModel, d: Decision) -> int:
        est = cluster.estimates(d.prompt, tokens)
        return min(range(len(est)), key=lambda i: est[i][0] + est[i][1])
    return choose


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", required=True, help="a loadgen workload file")
    parser.add_argument("--num-requests", type=int, default=4000)
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--profile", default="llama-3.1-8b-h100-tp1")
    parser.add_argument("--weights", default="1,2", help="delay weights, comma-separated")
    parser.add_argument("--slacks", default="0.2,0.5,1,inf",
                        help="delay slacks, comma-separated (inf: no limit)")
    parser.add_argument("--arrival-window", type=float, default=30.0,
                        help="decay time (s) of each instance's recent arrivals")
    parser.add_argument("--blind", action="store_true",
                        help="also each block router knowing no length: every request "
                             "predicted at the median's (as a proxy whose length model "
                             "has learned nothing else)")
    parser.add_argument("--stalls", default="",
                        help="also block with each of these --prefill-stall weights (comma-"
                             "separated; no delay weight, no slack limit)")
    parser.add_argument("--without-arrivals", action="store_true",
                        help="also each weighted block router without the expected "
                             "arrivals in its simulations (the proxy's --future-arrivals 0: "
                             "the delay counts only the requests already there)")
    parser.add_argument("--tie-tolerance", type=float, default=0.0,
                        help="also each weighted block router breaking ties within this "
                             "fraction of the best score as the proxy does (its default "
                             "--tie-tolerance is 0.02)")
    args = parser.parse_args()
    requests = rebase(read_requests(args.requests, args.num_requests))
    profile = load_profile(args.profile)
    median = int(statistics.median(r[2] for r in requests))
    routers: list[tuple[str, Chooser]] = [
        ("round_robin", round_robin()), ("heuristic", heuristic),
        ("heuristic, median length", one_bucket(median)), ("block", block())]
    if args.blind:
        routers.append(("block, median length", block(length=median)))
    for w in (float(x) for x in args.weights.split(",")):
        for slack in (float(x) for x in args.slacks.split(",")):
            routers.append((f"block w={w:g} slack={slack:g}", block(w, slack)))
            if args.tie_tolerance:
                routers.append((f"block w={w:g} slack={slack:g}, ties "
                                f"{args.tie_tolerance:g}",
                                block(w, slack, tie_tolerance=args.tie_tolerance)))
            if args.blind:
                routers.append((f"block w={w:g} slack={slack:g}, median length",
                                block(w, slack, median)))
            if args.without_arrivals:
                routers.append((f"block w={w:g} slack={slack:g}, no arrivals",
                                block(w, slack, arrivals=False)))
                if args.blind:
                    routers.append((f"block w={w:g} slack={slack:g}, median, no arrivals",
                                    block(w, slack, median, arrivals=False)))
    for stall in (float(x) for x in args.stalls.split(",") if x):
        routers.append((f"block prefill stall {stall:g}", block(prefill_stall=stall)))
        if args.blind:
            routers.append((f"block prefill stall {stall:g}, median length",
                            block(length=median, prefill_stall=stall)))
    rows: list[dict[str, Any]] = []
    for name, choose in routers:
        began = time.perf_counter()
        summary = summarize(run_episode(profile, args.instances, requests, choose, 0.05, 0,
                                            args.arrival_window))
        row: dict[str, Any] = {"router": name,
                               "wall_s": round(time.perf_counter() - began, 1)}
        row.update({k.replace("_s", "_ms"): round(v * 1000.0) for k, v in summary.items()
                    if k.endswith("_s")})
        rows.append(row)
        print(json.dumps(row), flush=True)
    rr = rows[0]["mean_e2e_ms"]
    print(f"\n{'router':40s} {'mean E2E':>9s} {'vs RR':>6s} {'P99 E2E':>8s} "
          f"{'mean TTFT':>9s} {'P99 TTFT':>8s}")
    for r in rows:
        print(f"{r['router']:40s} {r['mean_e2e_ms']:9,d} {r['mean_e2e_ms'] / rr:6.3f} "
              f"{r['p99_e2e_ms']:8,d} {r['mean_ttft_ms']:9,d} {r['p99_ttft_ms']:8,d}")


if __name__ == "__main__":
    main()
