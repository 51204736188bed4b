"""``bench overhead``: the TTFT blockproxy adds compared with a direct connection.

Starts one emulated instance (``loadgen emulate``) and one blockproxy in front of it, then
runs the same closed-loop streaming workload (``loadgen``'s runner: N concurrent streams,
a short prompt, output lengths drawn uniformly so that the streams do not finish in
lockstep and arrive in waves) directly against the instance and through the proxy,
alternating rounds so that machine noise hits both alike.  One instance keeps
routing out of the picture: what differs is the proxy's own work (parse, predict, choose,
forward, relay every chunk).  The emulator runs time-scaled so that one process can serve
hundreds of streams faithfully; the added TTFT is reported in wall-clock milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
from typing import Any

from blockproxy.bench.routers import add_arguments as add_router_arguments
from blockproxy.bench.routers import bench_routers
from blockproxy.cli import require_extra


def add_arguments(parser: argparse._ActionsContainer) -> None:
    """Flags of ``bench overhead`` (``--profile`` comes from ``bench``)."""
    parser.add_argument("--concurrency", default="50,200", help="concurrent streams to test")
    parser.add_argument("--requests-per-stream", type=int, default=4,
                        help="requests each stream sends per round")
    parser.add_argument("--rounds", type=int, default=2,
                        help="direct/proxy alternations per concurrency")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", default="32,96",
                        help="range of output lengths (uniform)")
    parser.add_argument("--time-scale", type=float, default=4.0,
                        help="emulator time scale (slower steps keep one process faithful)")
    parser.add_argument("--policy", default="block", help="the proxy's policy")
    add_router_arguments(parser)


async def _ttfts(target: str, concurrency: int, count: int, args: argparse.Namespace
                 ) -> tuple[list[float], float]:
    """TTFTs (ms) of ``count`` requests at ``concurrency``, and the chunks per second."""
    from loadgen.run import run_benchmark
    from loadgen.workload import RequestSpec

    lo, hi = (int(x) for x in args.output_tokens.split(","))
    rng = random.Random(count)
    specs = [RequestSpec(args.prompt_tokens, rng.randint(lo, hi), 0.0) for _ in range(count)]
    result = await run_benchmark(target, specs, max_concurrency=concurrency,
                                 max_tokens_policy="true", detail=True, seed=1)
    if result["failed"]:
        raise RuntimeError(f"{result['failed']} requests failed against {target}")
    return [r["ttft_ms"] for r in result["per_request"]], result["output_throughput"]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def bench_overhead(args: argparse.Namespace) -> dict[str, Any]:
    require_extra("bench overhead", "loadgen")
    if args.against:
        return asyncio.run(bench_routers(args))
    return asyncio.run(_bench_overhead(args))


async def _bench_overhead(args: argparse.Namespace) -> dict[str, Any]:
    from loadgen.cluster import EmulatedCluster, ProxyProcess

    no_ext = os.environ.get("BLOCKPROXY_NO_EXTENSIONS", "") not in ("", "0")
    result: dict[str, Any] = {"unit": "ms", "time_scale": args.time_scale,
                              "prompt_tokens": args.prompt_tokens,
                              "output_tokens": args.output_tokens, "policy": args.policy,
                              "simulator": "py" if no_ext else "c"}
    cluster = EmulatedCluster(1, profile=args.profile, time_scale=args.time_scale,
                              extra_args=["--stall-prob", "0"])
    async with cluster:
        proxy = ProxyProcess(cluster.backend_entries(), args.policy,
                             ["--speed", repr(args.time_scale), "--log-level", "warning"],
                             profile=args.profile)
        async with proxy:
            direct_url = cluster.urls[0]
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                count = concurrency * args.requests_per_stream
                direct: list[float] = []
                proxied: list[float] = []
                rates = []
                await _ttfts(proxy.url, concurrency, concurrency, args)  # warm-up
                for _ in range(args.rounds):
                    ttfts, _rate = await _ttfts(direct_url, concurrency, count, args)
                    direct += ttfts
                    ttfts, rate = await _ttfts(proxy.url, concurrency, count, args)
                    proxied += ttfts
                    rates.append(rate)
                row: dict[str, Any] = {
                    "chunks_per_s_through_proxy": round(sum(rates) / len(rates))}
                for q in (50, 99):
                    d, p = _percentile(direct, q), _percentile(proxied, q)
                    row[f"direct_p{q}_ttft_ms"] = round(d, 3)
                    row[f"proxy_p{q}_ttft_ms"] = round(p, 3)
                    row[f"added_p{q}_ttft_ms"] = round(p - d, 3)
                row["requests_each"] = len(direct)
                result[str(concurrency)] = row
    return result
