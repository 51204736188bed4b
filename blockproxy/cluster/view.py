"""The cluster view: every instance by name, built from the backends file.

:class:`ClusterView` turns a backends list into :class:`~blockproxy.cluster.instance.Instance`
objects and keeps them in line with the file on reload; gossip and the scraper reach an
instance's requests through it by name.  Synchronous and deterministic, like everything in
:mod:`blockproxy.cluster`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from blockproxy.backends import BackendSpec
from blockproxy.cluster.instance import Instance
from blockproxy.cluster.requests import RequestListener
from blockproxy.profile import Profile, load_profile


@dataclass
class ClusterView:
    """All instances by name, built from the backends file and updated on reload."""

    default_profile: str
    past_prediction_tokens: int = 16
    calibrate: bool = True
    speed: float = 1.0
    #: the simulator's expected future arrivals: decay window (s) and most per simulation
    arrival_window: float = 30.0
    future_arrivals: int = 256
    learn_overhead: bool = True
    #: the proxy's latency objectives, ms (0: none); the backends file may override them
    slo_ttft_ms: float = 0.0
    slo_e2e_ms: float = 0.0
    instances: dict[str, Instance] = field(default_factory=dict)
    #: told of every local reserve/release on any instance (the gossiper), or None
    listener: RequestListener | None = None
    _profiles: dict[str, Profile] = field(default_factory=dict)

    def _profile(self, name: str | None) -> Profile:
        key = name or self.default_profile
        if key not in self._profiles:
            self._profiles[key] = load_profile(key)
        return self._profiles[key]

    def _new_instance(self, spec: BackendSpec) -> Instance:
        inst = Instance(spec, self._profile(spec.profile), self.past_prediction_tokens,
                        self.calibrate, self.speed, self.arrival_window,
                        self.future_arrivals, self.learn_overhead)
        inst.requests.listener = self.listener
        return inst

    def set_listener(self, listener: RequestListener) -> None:
        """Tell ``listener`` of local reserves and releases on every instance."""
        self.listener = listener
        for inst in self.instances.values():
            inst.requests.listener = listener

    # ---- gossip sink: other proxies' requests, by instance name -------------------------------
    def upsert_remote(self, origin: int, instance: str, rid: int, prompt: int, predicted: int,
                      started: int, generated: int, cached: int = 0) -> None:
        inst = self.instances.get(instance)
        if inst is not None:  # an instance this proxy does not know: nothing to simulate
            inst.requests.upsert_remote(origin, rid, prompt, predicted, started, generated,
                                        time.perf_counter(), cached)

    def remove_remote(self, origin: int, instance: str, rid: int) -> None:
        inst = self.instances.get(instance)
        if inst is not None:
            inst.requests.remove_remote(origin, rid)

    def add_blocks(self, instance: str, hashes: list[int]) -> None:
        """Another proxy's request cached these prefix blocks on ``instance``."""
        inst = self.instances.get(instance)
        if inst is not None:
            inst.prefix.insert(hashes)

    def apply(self, specs: list[BackendSpec]) -> tuple[list[str], list[str], list[str]]:
        """Make the view match a backends list; returns (added, removed, changed) names.

        A removed instance leaves the view at once (no new requests); the requests
        already on it keep their reference and finish normally.  A changed state, weight
        or model list applies in place, keeping the instance's active requests.
        """
        added, removed, changed = [], [], []
        wanted = {s.name: s for s in specs}
        # Build every new instance first: a spec that cannot be built (an unknown profile,
        # an unreadable tokenizer) raises before anything has changed.
        built: dict[str, Instance] = {}
        for spec in specs:
            current = self.instances.get(spec.name)
            if current is None or (current.spec != spec and _needs_rebuild(current.spec, spec)):
                built[spec.name] = self._new_instance(spec)
        for name in list(self.instances):
            if name not in wanted:
                self.instances.pop(name).removed = True
                removed.append(name)
        for spec in specs:
            current = self.instances.get(spec.name)
            if current is None:
                self.instances[spec.name] = built[spec.name]
                added.append(spec.name)
            elif current.spec != spec:
                if spec.name in built:
                    # Another URL or engine: a new instance; streams on the old one finish.
                    current.removed = True
                    self.instances[spec.name] = built[spec.name]
                else:
                    current.spec = spec
                    current.set_state(spec.state)
                    current.weight = spec.weight
                    if spec.models is not None:
                        current.models = set(spec.models)
                changed.append(spec.name)
        return added, removed, changed

    def candidates(self, model: str) -> list[Instance]:
        """Instances that may take a new request for ``model`` now.  When every active
        instance serving it is ejected, all of them (panic mode, as Envoy's: ejection
        rests on failures that may be the clients', so never let it refuse everything)."""
        out = [i for i in self.instances.values() if i.accepts_new() and i.serves(model)]
        if not out:
            out = [i for i in self.instances.values()
                   if i.state == "active" and not i.removed and i.serves(model)]
        return out

    def may_eject(self, max_percent: float) -> bool:
        """Whether one more instance may be ejected: at most ``max_percent`` of the active
        instances are out at once (at least one may always be)."""
        active = [i for i in self.instances.values() if i.state == "active" and not i.removed]
        ejected = sum(not i.healthy for i in active)
        return ejected + 1 <= max(1, int(len(active) * max_percent / 100))

    def estimate_progress(self) -> None:
        """Advance every instance's non-streaming requests along their predictions."""
        now = time.perf_counter()
        for inst in self.instances.values():
            if inst.requests.n:
                inst.requests.estimate_progress(now)

    def models(self) -> set[str]:
        """Models served by healthy instances."""
        out: set[str] = set()
        for inst in self.instances.values():
            if inst.healthy and not inst.removed:
                out |= inst.models
        return out

    def objective(self, model: str) -> tuple[float, float]:
        """``model``'s (TTFT, E2E) objectives in seconds (0: none): the strictest an
        instance serving it sets in the backends file, else the proxy's."""
        ttft: list[float] = []
        e2e: list[float] = []
        for inst in self.instances.values():
            spec = inst.spec
            if inst.removed or not inst.serves(model):
                continue
            if spec.slo_ttft_ms is not None:
                ttft.append(spec.slo_ttft_ms)
            if spec.slo_e2e_ms is not None:
                e2e.append(spec.slo_e2e_ms)
        return (_strictest(ttft, self.slo_ttft_ms) / 1000.0,
                _strictest(e2e, self.slo_e2e_ms) / 1000.0)

    def knows_model(self, model: str) -> bool:
        """False only when every instance's models are known and none serves ``model``."""
        return any(i.serves(model) for i in self.instances.values() if not i.removed)


def _strictest(values: list[float], default: float) -> float:
    """The smallest positive of ``values`` (0 when all say none), or ``default``."""
    if not values:
        return default
    positive = [v for v in values if v > 0]
    return min(positive) if positive else 0.0


def _needs_rebuild(old: BackendSpec, new: BackendSpec) -> bool:
    def engine(s: BackendSpec) -> tuple[object, ...]:
        return (s.url, s.profile, s.max_num_seqs, s.max_num_batched_tokens, s.num_gpu_blocks,
                s.block_size, s.max_model_len, s.tokenizer, s.kv_events)
    return engine(old) != engine(new)

