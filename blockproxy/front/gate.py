"""The proxy's front gate: open while serving, closed while draining; counts what is inside.

SIGTERM first announces the departure (``leaving``: ``/ready`` turns 503, responses carry
``Connection: close``, requests are still served) so that load balancers stop routing
here; then closes the gate (new requests get 503) and waits until the requests already
inside have finished, up to a deadline.  With a cap, a request beyond ``max_in_flight``
gets a 503 at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Gauge

from blockproxy.request import ApiError


class Gate:
    def __init__(self, gauge: Gauge, max_in_flight: int = 0) -> None:
        self.gauge = gauge
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.leaving = False
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    @contextmanager
    def inside(self) -> Iterator[None]:
        """Count one request as in flight for the duration of the block."""
        if self.max_in_flight and self.in_flight >= self.max_in_flight:
            raise ApiError(503, f"the proxy is serving its maximum of {self.max_in_flight} "
                           "requests", "ServiceUnavailableError")
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

    def announce(self) -> None:
        """Tell load balancers to go elsewhere; keep serving."""
        self.leaving = True

    def close(self) -> None:
        """Admit nothing new from now on."""
        self.leaving = True
        self.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is inside; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=timeout)
        except asyncio.TimeoutError:
            return False
        return True
