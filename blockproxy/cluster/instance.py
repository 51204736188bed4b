"""One vLLM instance as the proxy sees it: configuration, health, simulator, requests.

An :class:`Instance` owns what is known about one backend: its spec from the backends file
and the engine limits that follow from it and its profile; whether it may take new
requests (state, health, ejection and probing); its simulator model, whose speed online
calibration keeps in line with the real instance; and its active requests
(:class:`~blockproxy.cluster.requests.RequestTable`).  Callers ask it to predict and to
record what they observe; they never touch the table's columns.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from blockproxy import simulator
from blockproxy.backends import BackendSpec
from blockproxy.cluster.arrivals import NO_ARRIVALS
from blockproxy.cluster.calibration import DecodeSpans, RequestOverhead, SpeedCalibration
from blockproxy.cluster.prefix import EngineBlocks, cache_for_kv
from blockproxy.cluster.requests import Entry, RequestTable
from blockproxy.profile import EngineLimits, Profile
from blockproxy.routing import tokenizer

if TYPE_CHECKING:
    from blockproxy.routing.job import Job

#: the states of an instance: takes new requests; finishes or hands over its streams and
#: takes none; held for auto-provisioning (the backends file's ``state``)
ACTIVE, DRAINING, STANDBY = "active", "draining", "standby"

#: this proxy's requests in flight on an instance from which it measures the share of a
#: cached prefix that several requests hold (see :meth:`Instance._count_own_shared`)
SHARE_SAMPLE = 4


class Instance:
    """One vLLM instance: its configuration, health, simulator and active requests."""

    def __init__(self, spec: BackendSpec, profile: Profile, past_prediction_tokens: int = 16,
                 calibrate: bool = True, speed: float = 1.0, arrival_window: float = 30.0,
                 arrival_limit: int = 256, learn_overhead: bool = True) -> None:
        self.spec = spec
        self.name = spec.name
        self.url = spec.url
        self.state = spec.state
        self.weight = spec.weight
        self.models: set[str] = set(spec.models or ())
        self.model_cards: dict[str, dict[str, Any]] = {}
        self.profile = profile
        eng = profile.engine
        self.limits = EngineLimits(
            max_num_seqs=spec.max_num_seqs or eng.max_num_seqs,
            max_num_batched_tokens=spec.max_num_batched_tokens or eng.max_num_batched_tokens,
            num_gpu_blocks=spec.num_gpu_blocks or eng.num_gpu_blocks,
            block_size=spec.block_size or eng.block_size,
            max_model_len=spec.max_model_len or eng.max_model_len)
        self.model = simulator.model_from_profile(
            profile, self.limits, speed=speed, past_prediction_tokens=past_prediction_tokens)
        self.calibration = SpeedCalibration(enabled=calibrate, initial=speed)
        self.spans = DecodeSpans(self.calibration, profile.step_time.fixed_s,
                                 profile.step_time.per_decode_seq_s)
        self.requests = RequestTable(self, arrival_window=arrival_window,
                                     arrival_limit=arrival_limit)
        #: seconds from dispatch until the engine queues a request (HTTP, tokenisation):
        #: the profile's, times the configured speed, then learned online
        self.overhead = RequestOverhead(enabled=learn_overhead,
                                        initial=profile.step_time.per_request_s * speed)
        self.kv_tokens = self.limits.num_gpu_blocks * self.limits.block_size
        self.prefix = cache_for_kv(self.limits.num_gpu_blocks, self.limits.block_size)
        #: prefix blocks this proxy's requests in flight here hold, counted per request
        self._held_blocks = 0
        #: this proxy's requests in flight here with prefix blocks, the prompt tokens of
        #: theirs predicted cached, and how many of those another of them holds too (the
        #: engine holds them once)
        self._own_rows = 0
        self._own_cached = 0
        self._own_shared = 0.0
        #: the share of a cached prefix another request in flight holds too, as last seen
        #: among this proxy's own requests here (applied to other proxies' requests)
        self.shared_fraction = 0.0
        #: the model's tokenizer (exact prompt tokens and engine blocks), when configured
        self.tokenizer = tokenizer.load(spec.tokenizer) if spec.tokenizer else None
        #: the engine's KV events drive the cache model, when it publishes them
        self.engine_blocks = (EngineBlocks(self.prefix, 4 * self.limits.num_gpu_blocks)
                              if spec.kv_events else None)
        self.healthy = True
        self.failures = 0
        self.probe_backoff = 0.0
        self.next_probe_at = 0.0
        self.removed = False
        #: draining by auto-provisioning: its streams finish here rather than hand over (a
        #: hand-off re-prefills each stream elsewhere, on the fewer that remain)
        self.finish_in_place = False

    def set_state(self, state: str, finish_in_place: bool = False) -> None:
        """Change the state; ``finish_in_place`` (draining only): its streams end here."""
        self.state = state
        self.finish_in_place = finish_in_place and state == DRAINING

    # ---- routing inputs -----------------------------------------------------------------------
    @property
    def active(self) -> int:
        """Requests active here (this proxy's, other proxies' and phantoms)."""
        return self.requests.n

    def accepts_new(self) -> bool:
        """Whether new requests may be sent here."""
        return self.state == ACTIVE and self.healthy and not self.removed

    def serves(self, model: str) -> bool:
        return not self.models or model in self.models

    def predict(self, prompt_tokens: int, cached_tokens: int, output_tokens: int,
                bound: float = math.inf, future: bool = False, delay_weight: float = 0.0,
                score_bound: float = math.inf, decode_delay: float = 1.0,
                score_ttft: bool = False) -> simulator.Prediction:
        """Simulate this instance with one more request (stopping past ``bound`` seconds,
        or where its latency plus ``delay_weight`` times the delay it adds passes
        ``score_bound``; with ``score_ttft`` the latency is the time to first token), its
        per-request overhead included; with ``future``, also the requests expected to
        arrive here meanwhile (its recent arrival process).  The delay to an other request
        already past its first token counts ``decode_delay`` times (0: first tokens only).

        Routing compares candidates without ``future`` (except ``block --delay-weight``,
        whose delay falls mostly on the requests still to arrive): an instance's recent
        arrivals are mostly the router's own past choices, so counting them against it
        would push each conversation away from the instance that caches it.  The values a
        user reads (the prediction recorded for the chosen instance, its error metrics)
        use ``future``."""
        r = self.requests
        o = self.overhead.seconds
        if future or delay_weight:
            arrivals = r.recent.expected(time.perf_counter()) if future else NO_ARRIVALS
            p = self.model.predict(r.table, r.n, prompt_tokens, cached_tokens, output_tokens,
                                   bound - o, *arrivals, 0.0, delay_weight, score_bound - o,
                                   decode_delay, score_ttft)
        else:
            p = self.model.predict(r.table, r.n, prompt_tokens, cached_tokens, output_tokens,
                                   bound - o)
        if o:
            return simulator.Prediction(p[0] + o, p[1] + o, p[2] + o, p[3], p[4], p[5], p[6])
        return simulator.Prediction._make(p)

    def prefill_stall(self, uncached_tokens: int) -> float:
        """Seconds a prefill of ``uncached_tokens`` holds up the requests running here,
        summed over them: its prefill time (the step-time profile at this instance's
        speed) times how many are running (the Intelligent Router's mixing penalty for a
        prompt, ``block --prefill-stall``)."""
        r = self.requests
        running = r.n - r.waiting()
        if not running:
            return 0.0
        return (self.profile.step_time.per_prefill_token_s * self.model.speed
                * uncached_tokens * running)

    def cached_tokens(self, job: Job) -> int:
        """Prompt tokens of ``job`` this instance probably has in its prefix cache: whole
        engine blocks, at least one prompt token left to compute (as vLLM leaves it)."""
        if not job.blocks:
            return 0
        matched = self.prefix.match(job.blocks)
        if not matched:
            return 0
        bs = self.limits.block_size
        tokens = int(matched * job.block_tokens) // bs * bs
        return max(min(tokens, (job.prompt_tokens - 1) // bs * bs), 0)

    def predict_job(self, job: Job, bound: float = math.inf, future: bool = False
                    ) -> simulator.Prediction:
        """:meth:`predict` for ``job``, its cached prefix here included."""
        return self.predict(job.prompt_tokens, self.cached_tokens(job), job.output_tokens,
                            bound, future)

    def unprocessed_tokens(self) -> int:
        """Prompt tokens not yet computed plus output tokens still expected."""
        return self.requests.unprocessed_tokens()

    def pending_prefill_tokens(self) -> int:
        """Prompt tokens queued here still to compute (cached prefixes excluded)."""
        return self.requests.pending_prefill_tokens()

    def llumnix_headroom(self) -> float:
        """Llumnix's load metric: (free blocks - blocks wanted by waiting) / running."""
        return self.requests.kv_headroom(self.limits.num_gpu_blocks, self.limits.block_size)

    # ---- what the proxy observes --------------------------------------------------------------
    def reserve(self, prompt_tokens: int, predicted_tokens: int, now: float) -> Entry:
        """Record a request dispatched here (it is waiting until its first token)."""
        return self.requests.reserve(prompt_tokens, predicted_tokens, now)

    def reserve_job(self, job: Job, now: float) -> Entry:
        """:meth:`reserve` ``job``; its prefix blocks are cached here from now on (held
        until it ends)."""
        cached = self.cached_tokens(job)
        new = None
        if job.blocks:
            # Blocks stand for as many tokens as the model's learned ratio says: size the
            # model in blocks of this size, so it holds what the KV cache holds.
            self.prefix.capacity = max(int(self.kv_tokens / job.block_tokens), 1)
            new = self.prefix.acquire(job.blocks)
            self._held_blocks += len(job.blocks)
            self._own_cached += cached
            self._own_rows += 1
            self._count_own_shared()
        return self.requests.reserve(job.prompt_tokens, job.output_tokens, now, cached,
                                     job.blocks, new)

    def _count_own_shared(self) -> None:
        """Count the prefix tokens this proxy's requests in flight here hold more than
        once: the prefix blocks they hold beyond the distinct ones the cache model has in
        use.  Their share of the requests' cached tokens is the estimate for every other
        proxy's request (whose blocks this proxy does not know), measured while it has
        :data:`SHARE_SAMPLE` requests here or more (fewer say little)."""
        duplicates = max(self._held_blocks - self.prefix.describe()["in_use"], 0)
        self._own_shared = duplicates * self.kv_tokens / self.prefix.capacity
        if self._own_rows >= SHARE_SAMPLE and self._own_cached > 0:
            self.shared_fraction = min(self._own_shared / self._own_cached, 1.0)
        self.update_shared()

    def update_shared(self) -> None:
        """Tell the simulator how many KV blocks the requests in flight here share: each
        row holds its cached prefix, the engine holds a prefix several requests use once.
        This proxy's requests count what they hold twice; other proxies' requests, the
        same share of their cached tokens."""
        tokens = self._own_shared + self.shared_fraction * self.requests.remote_cached
        self.model.shared_blocks = int(tokens) // self.limits.block_size

    def first_token(self, entry: Entry, now: float) -> None:
        """The request produced its first token: it is running.  A streamed one that the
        simulator expected to be scheduled at once teaches the per-request overhead."""
        self.requests.first_token(entry, now)
        if entry.observed and entry.predicted_queue_delay == entry.overhead_s:
            self.overhead.observe(now - entry.dispatched_at
                                  - (entry.predicted_ttft - entry.overhead_s))
        self.spans.restart(self.requests, entry, now)

    def streamed(self, entry: Entry, now: float, tokens: int) -> None:
        """A streaming request received ``tokens`` more output tokens (one per engine step);
        pure-decode spans of them calibrate the simulator's speed."""
        self.requests.add_tokens(entry, tokens)
        if self.spans.observe(self.requests, entry, now, tokens):
            self.model.speed = self.calibration.speed

    def release(self, entry: Entry) -> None:
        """The request ended (finished, failed or cancelled)."""
        if not entry.released and entry.blocks:
            self.prefix.release(entry.blocks)
            self._held_blocks -= len(entry.blocks)
            self._own_cached -= entry.cached_tokens
            self._own_rows -= 1
            self._count_own_shared()
        self.requests.release(entry)

    # ---- health -------------------------------------------------------------------------------
    def record_success(self) -> None:
        self.failures = 0

    def record_failure(self, now: float, eject_after: int, probe_interval: float,
                       may_eject: bool = True) -> bool:
        """Count a failure; returns True when it ejects the instance (only if
        ``may_eject``: the cluster's cap on ejected instances allows it)."""
        self.failures += 1
        if self.healthy and self.failures >= eject_after and may_eject:
            self.healthy = False
            self.probe_backoff = probe_interval
            self.next_probe_at = now + probe_interval
            return True
        return False

    def probe_failed(self, now: float) -> None:
        self.probe_backoff = min(self.probe_backoff * 2, 30.0)
        self.next_probe_at = now + self.probe_backoff

    def probe_succeeded(self) -> None:
        """Back after an ejection: it may have restarted, so its cache is assumed empty."""
        self.healthy = True
        self.failures = 0
        self.forget_prefix()

    def forget_prefix(self) -> None:
        """The instance restarted (or came back): its prefix cache is empty."""
        if self.engine_blocks is not None:
            self.engine_blocks.cleared()
        else:
            self.prefix.clear()

    def describe(self) -> dict[str, Any]:
        """The instance as ``/debug/cluster`` shows it (without the proxy-wide fields)."""
        probe = self.predict(1, 0, 1)
        return {
            "name": self.name, "url": self.url, "state": self.state,
            "healthy": self.healthy, "failures": self.failures,
            "models": sorted(self.models), "profile": self.profile.name,
            "active_requests": self.requests.n,
            "waiting_requests": self.requests.waiting(),
            "predicted_queue_delay_s": probe.queue_delay,
            "calibration": {"speed": self.model.speed, "samples": self.calibration.samples,
                            "request_overhead_s": self.overhead.seconds,
                            "overhead_samples": self.overhead.samples},
            "arrivals": self.requests.recent.describe(time.perf_counter()),
            "limits": vars(self.limits),
            "prefix_cache": {**self.prefix.describe(),
                             "mode": "kv_events" if self.engine_blocks else "model",
                             **(self.engine_blocks.describe() if self.engine_blocks else {})},
        }
