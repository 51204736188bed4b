"""``prefix_affinity``: the best prefix match, unless the load is too uneven.

The weighted-scorer heuristic of SGLang's cache-aware router and llm-d's prefix scorer:
when the most and least loaded candidates differ by more than ``balance_abs`` requests
and by more than ``balance_rel`` times, the request goes to the least loaded; otherwise
to the candidate with the longest cached prefix of its prompt if that covers at least
``cache_threshold`` of the prompt, else to the least loaded.  Load is active requests
per unit of weight; ties at random.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from blockproxy.cluster.instance import Instance
from blockproxy.routing.job import Job
from blockproxy.routing.policies import Policy, least_loaded, register
from blockproxy.simulator import Prediction


@register("prefix_affinity")
class PrefixAffinityPolicy(Policy):
    OPTIONS = ("balance_abs", "balance_rel", "cache_threshold")

    def __init__(self, name: str, rng: random.Random, balance_abs: int = 32,
                 balance_rel: float = 1.5, cache_threshold: float = 0.5) -> None:
        super().__init__(name, rng)
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.cache_threshold = cache_threshold

    def choose(self, candidates: Sequence[Instance], job: Job
               ) -> tuple[Instance, Prediction | None]:
        loads = [inst.active / inst.weight for inst in candidates]
        lo, hi = min(loads), max(loads)
        if hi - lo > self.balance_abs and hi > lo * self.balance_rel:
            return least_loaded(candidates, self.rng), None
        cached = [inst.cached_tokens(job) for inst in candidates]
        best = max(cached)
        if best > 0 and best >= self.cache_threshold * job.prompt_tokens:
            return self.rng.choice([inst for inst, c in zip(candidates, cached)
                                    if c == best]), None
        return least_loaded(candidates, self.rng), None
