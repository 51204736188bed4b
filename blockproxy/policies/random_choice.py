"""``random``: a weighted random instance."""

from __future__ import annotations

import random
from typing import Sequence

from blockproxy.cluster import Instance
from blockproxy.policies import Job, Prediction, register


@register("random")
class RandomPolicy:
    def __init__(self, name: str, rng: random.Random, **_: object) -> None:
        self.name = name
        self.rng = rng

    def choose(self, candidates: Sequence[Instance], job: Job
               ) -> tuple[Instance, Prediction | None]:
        weights = [inst.weight for inst in candidates]
        return self.rng.choices(list(candidates), weights=weights)[0], None
