"""The cluster view: every instance and the requests the proxy knows are active on it.

Each :class:`Instance` keeps its active requests as a columnar ``int64`` table (rows as in
:mod:`blockproxy.sim`) in dispatch order, so the simulator reads it with no per-request
Python objects.  The view is synchronous and deterministic: the server calls
:meth:`Instance.reserve` at dispatch (so the next decision, a microsecond later, already
sees the request), :meth:`Instance.first_token` / :meth:`Instance.add_tokens` while it
streams, and :meth:`Instance.release` when it ends, whatever the policy.

Requests of other proxies (learned by gossip) and phantom requests (load seen in an
instance's ``/metrics`` that no proxy accounts for) live in the same table, as entries whose
``origin`` is not :data:`LOCAL`, appended when learned; the simulator sees them at no cost.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from blockproxy import sim
from blockproxy.backends import BackendSpec
from blockproxy.calibration import SpeedCalibration
from blockproxy.profile import EngineLimits, Profile, load_profile


#: ``Entry.origin`` of this proxy's own requests and of phantom (unexplained) load
LOCAL = 0
PHANTOM = 1


@dataclass(eq=False)
class Entry:
    """One in-flight request on one instance."""

    instance: "Instance"
    slot: int
    prompt_tokens: int
    predicted_tokens: int
    dispatched_at: float
    predicted_ttft: float = math.nan
    predicted_e2e: float = math.nan
    first_token_at: float = 0.0
    generated: int = 0
    #: calibration span: start time, tokens since, and the instance's arrival count then
    span_start_at: float = 0.0
    span_tokens: int = 0
    span_epoch: int = -1
    released: bool = False
    #: False for non-streaming requests: their progress is estimated, not observed.
    observed: bool = True
    #: LOCAL, PHANTOM or the gossip origin id of the proxy that owns the request
    origin: int = LOCAL
    #: the owner's request id (gossip key with ``origin``)
    rid: int = 0


#: decode steps per calibration sample (see Instance.streamed)
SPAN_TOKENS = 16


class Instance:
    """One vLLM instance: its configuration, health, simulator and active requests."""

    def __init__(self, spec: BackendSpec, profile: Profile, past_prediction_tokens: int = 16,
                 calibrate: bool = True, speed: float = 1.0) -> None:
        self.spec = spec
        self.name = spec.name
        self.url = spec.url
        self.state = spec.state
        self.weight = spec.weight
        self.models: set[str] = set(spec.models or ())
        self.model_cards: dict[str, dict[str, object]] = {}
        self.profile = profile
        eng = profile.engine
        self.limits = EngineLimits(
            max_num_seqs=spec.max_num_seqs or eng.max_num_seqs,
            max_num_batched_tokens=spec.max_num_batched_tokens or eng.max_num_batched_tokens,
            num_gpu_blocks=spec.num_gpu_blocks or eng.num_gpu_blocks,
            block_size=spec.block_size or eng.block_size,
            max_model_len=spec.max_model_len or eng.max_model_len)
        self.model = sim.model_from_profile(profile, self.limits, speed=speed,
                                            past_prediction_tokens=past_prediction_tokens)
        self.calibration = SpeedCalibration(enabled=calibrate, initial=speed)
        self.table = np.zeros((sim.NUM_COLUMNS, 64), dtype=np.int64)
        self.n = 0
        #: requests dispatched here that have not produced their first token yet
        self.unstarted = 0
        #: requests ever added here: a change means a prefill may have joined the batch
        self.arrivals = 0
        st = profile.step_time
        self._decode_step = (st.fixed_s, st.per_decode_seq_s)
        self.entries: list[Entry] = []
        self.healthy = True
        self.failures = 0
        self.probe_backoff = 0.0
        self.next_probe_at = 0.0
        self.removed = False
        #: remote and phantom entries by (origin, rid)
        self.remote: dict[tuple[int, int], Entry] = {}
        #: told of local reserve/release (the gossiper), or None
        self.listener: Any = None

    # ---- routing inputs ---------------------------------------------------------------------
    def accepts_new(self) -> bool:
        """Whether new requests may be sent here."""
        return self.state == "active" and self.healthy and not self.removed

    def serves(self, model: str) -> bool:
        return not self.models or model in self.models

    def predict(self, prompt_tokens: int, cached_tokens: int, output_tokens: int,
                bound: float = math.inf) -> tuple[float, float, float, int, int, int]:
        """Simulate this instance with one more request (stopping past ``bound`` seconds)."""
        return self.model.predict(self.table, self.n, prompt_tokens, cached_tokens,
                                  output_tokens, bound)

    def unprocessed_tokens(self) -> int:
        """Prompt tokens not yet computed plus output tokens still expected."""
        t = self.table
        n = self.n
        waiting = t[sim.COL_STARTED, :n] == 0
        remaining = np.maximum(t[sim.COL_PREDICTED, :n] - t[sim.COL_GENERATED, :n], 1)
        return int((t[sim.COL_PROMPT, :n] * waiting).sum() + remaining.sum())

    def llumnix_headroom(self) -> float:
        """Llumnix's load metric: (free blocks - blocks wanted by waiting) / running."""
        t = self.table
        n = self.n
        bs = self.limits.block_size
        tokens = t[sim.COL_PROMPT, :n] + t[sim.COL_GENERATED, :n]
        started = t[sim.COL_STARTED, :n] != 0
        blocks = (tokens + bs - 1) // bs
        used = int(blocks[started].sum())
        wanted = int(blocks[~started].sum())
        running = int(started.sum())
        free = self.limits.num_gpu_blocks - used - wanted
        return free / max(running, 1)

    # ---- bookkeeping ------------------------------------------------------------------------
    def reserve(self, prompt_tokens: int, predicted_tokens: int, now: float) -> Entry:
        """Record a request dispatched to this instance (it is waiting until its first token)."""
        entry = self._append(prompt_tokens, predicted_tokens, now)
        if self.listener is not None:
            self.listener.reserved(entry)
        return entry

    def _append(self, prompt_tokens: int, predicted_tokens: int, now: float) -> Entry:
        if self.n == self.table.shape[1]:
            grown = np.zeros((sim.NUM_COLUMNS, 2 * self.n), dtype=np.int64)
            grown[:, :self.n] = self.table
            self.table = grown
        slot = self.n
        col = self.table[:, slot]
        col[sim.COL_PROMPT] = prompt_tokens
        col[sim.COL_CACHED] = 0
        col[sim.COL_GENERATED] = 0
        col[sim.COL_PREDICTED] = predicted_tokens
        col[sim.COL_STARTED] = 0
        self.n += 1
        self.unstarted += 1
        self.arrivals += 1
        entry = Entry(self, slot, prompt_tokens, predicted_tokens, now)
        self.entries.append(entry)
        return entry

    def first_token(self, entry: Entry, now: float) -> None:
        """The request produced its first token: it is running."""
        entry.first_token_at = now
        entry.generated = 1
        self.unstarted -= 1
        self.table[sim.COL_STARTED, entry.slot] = 1
        self.table[sim.COL_GENERATED, entry.slot] = 1
        self._restart_span(entry, now)

    def add_tokens(self, entry: Entry, tokens: int) -> None:
        """The request streamed ``tokens`` more output tokens."""
        entry.generated += tokens
        self.table[sim.COL_GENERATED, entry.slot] = entry.generated

    def streamed(self, entry: Entry, now: float, tokens: int) -> None:
        """A streaming request received ``tokens`` more output tokens (one per engine step).

        Calibration samples spans of :data:`SPAN_TOKENS` steps during which the view shows
        no prefill on this instance (nothing unstarted, nothing added): pure decode steps,
        whose model time is ``fixed + per_decode_seq x running``.  A span, not a single
        chunk gap, because a busy proxy reads chunks late and in bunches; over a span that
        lag only touches the two ends.  (Measured per gap, the bias made busy instances
        look fast and drew more traffic to them.)
        """
        self.add_tokens(entry, tokens)
        if self.unstarted or self.arrivals != entry.span_epoch:
            self._restart_span(entry, now)
            return
        entry.span_tokens += tokens
        if entry.span_tokens >= SPAN_TOKENS:
            fixed, per_decode = self._decode_step
            per_step = (now - entry.span_start_at) / entry.span_tokens
            if self.calibration.observe_step(per_step, fixed + per_decode * self.n):
                self.model.speed = self.calibration.speed
            self._restart_span(entry, now)

    def _restart_span(self, entry: Entry, now: float) -> None:
        entry.span_start_at = now
        entry.span_tokens = 0
        # A span may only start while no prefill is pending here.
        entry.span_epoch = -1 if self.unstarted else self.arrivals

    def release(self, entry: Entry) -> None:
        """The request ended (finished, failed or cancelled): drop it, keeping the order."""
        if entry.released:
            return
        entry.released = True
        if entry.origin != LOCAL:
            self.remote.pop((entry.origin, entry.rid), None)
        elif self.listener is not None:
            self.listener.released(entry)
        if not entry.first_token_at:
            self.unstarted -= 1
        i = entry.slot
        n = self.n
        if i < n - 1:
            self.table[:, i:n - 1] = self.table[:, i + 1:n]
        del self.entries[i]
        for later in self.entries[i:]:
            later.slot -= 1
        self.n = n - 1

    def upsert_remote(self, origin: int, rid: int, prompt_tokens: int, predicted_tokens: int,
                      started: int, generated: int, now: float) -> Entry:
        """Add or update another proxy's (or a phantom) request, appended when new."""
        entry = self.remote.get((origin, rid))
        if entry is None:
            entry = self._append(prompt_tokens, predicted_tokens, now)
            entry.origin, entry.rid = origin, rid
            self.remote[(origin, rid)] = entry
        elif entry.prompt_tokens != prompt_tokens or entry.predicted_tokens != predicted_tokens:
            entry.prompt_tokens, entry.predicted_tokens = prompt_tokens, predicted_tokens
            self.table[sim.COL_PROMPT, entry.slot] = prompt_tokens
            self.table[sim.COL_PREDICTED, entry.slot] = predicted_tokens
        if started and not entry.first_token_at:
            entry.first_token_at = now
            self.unstarted -= 1
            self.table[sim.COL_STARTED, entry.slot] = 1
        entry.generated = generated
        self.table[sim.COL_GENERATED, entry.slot] = generated
        return entry

    def remove_remote(self, origin: int, rid: int) -> None:
        """Another proxy's (or a phantom) request ended."""
        entry = self.remote.get((origin, rid))
        if entry is not None:
            self.release(entry)

    def by_origin(self) -> dict[int, int]:
        """Active entries per origin (LOCAL, PHANTOM or a gossip origin id)."""
        out: dict[int, int] = {}
        for entry in self.entries:
            out[entry.origin] = out.get(entry.origin, 0) + 1
        return out

    def estimate_progress(self, now: float) -> None:
        """Advance unobserved (non-streaming) requests along their own prediction.

        Nothing comes back from a non-streaming request until it ends; without this the
        simulator would think it is still waiting to start long after it began decoding.
        """
        for entry in self.entries:
            if entry.observed or not math.isfinite(entry.predicted_ttft):
                continue
            elapsed = now - entry.dispatched_at
            if elapsed < entry.predicted_ttft:
                continue
            if not entry.first_token_at:
                self.first_token(entry, entry.dispatched_at + entry.predicted_ttft)
            decode_time = entry.predicted_e2e - entry.predicted_ttft
            if entry.predicted_tokens > 1 and decode_time > 0:
                per_token = decode_time / (entry.predicted_tokens - 1)
                tokens = 1 + int((elapsed - entry.predicted_ttft) / per_token)
                if tokens > entry.generated:
                    self.add_tokens(entry, tokens - entry.generated)

    # ---- health -----------------------------------------------------------------------------
    def record_success(self) -> None:
        self.failures = 0

    def record_failure(self, now: float, eject_after: int, probe_interval: float) -> bool:
        """Count a failure; returns True when it ejects the instance."""
        self.failures += 1
        if self.healthy and self.failures >= eject_after:
            self.healthy = False
            self.probe_backoff = probe_interval
            self.next_probe_at = now + probe_interval
            return True
        return False

    def probe_failed(self, now: float) -> None:
        self.probe_backoff = min(self.probe_backoff * 2, 30.0)
        self.next_probe_at = now + self.probe_backoff

    def probe_succeeded(self) -> None:
        self.healthy = True
        self.failures = 0


@dataclass
class ClusterView:
    """All instances by name, built from the backends file and updated on reload."""

    default_profile: str
    past_prediction_tokens: int = 16
    calibrate: bool = True
    speed: float = 1.0
    instances: dict[str, Instance] = field(default_factory=dict)
    #: told of every local reserve/release on any instance (the gossiper), or None
    listener: Any = None
    _profiles: dict[str, Profile] = field(default_factory=dict)

    def _profile(self, name: str | None) -> Profile:
        key = name or self.default_profile
        if key not in self._profiles:
            self._profiles[key] = load_profile(key)
        return self._profiles[key]

    def _new_instance(self, spec: BackendSpec) -> Instance:
        inst = Instance(spec, self._profile(spec.profile), self.past_prediction_tokens,
                        self.calibrate, self.speed)
        inst.listener = self.listener
        return inst

    def set_listener(self, listener: Any) -> None:
        """Tell ``listener`` of local reserves and releases on every instance."""
        self.listener = listener
        for inst in self.instances.values():
            inst.listener = listener

    # ---- gossip sink: other proxies' requests, by instance name -------------------------------
    def upsert_remote(self, origin: int, instance: str, rid: int, prompt: int, predicted: int,
                      started: int, generated: int) -> None:
        inst = self.instances.get(instance)
        if inst is not None:  # an instance this proxy does not know: nothing to simulate
            inst.upsert_remote(origin, rid, prompt, predicted, started, generated,
                               time.perf_counter())

    def remove_remote(self, origin: int, instance: str, rid: int) -> None:
        inst = self.instances.get(instance)
        if inst is not None:
            inst.remove_remote(origin, rid)

    def apply(self, specs: list[BackendSpec]) -> tuple[list[str], list[str], list[str]]:
        """Make the view match a backends list; returns (added, removed, changed) names.

        A removed instance leaves the view at once (no new requests); the requests
        already on it keep their reference and finish normally.  A changed state, weight
        or model list applies in place, keeping the instance's active requests.
        """
        added, removed, changed = [], [], []
        wanted = {s.name: s for s in specs}
        for name in list(self.instances):
            if name not in wanted:
                self.instances.pop(name).removed = True
                removed.append(name)
        for spec in specs:
            current = self.instances.get(spec.name)
            if current is None:
                self.instances[spec.name] = self._new_instance(spec)
                added.append(spec.name)
            elif current.spec != spec:
                if _needs_rebuild(current.spec, spec):
                    # Another URL or engine: a new instance; streams on the old one finish.
                    current.removed = True
                    self.instances[spec.name] = self._new_instance(spec)
                else:
                    current.spec = spec
                    current.state = spec.state
                    current.weight = spec.weight
                    if spec.models is not None:
                        current.models = set(spec.models)
                changed.append(spec.name)
        return added, removed, changed

    def candidates(self, model: str) -> list[Instance]:
        """Instances that may take a new request for ``model`` now."""
        return [i for i in self.instances.values() if i.accepts_new() and i.serves(model)]

    def models(self) -> set[str]:
        """Models served by healthy instances."""
        out: set[str] = set()
        for inst in self.instances.values():
            if inst.healthy and not inst.removed:
                out |= inst.models
        return out

    def knows_model(self, model: str) -> bool:
        """False only when every instance's models are known and none serves ``model``."""
        return any(i.serves(model) for i in self.instances.values() if not i.removed)


def _needs_rebuild(old: BackendSpec, new: BackendSpec) -> bool:
    def engine(s: BackendSpec) -> tuple[object, ...]:
        return (s.url, s.profile, s.max_num_seqs, s.max_num_batched_tokens, s.num_gpu_blocks,
                s.block_size, s.max_model_len)
    return engine(old) != engine(new)

