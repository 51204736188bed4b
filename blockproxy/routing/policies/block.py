"""``block``: send the request where the simulator predicts it finishes soonest.

``block`` minimises the predicted end-to-end latency of the new request (the Block
paper's default); ``block_ttft`` minimises its predicted time to first token.  With
``sample_k`` > 0 only k randomly sampled instances are simulated (power-of-k).  Predictions
within ``tie_tolerance`` of the best are ties: on a fast GPU one more decoding sequence
changes a step's time by a fraction of a percent, so end-to-end predictions of instances
with quite different queues can sit within a few percent, while their first tokens do
not.  Ties go to the earliest predicted first token (for ``block_ttft``: the earliest
end), again within the tolerance, then to the fewest active requests, then at random, so
proxies deciding at the same moment on the same view do not all pile onto one instance.

With ``delay_weight`` w > 0 the score is the request's own predicted latency plus w times
the latency it is predicted to add to the others on the instance (``Prediction.delay``:
each step it takes part in is that much longer for every other request in flight), and
the simulations include the requests expected to arrive there meanwhile (the instance's
recent arrival process, as for the predictions users read).  Minimising its own latency
alone is greedy: a long prompt sent where it starts soonest can stall many decodes there,
and a long answer sent where the batch is smallest slows every prefill that arrives there
while it decodes; the mean latency over all requests pays for both.  At w = 1 the score
is the change in the sum of all latencies (to first order), the quantity the mean
end-to-end latency measures.  The requests still to come are most of those a long
answer delays: counting only the ones already there sends long prompts, unboundedly, to
wait for an instance where few others would notice them, while with the arrivals the
instances that receive fewer prefills keep the long answers.  For ``block_ttft`` the
latency is the time to first token, its own and the others': its steps delay only the
requests still before their first token (a decode's first token is out already), so a
long prompt is not sent to wait behind a queue merely because the instances with no
queue are busy decoding (what a TTFT SLO needs).  ``delay_decodes`` sets how much a
delay to a request past its first token counts against one to a first token (1 for
``block``, 0 for ``block_ttft`` unless set): between the two, a turn sent away from the
instance caching its history is still charged a share of the decodes its recomputed
prefill slows.  Only instances where the request's own predicted latency is within
``delay_slack`` (a fraction) of its best are candidates for it (``inf``: all of them).

With ``prefill_stall`` s > 0 the score also holds s times the time the request's prefill
holds up the requests running on the instance (``Instance.prefill_stall``: its uncached
prefill time times how many run there, the Intelligent Router's mixing penalty for a
prompt), and the simulations include the expected arrivals as with the delay weight.
Past the cluster's capacity, with lengths the proxy cannot foresee, this charge routes
better than the simulated delay (README, the Intelligent Router study); why the delay
falls short there is not established.  ``delay_slack`` bounds either weight's trade.

Branch and bound: candidates are simulated from the most likely winner down (the longest
cached prefix of the prompt first, then the least loaded), and each simulation stops as
soon as it can no longer end within the best prediction so far (plus the tie tolerance, or
the delay slack): its clock plus a step of at least the fixed step time for each token
the request still has to produce, and the prefill of its uncached prompt tokens still to
compute, passes it (so a long prompt's candidates without its prefix cached are cut at
once when one with it cached ends sooner).  With the delay weight and no slack limit it
stops as soon as that (for ``block_ttft`` its clock, or its first token once out) plus its
weighted delay so far passes the best score so far (the delay only grows): an instance
already past that cannot win, and its exact latency is not needed.  The choice is the
same as with full simulations, at a fraction of the cost.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from blockproxy.cluster.instance import Instance
from blockproxy.routing.job import Job
from blockproxy.routing.policies import Policy, register
from blockproxy.simulator import Prediction


@register("block", "block_ttft")
class BlockPolicy(Policy):
    OPTIONS = ("sample_k", "tie_tolerance", "delay_weight", "delay_slack", "delay_decodes",
               "prefill_stall")

    def __init__(self, name: str, rng: random.Random, sample_k: int = 0,
                 tie_tolerance: float = 0.02, delay_weight: float = 0.0,
                 delay_slack: float = 0.2, delay_decodes: float = -1.0,
                 prefill_stall: float = 0.0) -> None:
        super().__init__(name, rng)
        for option, value in (("delay_weight", delay_weight), ("delay_slack", delay_slack),
                              ("prefill_stall", prefill_stall)):
            if not value >= 0.0:
                raise ValueError(f"{option} must be >= 0, got {value}")
        if math.isnan(delay_decodes) or delay_decodes > 1.0:
            raise ValueError(f"delay_decodes must be in [0, 1] (negative: the policy's "
                             f"own), got {delay_decodes}")
        self.sample_k = sample_k
        self.tie_tolerance = tie_tolerance
        self.delay_weight = delay_weight
        self.delay_slack = delay_slack
        self.prefill_stall = prefill_stall
        self.predicts_future = delay_weight > 0.0 or prefill_stall > 0.0
        self.index = 0 if name == "block_ttft" else 1  # ttft or e2e in the prediction
        if delay_decodes < 0.0:  # the policy's own: the delay to what it minimises
            delay_decodes = 0.0 if self.index == 0 else 1.0
        self.delay_decodes = delay_decodes

    def choose(self, candidates: Sequence[Instance], job: Job
               ) -> tuple[Instance, Prediction | None]:
        pool = candidates
        if 0 < self.sample_k < len(candidates):
            pool = self.rng.sample(list(candidates), self.sample_k)
        idx = self.index
        w, stall = self.delay_weight, self.prefill_stall
        # with either weight the others it delays include those still to arrive
        weighted = future = self.predicts_future
        slack = 1.0 + self.tie_tolerance
        # how much of its own latency the request may give up for the others
        give = 1.0 + self.delay_slack if weighted else slack
        scored = []  # (prediction, instance, the stall term of its score)
        best = math.inf
        best_score = math.inf  # own latency + w * delay (+ the stall), over finished runs
        # With the delay and no slack limit, a run whose latency plus weighted delay so far
        # passes the best score cannot win (the delay only grows), whichever latency it is.
        # (With a limit it must run on: its own latency may be the best, which rules others
        # out.)  Without the delay only the end-to-end time can be bounded: a TTFT search
        # must finish its runs, whose end-to-end times break its ties.
        scores_bound = weighted and give == math.inf
        order = [(-inst.cached_tokens(job), inst.active, i, inst) for i, inst in enumerate(pool)]
        if idx == 1 or scores_bound:
            order.sort()
        prompt, output = job.prompt_tokens, job.output_tokens
        decodes, on_ttft = self.delay_decodes, idx == 0
        for neg_cached, _, _, inst in order:
            extra = stall * inst.prefill_stall(prompt + neg_cached) if stall else 0.0
            bound = _times(best, give) if idx == 1 else math.inf
            score_bound = best_score * slack - extra if scores_bound else math.inf
            prediction = inst.predict(prompt, -neg_cached, output, bound, future, w,
                                      score_bound, decodes, on_ttft)
            scored.append((prediction, inst, extra))
            if prediction[idx] < best:
                best = prediction[idx]
            if weighted and prediction[idx] < math.inf:
                best_score = min(best_score, prediction[idx] + w * prediction.delay + extra)
        limit = _times(best, give)
        ties = [tie for tie in scored if tie[0][idx] <= limit]
        if weighted and len(ties) > 1:
            scores = [p[idx] + w * p.delay + extra for p, _, extra in ties]
            limit = min(scores) * slack
            ties = [tie for tie, score in zip(ties, scores) if score <= limit]
        if len(ties) > 1:
            other = 1 - idx
            limit = min(p[other] for p, _, _ in ties) * slack
            ties = [tie for tie in ties if tie[0][other] <= limit]
        if len(ties) > 1:
            fewest = min(inst.active for _, inst, _ in ties)
            ties = [tie for tie in ties if tie[1].active == fewest]
        prediction, chosen, _ = ties[0] if len(ties) == 1 else self.rng.choice(ties)
        return chosen, prediction


def _times(best: float, factor: float) -> float:
    """``best * factor``, where an unlimited factor (``inf``) admits everything."""
    return math.inf if factor == math.inf else best * factor
