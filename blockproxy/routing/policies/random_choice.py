"""``random``: a weighted random instance."""

from __future__ import annotations

from collections.abc import Sequence

from blockproxy.cluster.instance import Instance
from blockproxy.routing.job import Job
from blockproxy.routing.policies import Policy, register
from blockproxy.simulator import Prediction


@register("random")
class RandomPolicy(Policy):
    def choose(self, candidates: Sequence[Instance], job: Job
               ) -> tuple[Instance, Prediction | None]:
        weights = [inst.weight for inst in candidates]
        return self.rng.choices(list(candidates), weights=weights)[0], None
