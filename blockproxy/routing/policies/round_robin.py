"""``round_robin``: smooth weighted round robin (nginx's algorithm; plain RR at equal weights)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from blockproxy.cluster.instance import Instance
from blockproxy.routing.job import Job
from blockproxy.routing.policies import Policy, register
from blockproxy.simulator import Prediction


@register("round_robin")
class RoundRobinPolicy(Policy):
    def __init__(self, name: str, rng: random.Random) -> None:
        super().__init__(name, rng)
        self.current: dict[str, float] = {}

    def choose(self, candidates: Sequence[Instance], job: Job
               ) -> tuple[Instance, Prediction | None]:
        total = 0.0
        best: Instance | None = None
        for inst in candidates:
            score = self.current.get(inst.name, 0.0) + inst.weight
            self.current[inst.name] = score
            total += inst.weight
            if best is None or score > self.current[best.name]:
                best = inst
        assert best is not None
        self.current[best.name] -= total
        return best, None
