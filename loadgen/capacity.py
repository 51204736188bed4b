"""The highest load whose P99 TTFT (or goodput ratio) meets an SLO, by a bounded search.

The knob is ``--request-rate`` (Poisson/gamma arrivals), or the trace replay's
``--rate-multiplier`` with ``--use-trace-timestamps``.  Every run uses the same trace
slice and seed, so only the load changes.  Search (at most ``--iterations`` runs): try
``--rate-lo``; if it fails, there is no capacity in range.  Try ``--rate-hi``; if it
passes, the capacity is at least ``hi``.  Otherwise bisect geometrically between the
highest pass and the lowest fail.  ``--multipliers`` instead runs a fixed list and reports
the highest value below the first failure.

Probes are cheap where that is exact: with a TTFT SLO, a probe ends at its last first token
(``--probe-until first-token``; every stream stays open until then, so the load is the
same) instead of waiting for the longest answers, and stops as soon as enough requests are
over the bound that the P99 must exceed it (an early abort, which can only ever cut a
failing probe short).  A goodput-ratio SLO needs whole requests, so its probes run to the
end.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from loadgen.measure import real_view
from loadgen.run import (
    UNTIL,
    add_workload_arguments,
    benchmark_kwargs,
    run_benchmark,
    specs_from_args,
    write_json,
)

RunOnce = Callable[[float], Awaitable[dict]]
MeetsSlo = Callable[[dict], bool]


def _point(value: float, metrics: dict, ok: bool) -> dict[str, Any]:
    # Time-scaled runs report real-GPU figures in the curve (what the SLO is about).
    real = real_view(metrics)
    return {"value": value, "passed": ok, "p99_ttft_ms": real.get("p99_ttft_ms"),
            "goodput_ratio": metrics.get("goodput_ratio"),
            "completed": metrics.get("completed"), "failed": metrics.get("failed"),
            "request_throughput": metrics.get("request_throughput"), "metrics": metrics}


async def find_capacity(run_once: RunOnce, lo: float, hi: float, iterations: int,
                        meets_slo: MeetsSlo) -> dict[str, Any]:
    """Search the highest value in ``[lo, hi]`` where ``meets_slo(await run_once(value))``.

    Assumes the SLO gets harder to meet as the value grows.  At most ``iterations`` calls
    of ``run_once``.  Returns ``{"capacity": highest passing value or None, "lowest_fail":
    lowest failing value or None, "curve": [points sorted by value], "runs": n}``, each
    point holding ``value``, ``passed``, ``p99_ttft_ms``, ``goodput_ratio`` and the full
    ``metrics``.
    """
    if not 0 < lo <= hi:
        raise ValueError("need 0 < lo <= hi")
    if iterations < 1:
        raise ValueError("iterations must be at least 1")
    curve: list[dict[str, Any]] = []
    best: float | None = None
    worst: float | None = None

    async def probe(value: float) -> bool:
        metrics = await run_once(value)
        ok = bool(meets_slo(metrics))
        curve.append(_point(value, metrics, ok))
        return ok

    if await probe(lo):
        best = lo
        if hi > lo and len(curve) < iterations:
            if await probe(hi):
                best = hi
            else:
                worst = hi
                while len(curve) < iterations:
                    mid = math.sqrt(best * worst)
                    if await probe(mid):
                        best = mid
                    else:
                        worst = mid
    else:
        worst = lo
    curve.sort(key=lambda p: p["value"])
    return {"capacity": best, "lowest_fail": worst, "curve": curve, "runs": len(curve)}


async def scan_capacity(run_once: RunOnce, values: Sequence[float],
                        meets_slo: MeetsSlo) -> dict[str, Any]:
    """Run every value (ascending); the capacity is the highest before the first fail."""
    curve = []
    best: float | None = None
    failed = False
    for value in sorted(values):
        metrics = await run_once(value)
        ok = bool(meets_slo(metrics))
        curve.append(_point(value, metrics, ok))
        if ok and not failed:
            best = value
        failed = failed or not ok
    first_fail = next((p["value"] for p in curve if not p["passed"]), None)
    return {"capacity": best, "lowest_fail": first_fail, "curve": curve, "runs": len(curve)}


def slo_check(p99_ttft_ms: float | None = None,
              min_goodput_ratio: float | None = None,
              max_failed: int = 0) -> MeetsSlo:
    """A pass/fail rule: P99 TTFT within bound, goodput ratio at least the minimum, and no
    more than ``max_failed`` failed requests."""
    def meets(metrics: dict) -> bool:
        if metrics.get("aborted") or metrics.get("failed", 0) > max_failed:
            return False
        if metrics.get("completed", 0) + metrics.get("cut", 0) == 0:
            return False
        if p99_ttft_ms is not None and not metrics["p99_ttft_ms"] <= p99_ttft_ms:
            return False
        return min_goodput_ratio is None or \
            metrics.get("goodput_ratio", 0.0) >= min_goodput_ratio
    return meets


def format_curve(result: dict[str, Any], knob: str) -> str:
    """The curve as a table and the capacity line."""
    lines = [f"{knob:>16} {'p99 TTFT ms':>12} {'goodput':>8} {'done':>6} {'failed':>6}  result"]
    for p in result["curve"]:
        goodput = p["goodput_ratio"]
        lines.append(f"{p['value']:>16.4g} {p['p99_ttft_ms'] or 0:>12.1f} "
                     f"{'-' if goodput is None else f'{goodput:.3f}':>8} "
                     f"{p['completed']:>6} {p['failed']:>6}  "
                     f"{'pass' if p['passed'] else 'FAIL'}")
    cap = result["capacity"]
    lines.append(f"capacity ({knob}): " + ("none in range" if cap is None else f"{cap:.4g}"))
    return "\n".join(lines)


def add_search_arguments(parser: argparse.ArgumentParser, rate_lo: float,
                         iterations: int) -> None:
    """The SLO, the search range and how probes run (``loadgen capacity`` and ``loadgen
    compare --capacity``)."""
    parser.add_argument("--slo-ttft-p99-ms", type=float, default=2000.0,
                        help="P99 TTFT bound in real-GPU ms (wall ms without --time-scale)")
    parser.add_argument("--min-goodput-ratio", type=float,
                        help="also require good/sent >= this (needs --goodput)")
    parser.add_argument("--max-failed", type=int, default=0,
                        help="failed requests allowed per probe")
    parser.add_argument("--rate-lo", type=float, default=rate_lo,
                        help="lowest rate (or rate multiplier) searched")
    parser.add_argument("--rate-hi", type=float, default=32.0,
                        help="highest rate (or rate multiplier) searched")
    parser.add_argument("--iterations", type=int, default=iterations,
                        help="at most this many probes (per policy)")
    parser.add_argument("--probe-until", choices=("auto", *UNTIL), default="auto",
                        help="a probe ends when every request is done, or at the last first "
                             "token (auto: first-token unless a goodput ratio is required, "
                             "which needs whole requests)")
    parser.add_argument("--no-early-abort", action="store_true",
                        help="run every probe to its end, even once its P99 TTFT must "
                             "exceed the SLO")


def probe_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``run_benchmark`` arguments of a probe: when it ends, and its TTFT abort bound
    (real-GPU ms, like the SLO)."""
    until = args.probe_until
    if until == "auto":
        until = "done" if args.min_goodput_ratio is not None else "first-token"
    if until == "first-token" and args.min_goodput_ratio is not None:
        raise ValueError("--min-goodput-ratio needs whole requests: use --probe-until done")
    abort = None
    if args.slo_ttft_p99_ms is not None and not args.no_early_abort:
        abort = args.slo_ttft_p99_ms
    return {"until": until, "ttft_abort_ms": abort, "abort_percentile": 99.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``loadgen capacity``."""
    add_workload_arguments(parser)
    add_search_arguments(parser, rate_lo=0.5, iterations=8)
    parser.add_argument("--multipliers", help="comma-separated values to run instead of a "
                                              "search")
    parser.add_argument("--json", metavar="OUT", help="write the curve and capacity here")


def run(args: argparse.Namespace) -> int:
    """``loadgen capacity``: print the curve and the capacity."""
    try:
        specs = specs_from_args(args)
        kwargs = {**benchmark_kwargs(args), **probe_kwargs(args)}
        values = ([float(v) for v in args.multipliers.split(",") if v.strip()]
                  if args.multipliers else None)
    except (ValueError, FileNotFoundError) as exc:
        print(f"loadgen capacity: {exc}", file=sys.stderr)
        return 2
    if args.min_goodput_ratio is not None and not kwargs["goodput"]:
        print("loadgen capacity: --min-goodput-ratio needs --goodput", file=sys.stderr)
        return 2
    knob = "rate_multiplier" if args.use_trace_timestamps else "request_rate"
    time_scale = args.time_scale
    check = slo_check(args.slo_ttft_p99_ms, args.min_goodput_ratio, args.max_failed)

    def meets(metrics: dict) -> bool:
        # The SLO is in real-GPU time; a time-scaled run's figures are unscaled first.
        return check(real_view(metrics))

    async def run_once(value: float) -> dict:
        metrics = await run_benchmark(args.target, specs, **{**kwargs, knob: value})
        mark = "pass" if meets(metrics) else "FAIL"
        print(f"{knob}={value:.4g}: p99 TTFT {metrics['p99_ttft_ms']:.1f} ms (wall), "
              f"completed {metrics['completed']}, cut {metrics.get('cut', 0)}, "
              f"failed {metrics['failed']} -> {mark}"
              + (f" (aborted: {metrics['aborted']})" if metrics.get("aborted") else ""),
              file=sys.stderr)
        return metrics

    if values:
        result = asyncio.run(scan_capacity(run_once, values, meets))
    else:
        result = asyncio.run(find_capacity(run_once, args.rate_lo, args.rate_hi,
                                           args.iterations, meets))
    result.update({"knob": knob, "slo_ttft_p99_ms": args.slo_ttft_p99_ms,
                   "min_goodput_ratio": args.min_goodput_ratio, "time_scale": time_scale})
    print(format_curve(result, knob))
    if args.json:
        write_json(args.json, result)
    return 0
