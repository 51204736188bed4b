"""Online calibration: learn how fast an instance really is from observed token timings.

The profile says how long a step *should* take; the instance may be a slower GPU, run
another model build or share its host.  For every finished request the proxy compares
the observed time per output token with the time the simulator predicted at dispatch,
and keeps an exponentially weighted estimate (in log space, so a 2x error up and down
weigh the same) of the instance's step-time multiplier.  The simulator's ``speed`` is set
to that estimate, so an unknown GPU is learned within a few dozen requests.
"""

from __future__ import annotations

import math


class SpeedCalibration:
    """Exponentially weighted estimate of one instance's step-time multiplier.

    It starts at ``initial`` (the configured speed) and stays within ``RANGE`` times of it
    either way, so a few wild observations cannot make an instance look absurdly fast.
    """

    RANGE = 10.0

    def __init__(self, enabled: bool = True, initial: float = 1.0, weight: float = 0.1,
                 warmup: int = 5) -> None:
        self.enabled = enabled
        self.weight = weight
        self.warmup = warmup
        self.samples = 0
        self.min_speed = initial / self.RANGE
        self.max_speed = initial * self.RANGE
        self._log_speed = math.log(initial)

    @property
    def speed(self) -> float:
        """Current estimate (1.0 = as fast as the profile)."""
        return math.exp(self._log_speed)

    def observe(self, speed_used: float, predicted_tpot: float, observed_tpot: float) -> float:
        """Fold in one request's observed vs predicted time per output token.

        ``predicted_tpot`` was computed with the simulator's speed ``speed_used``; the
        instance's multiplier implied by this request is ``speed_used * observed /
        predicted``.  Returns the updated estimate.
        """
        if not self.enabled or not (predicted_tpot > 0 and observed_tpot > 0) \
                or not math.isfinite(predicted_tpot):
            return self.speed
        implied = speed_used * observed_tpot / predicted_tpot
        implied = min(max(implied, self.min_speed), self.max_speed)
        self.samples += 1
        # Average the first samples plainly, then switch to the exponential weight.
        weight = max(self.weight, 1.0 / self.samples) if self.samples <= self.warmup \
            else self.weight
        self._log_speed += weight * (math.log(implied) - self._log_speed)
        return self.speed
