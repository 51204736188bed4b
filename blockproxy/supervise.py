"""Background loops that cannot silently die.

The proxy runs a few loops beside its handlers: reload the backends file, probe ejected
instances, advance non-streaming requests, scrape instances' gauges, gossip.  Each runs
under a :class:`Supervisor`: an exception is logged with its traceback, counted
(``blockproxy_background_task_restarts_total{task}``) and the loop restarted after a
backoff that grows with consecutive crashes; cancellation (shutdown) ends it.
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


class Supervisor:
    """Starts named loops, restarts any that raise, and cancels them all on :meth:`stop`."""

    def __init__(self, restarts: Counter) -> None:
        self.restarts = restarts
        self.loops: dict[str, Callable[[], Awaitable[None]]] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

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
                await asyncio.sleep(interval)
        self.loops[name] = periodic

    def start(self) -> None:
        for name, run in self.loops.items():
            self.tasks[name] = asyncio.create_task(self._supervised(name, run),
                                                   name=f"blockproxy:{name}")

    async def stop(self) -> None:
        tasks, self.tasks = list(self.tasks.values()), {}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _supervised(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        crashes = 0
        while True:
            try:
                await run()
                crashes = 0
                log.warning("background loop %s returned; restarting it", name)
            except asyncio.CancelledError:
                raise
            except Exception:
                crashes += 1
                log.exception("background loop %s crashed (%d in a row); restarting it",
                              name, crashes)
            self.restarts.labels(name).inc()
            await asyncio.sleep(min(BACKOFF_S * 2 ** max(crashes - 1, 0), MAX_BACKOFF_S))
