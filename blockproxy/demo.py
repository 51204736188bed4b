"""Compare ``block`` with round robin and least-requests on an emulated GPU cluster.

Starts, for each policy in turn, a fresh emulated cluster (4 instances of Llama-3.1-8B on
H100, time-scaled so that this machine keeps up) and a fresh blockproxy in front of it,
replays the same slice of the Azure LLM 2023 conversation trace through the proxy (sped up
so that the cluster is busy), and prints vLLM-style latency figures per policy, in
real-GPU milliseconds, with a plot of the latency distributions.  Nothing needs a GPU or
a download: the trace slice ships with the load generator, and the full trace is used
when it is on the trace search path (``LOADGEN_TRACE_PATH``).  Needs the ``[loadgen]``
extra (the load generator's plots use matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from blockproxy.cli import require_extra

POLICIES = "block,round_robin,least_requests"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policies", default=POLICIES, help="policies to compare")
    parser.add_argument("--instances", type=int, default=4, help="emulated instances")
    parser.add_argument("--profile", default="llama-3.1-8b-h100-tp1", help="GPU profile")
    parser.add_argument("--num-requests", type=int, default=200,
                        help="requests replayed per policy")
    parser.add_argument("--rate-multiplier", type=float, default=40.0,
                        help="replay the trace this many times faster than it was recorded")
    parser.add_argument("--time-scale", type=float, default=8.0,
                        help="emulated GPU slowed down this many times (so one CPU process "
                             "emulates the cluster faithfully); figures are real-GPU time")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="blockproxy-demo",
                        help="directory for the plot and the JSON result")


def run(args: argparse.Namespace) -> int:
    require_extra("demo", "loadgen", "matplotlib")
    from loadgen.compare import compare_seeds
    from loadgen.report import format_compare, plot_results
    from loadgen.run import write_json
    from loadgen.workload import load_trace

    specs = load_trace("azure-conv", num_requests=args.num_requests)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    print(f"blockproxy demo: {len(policies)} policies x {len(specs)} requests of the Azure "
          f"conversation trace at {args.rate_multiplier:g}x speed, {args.instances} emulated "
          f"{args.profile} instances (time-scale {args.time_scale:g})", flush=True)
    started = time.monotonic()
    result = asyncio.run(compare_seeds(
        policies, specs, [args.seed], instances=args.instances, profile=args.profile,
        time_scale=args.time_scale, use_trace_arrivals=True,
        rate_multiplier=args.rate_multiplier, percentiles=(50, 90, 99),
        log=lambda line: print(line, flush=True)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(str(out / "demo.json"), result)
    plot_results([result], out / "demo.png")
    print()
    print(format_compare(result))
    print(f"\nplot: {(out / 'demo.png').resolve()}")
    print(f"data: {(out / 'demo.json').resolve()} (re-plot with: loadgen report "
          f"{out / 'demo.json'} --plot OTHER.png)")
    print(f"took {time.monotonic() - started:.0f} s")
    return 0
