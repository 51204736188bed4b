"""``power_of_two``: the less loaded (fewest active requests) of two random instances."""

from __future__ import annotations

from collections.abc import Sequence

from blockproxy.cluster.instance import Instance
from blockproxy.routing.job import Job
from blockproxy.routing.policies import Policy, least_loaded, register
from blockproxy.simulator import Prediction


@register("power_of_two")
class PowerOfTwoPolicy(Policy):
    def choose(self, candidates: Sequence[Instance], job: Job
               ) -> tuple[Instance, Prediction | None]:
        pair = self.rng.sample(list(candidates), 2) if len(candidates) > 2 else candidates
        return least_loaded(pair, self.rng), None
