"""``loadgen workload``: write a workload's requests to a file, for offline tools.

The requests a trace (or a mix of length-only traces) gives, with their arrival times in
real-GPU seconds: a timestamped trace's own, divided by ``--rate-multiplier``; Poisson
arrivals at ``--request-rate`` (seeded) for a length-only one.  JSON Lines, one request
per line, in arrival order: ``{"arrival_s": 0.012, "prompt_tokens": 1830,
"output_tokens": 212}``.  ``blockproxy train-router --requests FILE`` reads it, so the
proxy's package needs nothing of the load generator's trace readers.
"""

from __future__ import annotations

import argparse
import sys

import orjson

from loadgen.workload import assign_arrivals, load_trace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", required=True,
                        help="trace file or name (azure-conv, sharegpt+arxiv, ...)")
    parser.add_argument("--trace-path", default=None, metavar="DIR[:DIR...]",
                        help="directories searched for a trace given by name "
                             "[env LOADGEN_TRACE_PATH]")
    parser.add_argument("--num-requests", type=int, help="at most this many requests")
    parser.add_argument("--rate-multiplier", type=float, default=1.0,
                        help="speed-up of a timestamped trace")
    parser.add_argument("--request-rate", type=float, default=0.0,
                        help="Poisson arrivals per second for a length-only trace")
    parser.add_argument("--seed", type=int, default=1, help="seed of those arrivals")
    parser.add_argument("--out", required=True, help="file to write (JSON Lines)")


def run(args: argparse.Namespace) -> int:
    try:
        specs = load_trace(args.trace, num_requests=args.num_requests,
                           search_path=args.trace_path)
        if all(s.arrival_s == 0 for s in specs):
            if not args.request_rate > 0:
                raise ValueError("a length-only trace needs --request-rate")
            specs = assign_arrivals(specs, args.request_rate, seed=args.seed)
            times = [s.arrival_s for s in specs]
        else:
            times = [s.arrival_s / args.rate_multiplier for s in specs]
        with open(args.out, "wb") as f:
            for t, s in zip(times, specs, strict=True):
                f.write(orjson.dumps({"arrival_s": t, "prompt_tokens": s.prompt_tokens,
                                      "output_tokens": s.output_tokens}) + b"\n")
    except (OSError, ValueError) as exc:
        print(f"loadgen workload: {exc}", file=sys.stderr)
        return 1
    print(f"{len(specs)} requests written to {args.out}", file=sys.stderr)
    return 0
