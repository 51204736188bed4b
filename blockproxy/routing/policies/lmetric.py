"""``lmetric``: fewest uncached prefill tokens times batch size.

The load metric prefix-aware routers settled on: an instance's cost for a new request is
the prefill it must still do (its queued prompts' uncached tokens plus the new request's
uncached tokens there) times the requests it is serving (the new one included), so a cache
hit counts for as much as it saves and a long queue counts against it.  Ties at random.
"""

from __future__ import annotations

from collections.abc import Sequence

from blockproxy.cluster.instance import Instance
from blockproxy.routing.job import Job
from blockproxy.routing.policies import Policy, register
from blockproxy.simulator import Prediction


@register("lmetric")
class LMetricPolicy(Policy):
    def choose(self, candidates: Sequence[Instance], job: Job
               ) -> tuple[Instance, Prediction | None]:
        scores = [((job.prompt_tokens - inst.cached_tokens(job) + inst.pending_prefill_tokens())
                   * (inst.active + 1) / inst.weight, inst) for inst in candidates]
        best = min(score for score, _ in scores)
        return self.rng.choice([inst for score, inst in scores if score == best]), None
