"""Health probes and model discovery: brings ejected instances back, learns model lists.

Every call of :meth:`Prober.check_once` probes each ejected instance whose backoff has
passed (``/health``; success brings it back, failure doubles its backoff), probes each
standby instance every 5 s (one that does not answer is marked unhealthy, so that
auto-provisioning activates only instances that are up, and probed back like an ejected
one), and asks instances whose backends entry lists no models for ``/v1/models`` (every
2 s until it answers, then every 30 s).  The requests go through the upstream client.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from blockproxy.cluster.instance import STANDBY, Instance
from blockproxy.cluster.view import ClusterView

log = logging.getLogger("blockproxy.prober")

#: seconds between model discoveries of an instance, before and after its first answer
DISCOVER_UNTIL_KNOWN_S, DISCOVER_AFTER_S = 2.0, 30.0
#: seconds between probes of a standby instance that looks up
STANDBY_PROBE_S = 5.0


class Prober:
    def __init__(self, view: ClusterView, upstream: Any) -> None:
        self.view = view
        self.upstream = upstream
        self.discovered_at: dict[str, float] = {}
        self.standby_at: dict[str, float] = {}

    async def check_once(self) -> None:
        for inst in list(self.view.instances.values()):
            try:
                await self._check(inst, time.monotonic())
            except Exception:  # one instance's oddity must not stop the others' probes
                log.exception("probing instance %s failed", inst.name)

    async def _check(self, inst: Instance, now: float) -> None:
        if not inst.healthy and now >= inst.next_probe_at:
            if await self.upstream.healthy(inst.url):
                inst.probe_succeeded()
                log.info("instance %s is back", inst.name)
            else:
                inst.probe_failed(now)
        elif inst.healthy and inst.state == STANDBY and \
                now - self.standby_at.get(inst.name, -1e9) >= STANDBY_PROBE_S:
            self.standby_at[inst.name] = now
            if not await self.upstream.healthy(inst.url):
                log.info("standby instance %s does not answer", inst.name)
                inst.healthy = False
                inst.probe_backoff = 1.0
                inst.next_probe_at = now + 1.0
        every = DISCOVER_AFTER_S if inst.models else DISCOVER_UNTIL_KNOWN_S
        if inst.healthy and not inst.spec.models and \
                now - self.discovered_at.get(inst.name, -1e9) > every:
            self.discovered_at[inst.name] = now
            cards = await self.upstream.models(inst.url)
            if cards is not None:
                inst.model_cards = {c["id"]: c for c in cards}
                inst.models = set(inst.model_cards)
