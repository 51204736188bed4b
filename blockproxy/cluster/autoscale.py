"""Auto-provisioning: how many instances the predicted load needs, up and down.

Evaluated per model every few seconds (:meth:`Autoscaler.evaluate`), from the view alone,
so every proxy sharing the view by gossip computes the same figure.

*What-if.*  The recent arrivals (all instances' decayed arrival processes,
:mod:`blockproxy.cluster.arrivals`: rate and mean sizes), times ``headroom`` (for the
Poisson bursts a steady stream does not have), are split evenly over ``k`` instances, and
so are the requests already waiting (their count and mean sizes: a backlog the rate does
not show, and the first sign of a ramp).  Each kind of instance is simulated with its
share of that backlog queued and that stream running for the horizon (at most
``--future-arrivals`` requests): a probe request arriving now, behind the backlog, and
one arriving once the stream has run (``new_at``, :mod:`blockproxy.simulator.reference`)
get their TTFT and E2E.  Once the stream has run that long, the queue it leaves is the
queue a load beyond the instances' capacity builds: the late request's latency is what
arriving requests would see with ``k`` instances.  The figure for ``k`` is the worst
kind's, of both requests.  The probe is the *tail* request (:meth:`Autoscaler.tail`):
the 99th percentile of the recent requests' uncached prompts (a request's TTFT grows
with its uncached prompt, behind the same queue) and of their outputs (E2E grows with
both: at the two percentiles together, an upper bound of the 99th percentile of E2E),
so the figure is a predicted P99 over the sizes arriving, which an objective on the P99
compares with.  A tail request that misses the objective (within the down margin) even
alone on an idle instance is late by its own size, which no instance count changes: then
the probe is the mean request.  The *needed* count is the fewest
``k`` meeting the objective (the most useful instances first: the fastest, then in the
backends file's order; then more of the first kind, what an HPA would start), found by
bisection.

The rate is the higher of the arrival processes' (decayed over ``--arrival-window``,
every proxy's requests through gossip) and this proxy's own arrivals over the last
``window`` (10 s), extrapolated where they rise (:meth:`Autoscaler._recent_rate`): up
fast, down slowly.

*Scale up* (Block's rule, sized by the simulator): when more instances are needed than
are active, or, over the last window, requests were predicted at dispatch to miss the
objective on every candidate (the admission queue's holds and refusals among them; then
at least one more), at two evaluations in a row: that many instances become active at
once, those it is still draining first (warm, and paid for until idle), then standby
ones of the backends file; then no scale-up within ``up_cooldown``.

*Scale down* (beyond Block): when fewer would meet the objective with a margin
(``down_margin`` x the objective) and nothing was predicted to miss, continuously for
``down_after`` seconds, and no action came within that time: the least useful instance is
set to draining, and, while fewer still look enough, one more every ``down_step``
seconds, each step decided again with the instances left.  A drained instance finishes
its streams in place (:attr:`Instance.finish_in_place`: a hand-off would re-prefill them
on the fewer instances left, a burst of their own making) and goes to standby once idle.
Never below ``min_instances``.

*Queue signal* (``signal="queue"``): the reactive baseline instead, what a Kubernetes
HorizontalPodAutoscaler on ``vllm:num_requests_waiting`` does: desired =
ceil(waiting / ``queue_target``), within a 10% tolerance, scaling up at once and down only
after ``down_after`` seconds of lower wishes.

``mode``: ``advise`` computes and exports the desired count (the
``blockproxy_desired_instances`` gauge, ``/autoscale``), ``act`` also changes instance
states.  Instances the backends file sets to ``standby`` are the ones it may activate; an
instance whose entry in the file changes takes the file's state again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from blockproxy import simulator
from blockproxy.cluster.instance import ACTIVE, DRAINING, STANDBY, Instance
from blockproxy.cluster.view import ClusterView

MODES = ("off", "advise", "act")
SIGNALS = ("predicted", "queue")
#: HPA's default tolerance: no change while the wish is within 10% of the current count
QUEUE_TOLERANCE = 0.1
#: actions remembered for /autoscale
HISTORY = 100
#: the quantile of the recent request sizes the what-if probes with: objectives are P99s
QUANTILE = 0.99
_EMPTY = np.zeros((simulator.NUM_COLUMNS, 1), dtype=np.int64)


@dataclass
class Objective:
    """The latency objective, seconds (0: none)."""

    ttft: float = 0.0
    e2e: float = 0.0

    def met(self, ttft: float, e2e: float, factor: float = 1.0) -> bool:
        return ((self.ttft <= 0 or ttft <= factor * self.ttft)
                and (self.e2e <= 0 or e2e <= factor * self.e2e))

    def __bool__(self) -> bool:
        return self.ttft > 0 or self.e2e > 0


@dataclass
class WhatIf:
    """The predicted latency of a probe request arriving once the recent load, split
    over ``instances``, has run for the horizon (and of one arriving now, behind the
    backlog): the worst of those instances."""

    instances: int
    ttft: float
    e2e: float
    meets: bool
    names: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"instances": self.instances, "ttft_s": _finite(self.ttft),
                "e2e_s": _finite(self.e2e), "meets_objective": self.meets,
                "simulated": self.names}


@dataclass
class _Model:
    """What the autoscaler remembers of one model between evaluations."""

    misses: float = 0.0  # decayed count of requests predicted to miss everywhere
    arrivals: float = 0.0  # decayed count of this proxy's requests (over ``window``)
    arrivals_slow: float = 0.0  # the same over twice the window
    first_at: float = math.nan
    decayed_at: float = 0.0
    up_streak: int = 0
    down_since: float = math.nan  # since when scaling down has looked safe
    last_action_at: float = -math.inf
    last_direction: str = ""
    desired: int = 0
    instance_seconds: float = 0.0
    counted_at: float = math.nan
    report: dict[str, Any] = field(default_factory=dict)


class Autoscaler:
    """Desired instance counts per model, and (``act``) the state changes to get there."""

    def __init__(self, view: ClusterView, *, mode: str = "advise",
                 signal: str = "predicted", window: float = 10.0, horizon: float = 30.0,
                 down_margin: float = 0.6, down_after: float = 60.0,
                 up_cooldown: float = 10.0, down_step: float = 15.0,
                 min_instances: int = 1,
                 queue_target: float = 4.0, headroom: float = 1.1) -> None:
        if mode not in MODES:
            raise ValueError(f"autoscale mode must be one of {', '.join(MODES)}, got {mode!r}")
        if signal not in SIGNALS:
            raise ValueError(f"autoscale signal must be one of {', '.join(SIGNALS)}, "
                             f"got {signal!r}")
        self.view = view
        self.mode = mode
        self.signal = signal
        self.window = window
        self.horizon = horizon
        self.down_margin = down_margin
        self.down_after = down_after
        self.up_cooldown = up_cooldown
        self.down_step = down_step
        self.min_instances = max(min_instances, 1)
        self.queue_target = queue_target
        self.headroom = headroom
        self.models: dict[str, _Model] = {}
        self.history: list[dict[str, Any]] = []

    # ---- what the request path tells it ---------------------------------------------------
    def observe(self, model: str, now: float, missed: bool) -> None:
        """One request of ``model`` was dispatched (or held, or refused); ``missed``: it
        was predicted to miss the objective on every candidate."""
        m = self._model(model)
        self._decay(m, now)
        if m.first_at != m.first_at:
            m.first_at = now
        m.arrivals += 1.0
        m.arrivals_slow += 1.0
        if missed:
            m.misses += 1.0

    def _model(self, model: str) -> _Model:
        m = self.models.get(model)
        if m is None:
            m = self.models[model] = _Model()
        return m

    def _decay(self, m: _Model, now: float) -> None:
        if now > m.decayed_at:
            f = math.exp((m.decayed_at - now) / self.window)
            m.misses *= f
            m.arrivals *= f
            m.arrivals_slow *= math.exp((m.decayed_at - now) / (2 * self.window))
            m.decayed_at = now

    # ---- the instances ---------------------------------------------------------------------
    def _pools(self, model: str) -> tuple[list[Instance], list[Instance], list[Instance]]:
        """(active, standby, draining) instances serving ``model``, from the most useful
        down: the fastest (calibrated step time per unit of weight, to 10%), then in the
        backends file's order, so that of equal instances the last listed is drained first
        and the first listed standby is activated first (a StatefulSet's ordinals)."""
        serving = [i for i in self.view.instances.values() if not i.removed and i.serves(model)]
        order = {id(inst): k for k, inst in enumerate(serving)}

        def useful(i: Instance) -> tuple[float, int]:  # step time per weight (10%), file order
            return round(i.model.speed / i.weight, 1), order[id(i)]
        active = sorted((i for i in serving if i.state == ACTIVE and i.healthy), key=useful)
        standby = sorted((i for i in serving if i.state == STANDBY and i.healthy), key=useful)
        draining = [i for i in serving if i.state == DRAINING]
        return active, standby, draining

    def load(self, model: str, now: float) -> tuple[float, int, int, int]:
        """The recent arrivals of ``model`` over all its instances: (rate per second,
        mean prompt, mean cached, mean output tokens)."""
        rate = prompt = cached = output = 0.0
        for inst in self.view.instances.values():
            if inst.removed or not inst.serves(model):
                continue
            recent = inst.requests.recent
            r = recent.rate(now)
            if r > 0:
                _, p, c, o, _ = recent.expected(now)
                rate += r
                prompt += r * p
                cached += r * c
                output += r * o
        if rate <= 0:
            return 0.0, 0, 0, 0
        return rate, round(prompt / rate), round(cached / rate), round(output / rate)

    def tail(self, model: str, quantile: float = QUANTILE) -> tuple[int, int, int] | None:
        """The tail request of ``model``'s recent arrivals (the last ones kept by each
        instance's arrival process): ``(prompt, cached, output)``, the prompt and cached
        tokens of the request at ``quantile`` of the uncached prompts, and ``quantile``
        of the outputs (None before any arrival)."""
        sizes = [s for inst in self.view.instances.values()
                 if not inst.removed and inst.serves(model)
                 for s in inst.requests.recent.sizes()]
        if not sizes:
            return None
        a = np.array(sizes, dtype=np.int64)
        rank = min(max(math.ceil(quantile * len(a)) - 1, 0), len(a) - 1)
        row = int(np.argsort(a[:, 0] - a[:, 1], kind="stable")[rank])
        return (int(a[row, 0]), int(a[row, 1]), int(np.sort(a[:, 2])[rank]))

    def what_if(self, instances: list[Instance], load: tuple[float, int, int, int],
                objective: Objective, factor: float = 1.0,
                backlog: tuple[int, int, int, int] = (0, 0, 0, 0),
                probe: tuple[int, int, int] | None = None) -> WhatIf:
        """The latency of ``probe`` (prompt, cached, output tokens; the mean request
        when None) once ``load`` split over ``instances`` has run for the horizon (the
        worst instance's), and whether it is within ``factor`` x ``objective``.
        Instances of one kind (profile, limits, calibrated speed and overhead) are
        simulated once: they give the same answer.

        ``backlog`` (count, mean prompt, cached and output tokens): requests already
        waiting, split evenly over the instances as their starting queue; the probe
        arriving now, behind its share, must be in time as well as the late one."""
        rate, prompt, cached, output = load
        k = len(instances)
        if k == 0:
            return WhatIf(0, math.inf, math.inf, False)
        worst_ttft = worst_e2e = 0.0
        if probe is None:
            probe = (prompt, cached, output)
        p_prompt = max(probe[0], 1)
        probe = (p_prompt, min(probe[1], p_prompt - 1), max(probe[2], 1))
        queued, state = self._backlog_state(backlog, k)
        seen: set[tuple[Any, ...]] = set()
        for inst in instances:
            o = inst.overhead.seconds
            # calibrated speeds differ a little per instance: kinds are 5% apart
            kind = (id(inst.profile), inst.limits, round(inst.model.speed * 20),
                    round(o, 3))
            if kind in seen:
                continue
            seen.add(kind)
            limit = 0
            interval = math.inf
            if rate > 0:
                interval = k / rate
                limit = min(max(inst.requests.recent.limit, 1),
                            max(int(self.horizon / interval), 1))
            new_at = limit * interval if limit else 0.0
            p = inst.model.predict(state, queued, *probe, math.inf, interval, prompt, cached,
                                   output, limit, new_at)
            worst_ttft = max(worst_ttft, p[0] + o)
            worst_e2e = max(worst_e2e, p[1] + o)
            if queued and new_at > 0:  # the request arriving now, behind the backlog
                p = inst.model.predict(state, queued, *probe, math.inf, interval, prompt,
                                       cached, output, limit, 0.0)
                worst_ttft = max(worst_ttft, p[0] + o)
                worst_e2e = max(worst_e2e, p[1] + o)
        return WhatIf(k, worst_ttft, worst_e2e, objective.met(worst_ttft, worst_e2e, factor),
                      [i.name for i in instances])

    @staticmethod
    def _backlog_state(backlog: tuple[int, int, int, int], k: int) -> tuple[int, np.ndarray]:
        """One instance's share of ``backlog`` as a simulator state: (rows, state)."""
        count, prompt, cached, output = backlog
        queued = -(-count // k) if count > 0 else 0
        if not queued:
            return 0, _EMPTY
        state = np.zeros((simulator.NUM_COLUMNS, queued), dtype=np.int64)
        state[simulator.COL_PROMPT] = max(prompt, 1)
        state[simulator.COL_CACHED] = min(cached, max(prompt, 1) - 1)
        state[simulator.COL_PREDICTED] = max(output, 1)
        return queued, state

    def needed(self, pool: list[Instance], load: tuple[float, int, int, int],
               objective: Objective, factor: float = 1.0,
               backlog: tuple[int, int, int, int] = (0, 0, 0, 0),
               probe: tuple[int, int, int] | None = None) -> tuple[int, WhatIf]:
        """The fewest instances (the most useful of ``pool`` first, then more of its
        first kind: what an HPA would start) whose what-if for ``probe``, under the
        recent load times the headroom and with ``backlog`` waiting, is within
        ``factor`` x ``objective``; and that what-if."""
        rate, prompt, cached, output = load
        planned = (rate * self.headroom, prompt, cached, output)

        def fleet(k: int) -> list[Instance]:
            return pool[:k] if k <= len(pool) else pool + [pool[0]] * (k - len(pool))
        lo, hi = self.min_instances, max(4 * len(pool), 16)
        best = self.what_if(fleet(hi), planned, objective, factor, backlog, probe)
        if not best.meets:
            return hi, best
        while lo < hi:  # the fewest that meet it: latency falls as instances are added
            mid = (lo + hi) // 2
            w = self.what_if(fleet(mid), planned, objective, factor, backlog, probe)
            if w.meets:
                hi, best = mid, w
            else:
                lo = mid + 1
        return hi, best

    # ---- the decision ----------------------------------------------------------------------
    def evaluate(self, now: float) -> list[tuple[str, str, Instance]]:
        """Decide for every model; returns the state changes made (``act`` only):
        ``(model, "up" | "down" | "standby", instance)``."""
        changes: list[tuple[str, str, Instance]] = []
        models = {m for i in self.view.instances.values() if not i.removed for m in i.models}
        for model in sorted(models | set(self.models)):
            changes += self._evaluate(model, now)
        return changes

    def _evaluate(self, model: str, now: float) -> list[tuple[str, str, Instance]]:
        m = self._model(model)
        self._decay(m, now)
        active, standby, draining = self._pools(model)
        if m.counted_at == m.counted_at:  # not nan: integrate instance-seconds
            on = sum(1 for i in self.view.instances.values() if not i.removed
                     and i.serves(model) and i.state in (ACTIVE, DRAINING))
            m.instance_seconds += (now - m.counted_at) * on
        m.counted_at = now
        changes: list[tuple[str, str, Instance]] = []
        for inst in draining:  # drained: back to standby
            if inst.active == 0 and self.mode == "act" and inst.spec.state != DRAINING:
                inst.set_state(STANDBY)
                changes.append((model, "standby", inst))
        load = self.load(model, now)
        recent = self._recent_rate(m, now)
        if recent > load[0]:  # a burst or a ramp shows here first: plan for the higher
            load = (recent, *load[1:])
        objective = Objective(*self.view.objective(model))
        if self.signal == "queue":
            want, why, report = self._queue_wish(active, now, m)
        elif not objective:
            want, why, report = len(active), "no objective: set --slo-ttft-ms or " \
                "--slo-e2e-ms (or slo_ttft_ms in the backends file)", {}
        else:
            want, why, report = self._predicted_wish(active, standby, load, now, m,
                                                     objective, self.tail(model))
        m.desired = want
        changes += self._act(model, m, active, standby, draining, want, why, now)
        rate, prompt, cached, output = load
        m.report = {"model": model, "signal": self.signal, "mode": self.mode,
                    "active": [i.name for i in active], "standby": [i.name for i in standby],
                    "draining": [i.name for i in draining], "desired": want, "reason": why,
                    "arrival_rate_per_s": rate, "mean_prompt_tokens": prompt,
                    "mean_cached_tokens": cached, "mean_output_tokens": output,
                    "predicted_miss_share": m.misses / m.arrivals if m.arrivals else 0.0,
                    "instance_seconds": m.instance_seconds, **report}
        return changes

    def _predicted_wish(self, active: list[Instance], standby: list[Instance],
                        load: tuple[float, int, int, int], now: float, m: _Model,
                        objective: Objective, probe: tuple[int, int, int] | None
                        ) -> tuple[int, str, dict[str, Any]]:
        n = len(active)
        pool = active + standby
        if not pool:
            return 0, "no instance", {}
        # the requests already waiting, which a simulation from idle does not see: the
        # first sign of a ramp (it outruns any rate estimate) and of a burst
        backlog = self._waiting(active)
        alone = None
        if probe is not None:  # a tail request late even on an idle instance (within the
            # margin) is late by its own size, which no count of instances changes: then
            # the mean request is the probe, or the surplus would never show
            alone = self.what_if(pool[:1], (0.0, 0, 0, 0), objective, self.down_margin,
                                 probe=probe)
            if not alone.meets:
                probe = None
        need, at_need = self.needed(pool, load, objective, backlog=backlog, probe=probe)
        calm, _ = self.needed(pool, load, objective, self.down_margin, backlog, probe)
        waiting = backlog[0]
        planned = (load[0] * self.headroom, *load[1:])
        around = [self.what_if(active[:k] if k <= n else pool[:k], planned, objective,
                               backlog=backlog, probe=probe)
                  for k in (n - 1, n, n + 1) if 0 < k <= len(pool)]
        p_prompt, p_cached, p_output = probe or load[1:]
        report: dict[str, Any] = {
            "objective": {"ttft_s": objective.ttft, "e2e_s": objective.e2e},
            "quantile": QUANTILE if probe else None,
            "tail_alone": alone.as_dict() if alone else None,
            "probe_tokens": {"prompt": p_prompt, "cached": p_cached, "output": p_output},
            "headroom": self.headroom, "needed": need, "needed_with_margin": calm,
            "waiting": waiting, "waiting_mean_tokens": {"prompt": backlog[1],
                                                        "cached": backlog[2],
                                                        "output": backlog[3]},
            "what_if": [w.as_dict() for w in around],
            "what_if_needed": at_need.as_dict()}
        missing = m.misses >= 3.0 and m.misses >= 0.02 * m.arrivals
        if missing or need > n:
            m.up_streak += 1
            m.down_since = math.nan
            want = max(need, n + 1)
            why = (f"requests were predicted to miss the objective on every instance; "
                   f"{need} needed" if missing and need <= n else
                   f"the recent load (x{self.headroom:g} headroom) needs {need}")
            if m.up_streak >= 2:
                return want, why, report
            return n, why + " (once: waiting for a second evaluation)", report
        m.up_streak = 0
        target = max(calm, need, self.min_instances)
        if target >= n or m.misses >= 1.0:
            m.down_since = math.nan
            return n, f"{n} needed ({calm} within {self.down_margin:g} of the objective)", \
                report
        if m.down_since != m.down_since:
            m.down_since = now
        held = now - m.down_since
        if held >= self.down_after:  # one at a time: each step re-checked with the rest
            return n - 1, (f"{target} would meet the objective with margin, for "
                           f"{held:.0f} s: one fewer"), report
        return n, (f"{target} would meet the objective with margin for {held:.0f} s of "
                   f"the {self.down_after:g} s needed"), report

    def _recent_rate(self, m: _Model, now: float) -> float:
        """This proxy's arrival rate over the last ``window``, and where a rising one is
        heading: the rates decayed over the window and over twice it lag a ramp by one
        and two windows, so twice the first less the second has no lag (double
        exponential smoothing); a falling rate is not extrapolated."""
        if not m.arrivals or now <= m.first_at:
            return 0.0
        age = now - m.first_at
        fast = m.arrivals / (self.window * -math.expm1(-age / self.window))
        slow = m.arrivals_slow / (2 * self.window * -math.expm1(-age / (2 * self.window)))
        return max(fast, 2 * fast - slow)

    @staticmethod
    def _waiting(active: list[Instance]) -> tuple[int, int, int, int]:
        """The requests waiting on ``active`` (no first token yet): (count, mean prompt,
        cached and predicted output tokens)."""
        sums = [inst.requests.waiting_sizes() for inst in active]
        count = sum(s[0] for s in sums)
        if not count:
            return 0, 0, 0, 0
        prompt, cached, output = (round(sum(s[k] for s in sums) / count) for k in (1, 2, 3))
        return count, prompt, cached, output

    def _queue_wish(self, active: list[Instance], now: float, m: _Model
                    ) -> tuple[int, str, dict[str, Any]]:
        n = len(active)
        waiting = sum(i.requests.waiting() for i in active)
        wish = max(math.ceil(waiting / self.queue_target), self.min_instances)
        report = {"waiting": waiting, "queue_target": self.queue_target}
        if n and abs(waiting / (self.queue_target * n) - 1.0) <= QUEUE_TOLERANCE:
            wish = n
        if wish > n:
            m.down_since = math.nan
            return wish, f"{waiting} requests waiting (target {self.queue_target:g} each)", \
                report
        if wish < n:
            if m.down_since != m.down_since:
                m.down_since = now
            if now - m.down_since >= self.down_after:
                return max(wish, n - 1), f"{waiting} requests waiting, for " \
                    f"{now - m.down_since:.0f} s", report
            return n, f"{waiting} requests waiting (lower for {now - m.down_since:.0f} s)", \
                report
        m.down_since = math.nan
        return n, f"{waiting} requests waiting", report

    def _act(self, model: str, m: _Model, active: list[Instance], standby: list[Instance],
             draining: list[Instance], want: int, why: str, now: float
             ) -> list[tuple[str, str, Instance]]:
        """Activate as many instances as the wish says, at once (those this drained and
        still busy first, then standby ones), or drain one."""
        n = len(active)
        if self.mode != "act":
            return []
        changes: list[tuple[str, str, Instance]] = []
        # those this drained and still busy first (warm, and paid for until idle)
        spare = [i for i in draining if i.finish_in_place and i.healthy] + standby
        if want > n and spare and (m.last_direction != "up"
                                   or now - m.last_action_at >= self.up_cooldown):
            m.up_streak = 0
            for inst in spare[:want - n]:  # too few: the wish stays, for an HPA
                changes += self._change(model, m, "up", inst, ACTIVE, why, now)
        elif want < n and now - m.last_action_at >= (
                self.down_step if m.last_direction == "down" else self.down_after):
            if self.signal == "queue":
                m.down_since = math.nan
            changes += self._change(model, m, "down", active[-1], DRAINING, why, now)
        return changes

    def _change(self, model: str, m: _Model, direction: str, inst: Instance, state: str,
                why: str, now: float) -> list[tuple[str, str, Instance]]:
        inst.set_state(state, finish_in_place=True)
        m.last_action_at = now
        m.last_direction = direction
        self.history.append({"at": now, "model": model, "action": direction,
                             "instance": inst.name, "reason": why})
        del self.history[:-HISTORY]
        return [(model, direction, inst)]

    def describe(self) -> dict[str, Any]:
        """The ``/autoscale`` document."""
        return {"mode": self.mode, "signal": self.signal,
                "models": {name: m.report for name, m in sorted(self.models.items())
                           if m.report},
                "history": list(self.history)}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
