"""``llumnix``: Llumnix's load metric, pick the instance with the most KV headroom.

Headroom = (free KV blocks - blocks needed by waiting requests) / running requests, from
the proxy's view of each instance.
"""

from __future__ import annotations

from collections.abc import Sequence

from blockproxy.cluster.instance import Instance
from blockproxy.routing.job import Job
from blockproxy.routing.policies import Policy, register
from blockproxy.simulator import Prediction


@register("llumnix")
class LlumnixPolicy(Policy):
    def choose(self, candidates: Sequence[Instance], job: Job
               ) -> tuple[Instance, Prediction | None]:
        room = [inst.llumnix_headroom() * inst.weight for inst in candidates]
        best = max(room)
        return self.rng.choice([c for c, x in zip(candidates, room) if x == best]), None
