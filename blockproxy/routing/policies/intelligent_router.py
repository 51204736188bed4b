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
bucket.  Holding a request at the router belongs to the learned policy (the paper's DQN
action space), not to this heuristic.  Ties at random.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from blockproxy import simulator
from blockproxy.cluster.instance import Instance
from blockproxy.routing.job import Job
from blockproxy.routing.policies import Policy, register
from blockproxy.simulator import Prediction


@register("intelligent_router")
class IntelligentRouterPolicy(Policy):
    OPTIONS = ("mixing_weight",)
    USES_BUCKETS = True

    def __init__(self, name: str, rng: random.Random, mixing_weight: float = 1.0) -> None:
        super().__init__(name, rng)
        if not mixing_weight >= 0.0:
            raise ValueError(f"mixing_weight must be >= 0, got {mixing_weight}")
        self.mixing_weight = mixing_weight

    def choose(self, candidates: Sequence[Instance], job: Job
               ) -> tuple[Instance, Prediction | None]:
        scores = [(sum(self.estimate(inst, job)), inst) for inst in candidates]
        best = min(score for score, _ in scores)
        return self.rng.choice([inst for score, inst in scores if score == best]), None

    def estimate(self, inst: Instance, job: Job) -> tuple[float, float]:
        """(the new request's own latency, ``mixing_weight`` x the latency it adds to the
        others) on ``inst``, seconds."""
        st = inst.profile.step_time
        speed = inst.model.speed
        r = inst.requests
        n = r.n
        t = r.table
        decode = job.bucket_tokens or job.output_tokens
        prefill = job.prompt_tokens - inst.cached_tokens(job)
        own = (st.per_prefill_token_s * prefill
               + decode * (st.fixed_s + st.per_decode_seq_s))
        if n == 0:
            return speed * own, 0.0
        started = t[simulator.COL_STARTED, :n] != 0
        queued = int(((t[simulator.COL_PROMPT, :n] - t[simulator.COL_CACHED, :n])
                      * ~started).sum())
        remaining = np.maximum(t[simulator.COL_PREDICTED, :n] - t[simulator.COL_GENERATED, :n],
                               1)
        # decode steps shared with each other request: as many as the shorter of the two
        shared = st.per_decode_seq_s * int(np.minimum(remaining, decode).sum())
        own += st.per_prefill_token_s * queued + shared
        penalty = st.per_prefill_token_s * prefill * int(started.sum()) + shared
        return speed * own, speed * self.mixing_weight * penalty
