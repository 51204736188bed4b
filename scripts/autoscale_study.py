#!/usr/bin/env python3
"""Auto-provisioning on a bursty load: instance-seconds against latency, four ways.

    LOADGEN_TRACE_PATH=../shared/traces python scripts/autoscale_study.py \\
        [--workload onoff|azure] [--time-scale 4] [--out results/autoscale] [--seed 1]

Twelve emulated H100s behind ``block``, each configuration on a fresh cluster and proxy
(``loadgen compare``), the same requests for all:

- ``all-on``: the twelve always active;
- ``half-on``: six active, six standby never used (``--autoscale advise``);
- ``queue``: six active, six standby, scaled as a Kubernetes HPA on
  ``vllm:num_requests_waiting`` scales (``--autoscale-signal queue``: the reactive
  baseline);
- ``predicted``: six active, six standby, blockproxy's auto-provisioning
  (``--autoscale act``).

Workloads: ``onoff``, synthetic requests (4,000-token prompts, 100-token answers: prefill
bound, so ~10 per second fill an H100) whose Poisson rate steps from 25/s to 100/s and
back with 5 s ramps; ``azure``, the Azure conversation trace's first 1,500 s at its own
timestamps sped up ``--rate-multiplier`` times (50: 30 s of real-GPU time, about six
H100s' worth on average and more in its bursts).  The proxy's time constants are given in
real-GPU seconds and multiplied by the time scale (the proxy runs on wall time): decisions
every 0.5 s, arrival window 5 s, scale-up cooldown 2 s, scale down after 10 s of surplus,
so the dynamics of minutes-long bursts fit in a run of minutes.  Admission is off
(``--no-admission``): this measures provisioning alone.  The objective is P99 TTFT
<= 2 s (real-GPU).

``--proxies N`` puts N gossiping proxies in front (each deciding from its own view; the
figures are the first one's) and reports how often their desired counts agreed.

``--configs`` runs a subset and reports it with the other configurations' results of an
earlier run (``--report-only``: runs nothing).  Prints per configuration the
instance-seconds (real-GPU, from the proxy's active and
draining instances sampled every 0.5 s wall), their share of ``all-on``'s, P99 and mean
TTFT, and the requests over 2 s (SLO misses, failures included); writes the compare
results to ``OUT_<config>.json``, a summary to ``OUT.json`` and a plot of the instances
over time against the arrival rate to ``OUT.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SLO_MS = 2000.0
#: onoff: (real-GPU seconds, requests per second)
ONOFF = "0:25,15:25,20:100,40:100,45:25,70:25"
CONFIGS = {
    "all-on": (0, ["--autoscale=advise"]),
    "half-on": (6, ["--autoscale=advise"]),
    "queue": (6, ["--autoscale=act", "--autoscale-signal=queue"]),
    "predicted": (6, ["--autoscale=act"]),
}


def workload_args(name: str, multiplier: float) -> list[str]:
    if name == "onoff":
        return ["--format", "synthetic", "--synthetic-prompt-mean", "4000",
                "--synthetic-output-mean", "100", "--rate-schedule", ONOFF,
                "--use-trace-timestamps"]
    return ["--trace", "azure-conv", "--duration", "1500", "--use-trace-timestamps",
            "--rate-multiplier", repr(multiplier)]


def proxy_args(extra: Sequence[str], scale: float) -> list[str]:
    def wall(real_s: float) -> str:
        return repr(real_s * scale)
    flags = [f"--slo-ttft-ms={SLO_MS * scale!r}", "--no-admission",
             f"--autoscale-interval={wall(0.5)}", f"--arrival-window={wall(5.0)}",
             f"--scale-up-cooldown={wall(2.0)}", f"--scale-down-after={wall(10.0)}",
             f"--scale-down-step={wall(2.5)}",
             *extra]
    return [f"--proxy-arg={f}" for f in flags]


def run_config(name: str, standby: int, extra: Sequence[str], args: argparse.Namespace
               ) -> dict[str, Any]:
    out = Path(f"{args.out}_{name}.json")
    cmd = ["loadgen", "compare", "--policies", "block", "--instances", "12",
           "--proxies", str(args.proxies),
           "--standby", str(standby), "--time-scale", repr(args.time_scale),
           "--seed", str(args.seed), "--goodput", f"ttft:{SLO_MS:g}", "--no-progress",
           *workload_args(args.workload, args.rate_multiplier),
           *proxy_args(extra, args.time_scale),
           "--json", str(out)]
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def summary(result: dict[str, Any]) -> dict[str, Any]:
    entry = result["runs"][0]["policies"]["block"]
    m = entry["metrics"]
    scale = float(result.get("time_scale") or 1.0)
    auto = entry["proxy"].get("autoscale") or {}
    total = m["completed"] + m["failed"] + m.get("cut", 0)
    good = round(m.get("goodput_ratio", 0.0) * total)
    return {"requests": total, "failed": m["failed"],
            "p99_ttft_ms": m["p99_ttft_ms"] / scale, "mean_ttft_ms": m["mean_ttft_ms"] / scale,
            "slo_misses": total - good, "instance_seconds": auto.get("instance_seconds"),
            "mean_instances": auto.get("mean_instances"), "max_active": auto.get("max_active"),
            "emulator": entry["proxy"].get("emulator"), "timeline": auto.get("timeline", []),
            "proxies_desired": auto.get("proxies_desired")}


def arrival_rate(workload: str, multiplier: float) -> tuple[list[float], list[float]]:
    """The workload's arrivals per real-GPU second: (times, rates)."""
    if workload == "onoff":
        points = [tuple(map(float, p.split(":"))) for p in ONOFF.split(",")]
        return [p[0] for p in points], [p[1] for p in points]
    from loadgen.workload import load_trace
    specs = load_trace("azure-conv", duration=1500)
    first = specs[0].arrival_s
    bins: dict[int, int] = {}
    for spec in specs:
        k = int((spec.arrival_s - first) / multiplier)
        bins[k] = bins.get(k, 0) + 1
    times = list(range(max(bins) + 1))
    return [t + 0.5 for t in times], [float(bins.get(t, 0)) for t in times]


def plot(results: dict[str, dict[str, Any]], path: Path, workload: str,
         multiplier: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, s in results.items():
        line = s["timeline"]
        if line:
            ax.step([p[0] for p in line], [p[1] + p[2] for p in line], where="post",
                    label=f"{name} ({s['instance_seconds']:.0f} inst-s, "
                          f"P99 {s['p99_ttft_ms']:.0f} ms)")
    ax.set_xlabel("time (real-GPU s)")
    ax.set_ylabel("active + draining instances")
    rate = ax.twinx()
    times, rates = arrival_rate(workload, multiplier)
    rate.plot(times, rates, "k:", label="arrival rate")
    rate.set_ylabel("arrival rate (requests per real-GPU s)")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"auto-provisioning, 12 emulated H100s, {workload}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=("onoff", "azure"), default="onoff")
    parser.add_argument("--time-scale", type=float, default=4.0)
    parser.add_argument("--rate-multiplier", type=float, default=50.0,
                        help="azure: the trace's speed-up (50: about six H100s' worth on "
                             "average, more in its bursts)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--proxies", type=int, default=1,
                        help="proxies gossiping in front of the instances, each deciding "
                             "from its view (the figures are the first one's; the summary "
                             "says how often their desired counts agreed)")
    parser.add_argument("--out", default="results/autoscale")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="comma-separated subset of " + ", ".join(CONFIGS) + " to run")
    parser.add_argument("--predicted-arg", action="append", default=[], metavar="FLAG",
                        help="another proxy flag for the predicted configuration, e.g. "
                             "--predicted-arg=--scale-headroom=1.1 (repeatable)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: report every configuration from its OUT_<config>"
                             ".json of an earlier run")
    args = parser.parse_args(argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    results = {}
    run = set() if args.report_only else set(args.configs.split(","))
    for name, (standby, extra) in CONFIGS.items():
        if name in run:
            if name == "predicted":
                extra = [*extra, *args.predicted_arg]
            results[name] = summary(run_config(name, standby, extra, args))
        elif Path(f"{args.out}_{name}.json").exists():
            results[name] = summary(json.loads(Path(f"{args.out}_{name}.json").read_text()))
    base = results.get("all-on", {}).get("instance_seconds")
    print(f"\n{'config':<10} {'inst-s':>8} {'vs all-on':>9} {'mean inst':>9} "
          f"{'P99 TTFT':>9} {'mean TTFT':>9} {'> 2 s':>6} {'requests':>8}")
    for name, s in results.items():
        share = s["instance_seconds"] / base if base and s["instance_seconds"] else None
        print(f"{name:<10} {s['instance_seconds'] or 0:>8.0f} "
              f"{'' if share is None else f'{share:.2f}':>9} {s['mean_instances'] or 0:>9.2f} "
              f"{s['p99_ttft_ms']:>9.0f} {s['mean_ttft_ms']:>9.0f} {s['slo_misses']:>6} "
              f"{s['requests']:>8}")
    for name, s in results.items():
        agree = s.get("proxies_desired")
        if agree:
            print(f"{name}: the proxies' desired counts agreed in "
                  f"{agree['agree_share']:.0%} of {agree['samples']} samples, within one "
                  f"in {agree['within_one_share']:.0%}, at most {agree['max_spread']} apart")
    Path(f"{args.out}.json").write_text(json.dumps(results, indent=1))
    plot(results, Path(f"{args.out}.png"), args.workload, args.rate_multiplier)
    return 0


if __name__ == "__main__":
    sys.exit(main())
