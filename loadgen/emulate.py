"""Start N emulated vLLM instances in one process, one port each (no GPU needed).

Each instance speaks vLLM's HTTP API (completions and chat, streaming or not, /v1/models,
/health, /version, /metrics) and runs its own continuous-batching engine whose step
time follows the profile x speed factor x time-scale, with lognormal noise and rare
stalls.  A speed factor is a step-time multiplier (1.25 = 25% slower).  The true output
length comes from the ``x-loadgen-output-tokens`` header when present.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys
import time

from aiohttp import web

from loadgen.emulator.engine import Engine, TimingConfig
from loadgen.emulator.kvevents import KVEventPublisher
from loadgen.emulator.metrics import InstanceMetrics
from loadgen.emulator.profiles import EngineLimits, Profile, load_profile
from loadgen.emulator.server import Instance, create_app
from loadgen.tokenizer import write_tokenizer
from loadgen.truth import Truth

DEFAULT_PROFILE = "llama-3.1-8b-h100-tp1"


def _speed_factors(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError("speed factors must be positive numbers")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``loadgen emulate``."""
    parser.add_argument("--instances", type=int, default=1, help="number of instances")
    parser.add_argument("--base-port", type=int, default=8100,
                        help="port of instance 0; instance i listens on base-port + i")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--profile", default=DEFAULT_PROFILE,
                        help="profile name (profiles/NAME.json) or path to a profile JSON")
    parser.add_argument("--model-name", default="tiny", help="served model name")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="multiplies every step time (0.1 = ten times faster)")
    parser.add_argument("--speed-factors", type=_speed_factors, default=[1.0],
                        help="step-time multiplier per instance, comma-separated: one value "
                             "for all, or one per instance (1.25 = 25%% slower)")
    parser.add_argument("--max-num-seqs", type=int, help="override the profile's sequence cap")
    parser.add_argument("--max-num-batched-tokens", type=int,
                        help="override the profile's token budget per step")
    parser.add_argument("--num-gpu-blocks", type=int, help="override the KV cache size")
    parser.add_argument("--block-size", type=int, help="override tokens per KV block")
    parser.add_argument("--max-model-len", type=int, help="override the context limit")
    parser.add_argument("--noise-sigma", type=float, default=0.05,
                        help="sigma of the mean-one lognormal step-time noise (0 = none)")
    parser.add_argument("--stall-prob", type=float, default=0.001,
                        help="probability per step of a stall (0 = never)")
    parser.add_argument("--stall-ms", type=float, default=40.0,
                        help="mean stall length in ms at time-scale 1 (uniform 0.5x-1.5x)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the engines' noise")
    parser.add_argument("--request-overhead-ms", type=float, metavar="MS",
                        help="per-request time before the engine queues a request (x "
                             "time-scale; default: the profile's per_request_ms, else 0)")
    parser.add_argument("--kv-events-port", type=int, metavar="PORT",
                        help="publish KV cache events as vLLM does (ZeroMQ PUB, msgpack): "
                             "instance i on tcp://HOST:PORT+i")
    parser.add_argument("--write-tokenizer", metavar="DIR",
                        help="write the word tokenizer (tokenizer.json, and the chat rule as "
                             "a template in tokenizer_config.json) into DIR, for a router "
                             "that follows the KV events: the events carry its ids")
    parser.add_argument("--truth", metavar="FILE",
                        help="true output lengths by prompt, written by loadgen run/compare "
                             "(router-neutral; re-read when it changes; may not exist yet)")


def _limits(profile: Profile, args: argparse.Namespace) -> EngineLimits:
    overrides = {field: getattr(args, field) for field in (
        "max_num_seqs", "max_num_batched_tokens", "num_gpu_blocks", "block_size",
        "max_model_len") if getattr(args, field, None) is not None}
    for field, value in overrides.items():
        if value <= 0:
            raise ValueError(f"--{field.replace('_', '-')} must be positive")
    return dataclasses.replace(profile.engine, **overrides)


def build_instances(args: argparse.Namespace) -> list[Instance]:
    """One engine + metrics per instance, from the parsed flags."""
    if args.instances < 1:
        raise ValueError("--instances must be at least 1")
    factors = args.speed_factors
    if len(factors) not in (1, args.instances):
        raise ValueError(f"--speed-factors has {len(factors)} values; give 1 or "
                         f"{args.instances}")
    if args.time_scale <= 0 or args.noise_sigma < 0 or not 0 <= args.stall_prob <= 1:
        raise ValueError("--time-scale must be > 0, --noise-sigma >= 0, --stall-prob in [0, 1]")
    profile = load_profile(args.profile)
    limits = _limits(profile, args)
    started = int(time.time())
    truth = Truth(args.truth) if getattr(args, "truth", None) else None
    overhead = getattr(args, "request_overhead_ms", None)
    overhead = profile.step_time.per_request_s if overhead is None else overhead * 1e-3
    if overhead < 0:
        raise ValueError("--request-overhead-ms must be >= 0")
    instances = []
    for i in range(args.instances):
        timing = TimingConfig(time_scale=args.time_scale,
                              speed_factor=factors[i] if len(factors) > 1 else factors[0],
                              noise_sigma=args.noise_sigma, stall_prob=args.stall_prob,
                              stall_ms=args.stall_ms, seed=args.seed * 1_000_003 + i,
                              request_overhead_s=overhead)
        metrics = InstanceMetrics(args.model_name)
        publisher = None
        if getattr(args, "kv_events_port", None):
            publisher = KVEventPublisher(f"tcp://{args.host}:{args.kv_events_port + i}",
                                         limits.block_size)
        engine = Engine(profile.step_time, limits, timing, metrics, publisher)
        instances.append(Instance(i, args.model_name, engine, metrics, started, truth))
    return instances


async def serve(args: argparse.Namespace) -> int:
    """Run the instances until SIGINT/SIGTERM."""
    instances = build_instances(args)
    if getattr(args, "write_tokenizer", None):
        write_tokenizer(args.write_tokenizer)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    engine_tasks = [asyncio.create_task(inst.engine.run(), name=f"engine-{inst.index}")
                    for inst in instances]
    runners: list[web.AppRunner] = []
    try:
        for inst in instances:
            # handler_cancellation: a client that disconnects cancels its handler, which
            # aborts its request even while it is still queued.
            runner = web.AppRunner(create_app(inst), handler_cancellation=True,
                                   access_log=None, shutdown_timeout=0.25)
            await runner.setup()
            runners.append(runner)
            port = args.base_port + inst.index
            await web.TCPSite(runner, args.host, port, backlog=1024).start()
            print(f"emulated instance {inst.index} listening on http://{args.host}:{port}",
                  flush=True)
        await stop.wait()
    finally:
        for task in engine_tasks:
            task.cancel()
        await asyncio.gather(*engine_tasks, return_exceptions=True)
        # Concurrently: each runner waits up to its shutdown_timeout for open connections.
        await asyncio.gather(*(runner.cleanup() for runner in runners),
                             return_exceptions=True)
        for inst in instances:
            if inst.engine.publisher is not None:
                inst.engine.publisher.close()
    return 0


def install_event_loop_policy() -> None:
    """Use uvloop when available (as uvicorn's ``loops/auto.py``)."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run(args: argparse.Namespace) -> int:
    """Entry point of ``loadgen emulate``."""
    try:
        build_instances(args)  # validate flags and the profile before binding anything
    except (ValueError, FileNotFoundError) as exc:
        print(f"loadgen emulate: {exc}", file=sys.stderr)
        return 2
    install_event_loop_policy()
    try:
        return asyncio.run(serve(args))
    except OSError as exc:
        print(f"loadgen emulate: {exc}", file=sys.stderr)
        return 1
