"""Choose an instance for a job and reserve the request there, with no await in between.

The policy picks; the prediction for the chosen instance is made whatever the policy (so
prediction error is measured alike for all), with the requests expected to arrive there
meanwhile (which no policy's comparison uses: see ``Instance.predict``); the reservation
is recorded at once, so the next decision, a microsecond later, already sees this
request.
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
        if prediction is None or inst.requests.recent.limit:
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
