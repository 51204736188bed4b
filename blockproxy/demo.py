"""``blockproxy demo``: ``block`` beside round robin and a peer router, on an emulated cluster.

For each router in turn it starts a fresh emulated cluster (Llama-3.1-8B on H100,
time-scaled so that this machine keeps up) and a fresh router in front of it, replays the
same workload, and prints vLLM-style latency figures per router in real-GPU milliseconds,
with a plot of the latency distributions.  Nothing needs a GPU or a download.

Two workloads (``--workload``):

- ``sessions`` (default): multi-turn chat sessions sharing long system prompts, the load
  generator's seeded generator (``--format sessions``): every turn's prompt is the whole
  conversation so far, so where a turn goes decides how much of it is already in that
  instance's prefix cache.  ``block`` runs against round robin and the best prefix-aware peer
  that is installed (SGLang's ``cache_aware`` router, else vLLM router's); the table shows
  each router's prefix-cache hit rate as the emulated engines report it.
- ``azure``: the Azure LLM 2023 conversation trace (a slice ships with the load generator;
  the full trace is used when it is on ``LOADGEN_TRACE_PATH``), ``block`` against round
  robin and least-requests.

Needs the ``[loadgen]`` extra (the load generator's plots use matplotlib); the peers are in
the ``[peers]`` extra.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from blockproxy.cli import require_extra

#: peers tried in order for the sessions workload: the first one installed runs
PREFIX_PEERS = ("sglang:cache_aware", "vllm-router:cache_aware")
#: per workload: policies, instances, requests/sessions, rate multiplier, time scale
WORKLOADS: dict[str, dict[str, Any]] = {
    "sessions": {"policies": "block,round_robin", "instances": 4, "size": 60,
                 "rate_multiplier": 30.0, "time_scale": 6.0},
    "azure": {"policies": "block,round_robin,least_requests", "instances": 4, "size": 200,
              "rate_multiplier": 40.0, "time_scale": 8.0},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="sessions",
                        help="multi-turn sessions (prefix caching) or the Azure trace")
    parser.add_argument("--policies", help="routers to compare (default: per workload; "
                                           "sessions adds the best installed peer)")
    parser.add_argument("--instances", type=int, help="emulated instances (default 4)")
    parser.add_argument("--profile", default="llama-3.1-8b-h100-tp1", help="GPU profile")
    parser.add_argument("--num-requests", type=int,
                        help="azure: requests replayed; sessions: sessions generated "
                             "(default 200 / 60)")
    parser.add_argument("--rate-multiplier", type=float,
                        help="replay this many times faster than the trace or generator "
                             "(default 40 / 30)")
    parser.add_argument("--time-scale", type=float,
                        help="emulated GPU slowed down this many times (so one CPU process "
                             "emulates the cluster faithfully); figures are real-GPU time "
                             "(default 8 / 6)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="blockproxy-demo",
                        help="directory for the plot and the JSON result")


def _installed_peer() -> str | None:
    from loadgen.peers import PeerMissing, parse_router

    for spec in PREFIX_PEERS:
        peer, _ = parse_router(spec)
        try:
            assert peer is not None
            peer.executable()
        except PeerMissing:
            continue
        return spec
    return None


def run(args: argparse.Namespace) -> int:
    require_extra("demo", "loadgen", "matplotlib")
    from loadgen.compare import compare_seeds
    from loadgen.report import format_compare, plot_results
    from loadgen.run import write_json
    from loadgen.workload import load_trace, sessions

    preset = WORKLOADS[args.workload]
    instances = args.instances or preset["instances"]
    size = args.num_requests or preset["size"]
    rate = args.rate_multiplier or preset["rate_multiplier"]
    time_scale = args.time_scale or preset["time_scale"]
    policies = [p.strip() for p in (args.policies or preset["policies"]).split(",")
                if p.strip()]
    if args.workload == "sessions":
        specs = sessions(size, turns_mean=5.0, system_prompts=8, system_tokens=4096,
                         user_tokens_mean=400, output_mean=100, session_rate=2.0,
                         think_time_s=5.0, seed=args.seed)
        peer = _installed_peer() if args.policies is None else None
        if peer is not None:
            policies.append(peer)
        elif args.policies is None:
            print("(no peer router installed: pip install '.[peers]' adds SGLang's and "
                  "vLLM's routers to the comparison)", flush=True)
        what = (f"{size} multi-turn sessions ({len(specs)} requests, system prompts of "
                f"4,096 tokens)")
    else:
        specs = load_trace("azure-conv", num_requests=size)
        what = f"{len(specs)} requests of the Azure conversation trace"
    print(f"blockproxy demo: {', '.join(policies)} x {what} at {rate:g}x speed, "
          f"{instances} emulated {args.profile} instances (time-scale {time_scale:g})",
          flush=True)
    started = time.monotonic()
    result = asyncio.run(compare_seeds(
        policies, specs, [args.seed], instances=instances, profile=args.profile,
        time_scale=time_scale, use_trace_arrivals=True, rate_multiplier=rate,
        percentiles=(50, 90, 99), log=lambda line: print(line, flush=True)))
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
