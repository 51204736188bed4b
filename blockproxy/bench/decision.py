"""``bench decision``: how long one routing decision takes, the way the server makes it.

Builds a cluster view of 4 and 16 instances of the profile, each holding a realistic
load (the same generator as ``bench sim``: ShareGPT lengths, mostly decoding), and times
what the server does per request before forwarding it: the policy's choice (for
``block``, one simulation per candidate), the prediction for the chosen instance, and the
reservation (then releases it, so the load stays the same).  Reports p50/p99 in
microseconds per policy and cluster size.
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

import numpy as np

from blockproxy import simulator
from blockproxy.backends import BackendSpec
from blockproxy.bench import find_lengths_file, load_lengths, make_state
from blockproxy.cluster import ClusterView, Instance
from blockproxy.metrics import Metrics
from blockproxy.routing.dispatch import Dispatcher
from blockproxy.routing.job import Job
from blockproxy.routing.policies import make_policy

CLUSTER_SIZES = (4, 16)


def build_cluster(size: int, active: int, profile: str, pairs: np.ndarray,
                  rng: np.random.Generator) -> tuple[ClusterView, list[Instance]]:
    """``size`` instances, each holding ``active`` requests with realistic lengths."""
    view = ClusterView(profile)
    view.apply([BackendSpec(url=f"http://127.0.0.1:{20000 + i}", name=f"i{i}")
                for i in range(size)])
    instances = list(view.instances.values())
    for inst in instances:
        state, _ = make_state(active, pairs, inst.limits.num_gpu_blocks,
                              inst.limits.block_size, rng)
        for i in range(active):
            entry = inst.reserve(int(state[simulator.COL_PROMPT, i]),
                                 int(state[simulator.COL_PREDICTED, i]), 0.0)
            inst.requests.table[:, entry.slot] = state[:, i]
    return view, instances


def time_decisions(view: ClusterView, instances: list[Instance], policy_name: str,
                   jobs: list[Job], seed: int) -> list[float]:
    """Seconds per decision (the server's Dispatcher: choose + predict + reserve, with its
    metrics), one sample per job."""
    dispatcher = Dispatcher(make_policy(policy_name, random.Random(seed)), Metrics(view))
    samples = []
    for job in jobs:
        start = time.perf_counter()
        entry = dispatcher.dispatch(instances, job)
        samples.append(time.perf_counter() - start)
        entry.instance.release(entry)
    return samples


def bench_decision(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    pairs, source = load_lengths(find_lengths_file(args.lengths), rng)
    jobs = [Job(int(p), 256) for p, _ in pairs[rng.integers(0, len(pairs), args.decisions)]]
    result: dict[str, Any] = {"simulator": simulator.IMPLEMENTATION, "lengths": source,
                              "active_per_instance": args.active, "decisions": args.decisions,
                              "unit": "microseconds"}
    for policy_name in args.policies.split(","):
        per_size = {}
        for size in CLUSTER_SIZES:
            view, instances = build_cluster(size, args.active, args.profile, pairs, rng)
            time_decisions(view, instances, policy_name, jobs[:20], args.seed)  # warm-up
            samples = np.array(time_decisions(view, instances, policy_name, jobs,
                                              args.seed)) * 1e6
            per_size[str(size)] = {"p50": round(float(np.percentile(samples, 50)), 1),
                                   "p99": round(float(np.percentile(samples, 99)), 1)}
        result[policy_name] = per_size
    return result
