"""``least_tokens``: fewest unprocessed tokens (prompt + predicted output - done).

The Block paper's "Block-NoSim" baseline: the same information as ``block`` without the
simulation of how the engine will batch it.
"""

from __future__ import annotations

from collections.abc import Sequence

from blockproxy.cluster.instance import Instance
from blockproxy.routing.job import Job
from blockproxy.routing.policies import Policy, register
from blockproxy.simulator import Prediction


@register("least_tokens")
class LeastTokensPolicy(Policy):
    def choose(self, candidates: Sequence[Instance], job: Job
               ) -> tuple[Instance, Prediction | None]:
        loads = [inst.unprocessed_tokens() / inst.weight for inst in candidates]
        best = min(loads)
        return self.rng.choice([c for c, x in zip(candidates, loads) if x == best]), None
