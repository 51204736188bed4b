"""Benchmark: how many emulated instances one ``loadgen emulate`` process sustains.

For N = 1, 2, 4, ... instances it starts one emulator process at time-scale 1, keeps every
instance busy with closed-loop streaming clients running in this (separate) process, and
reads the engines' step records (``/debug/engine``) over a measurement window:

* duration drift: median over back-to-back steps of (measured / intended duration) - 1,
  where measured is the time between the ends of consecutive steps;
* rate drift: sum of measured durations / sum of intended durations - 1;
* lateness: how late steps end relative to their deadline (median and p99, ms), and the
  median lateness as a fraction of the mean step.

N is sustainable while both drifts and the relative median lateness stay within 5%; the
sweep stops at the first N that exceeds it.  Run: ``python -m loadgen.bench_emulator --json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from loadgen import promtext
from loadgen.procs import ChildProcess, command, free_port_range, wait_healthy
from loadgen.tokenizer import make_prompt

DRIFT_LIMIT = 0.05


def _start_emulator(instances: int, base: int, profile: str, log_dir: str) -> ChildProcess:
    return ChildProcess([*command("loadgen"), "emulate", "--instances", str(instances),
                         "--base-port", str(base), "--profile", profile, "--time-scale", "1",
                         "--stall-prob", "0"], f"emulator-{base}", Path(log_dir))


async def _client(session: aiohttp.ClientSession, url: str, worker: int, output_tokens: int,
                  counter: list[int], stop: asyncio.Event) -> None:
    """A closed-loop streaming client: one request after another until ``stop``."""
    i = 0
    while not stop.is_set():
        body = {"prompt": make_prompt(100, seed=worker * 100_003 + i), "stream": True,
                "ignore_eos": True, "max_tokens": output_tokens}
        i += 1
        async with session.post(url, json=body) as resp:
            async for data in resp.content.iter_any():
                counter[0] += data.count(b'"text":')
                if stop.is_set():
                    return


def _window_stats(steps: list[dict[str, Any]], t0: float, t1: float) -> dict[str, Any]:
    ratios, measured_sum, intended_sum, late = [], 0.0, 0.0, []
    for prev, cur in zip(steps, steps[1:]):
        if not t0 <= cur["intended_start"] <= t1:
            continue
        late.append(cur["actual_end"] - cur["intended_end"])
        if cur["intended_start"] == prev["intended_end"]:
            measured = cur["actual_end"] - prev["actual_end"]
            ratios.append(measured / cur["true_s"])
            measured_sum += measured
            intended_sum += cur["true_s"]
    return {"ratios": ratios, "measured_sum": measured_sum, "intended_sum": intended_sum,
            "late": late}


async def _measure(instances: int, streams: int, output_tokens: int, warmup: float,
                   window: float, profile: str) -> dict[str, Any]:
    base = free_port_range(instances)
    log_dir = tempfile.mkdtemp(prefix="bench-emulator-")
    proc = _start_emulator(instances, base, profile, log_dir)
    urls = [f"http://127.0.0.1:{base + i}" for i in range(instances)]
    stop = asyncio.Event()
    counter = [0]
    try:
        await wait_healthy(urls, [proc])
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            tasks = [asyncio.create_task(_client(session, f"{url}/v1/completions",
                                                 i * streams + k, output_tokens, counter, stop))
                     for i, url in enumerate(urls) for k in range(streams)]
            await asyncio.sleep(warmup)
            t0, received0 = time.perf_counter(), counter[0]
            gen0 = await _generated(session, urls)
            await asyncio.sleep(window)
            t1, received1 = time.perf_counter(), counter[0]
            gen1 = await _generated(session, urls)
            merged: dict[str, Any] = {"ratios": [], "measured_sum": 0.0, "intended_sum": 0.0,
                                      "late": []}
            resyncs = 0
            for url in urls:
                async with session.get(f"{url}/debug/engine", params={"last": "4096"}) as r:
                    debug = await r.json()
                resyncs += debug["num_resyncs"]
                steps = [dict(zip(debug["step_fields"], s)) for s in debug["steps"]]
                part = _window_stats(steps, t0, t1)
                for key in merged:
                    merged[key] += part[key]
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        proc.stop()
        shutil.rmtree(log_dir, ignore_errors=True)
    ratios, late = merged["ratios"], sorted(merged["late"])
    duration_drift = statistics.median(ratios) - 1 if ratios else float("nan")
    late_p50 = late[len(late) // 2] if late else float("nan")
    mean_step = merged["intended_sum"] / len(ratios) if ratios else float("nan")
    rate_drift = (merged["measured_sum"] / merged["intended_sum"] - 1
                  if merged["intended_sum"] else float("nan"))
    return {
        "instances": instances,
        "streams_per_instance": streams,
        "generated_tokens_per_s": round((gen1 - gen0) / (t1 - t0)),
        "streamed_tokens_per_s": round((received1 - received0) / (t1 - t0)),
        "steps_measured": len(ratios),
        "duration_drift": round(duration_drift, 4),
        "rate_drift": round(rate_drift, 4),
        "late_ms_p50": round(late_p50 * 1e3, 3),
        "late_relative_p50": round(late_p50 / mean_step, 4),
        "late_ms_p99": round(late[int(len(late) * 0.99)] * 1e3, 3) if late else None,
        "resyncs": resyncs,
    }


async def _generated(session: aiohttp.ClientSession, urls: list[str]) -> int:
    generated = 0
    for url in urls:
        async with session.get(f"{url}/metrics") as resp:
            generated += int(promtext.total(await resp.text(), "vllm:generation_tokens_total"))
    return generated


async def bench(counts: list[int], streams: int, output_tokens: int, warmup: float,
                window: float, profile: str, log: Any) -> dict[str, Any]:
    """Run the sweep; stop at the first N whose drift exceeds 5%."""
    results, sustainable = [], 0
    for n in counts:
        result = await _measure(n, streams, output_tokens, warmup, window, profile)
        worst = max(abs(result["duration_drift"]), abs(result["rate_drift"]),
                    abs(result["late_relative_p50"]))
        result["drift"] = round(worst, 4)
        result["within_5_percent"] = bool(worst <= DRIFT_LIMIT)
        results.append(result)
        print(json.dumps(result), file=log, flush=True)
        if not result["within_5_percent"]:
            break
        sustainable = n
    return {"profile": profile, "time_scale": 1.0, "drift_limit": DRIFT_LIMIT,
            "cpu_count": os.cpu_count(), "results": results,
            "max_sustainable_instances": sustainable,
            "tokens_per_s_at_max": next((r["generated_tokens_per_s"] for r in results
                                         if r["instances"] == sustainable), 0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadgen.bench_emulator",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--instances", default="1,2,3,4,5,6,8,16,32",
                        help="instance counts to try, in order")
    parser.add_argument("--streams", type=int, default=16,
                        help="concurrent closed-loop streams per instance")
    parser.add_argument("--output-tokens", type=int, default=200)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--window", type=float, default=6.0, help="seconds measured")
    parser.add_argument("--profile", default="llama-3.1-8b-h100-tp1")
    args = parser.parse_args(argv)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    counts = [int(n) for n in args.instances.split(",")]
    summary = asyncio.run(bench(counts, args.streams, args.output_tokens, args.warmup,
                                args.window, args.profile, sys.stderr))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for r in summary["results"]:
            print(f"{r['instances']:>3} instances: {r['generated_tokens_per_s']:>7} tok/s, "
                  f"duration drift {r['duration_drift']:+.3f}, rate drift "
                  f"{r['rate_drift']:+.3f}, late p50 {r['late_ms_p50']} ms")
        print(f"max sustainable: {summary['max_sustainable_instances']} instances")
    return 0


if __name__ == "__main__":
    sys.exit(main())
