"""The engine loop of one emulated instance: schedules steps and paces them in real time.

True step time = time_scale x speed_factor x profile model x lognormal noise (mean one,
``noise_sigma``), plus, with probability ``stall_prob`` per step, a stall of
``stall_ms`` (x time_scale).  Each request reaches the scheduler ``request_overhead_s``
(x time_scale) after it arrived: the API server's HTTP handling and tokenisation, which
no step accounts for (the profile's ``per_request_ms`` unless overridden).  A speed factor
is a step-time multiplier: 1.25 is 25% slower.  Steps are paced against a monotonic-clock
deadline (``next_end += step``), so the loop's own Python overhead does not inflate step
times; when the loop falls more than :data:`RESYNC_S` behind (an overloaded process) it
re-synchronises instead of bursting.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from loadgen.emulator.kvevents import KVEventPublisher
from loadgen.emulator.metrics import InstanceMetrics
from loadgen.emulator.profiles import EngineLimits, StepTimeModel
from loadgen.emulator.scheduler import FINISHED, EngineRequest, Scheduler, StepPlan

#: Lateness (wall seconds) beyond which the pacing clock is reset rather than caught up.
RESYNC_S = 0.25
#: Bounds and gain of the wake-up latency compensation (see ``Engine.run``).
MAX_WAKE_BIAS_S = 0.002
WAKE_BIAS_STEP_S = 10e-6
#: Step records kept for ``/debug/engine``.
STEP_HISTORY = 4096


@dataclass(frozen=True)
class TimingConfig:
    """How the true step time departs from the profile on one instance."""

    time_scale: float = 1.0
    speed_factor: float = 1.0
    noise_sigma: float = 0.05
    stall_prob: float = 0.001
    stall_ms: float = 40.0
    seed: int = 0
    request_overhead_s: float = 0.0


class StepRecord(NamedTuple):
    """One executed step: when it should have and did end, and what it computed."""

    intended_start: float
    intended_end: float
    actual_end: float
    model_s: float  # profile x time_scale x speed factor, without noise or stalls
    true_s: float  # the duration the engine aimed for (noise and stall included)
    num_seqs: int
    prefill_tokens: int
    decode_seqs: int


class Engine:
    """Scheduler + pacing loop + metrics of one instance."""

    def __init__(self, model: StepTimeModel, limits: EngineLimits, timing: TimingConfig,
                 metrics: InstanceMetrics, publisher: KVEventPublisher | None = None
                 ) -> None:
        self.model = model
        self.limits = limits
        self.timing = timing
        self.metrics = metrics
        self.scheduler = Scheduler(limits)
        #: KV cache events, published after each step when a publisher is given
        self.publisher = publisher
        if publisher is not None:
            self.scheduler.kv.events = []
        self.steps: deque[StepRecord] = deque(maxlen=STEP_HISTORY)
        self.num_steps = 0
        self.num_resyncs = 0
        #: wall seconds steps ended past their deadline, summed (fidelity of the pacing)
        self.lateness_s = 0.0
        self._rng = random.Random(timing.seed)
        self._scale = timing.time_scale * timing.speed_factor
        self._noise_mu = -0.5 * timing.noise_sigma ** 2  # mean-one lognormal
        self._wake = asyncio.Event()
        # Event-loop timers fire up to ~1 ms late (millisecond resolution); sleeping this
        # much less than asked keeps the median step end on its deadline.
        self._wake_bias = 0.0

    def submit(self, req: EngineRequest) -> None:
        """Queue a request and wake the loop."""
        self.scheduler.add(req)
        self._wake.set()

    def abort(self, req: EngineRequest) -> None:
        """Abort a request (client gone); it leaves the batch at the next step."""
        self.scheduler.abort(req)
        self._wake.set()

    def step_seconds(self, plan: StepPlan) -> tuple[float, float]:
        """(model, true) wall duration of a step: see the module docstring."""
        model_s = self._scale * self.model.seconds(
            plan.prefill_tokens, plan.decode_seqs, plan.context_tokens)
        timing = self.timing
        true_s = model_s
        if timing.noise_sigma > 0:
            true_s *= math.exp(self._noise_mu + timing.noise_sigma * self._rng.gauss(0.0, 1.0))
        if timing.stall_prob > 0 and self._rng.random() < timing.stall_prob:
            true_s += timing.stall_ms * 1e-3 * timing.time_scale * self._rng.uniform(0.5, 1.5)
        return model_s, true_s

    async def _idle(self) -> None:
        self._wake.clear()
        await self._wake.wait()

    async def run(self) -> None:
        """The engine loop; runs until cancelled."""
        clock = time.perf_counter
        scheduler = self.scheduler
        next_end = clock()
        while True:
            if not scheduler.has_work():
                await self._idle()
                next_end = clock()
            now = clock()
            if now - next_end > RESYNC_S:
                self.num_resyncs += 1
                next_end = now
            plan = scheduler.schedule()
            if not plan.scheduled:
                await self._idle()  # nothing fits until something arrives or leaves
                next_end = clock()
                continue
            model_s, true_s = self.step_seconds(plan)
            start = next_end
            next_end = start + true_s
            delay = next_end - clock() - self._wake_bias
            await asyncio.sleep(delay if delay > 0 else 0)
            end = clock()
            if delay > 0:
                # A sign update converges to the median lateness, unmoved by rare long
                # delays (a busy event loop), which no sleep could have avoided.
                if end > next_end:
                    self._wake_bias = min(MAX_WAKE_BIAS_S, self._wake_bias + WAKE_BIAS_STEP_S)
                else:
                    self._wake_bias = max(0.0, self._wake_bias - WAKE_BIAS_STEP_S)
            self._finish_step(plan, end)
            if self.publisher is not None and scheduler.kv.events:
                self.publisher.publish(scheduler.kv.events)
                scheduler.kv.events = []
            self.num_steps += 1
            if end > next_end:
                self.lateness_s += end - next_end
            self.steps.append(StepRecord(start, next_end, end, model_s, true_s,
                                         len(plan.scheduled), plan.prefill_tokens,
                                         plan.decode_seqs))

    def _finish_step(self, plan: StepPlan, now: float) -> None:
        metrics = self.metrics
        for req in self.scheduler.complete(plan, now):
            if req.num_output == 1:
                metrics.ttft.observe(now - req.arrival_time)
            else:
                metrics.itl.observe(now - req.last_token_time)
            req.last_token_time = now
            if req.state == FINISHED:
                metrics.on_finished(req, now)
            req.wake()
