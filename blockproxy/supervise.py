"""Background loops that cannot silently die.

The proxy runs a few loops beside its handlers: reload the backends file, probe ejected
instances, advance non-streaming requests, scrape instances' gauges, gossip.  Each runs
under a :class:`Supervisor`: an exception is logged with its traceback, counted
(``blockproxy_background_task_restarts_total{task}``) and the loop restarted after a
backoff that grows with consecutive crashes; cancellation (shutdown) ends it.  A loop that
has crashed :data:`FAILING_AFTER` times in a row without a good tick in between is
*failing*, and ``/health`` says so (503), so that a supervisor of the process restarts it
rather than let it serve on with, say, no health probing.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import Counter

log = logging.getLogger("blockproxy.supervise")

#: seconds before the first restart, doubled per consecutive crash up to MAX_BACKOFF_S
BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
#: consecutive crashes after which a loop counts as failing
FAILING_AFTER = 3


class Supervisor:
    """Starts named loops, restarts any that raise, and cancels them all on :meth:`stop`."""

    def __init__(self, restarts: Counter) -> None:
        self.restarts = restarts
        self.loops: dict[str, Callable[[], Awaitable[None]]] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        #: consecutive crashes per loop, reset by a tick that completes
        self.crashes: dict[str, int] = {}

    def loop(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Supervise ``run()``, a coroutine that runs until cancelled."""
        self.loops[name] = run

    def every(self, name: str, interval: float, tick: Callable[[], Any]) -> None:
        """Supervise a loop calling ``tick()`` (plain or async) at once, then every
        ``interval`` seconds."""
        async def periodic() -> None:
            while True:
                result = tick()
                if inspect.isawaitable(result):
                    await result
                self.crashes[name] = 0
                await asyncio.sleep(interval)
        self.loops[name] = periodic

    def start(self) -> None:
        for name in self.loops:
            self.start_one(name)

    def start_one(self, name: str) -> None:
        self.tasks[name] = asyncio.create_task(self._supervised(name, self.loops[name]),
                                               name=f"blockproxy:{name}")

    def failing(self) -> list[str]:
        """Loops that crashed :data:`FAILING_AFTER` times in a row."""
        return sorted(n for n, c in self.crashes.items() if c >= FAILING_AFTER)

    async def stop(self) -> None:
        tasks, self.tasks = list(self.tasks.values()), {}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _supervised(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        self.crashes[name] = 0
        while True:
            try:
                await run()
                self.crashes[name] = 0
                log.warning("background loop %s returned; restarting it", name)
            except asyncio.CancelledError:
                raise
            except Exception:
                crashes = self.crashes[name] = self.crashes.get(name, 0) + 1
                log.exception("background loop %s crashed (%d in a row); restarting it",
                              name, crashes)
            self.restarts.labels(name).inc()
            wait = BACKOFF_S * 2 ** max(self.crashes[name] - 1, 0)
            await asyncio.sleep(min(wait, MAX_BACKOFF_S))
