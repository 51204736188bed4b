"""``intelligent_router``: the workload-aware heuristic of the Intelligent Router.

Jain et al., "Intelligent Router for LLM Workloads: Improving Performance Through
Workload-Aware Load Balancing" (arXiv 2408.13510): a request's latency depends on what it
is batched with.  A long prompt added where many requests decode stalls every one of them
for its prefill; a long answer added to a busy batch makes each of the others' steps a
little longer for as long as it decodes.  The router predicts the new request's output
length as a *bucket* (:class:`~blockproxy.routing.lengths.BucketHead`: ``job.bucket_tokens``)
and sends it where its own estimated latency plus ``mixing_weight`` times the latency it
adds to the requests already there (the *mixing penalty*) is lowest.

Both terms are read off the instance's step-time model (the profile's linear model of one
engine step, times its calibrated speed), in seconds, with no simulation:

* own: the prefill queued ahead of it (uncached prompt tokens of the requests without a
  first token), its own uncached prefill, and its bucket's tokens of decode steps, each
  one sequence longer for every other request still decoding then (``min(its remaining
  tokens, the bucket's)`` steps shared with each);
* penalty: each running request waits for its uncached prefill, and the steps it shares
  with each request in flight are one sequence longer for that request too.

Where it departs from the paper: the paper fits the impact of mixing from profiling runs
of its GPUs; here the same kind of fit, the instance's profile (``blockproxy profile``),
gives it, so calibration carries it to other hardware.  Requests already on an instance
count with the length the proxy predicted for them (the regression's median), not a
bucket.  Ties at random.

With ``router_weights`` (a file from ``blockproxy train-router``) the learned policy
decides instead: its Q-network (:mod:`blockproxy.routing.qnet`) scores each candidate
from the same load features and estimates, and the best one takes the request.  Its
hold action is not taken at serve time: holding is the admission queue's
(``--slo-ttft-ms``), which releases a request the moment an instance is predicted in
time.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from blockproxy import simulator
from blockproxy.cluster.instance import Instance
from blockproxy.profile import StepTime
from blockproxy.routing.job import Job
from blockproxy.routing.policies import Policy, register
from blockproxy.routing.qnet import QNet, action_inputs, load_features
from blockproxy.simulator import Prediction


def mixing_estimate(step: StepTime, speed: float, table: np.ndarray, n: int,
                    prefill: int, decode: int) -> tuple[float, float]:
    """(own latency, the latency it adds to the others), seconds, of a request of
    ``prefill`` uncached prompt tokens and ``decode`` output tokens on an instance
    holding ``table[:, :n]`` (the simulator's columns), from its step-time model at
    ``speed`` (see the module docstring)."""
    own = step.per_prefill_token_s * prefill + decode * (step.fixed_s + step.per_decode_seq_s)
    if n == 0:
        return speed * own, 0.0
    started = table[simulator.COL_STARTED, :n] != 0
    queued = int(((table[simulator.COL_PROMPT, :n] - table[simulator.COL_CACHED, :n])
                  * ~started).sum())
    remaining = np.maximum(table[simulator.COL_PREDICTED, :n]
                           - table[simulator.COL_GENERATED, :n], 1)
    # decode steps shared with each other request: as many as the shorter of the two
    shared = step.per_decode_seq_s * int(np.minimum(remaining, decode).sum())
    own += step.per_prefill_token_s * queued + shared
    penalty = step.per_prefill_token_s * prefill * int(started.sum()) + shared
    return speed * own, speed * penalty


@register("intelligent_router")
class IntelligentRouterPolicy(Policy):
    OPTIONS = ("mixing_weight", "router_weights")
    USES_BUCKETS = True

    def __init__(self, name: str, rng: random.Random, mixing_weight: float = 1.0,
                 router_weights: str = "") -> None:
        super().__init__(name, rng)
        if not mixing_weight >= 0.0:
            raise ValueError(f"mixing_weight must be >= 0, got {mixing_weight}")
        self.mixing_weight = mixing_weight
        #: the learned policy's Q-network (None: the heuristic)
        self.net: QNet | None = QNet.load(router_weights)[0] if router_weights else None

    def choose(self, candidates: Sequence[Instance], job: Job
               ) -> tuple[Instance, Prediction | None]:
        estimates = [self.estimate(inst, job) for inst in candidates]
        if self.net is not None:
            loads = [load_features(inst.requests.table, inst.requests.n, own, penalty)
                     for inst, (own, penalty) in zip(candidates, estimates, strict=True)]
            q = self.net.q(action_inputs(loads, job.prompt_tokens,
                                         job.bucket_tokens or job.output_tokens, 0))
            scores = list(-q[:len(candidates)])  # the hold row is the admission queue's
        else:
            scores = [own + self.mixing_weight * penalty for own, penalty in estimates]
        best = min(scores)
        return self.rng.choice([inst for score, inst in zip(scores, candidates, strict=True)
                                if score == best]), None

    def estimate(self, inst: Instance, job: Job) -> tuple[float, float]:
        """(the new request's own latency, the latency it adds to the others) on
        ``inst``, seconds."""
        r = inst.requests
        return mixing_estimate(inst.profile.step_time, inst.model.speed, r.table, r.n,
                               job.prompt_tokens - inst.cached_tokens(job),
                               job.bucket_tokens or job.output_tokens)
