"""``bench decision``: how long one routing decision takes, the way the server makes it.

Builds a cluster view of 4 and 16 instances of the profile, each holding a realistic
load (the same generator as ``bench sim``: ShareGPT lengths, mostly decoding), and times
what the server does per request before forwarding it: the policy's choice (for
``block``, one simulation per candidate), the prediction for the chosen instance, and the
reservation (then releases it, so the load stays the same).  Reports p50/p99 in
microseconds per policy and cluster size.

The ``prefix`` section times the same with long prompts and full prefix-cache models:
16 instances whose cache models are filled to their KV capacity with other prompts' blocks,
prompts of 8k and 32k tokens (text, 4 characters per token) of which half share 75% of
their blocks with what one instance caches.  ``describe`` is parsing the request body and
describing it (hashing included), ``decision`` the dispatch with a prefix lookup per
candidate; ``cache_model_mib`` is the memory of one instance's cache model when full.

The jobs are as the server sees them once its length model is ready: one in
``--tail-every`` (by default the server's ``--length-tail-every``) also carries a tail
length, four times its median, whose E2E the dispatch predicts as well.

Each cluster size, and the ``prefix`` section, draws its states from a random stream of
its own (``--seed`` and the size): every policy is timed on the same states, and the
``prefix`` figures do not depend on which policies were timed before them.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from typing import Any

import numpy as np

from blockproxy import simulator
from blockproxy.backends import BackendSpec
from blockproxy.bench import find_lengths_file, load_lengths, make_state
from blockproxy.cluster import ClusterView, Instance
from blockproxy.config import ProxyConfig
from blockproxy.metrics import Metrics
from blockproxy.request import COMPLETIONS, parse_request
from blockproxy.routing.describe import Describer
from blockproxy.routing.dispatch import Dispatcher
from blockproxy.routing.job import Job
from blockproxy.routing.lengths import LengthPredictor
from blockproxy.routing.policies import make_policy

CLUSTER_SIZES = (4, 16)
#: the server predicts the tail E2E of one request in this many (``--length-tail-every``)
TAIL_EVERY = ProxyConfig().length_tail_every
#: a request's tail length against its median, as a length model gives it: the 0.9 and
#: 0.5 quantiles of its log-length residuals on the Azure conversation trace are 1.50
#: and 0.11 apart by e^1.39, about 4
TAIL_RATIO = 4


def tail_every(args: argparse.Namespace) -> int:
    """``--tail-every``, or the server's rate when not given."""
    return TAIL_EVERY if args.tail_every is None else int(args.tail_every)


def with_tail(job: Job, k: int, every: int) -> Job:
    """The ``k``-th job as a ready length model describes it to the server: one in
    ``every`` also carries its tail length, whose E2E the dispatch predicts too."""
    if every and k % every == every - 1:
        return job._replace(output_high=TAIL_RATIO * job.output_tokens)
    return job


def build_cluster(size: int, active: int, profile: str, pairs: np.ndarray,
                  rng: np.random.Generator, arrival_rate: float = 0.0
                  ) -> tuple[ClusterView, list[Instance]]:
    """``size`` instances, each holding ``active`` requests with realistic lengths and
    a recent arrival process of ``arrival_rate`` requests per second (trace sizes) over
    the last minute, which the chosen instance's prediction extrapolates."""
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
        recent = inst.requests.recent
        recent.clear()  # forget the set-up's reserves
        if arrival_rate > 0:
            now = time.perf_counter()
            count = int(60 * arrival_rate)
            for k, (p, o) in enumerate(pairs[rng.integers(0, len(pairs), count)]):
                recent.record(now - 60 + k / arrival_rate, int(p), 0, int(o))
    return view, instances


def time_decisions(view: ClusterView, instances: list[Instance], policy_name: str,
                   jobs: list[Job], seed: int, **options: Any) -> list[float]:
    """Seconds per decision (the server's Dispatcher: choose + predict + reserve, with its
    metrics), one sample per job; ``options`` go to the policy."""
    dispatcher = Dispatcher(make_policy(policy_name, random.Random(seed), **options),
                            Metrics(view))
    samples = []
    for job in jobs:
        # the benchmark's decisions come faster than any real traffic: each one's arrival
        # is undone with its reservation, so the arrival rate stays the configured one
        arrivals = [inst.requests.recent.snapshot() for inst in instances]
        start = time.perf_counter()
        entry = dispatcher.dispatch(instances, job)
        samples.append(time.perf_counter() - start)
        entry.instance.release(entry)
        for inst, state in zip(instances, arrivals, strict=True):
            inst.requests.recent.restore(state)
    return samples


def bench_decision(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    pairs, source = load_lengths(find_lengths_file(args.lengths), rng)
    every = tail_every(args)
    jobs = [with_tail(Job(int(p), 256), k, every)
            for k, (p, _) in enumerate(pairs[rng.integers(0, len(pairs), args.decisions)])]
    result: dict[str, Any] = {"simulator": simulator.IMPLEMENTATION, "lengths": source,
                              "active_per_instance": args.active, "decisions": args.decisions,
                              "arrival_rate_per_instance": args.arrival_rate,
                              "unit": "microseconds"}
    timed: list[tuple[str, str, dict[str, Any]]] = [
        (name, name, {}) for name in args.policies.split(",")]
    if args.delay_weight:  # every candidate simulated with its expected arrivals
        for name in ("block", "block_ttft"):  # end-to-end and first-token delay
            timed.append((f"{name} --delay-weight {args.delay_weight:g}", name,
                          {"delay_weight": args.delay_weight, "delay_slack": math.inf}))
    for label, policy_name, options in timed:
        per_size = {}
        for size in CLUSTER_SIZES:
            # the same cluster state of each size for every policy, whichever are timed
            view, instances = build_cluster(size, args.active, args.profile, pairs,
                                            np.random.default_rng([args.seed, size]),
                                            args.arrival_rate)
            time_decisions(view, instances, policy_name, jobs[:20], args.seed,
                           **options)  # warm-up
            samples = np.array(time_decisions(view, instances, policy_name, jobs,
                                              args.seed, **options)) * 1e6
            per_size[str(size)] = {"p50": round(float(np.percentile(samples, 50)), 1),
                                   "p99": round(float(np.percentile(samples, 99)), 1)}
        result[label] = per_size
    # its own random stream: the same states and prompts whichever policies were timed
    result["prefix"] = bench_prefix(args, pairs, np.random.default_rng([args.seed, 0]))
    return result


PREFIX_PROMPT_TOKENS = (8192, 32768)


def _filled_cluster(args: argparse.Namespace, pairs: np.ndarray, rng: np.random.Generator
                    ) -> tuple[ClusterView, list[Instance]]:
    view, instances = build_cluster(16, args.active, args.profile, pairs, rng,
                                    args.arrival_rate)
    for inst in instances:
        base = int(rng.integers(1 << 40))
        inst.prefix.acquire(range(base, base + inst.prefix.capacity))
        inst.prefix.release(range(base, base + inst.prefix.capacity))
    return view, instances


def bench_prefix(args: argparse.Namespace, pairs: np.ndarray, rng: np.random.Generator
                 ) -> dict[str, Any]:
    import tracemalloc

    import orjson

    from blockproxy.cluster.prefix import PrefixCache

    out: dict[str, Any] = {}
    every = tail_every(args)
    words = np.array([f"w{i:03d}" for i in range(1000)])
    for tokens in PREFIX_PROMPT_TOKENS:
        view, instances = _filled_cluster(args, pairs, rng)
        describer = Describer(LengthPredictor())
        dispatcher = Dispatcher(make_policy("block", random.Random(args.seed)), Metrics(view))
        shared = " ".join(words[rng.integers(0, 1000, tokens)])  # ~4 characters a token
        bodies = []
        for i in range(max(args.decisions // 10, 50)):
            if i % 2:  # a cached prefix (75%) on instance 0, a fresh tail
                cut = len(shared) * 3 // 4
                text = shared[:cut] + " ".join(words[rng.integers(0, 1000, tokens // 4)])
            else:
                text = " ".join(words[rng.integers(0, 1000, tokens)])
            bodies.append(orjson.dumps({"model": "m", "prompt": text, "max_tokens": 256}))
        first = describer.describe(parse_request(COMPLETIONS, bodies[1]), None, 1 << 20)
        instances[0].prefix.acquire(first.blocks or [])
        instances[0].prefix.release(first.blocks or [])
        describe_s, decide_s = [], []
        for k, raw in enumerate(bodies):
            start = time.perf_counter()
            job = describer.describe(parse_request(COMPLETIONS, raw), None, 1 << 20)
            job = with_tail(job, k, every)
            arrivals = [inst.requests.recent.snapshot() for inst in instances]
            mid = time.perf_counter()
            entry = dispatcher.dispatch(instances, job)
            end = time.perf_counter()
            entry.instance.release(entry)
            for inst, state in zip(instances, arrivals, strict=True):
                inst.requests.recent.restore(state)
            describe_s.append(mid - start)
            decide_s.append(end - mid)
        out[str(tokens)] = {
            name: {"p50": round(float(np.percentile(v, 50)) * 1e6, 1),
                   "p99": round(float(np.percentile(v, 99)) * 1e6, 1)}
            for name, v in (("describe", describe_s), ("decision", decide_s))}
    capacity = instances[0].prefix.capacity
    tracemalloc.start()
    cache = PrefixCache(capacity)
    base = 1 << 62
    cache.acquire(range(base, base + capacity))
    cache.release(range(base, base + capacity))
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    if hasattr(cache, "memory_bytes"):  # compiled: its C arrays are not traced
        size += cache.memory_bytes()
    out["cache_model_blocks"] = capacity
    out["cache_model_mib"] = round(size / 2 ** 20, 2)
    out["unit"] = "microseconds per request (16 instances, block)"
    return out
