"""``bench overhead --against nginx,sglang,vllm-router``: blockproxy's cost beside the peers.

Every router stands in front of the same origin (emulated instances, one process) at the
same time, and the same two closed-loop workloads go through each in turn, several
alternating rounds, with a direct run (the client round-robins over the instances itself)
in every round as the TTFT baseline:

* *streams*: ``--stream-requests`` requests of ``--stream-tokens`` streamed tokens at
  ``--stream-concurrency`` (each token is one SSE chunk the router relays);
* *short*: ``--short-requests`` requests of ``--short-tokens`` tokens at the same
  concurrency (the per-request path: parse, decide, connect, headers).

Per router: CPU time of all its processes (``/proc``: nginx's workers too) per streamed
chunk and per short request, the streamed chunks per second one core of it could relay at
that cost, and added TTFT p50/p99 against the direct runs, with ratios to nginx and to the
cheaper Rust gateway.  The origin, the client and the router share this machine's cores,
so CPU time, not throughput, is the comparable figure.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

#: router spec of each ``--against`` name
AGAINST = {"nginx": "nginx:round_robin", "sglang": "sglang:round_robin",
           "vllm-router": "vllm-router:round_robin"}


def add_arguments(group: argparse._ActionsContainer) -> None:
    group.add_argument("--against", default="",
                       help="peers to measure beside blockproxy (nginx, sglang, vllm-router, "
                            "or PEER:POLICY); empty: the plain TTFT benchmark")
    group.add_argument("--blockproxy-policies", default="block,round_robin",
                       help="blockproxy policies measured with --against")
    group.add_argument("--origin-instances", type=int, default=2)
    group.add_argument("--stream-requests", type=int, default=600)
    group.add_argument("--stream-tokens", type=int, default=200)
    group.add_argument("--stream-concurrency", type=int, default=64)
    group.add_argument("--short-requests", type=int, default=3000)
    group.add_argument("--short-tokens", type=int, default=2)
    group.add_argument("--origin-time-scale", type=float, default=0.25,
                       help="emulator time scale of the origin (small: a fast origin)")


async def bench_routers(args: argparse.Namespace) -> dict[str, Any]:
    from loadgen.cluster import EmulatedCluster, PeerProcess, ProxyProcess
    from loadgen.peers import parse_router

    specs = ([f"blockproxy:{p}" for p in args.blockproxy_policies.split(",") if p]
             + [AGAINST.get(name, name) for name in args.against.split(",") if name])
    cluster = EmulatedCluster(args.origin_instances, profile=args.profile,
                              time_scale=args.origin_time_scale,
                              extra_args=["--stall-prob", "0"])
    samples: dict[str, dict[str, list[float]]] = {s: {} for s in ["direct", *specs]}
    versions: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-routers-") as tmp:
        async with cluster:
            routers: dict[str, Any] = {}
            try:
                for spec in specs:
                    if spec.startswith("blockproxy:"):
                        policy = spec.split(":", 1)[1]
                        proc: Any = ProxyProcess(
                            cluster.backend_entries(), policy,
                            ["--speed", repr(args.origin_time_scale), "--log-level",
                             "warning"], profile=args.profile, log_dir=Path(tmp) / spec)
                        versions[spec] = f"blockproxy {policy}"
                    else:
                        peer, policy = parse_router(spec)
                        assert peer is not None
                        proc = PeerProcess(peer, policy, cluster.urls, Path(tmp))
                        versions[spec] = proc.version
                    await proc.start()
                    routers[spec] = proc
                for _ in range(args.rounds):
                    await _measure(samples["direct"], cluster.urls, [], args)
                    for spec, proc in routers.items():
                        await _measure(samples[spec], [proc.url], proc.pids, args)
            finally:
                for proc in routers.values():
                    proc.stop()
    return _summary(samples, versions, args)


async def _measure(into: dict[str, list[float]], targets: list[str], pids: list[int],
                   args: argparse.Namespace) -> None:
    """One round of both workloads through ``targets``; CPU of ``pids`` (if any)."""
    from loadgen.procs import cpu_seconds
    from loadgen.run import run_benchmark
    from loadgen.workload import RequestSpec

    for kind, count, tokens in (("stream", args.stream_requests, args.stream_tokens),
                                ("short", args.short_requests, args.short_tokens)):
        specs = [RequestSpec(args.prompt_tokens, tokens, 0.0) for _ in range(count)]
        before = cpu_seconds(pids) if pids else 0.0
        result = await run_benchmark(targets[0] if len(targets) == 1 else targets, specs,
                                     max_concurrency=args.stream_concurrency,
                                     max_tokens_policy="true", detail=kind == "stream",
                                     seed=1)
        cpu = cpu_seconds(pids) - before if pids else 0.0
        if result["failed"]:
            raise RuntimeError(f"{result['failed']} {kind} requests failed via {targets}")
        into.setdefault(f"{kind}_cpu_s", []).append(cpu)
        into.setdefault(f"{kind}_requests", []).append(result["completed"])
        into.setdefault(f"{kind}_chunks", []).append(result["total_output_tokens"])
        if kind == "stream":
            into.setdefault("ttft_ms", []).extend(r["ttft_ms"] for r in result["per_request"])


def _summary(samples: dict[str, dict[str, list[float]]], versions: dict[str, str],
             args: argparse.Namespace) -> dict[str, Any]:
    direct = samples["direct"]["ttft_ms"]
    rows: dict[str, dict[str, Any]] = {}
    for spec, s in samples.items():
        if spec == "direct":
            continue
        per_chunk = sum(s["stream_cpu_s"]) / sum(s["stream_chunks"]) * 1e6
        per_request = sum(s["short_cpu_s"]) / sum(s["short_requests"]) * 1e6
        rows[spec] = {
            "router": versions[spec],
            "cpu_us_per_streamed_chunk": round(per_chunk, 2),
            "cpu_us_per_short_request": round(per_request, 1),
            "chunks_per_s_per_core": round(1e6 / per_chunk) if per_chunk else None,
            "added_p50_ttft_ms": round(_q(s["ttft_ms"], 50) - _q(direct, 50), 2),
            "added_p99_ttft_ms": round(_q(s["ttft_ms"], 99) - _q(direct, 99), 2),
        }
    for base in ("nginx:round_robin", "gateway"):
        ref = _reference(rows, base)
        if ref is None:
            continue
        for row in rows.values():
            for key in ("cpu_us_per_streamed_chunk", "cpu_us_per_short_request"):
                row[f"{key}_vs_{base.split(':')[0]}"] = round(row[key] / ref[key], 2)
    return {"unit": "CPU microseconds of the router's processes; TTFT wall ms",
            "origin": {"instances": args.origin_instances,
                       "time_scale": args.origin_time_scale},
            "workloads": {"stream": [args.stream_requests, args.stream_tokens],
                          "short": [args.short_requests, args.short_tokens],
                          "concurrency": args.stream_concurrency, "rounds": args.rounds},
            "direct_ttft_ms": {"p50": round(_q(direct, 50), 2), "p99": round(_q(direct, 99), 2)},
            "routers": rows}


def _reference(rows: dict[str, dict[str, Any]], base: str) -> dict[str, Any] | None:
    """nginx's row, or (``gateway``) the Rust gateway cheaper per streamed chunk."""
    if base != "gateway":
        return rows.get(base)
    gateways = [r for spec, r in rows.items() if spec.split(":")[0] in ("sglang",
                                                                       "vllm-router")]
    return min(gateways, key=lambda r: r["cpu_us_per_streamed_chunk"], default=None)


def _q(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] \
        if q < 100 else max(values)
