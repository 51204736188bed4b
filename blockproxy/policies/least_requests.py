"""``least_requests``: the instance with the fewest active requests (per unit of weight)."""

from __future__ import annotations

import random
from typing import Sequence

from blockproxy.cluster import Instance
from blockproxy.policies import Job, Prediction, register


def least_loaded(candidates: Sequence[Instance], rng: random.Random) -> Instance:
    """Fewest active requests per weight; ties broken at random."""
    best = min(inst.n / inst.weight for inst in candidates)
    return rng.choice([inst for inst in candidates if inst.n / inst.weight == best])


@register("least_requests")
class LeastRequestsPolicy:
    def __init__(self, name: str, rng: random.Random, **_: object) -> None:
        self.name = name
        self.rng = rng

    def choose(self, candidates: Sequence[Instance], job: Job
               ) -> tuple[Instance, Prediction | None]:
        return least_loaded(candidates, self.rng), None
