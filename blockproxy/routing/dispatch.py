"""Choose an instance for a job and reserve the request there, with no await in between.

The policy picks; the prediction for the chosen instance is made whatever the policy (so
prediction error is measured alike for all), with the requests expected to arrive there
meanwhile (which only ``block --delay-weight`` compares by: see ``Instance.predict``);
the reservation is recorded at once, so the next decision, a microsecond later, already
sees this request.

With a TTFT budget (admission under an objective), a choice predicted to start later than
the budget is replaced by the policy's choice among the candidates predicted in time, and
when there is none nothing is reserved: the caller holds the request.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from blockproxy.cluster.instance import Instance
from blockproxy.cluster.requests import Entry
from blockproxy.metrics import Metrics
from blockproxy.routing.job import Job
from blockproxy.routing.policies import Policy
from blockproxy.simulator import Prediction


class Dispatcher:
    def __init__(self, policy: Policy, metrics: Metrics) -> None:
        self.policy = policy
        self.metrics = metrics
        # Labelled children looked up once: labels() takes a lock and builds a key each call.
        self._decision_time = metrics.decision.labels(policy.name)
        self._decisions: dict[str, Any] = {}

    def dispatch(self, candidates: Sequence[Instance], job: Job) -> Entry:
        """Choose one of ``candidates`` (never empty) and reserve ``job`` on it."""
        start = time.perf_counter()
        inst, prediction = self.policy.choose(candidates, job)
        return self._reserve(inst, prediction, job, start)

    def dispatch_in_time(self, candidates: Sequence[Instance], job: Job,
                         ttft_budget: float, fit_first: bool = False) -> Entry | None:
        """:meth:`dispatch` to an instance predicted to give the first token within
        ``ttft_budget`` seconds; None (nothing reserved) when there is none.  The policy
        chooses first and its choice is checked; with ``fit_first`` (likely none fits:
        a held request) the instances in time are found first, at one short simulation
        each, and the policy chooses among them."""
        start = time.perf_counter()
        if fit_first:
            fit = [c for c in candidates if self._in_time(c, None, job, ttft_budget)]
            if not fit:
                self._decision_time.observe(time.perf_counter() - start)
                return None
            inst, prediction = self.policy.choose(fit, job)
            return self._reserve(inst, prediction, job, start)
        inst, prediction = self.policy.choose(candidates, job)
        if not self._in_time(inst, prediction, job, ttft_budget):
            fit = [c for c in candidates
                   if c is not inst and self._in_time(c, None, job, ttft_budget)]
            if not fit:
                self._decision_time.observe(time.perf_counter() - start)
                return None
            inst, prediction = self.policy.choose(fit, job)
        return self._reserve(inst, prediction, job, start)

    @staticmethod
    def idle_service(candidates: Sequence[Instance], job: Job) -> float:
        """Seconds to ``job``'s first token on the fastest of ``candidates`` were it idle
        (its cached prefix there counted): no deadline closer than this can be met."""
        best = math.inf
        for inst in candidates:
            r = inst.requests  # none of its requests: the table's first 0 rows
            p = inst.model.predict(r.table, 0, job.prompt_tokens, inst.cached_tokens(job), 1,
                                   math.inf)
            best = min(best, p[0] + inst.overhead.seconds)
        return best

    def _reserve(self, inst: Instance, prediction: Prediction | None, job: Job,
                 start: float) -> Entry:
        if prediction is None or (inst.requests.recent.limit
                                  and not self.policy.predicts_future):
            prediction = inst.predict_job(job, future=True)
        high = math.nan
        if job.output_high > job.output_tokens:  # the risk of a long answer, priced
            high = inst.predict_job(job._replace(output_tokens=job.output_high),
                                    future=True).e2e
        now = time.perf_counter()
        self._decision_time.observe(now - start)
        counter = self._decisions.get(inst.name)
        if counter is None:
            counter = self._decisions[inst.name] = self.metrics.decisions.labels(
                self.policy.name, inst.name)
        counter.inc()
        entry = inst.reserve_job(job, now)
        self.metrics.prompt_tokens.inc(job.prompt_tokens)
        if entry.cached_tokens:
            self.metrics.cached_tokens.inc(entry.cached_tokens)
        entry.predicted_ttft = prediction.ttft
        entry.predicted_e2e = prediction.e2e
        entry.predicted_queue_delay = prediction.queue_delay
        entry.predicted_e2e_high = high
        entry.overhead_s = inst.overhead.seconds
        return entry

    @staticmethod
    def _in_time(inst: Instance, prediction: Prediction | None, job: Job,
                 budget: float) -> bool:
        """Whether ``inst`` is predicted to give ``job``'s first token within ``budget``
        (as routing compares: without expected future arrivals)."""
        if prediction is None:  # its own length does not delay its first token
            prediction = inst.predict(job.prompt_tokens, inst.cached_tokens(job), 1, budget)
        return prediction.ttft <= budget
