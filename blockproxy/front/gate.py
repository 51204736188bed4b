"""The proxy's front gate: open while serving, closed while draining; counts what is inside.

SIGTERM closes the gate (new requests get 503, ``/ready`` turns 503) and waits until the
requests already inside have finished, up to a deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Gauge


class Gate:
    def __init__(self, gauge: Gauge) -> None:
        self.gauge = gauge
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    @contextmanager
    def inside(self) -> Iterator[None]:
        """Count one request as in flight for the duration of the block."""
        self.in_flight += 1
        self._idle.clear()
        self.gauge.inc()
        try:
            yield
        finally:
            self.in_flight -= 1
            self.gauge.dec()
            if self.in_flight == 0:
                self._idle.set()

    def close(self) -> None:
        """Admit nothing new from now on."""
        self.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is inside; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=timeout)
        except asyncio.TimeoutError:
            return False
        return True
