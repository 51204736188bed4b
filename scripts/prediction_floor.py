"""How much of the predicted end-to-end error is the unknown future: measured on the
cluster model, where the simulator is exact.

The proxy predicts a request's latency at dispatch, from the requests already on the
instance plus a stream of expected arrivals (the instance's recent rate and mean sizes).
Served on emulated engines, part of its error may be the engine differing from the
simulator, part is the future itself: which requests will arrive while this one decodes,
and how large they will be, is not known at dispatch.

This script measures the second part alone.  It replays a workload (a ``loadgen
workload`` file) through the cluster model ``train-router`` uses (``--instances`` copies
of the compiled simulator stepped together: :class:`blockproxy.train_router.ClusterModel`),
routing with ``block`` (least predicted end-to-end latency, true output lengths), and for
every request compares what happened with predictions made at its dispatch on the chosen
instance:

* ``none``: the requests already there, nothing more;
* ``recent``: plus the instance's recent arrival process as the proxy keeps it
  (:class:`blockproxy.cluster.arrivals.ArrivalProcess`, decayed over ``--arrival-window``
  seconds of the cluster's time): one request every 1/rate seconds, of the mean recent
  sizes; ``recent_Ws`` the same with a decay of W seconds (``--windows``);
* ``cluster_recent``: the whole cluster's recent rate shared evenly;
* ``true_rate``: the same kind of stream at the rate and mean sizes of the requests that
  really arrived on that instance between the dispatch and the request's end (known only
  afterwards: what a perfect forecast of the rate would give);
* ``cluster_true_rate``: the cluster's real rate over that time shared evenly (a perfect
  forecast of the load, none of the routing).

The cluster model is the simulator, so given the actual future arrivals one by one the
prediction would be exact: the difference between ``recent`` and ``true_rate`` is the
forecast's, and ``true_rate``'s own error what replacing the arrivals by a uniform stream
costs.  Requests that end after the workload's last arrival are left out unless
``--tail`` (their future is the workload ending, which no steady forecast foresees; a
served run counts them).

    loadgen workload --trace azure-conv --rate-multiplier 40 --num-requests 2000 \\
        --out results/azure40.jsonl
    python scripts/prediction_floor.py --requests results/azure40.jsonl --windows 1 [--tail]
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import sys
from typing import Any

import numpy as np

from blockproxy.cluster.arrivals import ArrivalProcess
from blockproxy.profile import load_profile
from blockproxy.train_router import ClusterModel, Decision, block, read_requests, rebase


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", required=True, help="a loadgen workload file")
    parser.add_argument("--num-requests", type=int, default=2000)
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--profile", default="llama-3.1-8b-h100-tp1")
    parser.add_argument("--arrival-window", type=float, default=5.0,
                        help="decay time of the recent arrivals, in the cluster's seconds "
                             "(the proxy's 30 s of wall time at time-scale 6)")
    parser.add_argument("--windows", default="",
                        help="more decay times to compare (comma-separated, seconds)")
    parser.add_argument("--limit", type=int, default=256,
                        help="most expected arrivals one prediction is given")
    parser.add_argument("--skip", type=float, default=0.1,
                        help="leave out the first share of the requests (the cluster "
                             "filling)")
    parser.add_argument("--tail", action="store_true",
                        help="count the requests that end after the workload's last "
                             "arrival too (by default left out: no forecast of a steady "
                             "load foresees the end of the workload)")
    return parser.parse_args(argv)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """The errors of each variant (see the module's text), as the script prints them."""
    requests = rebase(read_requests(args.requests, args.num_requests))
    profile = load_profile(args.profile)
    cluster = ClusterModel(profile, args.instances, args.arrival_window)
    windows = [float(w) for w in args.windows.split(",") if w]
    others = {w: [ArrivalProcess(w) for _ in range(args.instances)] for w in windows}
    whole = ArrivalProcess(args.arrival_window)  # the cluster's arrivals, one process
    choose = block()  # least predicted end-to-end latency, true lengths
    # per request: instance, dispatch time, predictions (ttft, e2e) by variant
    made: dict[int, tuple[int, float, dict[str, tuple[float, float]]]] = {}
    states: dict[int, tuple[np.ndarray, int, float]] = {}  # the instance as it was then

    def stream(i: int, state: tuple[np.ndarray, int, float], rid: int, interval: float,
               prompt: float, output: float) -> tuple[float, float]:
        """(ttft, e2e) of request ``rid`` on instance ``i`` in ``state``, with a stream of
        expected arrivals every ``interval`` seconds of those mean sizes (inf: none)."""
        table, n, lag = state
        if math.isfinite(interval):
            p = cluster.models[i].predict(table, n, requests[rid][1], 0, requests[rid][2],
                                          math.inf, interval, round(prompt), 0,
                                          round(output), args.limit)
        else:
            p = cluster.models[i].predict(table, n, requests[rid][1], 0, requests[rid][2])
        return p[0] + lag, p[1] + lag

    for rid, (t, prompt, output) in enumerate(requests):
        cluster.advance(t)
        i = choose(cluster, Decision(rid, prompt, output, t, 0, True))
        n = cluster.n[i]
        state = (cluster.tables[i][:, :n].copy(), n, max(cluster.clock[i] - t, 0.0))
        preds = {"none": stream(i, state, rid, math.inf, 0, 0)}
        interval, a_p, _, a_o, _ = cluster.recent[i].expected(t)
        preds["recent"] = stream(i, state, rid, interval, a_p, a_o)
        for w, processes in others.items():
            interval, a_p, _, a_o, _ = processes[i].expected(t)
            preds[f"recent_{w:g}s"] = stream(i, state, rid, interval, a_p, a_o)
        # the cluster's recent rate shared evenly
        interval, a_p, _, a_o, _ = whole.expected(t)
        preds["cluster_recent"] = stream(i, state, rid, interval * args.instances, a_p, a_o)
        made[rid] = (i, t, preds)
        states[rid] = state
        for processes in others.values():
            processes[i].record(t, prompt, 0, output)
        whole.record(t, prompt, 0, output)
        cluster.dispatch(i, rid, prompt, output, t)
    for _ in range(100):
        if not cluster.in_flight():
            break
        cluster.advance(max(cluster.clock) + 1e6)
    actual = {rid: (ttft, e2e) for rid, ttft, e2e in cluster.finished}

    # the requests each instance really received, in time order
    received: list[list[tuple[float, int, int]]] = [[] for _ in range(args.instances)]
    for rid, (i, t, _) in sorted(made.items(), key=lambda kv: kv[1][1]):
        received[i].append((t, requests[rid][1], requests[rid][2]))
    times = [[r[0] for r in rows] for rows in received]
    all_times = [r[0] for r in requests]

    errors: dict[str, dict[str, list[float]]] = {}
    last = requests[-1][0]
    counted = []
    for rid in range(int(len(requests) * args.skip), len(requests)):
        i, t, preds = made[rid]
        ttft, e2e = actual[rid]
        if not args.tail and t + e2e > last:  # it outlives the workload: no future
            continue
        counted.append(rid)
        # the requests that arrived there after it and before its end
        a = bisect.bisect_right(times[i], t)
        b = bisect.bisect_right(times[i], t + e2e)
        later = received[i][a:b]
        preds["true_rate"] = stream(
            i, states[rid], rid, e2e / len(later) if later else math.inf,
            float(np.mean([r[1] for r in later])) if later else 0.0,
            float(np.mean([r[2] for r in later])) if later else 0.0)
        # the cluster's true rate over its lifetime, shared evenly
        a = bisect.bisect_right(all_times, t)
        b = bisect.bisect_right(all_times, t + e2e)
        preds["cluster_true_rate"] = stream(
            i, states[rid], rid, e2e * args.instances / (b - a) if b > a else math.inf,
            float(np.mean([requests[k][1] for k in range(a, b)])) if b > a else 0.0,
            float(np.mean([requests[k][2] for k in range(a, b)])) if b > a else 0.0)
        for name, (pt, pe) in preds.items():
            e = errors.setdefault(name, {"ttft": [], "e2e": [], "e2e_signed": []})
            e["ttft"].append(abs(pt - ttft) / ttft)
            e["e2e"].append(abs(pe - e2e) / e2e)
            e["e2e_signed"].append((pe - e2e) / e2e)
    out = {"requests": len(counted), "instances": args.instances,
           "arrival_window_s": args.arrival_window,
           "mean_actual_e2e_s": round(float(np.mean([actual[r][1] for r in counted])), 3),
           "mean_absolute_relative_error": {
               name: {k: round(float(np.mean(v)), 3) for k, v in e.items()}
               for name, e in errors.items()}}
    return out


def main(argv: list[str] | None = None) -> int:
    json.dump(measure(parse_args(argv)), sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
