"""Profile blockproxy on the per-request path: short requests, closed loop, py-spy.

    python scripts/profile_requests.py [--policy block] [--requests 3000] [--spy OUT.txt]

Starts 2 emulated instances (a fast origin, time-scale 0.25) and one ``blockproxy serve``,
sends ``--requests`` two-token streams at concurrency 64 three times, and prints the
proxy's CPU microseconds per request for each round (user + system time from ``/proc``).
With ``--spy``, py-spy records the proxy during the rounds in raw (collapsed-stack) form;
``--summary`` prints the share of samples by innermost frame's package.  Every process
started is stopped, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from loadgen.cluster import EmulatedCluster, ProxyProcess
from loadgen.procs import cpu_seconds
from loadgen.run import run_benchmark
from loadgen.workload import RequestSpec


async def main(args: argparse.Namespace) -> None:
    cluster = EmulatedCluster(2, profile="llama-3.1-8b-a100-80gb-tp1", time_scale=0.25,
                              extra_args=["--stall-prob", "0"])
    async with cluster:
        proc = ProxyProcess(cluster.backend_entries(), args.policy,
                            ["--speed", "0.25", "--log-level", "warning"],
                            log_dir=Path(tempfile.mkdtemp(prefix="profile-requests-")))
        await proc.start()
        spy = None
        try:
            def specs(n: int) -> list[RequestSpec]:
                return [RequestSpec(64, 2, 0.0) for _ in range(n)]

            await run_benchmark(proc.url, specs(300), max_concurrency=64,
                                max_tokens_policy="true", seed=1)  # warm-up
            if args.spy:
                exe = shutil.which("py-spy")
                if exe is None:
                    raise SystemExit("py-spy is not installed (pip install py-spy)")
                spy = subprocess.Popen([exe, "record", "--pid", str(proc.pids[0]), "-r", "250",
                                        "-f", "raw", "-o", args.spy, "--nonblocking"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)
            for rnd in range(3):
                before = cpu_seconds(proc.pids)
                start = time.perf_counter()
                result = await run_benchmark(proc.url, specs(args.requests),
                                             max_concurrency=64, max_tokens_policy="true",
                                             seed=1)
                cpu = cpu_seconds(proc.pids) - before
                print(f"round {rnd}: {cpu / result['completed'] * 1e6:.0f} CPU us/request, "
                      f"{result['completed'] / (time.perf_counter() - start):.0f} requests/s, "
                      f"{result['failed']} failed", flush=True)
        finally:
            if spy is not None:
                spy.send_signal(2)
                spy.wait()
            proc.stop()
    if args.spy and args.summary:
        summarize(args.spy)


def summarize(path: str) -> None:
    by_package: collections.Counter[str] = collections.Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        stack, samples = line.rsplit(" ", 1)
        leaf = stack.split(";")[-1]
        m = re.search(r"\(([^/]+)/([^:]+)", leaf)
        key = (m.group(1) + ("/" + m.group(2) if m.group(1) == "blockproxy" else "")) if m \
            else leaf
        by_package[key] += int(samples)
        total += int(samples)
    for key, count in by_package.most_common(20):
        print(f"{100 * count / total:5.1f}% {key}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="block")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--spy", metavar="OUT", help="record a py-spy profile here")
    parser.add_argument("--summary", action="store_true",
                        help="print the profile's share by innermost package")
    asyncio.run(main(parser.parse_args()))
