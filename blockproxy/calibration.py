"""Online calibration: learn how fast an instance really is from observed token timings.

The profile says how long a step *should* take; the instance may be a slower GPU, run
another model build, share its host, or be a time-scaled emulator.  While a request
streams, the gap between two of its chunks is one engine step.  When the proxy's view of
the instance shows no prefill pending (every request on it has produced its first token),
that step was a pure decode step, whose model time is ``fixed + per_decode_seq x running``.
The median of observed / model over a window of such steps is the instance's step-time
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
