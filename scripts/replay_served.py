"""Where a served run and the cluster model part: replay the served proxy's choices.

Reads the debug log of a served run (``blockproxy serve --log-level debug``, kept by
``loadgen compare --log-dir``: one "done on" line per finished request, with its
instance, true prompt and output tokens, the length the proxy predicted for it, and its
TTFT and E2E) and the workload file of the same requests (``loadgen workload`` with
the run's trace, load, count and seed), finds each request's line (dispatch order,
confirmed by its prompt and output tokens), and serves the workload on the cluster
model ``blockproxy train-router`` uses (:class:`~blockproxy.train_router.ClusterModel`)
four ways:

1. **the served assignment**: each request on the instance the proxy chose.  The same
   mean as served says the emulated engines and the model agree on what those choices
   cost, so any difference from the model's own router is in the choices;
2. ``block`` (``--delay-weight``) choosing, told the lengths the served proxy predicted
   (for the new request, those in flight, and the expected arrivals);
3. the same told the true lengths;
4. the same told every length at the workload's median.

Prints one JSON object per row (real-GPU ms), then a table, with how often each router
chose as the served proxy did on the served run's own states (the served assignment
replayed, the router asked at each step; told the served predictions, a router keeps its
own record of arrivals, so there its expected arrivals follow its own choices).

    LOADGEN_TRACE_PATH=../shared/traces loadgen compare --policies block \\
        --trace azure-conv --instances 8 --time-scale 12 --num-requests 4000 \\
        --rate-multiplier 53 --seeds 1 --proxy-arg=--delay-weight=1 \\
        --proxy-arg=--delay-slack=inf --proxy-arg=--log-level=debug --log-dir results/logs
    LOADGEN_TRACE_PATH=../shared/traces loadgen workload --trace azure-conv \\
        --rate-multiplier 53 --num-requests 4000 --out results/azure53.jsonl
    python scripts/replay_served.py --log results/logs/001-seed1-block/proxy-*.log \\
        --requests results/azure53.jsonl --time-scale 12
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
from collections.abc import Sequence
from typing import Any, NamedTuple

from blockproxy.profile import load_profile
from blockproxy.train_router import (
    Chooser,
    ClusterModel,
    Decision,
    Request,
    block,
    read_requests,
    rebase,
    run_episode,
    summarize,
)

#: the proxy's debug line for a finished request (``Proxy._learn``), after the log's time
DONE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) DEBUG \S+: done on (\S+): prompt (\d+)~\d+, "
    r"output (\d+) \(predicted (\d+)\), ttft ([\d.]+) \(predicted \S+\), "
    r"e2e ([\d.]+) \(predicted \S+\)")
#: how far from its place in dispatch order a request's line is looked for
REACH = 64


class Served(NamedTuple):
    dispatched_at: float  # wall seconds
    instance: str
    prompt: int
    output: int
    predicted: int
    ttft: float  # wall seconds
    e2e: float


def read_log(lines: Sequence[str]) -> list[Served]:
    """The finished requests of a debug log, in dispatch order (end time less E2E)."""
    out = []
    for line in lines:
        m = DONE.search(line)
        if m is None:
            continue
        stamp, name, prompt, output, predicted, ttft, e2e = m.groups()
        done = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        out.append(Served(done - float(e2e), name, int(prompt), int(output), int(predicted),
                          float(ttft), float(e2e)))
    out.sort()
    return out


def match(requests: Sequence[Request], served: Sequence[Served]) -> list[int]:
    """For each request, the index of its line in ``served``: the first line not yet
    taken, near its place in dispatch order, with its prompt tokens and its output
    tokens (or fewer: the run may cap an answer the workload file does not)."""
    taken = [False] * len(served)
    found = []
    low = 0
    for k, (_, prompt, output) in enumerate(requests):
        near = range(max(low - REACH, 0), min(k + REACH, len(served)))
        j = next((j for same in (True, False) for j in near
                  if not taken[j] and served[j].prompt == prompt
                  and (served[j].output == output if same else served[j].output < output)),
                 -1)
        if j < 0:
            raise ValueError(f"request {k} ({prompt} prompt, {output} output tokens) "
                             "has no line in the log: not the same workload?")
        taken[j] = True
        found.append(j)
        while low < len(served) and taken[low]:
            low += 1
    return found


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    with open(args.log, encoding="utf-8") as f:
        served = read_log(f.readlines())
    requests = rebase(read_requests(args.requests, len(served)))
    if len(requests) < len(served):
        raise ValueError(f"the workload has {len(requests)} requests, the log {len(served)}")
    lines = [served[j] for j in match(requests, served)]
    # the answers as served (a run's cap may have cut one the workload file has longer)
    requests = [(t, p, s.output) for (t, p, _), s in zip(requests, lines, strict=True)]
    names = sorted({s.instance for s in served}, key=lambda x: (len(x), x))
    index = {name: i for i, name in enumerate(names)}
    assignment = [index[s.instance] for s in lines]
    predicted = [s.predicted for s in lines]
    median = int(statistics.median(r[2] for r in requests))
    profile = load_profile(args.profile)
    n = len(names)
    scale = 1000.0 / args.time_scale
    truth = [max(r[2], 1) for r in requests]
    rows: list[dict[str, Any]] = [{
        "router": "served (the proxy's own timings)",
        "mean_e2e_ms": round(statistics.fmean(s.e2e for s in lines) * scale),
        "mean_ttft_ms": round(statistics.fmean(s.ttft for s in lines) * scale),
        # the served predictions' mean absolute relative error, and the median's
        "length_error": round(statistics.fmean(
            abs(p - t) / t for p, t in zip(predicted, truth, strict=True)), 3),
        "length_error_of_the_median": round(statistics.fmean(
            abs(median - t) / t for t in truth), 3)}]
    print(json.dumps(rows[0]), flush=True)

    def episode(name: str, choose: Chooser, agree: float | None = None) -> None:
        summary = summarize(run_episode(profile, n, requests, choose, 0.05, 0,
                                        args.arrival_window))
        row: dict[str, Any] = {"router": name}
        row.update({k.replace("_s", "_ms"): round(v * 1000.0) for k, v in summary.items()
                    if k.endswith("_s")})
        if agree is not None:
            row["same_choice_as_served"] = round(agree, 3)
        rows.append(row)
        print(json.dumps(row), flush=True)

    def agreement(router: Chooser) -> float:
        """How often ``router`` chooses as the served proxy did, asked at each step of
        the served assignment replayed."""
        same: list[bool] = []

        def choose(cluster: ClusterModel, d: Decision) -> int:
            same.append(router(cluster, d) == assignment[d.rid])
            return assignment[d.rid]
        run_episode(profile, n, requests, choose, 0.05, 0, args.arrival_window)
        return sum(same) / max(len(same), 1)

    episode("the served assignment", lambda cluster, d: assignment[d.rid])
    w = args.delay_weight
    for name, lengths in ((f"block w={w:g}, the served predictions", predicted),
                          (f"block w={w:g}, the true lengths", 0),
                          (f"block w={w:g}, every length {median}", median)):
        episode(name, block(w, length=lengths), agreement(block(w, length=lengths)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", required=True, help="the proxy's debug log")
    parser.add_argument("--requests", required=True, help="the run's workload file")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="the run's time scale (the log's times are wall seconds)")
    parser.add_argument("--profile", default="llama-3.1-8b-h100-tp1")
    parser.add_argument("--delay-weight", type=float, default=1.0)
    parser.add_argument("--arrival-window", type=float, default=2.5,
                        help="decay time (real-GPU s) of each instance's recent arrivals: "
                             "the proxy's --arrival-window over the time scale")
    rows = run(parser.parse_args())
    print(f"\nlength predictions: mean absolute relative error {rows[0]['length_error']:.3f} "
          f"(every length at the median: {rows[0]['length_error_of_the_median']:.3f})")
    print(f"\n{'router':40s} {'mean E2E':>9s} {'mean TTFT':>9s} {'P99 TTFT':>8s} "
          f"{'same choice':>11s}")
    for r in rows:
        same = r.get("same_choice_as_served")
        print(f"{r['router']:40s} {r['mean_e2e_ms']:9,d} {r['mean_ttft_ms']:9,d} "
              f"{r.get('p99_ttft_ms', 0):8,d} {'' if same is None else f'{same:.3f}':>11s}")


if __name__ == "__main__":
    main()
