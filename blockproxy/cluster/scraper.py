"""Phantom load: what instances' ``/metrics`` show that no proxy accounts for.

Traffic that bypasses the proxies (a batch job, a client talking to vLLM directly) is
invisible to the view.  Every ``interval`` seconds each instance's vLLM gauges
(``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
``vllm:kv_cache_usage_perc``) are read; when running + waiting exceeds the view's entries
for the instance (local and remote) in two scrapes in a row (a single excess is usually a
gossip delay, not foreign load), the difference is added as phantom entries (origin
:data:`~blockproxy.cluster.requests.PHANTOM`) sized like the recent requests, and removed
again when the gap closes.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.parser import text_string_to_metric_families

from blockproxy.cluster.instance import Instance
from blockproxy.cluster.requests import PHANTOM
from blockproxy.cluster.view import ClusterView

log = logging.getLogger("blockproxy.scraper")

GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
          "vllm:prompt_tokens_total")
#: a counter that only a restart makes go down: the instance's prefix cache is empty then
RESTART_COUNTER = "vllm:prompt_tokens_total"
#: phantom size before any request has been seen
DEFAULT_PROMPT, DEFAULT_OUTPUT = 512, 256
#: phantom requests per instance at most, whatever its page claims
MAX_PHANTOMS = 4096


def parse_vllm_gauges(text: str) -> dict[str, float]:
    """The three gauges and the prompt-token counter, summed over label sets (engines);
    missing ones are absent, and so are values that are not finite numbers >= 0."""
    out: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                value = sample.value
                if sample.name in GAUGES and math.isfinite(value):
                    out[sample.name] = out.get(sample.name, 0.0) + max(value, 0.0)
    except ValueError:  # a malformed page: use what was read before the bad line
        pass
    return out


class Scraper:
    """Keeps phantom entries in the view in line with the instances' own counts."""

    def __init__(self, view: ClusterView, upstream: Any, registry: CollectorRegistry,
                 interval: float) -> None:
        self.view = view
        self.upstream = upstream
        self.interval = interval
        self.prev_excess: dict[str, int] = {}
        self.kv_usage: dict[str, float] = {}
        self.prompt_tokens: dict[str, float] = {}
        self.prompt_avg, self.output_avg = float(DEFAULT_PROMPT), float(DEFAULT_OUTPUT)
        self.next_rid = 0
        self.gauge = Gauge("blockproxy_phantom_requests", "Requests an instance reports that "
                           "no proxy accounts for (added to the view)", ["instance"],
                           registry=registry)

    def _learn_sizes(self) -> None:
        prompts = outputs = count = 0
        for inst in self.view.instances.values():
            p, o, c = inst.requests.sizes(exclude_origin=PHANTOM)
            prompts, outputs, count = prompts + p, outputs + o, count + c
        if count:
            self.prompt_avg = 0.7 * self.prompt_avg + 0.3 * prompts / count
            self.output_avg = 0.7 * self.output_avg + 0.3 * outputs / count

    def restarted(self, inst: Instance, gauges: dict[str, float]) -> bool:
        """Whether the instance's prompt-token counter went down since the last scrape (a
        restart); its cache model is then cleared."""
        count = gauges.get(RESTART_COUNTER)
        if count is None:
            return False
        before = self.prompt_tokens.get(inst.name)
        self.prompt_tokens[inst.name] = count
        if before is not None and count < before:
            log.info("instance %s restarted (its prompt-token counter went down): its "
                     "prefix cache is empty", inst.name)
            inst.forget_prefix()
            return True
        return False

    def apply(self, inst: Instance, gauges: dict[str, float]) -> int:
        """Reconcile one instance's phantoms with its gauges; returns the phantom count."""
        running = int(min(gauges.get("vllm:num_requests_running", 0), MAX_PHANTOMS))
        waiting = int(min(gauges.get("vllm:num_requests_waiting", 0), MAX_PHANTOMS))
        if "vllm:kv_cache_usage_perc" in gauges:
            self.kv_usage[inst.name] = min(gauges["vllm:kv_cache_usage_perc"], 1.0)
        phantoms = inst.requests.of_origin(PHANTOM)
        known = [e for e in inst.requests.entries if e.origin != PHANTOM]
        excess = running + waiting - len(known)
        target = max(0, min(excess, self.prev_excess.get(inst.name, 0), MAX_PHANTOMS))
        self.prev_excess[inst.name] = excess
        known_started = sum(1 for e in known if e.first_token_at)
        started = min(target, max(running - known_started, 0))
        now = time.perf_counter()
        for entry in phantoms[target:]:
            inst.requests.remove_remote(PHANTOM, entry.rid)
        prompt, output = int(self.prompt_avg), max(int(self.output_avg), 1)
        for i in range(target):
            if i < len(phantoms):
                rid = phantoms[i].rid
            else:
                self.next_rid += 1
                rid = self.next_rid
            is_started = i < started
            inst.requests.upsert_remote(PHANTOM, rid, prompt, output, int(is_started),
                                        output // 2 if is_started else 0, now)
        self.gauge.labels(inst.name).set(target)
        return target

    async def scrape_once(self) -> None:
        """Read every healthy instance's gauges once and reconcile its phantoms."""
        self._learn_sizes()
        for inst in list(self.view.instances.values()):
            if not inst.healthy or inst.removed:
                continue
            try:
                await self._scrape(inst)
            except Exception:  # one instance's page must not stop the others' scrapes
                log.exception("scraping instance %s failed", inst.name)

    async def _scrape(self, inst: Instance) -> None:
        text = await self.upstream.get_text(inst.url + "/metrics")
        if text is None:
            return
        gauges = parse_vllm_gauges(text)
        self.restarted(inst, gauges)
        if "vllm:num_requests_running" in gauges or "vllm:num_requests_waiting" in gauges:
            self.apply(inst, gauges)
