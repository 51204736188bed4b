"""``least_tokens``: fewest unprocessed tokens (prompt + predicted output - done).

The Block paper's "Block-NoSim" baseline: the same information as ``block`` without the
simulation of how the engine will batch it.
"""

from __future__ import annotations

import random
from typing import Sequence

from blockproxy.cluster import Instance
from blockproxy.policies import Job, Prediction, register


@register("least_tokens")
class LeastTokensPolicy:
    def __init__(self, name: str, rng: random.Random, **_: object) -> None:
        self.name = name
        self.rng = rng

    def choose(self, candidates: Sequence[Instance], job: Job
               ) -> tuple[Instance, Prediction | None]:
        loads = [inst.unprocessed_tokens() / inst.weight for inst in candidates]
        best = min(loads)
        return self.rng.choice([c for c, x in zip(candidates, loads) if x == best]), None
