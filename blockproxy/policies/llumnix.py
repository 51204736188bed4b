"""``llumnix``: Llumnix's load metric, pick the instance with the most KV headroom.

Headroom = (free KV blocks - blocks needed by waiting requests) / running requests, from
the proxy's view of each instance.
"""

from __future__ import annotations

import random
from typing import Sequence

from blockproxy.cluster import Instance
from blockproxy.policies import Job, Prediction, register


@register("llumnix")
class LlumnixPolicy:
    def __init__(self, name: str, rng: random.Random, **_: object) -> None:
        self.name = name
        self.rng = rng

    def choose(self, candidates: Sequence[Instance], job: Job
               ) -> tuple[Instance, Prediction | None]:
        room = [inst.llumnix_headroom() * inst.weight for inst in candidates]
        best = max(room)
        return self.rng.choice([c for c, x in zip(candidates, room) if x == best]), None
