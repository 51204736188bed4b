"""``power_of_two``: the less loaded (fewest active requests) of two random instances."""

from __future__ import annotations

import random
from typing import Sequence

from blockproxy.cluster import Instance
from blockproxy.policies import Job, Prediction, register
from blockproxy.policies.least_requests import least_loaded


@register("power_of_two")
class PowerOfTwoPolicy:
    def __init__(self, name: str, rng: random.Random, **_: object) -> None:
        self.name = name
        self.rng = rng

    def choose(self, candidates: Sequence[Instance], job: Job
               ) -> tuple[Instance, Prediction | None]:
        pair = self.rng.sample(list(candidates), 2) if len(candidates) > 2 else candidates
        return least_loaded(pair, self.rng), None
