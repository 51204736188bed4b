"""The recent arrival process of one instance: the load it will see while a request runs.

A prediction made at dispatch knows the requests already on the instance, but in a busy
cluster more keep arriving while the new one decodes, and each of their prefills slows
its steps.  :class:`ArrivalProcess` keeps exponentially decayed sums over the requests
that arrived at one instance (this proxy's, and other proxies' learned by gossip; not
phantom load, which is not an arrival the proxy saw): count, prompt tokens, cached prompt
tokens and predicted output tokens, each weighted by ``exp(-age / window)``.  Their ratio
to the weight of a steady stream gives the rate; ratios to the count give the mean sizes.
:meth:`expected` hands the simulator one stream of identical requests at that rate and
those sizes (:mod:`blockproxy.simulator.reference`, expected future arrivals).

With ``w`` the decayed count, a stream of rate ``r`` that has run for ``age`` seconds
gives ``w = r * window * (1 - exp(-age / window))``, so the rate estimate divides by that
factor (after discounting the first arrival, which only starts the clock): it is right
from the first seconds on, not only after a whole window.
"""

from __future__ import annotations

import math
from typing import Any

#: the most recent requests whose sizes are kept, for size quantiles (:meth:`sizes`)
SIZE_SAMPLES = 128
#: :meth:`ArrivalProcess.expected` when no arrival is expected
NO_ARRIVALS = (math.inf, 0, 0, 0, 0)


class ArrivalProcess:
    """Decayed rate and mean sizes of the requests arriving at one instance."""

    __slots__ = ("_cached", "_count", "_first", "_last", "_next", "_output", "_prompt",
                 "_sizes", "limit", "window")

    def __init__(self, window: float = 30.0, limit: int = 256) -> None:
        #: time constant of the decay, seconds
        self.window = window
        #: most expected arrivals one simulation is given (0: none)
        self.limit = limit
        self.clear()

    def clear(self) -> None:
        """Forget every arrival."""
        self._first = math.nan
        self._last = 0.0
        self._count = 0.0
        self._prompt = 0.0
        self._cached = 0.0
        self._output = 0.0
        self._sizes: list[tuple[int, int, int]] = []
        self._next = 0

    def snapshot(self) -> tuple[Any, ...]:
        """The whole state, for :meth:`restore` (a benchmark undoing its own arrivals)."""
        return (self._first, self._last, self._count, self._prompt, self._cached,
                self._output, list(self._sizes), self._next)

    def restore(self, state: tuple[Any, ...]) -> None:
        (self._first, self._last, self._count, self._prompt, self._cached,
         self._output, sizes, self._next) = state
        self._sizes = list(sizes)

    def record(self, now: float, prompt_tokens: int, cached_tokens: int,
               output_tokens: int) -> None:
        """One request arrived at ``now``."""
        if self._first != self._first:  # nan: the first arrival
            self._first = now
            self._last = now
        elif now > self._last:
            decay = math.exp((self._last - now) / self.window)
            self._count *= decay
            self._prompt *= decay
            self._cached *= decay
            self._output *= decay
            self._last = now
        self._count += 1.0
        self._prompt += prompt_tokens
        self._cached += cached_tokens
        self._output += output_tokens
        if len(self._sizes) < SIZE_SAMPLES:
            self._sizes.append((prompt_tokens, cached_tokens, output_tokens))
        else:
            self._sizes[self._next] = (prompt_tokens, cached_tokens, output_tokens)
            self._next = (self._next + 1) % SIZE_SAMPLES

    def sizes(self) -> list[tuple[int, int, int]]:
        """``(prompt, cached, output)`` tokens of the last :data:`SIZE_SAMPLES` requests
        (in no particular order)."""
        return self._sizes

    def rate(self, now: float) -> float:
        """Arrivals per second over the recent window (0 before any)."""
        if self._count <= 0.0:
            return 0.0
        age = now - self._first
        if age <= 0.0:
            return 0.0
        # The first arrival only starts the clock: k arrivals span k - 1 intervals.
        weight = (self._count * math.exp((self._last - now) / self.window)
                  - math.exp(-age / self.window))
        return max(weight, 0.0) / (self.window * -math.expm1(-age / self.window))

    def expected(self, now: float) -> tuple[float, int, int, int, int]:
        """``(interval, prompt, cached, output, limit)`` for the simulator: one arrival
        every ``interval`` seconds of the mean recent sizes (no arrivals: interval inf)."""
        rate = self.rate(now) if self.limit else 0.0
        if not rate > 0.0:
            return NO_ARRIVALS
        count = self._count
        return (1.0 / rate, round(self._prompt / count), round(self._cached / count),
                round(self._output / count), self.limit)

    def describe(self, now: float) -> dict[str, float]:
        _, prompt, cached, output, _ = self.expected(now)
        return {"rate_per_s": self.rate(now), "window_s": self.window,
                "mean_prompt_tokens": prompt, "mean_cached_tokens": cached,
                "mean_output_tokens": output, "limit": self.limit}
