"""Online calibration: learn how fast an instance really is from observed token timings.

The profile says how long a step *should* take; the instance may be a slower GPU, run
another model build, share its host, or be a time-scaled emulator.  While a request
streams, each of its chunks is one engine step.  :class:`DecodeSpans` samples spans of
:data:`SPAN_TOKENS` such steps of one request during which the proxy's view of the
instance shows no prefill (nothing dispatched there is still waiting for its first token,
and nothing was added): pure decode steps, whose model time is ``fixed + per_decode_seq x
running``.  A span rather than a single chunk gap, because a busy proxy reads chunks late
and in bunches; over a span that lag only touches the two ends.  The median of observed /
model over a window of such spans (:class:`SpeedCalibration`) is the instance's step-time
multiplier, and the simulator's ``speed`` is set to it.

Why not compare a finished request's time per token with the prediction made at
dispatch: under load, prefills of requests that arrive *later* slow its decode steps down,
which no prediction at dispatch can know; that comparison blames the hardware for future
traffic and drifts (we measured 3x).  Pure decode steps have no such bias, and the median
shrugs off the odd step that did include an unseen prefill or a stall.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from blockproxy.cluster.requests import Entry, RequestTable

#: decode steps per calibration sample
SPAN_TOKENS = 16


class SpeedCalibration:
    """Median of observed / model time over recent pure decode steps of one instance.

    It starts at ``initial`` (the configured speed) and stays within ``RANGE`` times of it
    either way, so a burst of odd observations cannot make an instance look absurdly fast.
    """

    RANGE = 10.0

    def __init__(self, enabled: bool = True, initial: float = 1.0, window: int = 256,
                 min_samples: int = 16, update_every: int = 16) -> None:
        self.enabled = enabled
        self.window = window
        self.min_samples = min_samples
        self.update_every = update_every
        self.samples = 0
        self.min_speed = initial / self.RANGE
        self.max_speed = initial * self.RANGE
        self.speed = initial
        self._ratios: list[float] = []
        self._next = 0

    def observe_step(self, observed_s: float, model_s: float) -> bool:
        """Fold in one pure decode step; returns True when :attr:`speed` was updated."""
        if not self.enabled or not (observed_s > 0 and model_s > 0) or \
                not math.isfinite(observed_s):
            return False
        ratio = observed_s / model_s
        if ratio < self.speed / 4:
            # Two events in one step (a usage chunk or [DONE] right behind the last token).
            return False
        if len(self._ratios) < self.window:
            self._ratios.append(ratio)
        else:
            self._ratios[self._next] = ratio
            self._next = (self._next + 1) % self.window
        self.samples += 1
        if self.samples < self.min_samples or self.samples % self.update_every:
            return False
        median = statistics.median(self._ratios)
        self.speed = min(max(median, self.min_speed), self.max_speed)
        return True


class DecodeSpans:
    """Cuts one instance's streamed tokens into pure-decode spans for :class:`SpeedCalibration`.

    The span state lives on each :class:`~blockproxy.cluster.requests.Entry`; ``requests``
    is the instance's table, whose ``unstarted`` and ``arrivals`` counters tell whether a
    prefill may have joined the batch since the span started.
    """

    def __init__(self, calibration: SpeedCalibration, fixed_s: float,
                 per_decode_seq_s: float) -> None:
        self.calibration = calibration
        self.fixed_s = fixed_s
        self.per_decode_seq_s = per_decode_seq_s

    def restart(self, requests: RequestTable, entry: Entry, now: float) -> None:
        """Start a new span for ``entry`` at ``now`` (void while a prefill is pending)."""
        entry.span_start_at = now
        entry.span_tokens = 0
        entry.span_epoch = -1 if requests.unstarted else requests.arrivals

    def observe(self, requests: RequestTable, entry: Entry, now: float, tokens: int) -> bool:
        """``entry`` streamed ``tokens`` more; True when the calibrated speed changed."""
        if requests.unstarted or requests.arrivals != entry.span_epoch:
            self.restart(requests, entry, now)
            return False
        entry.span_tokens += tokens
        if entry.span_tokens < SPAN_TOKENS:
            return False
        per_step = (now - entry.span_start_at) / entry.span_tokens
        model_step = self.fixed_s + self.per_decode_seq_s * requests.n
        updated = self.calibration.observe_step(per_step, model_step)
        self.restart(requests, entry, now)
        return updated


class RequestOverhead:
    """What a request costs before the engine queues it (HTTP, tokenisation, the API
    server's scheduling): a time the step model has no term for.

    It starts at ``initial`` (the profile's ``per_request_ms``, times the configured speed)
    and, once ``min_samples`` are in, is the median, floored at zero, of the last
    ``window`` residuals ``observed TTFT - simulated TTFT`` of streamed requests that the
    simulator expected to be scheduled in its first step: for them the simulated TTFT is
    one step, so the residual is the overhead (plus the wait for the step in flight when
    the request reached the engine, which is just as real and just as unmodelled).
    Requests that queued are left out: their residual is mostly queueing error.
    """

    MAX_S = 10.0

    def __init__(self, enabled: bool = True, initial: float = 0.0, window: int = 128,
                 min_samples: int = 16, update_every: int = 8) -> None:
        self.enabled = enabled
        self.seconds = initial
        self.window = window
        self.min_samples = min_samples
        self.update_every = update_every
        self.samples = 0
        self._residuals: list[float] = []
        self._next = 0

    def observe(self, residual_s: float) -> bool:
        """Fold in one residual; True when :attr:`seconds` changed."""
        if not self.enabled or not math.isfinite(residual_s):
            return False
        if len(self._residuals) < self.window:
            self._residuals.append(residual_s)
        else:
            self._residuals[self._next] = residual_s
            self._next = (self._next + 1) % self.window
        self.samples += 1
        if self.samples < self.min_samples or self.samples % self.update_every:
            return False
        self.seconds = min(max(statistics.median(self._residuals), 0.0), self.MAX_S)
        return True
