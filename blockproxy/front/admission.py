"""SLO admission: hold what no instance can start in time, release it when one can.

With a TTFT objective (``--slo-ttft-ms``), a request is dispatched at once when some
instance is predicted to give its first token within the objective.  When none is (a
burst has every instance's queue full), the request is *held* here rather than queued at
an engine, in a bounded queue, so that:

- the order is the proxy's: earliest deadline first within a priority (the
  ``x-blockproxy-priority`` header, higher first), and round robin across tenants
  (``x-blockproxy-tenant``, the body's ``user``, else the API key), so one tenant's burst
  cannot starve the others;
- a held request is released, by the same dispatch the others get, the moment an instance
  is predicted to give its first token before the request's deadline (its arrival plus the
  objective); every release and every end of a request wakes the queue, and a tick
  re-checks it while it is not empty;
- what cannot be served in time is refused early and explicitly: ``429`` with
  ``Retry-After`` when the queue is full (the tenant holding the most gives up its latest
  request when another tenant arrives: fair push-out), when the queue's drain rate says the
  request's turn would come past its deadline, or when its deadline comes (or is closer
  than even an idle instance could start it) while it waits.

Overload then costs the requests that would have missed anyway, instead of every request
behind a queue that keeps growing: goodput stays near capacity.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import math
import time
from collections.abc import Callable

from blockproxy.cluster.requests import Entry
from blockproxy.metrics import Metrics
from blockproxy.request import ApiError

#: the request header giving a request's priority (an integer; higher goes first)
PRIORITY_HEADER = "x-blockproxy-priority"
PRIORITY_RANGE = 1000
#: seconds between re-checks of a non-empty queue (releases and ends also wake it)
TICK = 0.01
#: releases remembered to estimate the queue's drain rate
RATE_WINDOW = 64
#: a drain rate older than this (s) is not trusted to refuse a request on arrival
RATE_FRESH = 2.0

#: tries to dispatch the request with this TTFT budget (s): the entry, or None.  The flag
#: says the request is held (under overload: find the instances in time before choosing)
TryDispatch = Callable[[float, bool], "Entry | None"]


def priority_of(header: str | None) -> int:
    """The request's priority from its header (0 without); 400 for anything else than
    an integer within +-1000."""
    if header is None:
        return 0
    try:
        value = int(header)
    except ValueError:
        value = PRIORITY_RANGE + 1
    if abs(value) > PRIORITY_RANGE:
        raise ApiError(400, f"{PRIORITY_HEADER} must be an integer from -{PRIORITY_RANGE} "
                       f"to {PRIORITY_RANGE}, got {header!r}", "BadRequestError")
    return value


class Held:
    """One request waiting for admission."""

    __slots__ = ("arrived", "deadline", "dispatch", "future", "key", "service", "slo",
                 "tenant", "timer")

    def __init__(self, key: tuple[int, float, int], tenant: str, arrived: float,
                 deadline: float, dispatch: TryDispatch, service: float,
                 future: asyncio.Future[Entry], slo: float) -> None:
        self.key = key
        self.slo = slo
        self.tenant = tenant
        self.arrived = arrived
        self.deadline = deadline
        self.dispatch = dispatch
        self.service = service
        self.future = future
        self.timer: asyncio.TimerHandle | None = None


class Admission:
    """The admission queue of one proxy."""

    def __init__(self, capacity: int, metrics: Metrics) -> None:
        self.capacity = max(capacity, 1)
        self.metrics = metrics
        self.held = 0
        self._queues: dict[str, list[tuple[tuple[int, float, int], Held]]] = {}
        self._turn: collections.deque[str] = collections.deque()  # tenants, round robin
        self._seq = itertools.count()
        self._releases: collections.deque[float] = collections.deque(maxlen=RATE_WINDOW)
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._outcome = {name: metrics.admission.labels(name) for name in (
            "admitted", "held", "released", "rejected_full", "rejected_deadline",
            "cancelled")}

    # ---- the request's side ---------------------------------------------------------------
    async def admit(self, dispatch: TryDispatch, idle_service: Callable[[], float],
                    tenant: str, priority: int, arrived: float, slo: float) -> Entry:
        """Dispatch now if an instance is predicted in time and nobody waits, else hold
        until one is; the entry, or :class:`ApiError` 429.  ``idle_service()``: seconds
        to the request's first token on the fastest instance were it idle (a deadline
        closer than this cannot be met); ``arrived``: ``time.monotonic()`` at arrival;
        ``slo``: its model's TTFT objective, seconds."""
        tried = not self.held
        if tried:
            entry = dispatch(slo - (time.monotonic() - arrived), False)
            if entry is not None:
                self._outcome["admitted"].inc()
                return entry
        service = idle_service()
        deadline = arrived + slo
        now = time.monotonic()
        if deadline - now < service:
            raise self._refuse("rejected_deadline", "no instance can give its first token "
                               f"within the {slo * 1000:g} ms objective", slo)
        wait = self._expected_wait(self._position(tenant, priority), now)
        if now + wait + service > deadline:
            raise self._refuse("rejected_deadline", f"{self.held} requests are waiting; "
                               f"its turn would come past the {slo * 1000:g} ms "
                               "objective", slo, wait)
        if self.held >= self.capacity and not self._push_out(tenant):
            raise self._refuse("rejected_full", f"the admission queue is full "
                               f"({self.capacity} requests)", slo)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Entry] = loop.create_future()
        held = Held((-priority, deadline, next(self._seq)), tenant, arrived, deadline,
                    dispatch, service, future, slo)
        self._push(held)
        held.timer = loop.call_at(loop.time() + (deadline - service - now), self._expire,
                                  held)
        self._outcome["held"].inc()
        if not tried:
            self._release()  # it may be the head, and an instance in time
        if not future.done() and self._loop_task is None:
            self._loop_task = loop.create_task(self._run())
        try:
            return await future
        except asyncio.CancelledError:
            if future.cancelled() or not future.done():  # still held: leave the queue
                self._drop(held)
                self._outcome["cancelled"].inc()
            elif future.exception() is None:  # released as the client left: give it back
                entry = future.result()
                entry.instance.release(entry)
            raise

    def poke(self) -> None:
        """Something ended or started: a held request may fit now."""
        if self.held:
            self._wake.set()

    # ---- the queue --------------------------------------------------------------------------
    def _push(self, held: Held) -> None:
        queue = self._queues.get(held.tenant)
        if queue is None:
            queue = self._queues[held.tenant] = []
            self._turn.append(held.tenant)
        heapq.heappush(queue, (held.key, held))
        self.held += 1
        self.metrics.admission_depth.set(self.held)

    def _drop(self, held: Held) -> None:
        """Take ``held`` out of its queue (it is done, one way or another)."""
        queue = self._queues[held.tenant]
        queue.remove((held.key, held))
        heapq.heapify(queue)
        self._left(held, queue)

    def _pop_head(self, tenant: str) -> Held:
        queue = self._queues[tenant]
        _, held = heapq.heappop(queue)
        self._left(held, queue)
        return held

    def _left(self, held: Held, queue: list[tuple[tuple[int, float, int], Held]]) -> None:
        """``held`` is out of ``queue``: its timer, its tenant's turn, the depth."""
        if held.timer is not None:
            held.timer.cancel()
            held.timer = None
        if not queue:
            del self._queues[held.tenant]
            self._turn.remove(held.tenant)
        self.held -= 1
        self.metrics.admission_depth.set(self.held)

    def _push_out(self, tenant: str) -> bool:
        """Make room for ``tenant`` by refusing the latest request of the tenant holding
        the most, if that tenant holds more than ``tenant`` would after admission."""
        mine = len(self._queues.get(tenant, ()))
        most = max(self._queues, key=lambda t: len(self._queues[t]))
        if len(self._queues[most]) <= mine + 1:
            return False
        _, victim = max(self._queues[most])
        self._drop(victim)
        victim.future.set_exception(self._refuse(
            "rejected_full", "the admission queue is full and its tenant holds the most",
            victim.slo))
        return True

    def _release(self) -> None:
        """Dispatch held requests while an instance is predicted in time: the heads of
        the tenants' queues in turn, each tried once per pass until none fits."""
        misses = 0
        while self._turn and misses < len(self._turn):
            tenant = self._turn[0]
            self._turn.rotate(-1)
            _, held = self._queues[tenant][0]
            now = time.monotonic()
            left = held.deadline - now
            entry = held.dispatch(left, True) if left > held.service else None
            if entry is None:
                if left <= held.service:
                    self._pop_head(tenant)
                    held.future.set_exception(self._refuse(
                        "rejected_deadline", "it could not be started within the "
                        f"{held.slo * 1000:g} ms objective", held.slo))
                    continue
                misses += 1
                continue
            misses = 0
            self._pop_head(tenant)
            entry.held_s = now - held.arrived
            self.metrics.admission_wait.observe(entry.held_s)
            self._releases.append(now)
            self._outcome["released"].inc()
            held.future.set_result(entry)

    def _expire(self, held: Held) -> None:
        held.timer = None
        if held.future.done():
            return
        self._drop(held)
        held.future.set_exception(self._refuse(
            "rejected_deadline", "it could not be started within the "
            f"{held.slo * 1000:g} ms objective", held.slo))

    async def _run(self) -> None:
        try:
            while self.held:
                try:
                    await asyncio.wait_for(self._wake.wait(), TICK)
                except asyncio.TimeoutError:
                    pass
                self._wake.clear()
                self._release()
        finally:
            self._loop_task = None

    # ---- refusals ---------------------------------------------------------------------------
    def _position(self, tenant: str, priority: int) -> int:
        """Roughly where a new request of ``tenant`` would stand: behind all held at its
        priority or above, and no further back than its tenant's share of the turns."""
        if priority > 0:
            ahead = sum(1 for q in self._queues.values() for key, _ in q if key[0] <= -priority)
        else:
            ahead = self.held
        turns = (len(self._queues.get(tenant, ())) + 1) * (len(self._queues) + (
            tenant not in self._queues))
        return min(ahead + 1, turns)

    def _expected_wait(self, position: int, now: float) -> float:
        """Seconds until the ``position``-th held request's turn, from the recent drain
        rate (0 when it is not known: the queue has not been draining lately)."""
        r = self._releases
        if len(r) < 8 or now - r[-1] > RATE_FRESH:
            return 0.0
        rate = (len(r) - 1) / max(r[-1] - r[0], 1e-3)
        return position / rate

    def _refuse(self, outcome: str, why: str, slo: float, wait: float = 0.0) -> ApiError:
        self._outcome[outcome].inc()
        if wait <= 0:
            wait = self._expected_wait(self.held, time.monotonic()) or slo
        retry = min(max(math.ceil(wait), 1), 60)
        return ApiError(429, f"overloaded: {why}; retry after {retry} s", "RateLimitError",
                        headers={"Retry-After": str(retry)})
