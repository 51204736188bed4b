"""``least_requests``: the instance with the fewest active requests (per unit of weight)."""

from __future__ import annotations

from collections.abc import Sequence

from blockproxy.cluster.instance import Instance
from blockproxy.routing.job import Job
from blockproxy.routing.policies import Policy, least_loaded, register
from blockproxy.simulator import Prediction


@register("least_requests")
class LeastRequestsPolicy(Policy):
    def choose(self, candidates: Sequence[Instance], job: Job
               ) -> tuple[Instance, Prediction | None]:
        return least_loaded(candidates, self.rng), None
