"""``blockproxy train-router``: train the learned Intelligent Router offline.

Jain et al. (arXiv 2408.13510) route with a DQN-style agent over the cluster's state,
guided by their heuristic, with holding a request at the router among its actions.  This
trains one against a model of the cluster, not a live one:

* **The cluster** (:class:`ClusterModel`): ``--instances`` copies of the compiled
  simulator (``profile``), stepped from one decision to the next by ``advance``
  (:mod:`blockproxy.simulator.reference`); the report gives its speed (simulated
  seconds and decisions per wall second, with and without the learning).  The requests
  come from a file ``loadgen workload`` writes (``--requests``: a trace's arrivals in
  real-GPU seconds, sped up or drawn as the load generator does, with their true output
  lengths), so this package reads no trace format itself.
* **State and actions** (:mod:`blockproxy.routing.qnet`): per candidate, its load and
  the heuristic's two estimates (own latency, mixing penalty); the request's prompt and
  output-length bucket; how many requests are held.  Actions: each instance, or hold
  (the request waits at the router and is decided again at the next decision or after
  ``--hold-tick`` seconds, at most ``--max-holds`` times).
* **Reward**: routing a request earns minus its latency from that decision to its last
  token (training is offline: the reward waits until the request finishes), and, as
  heuristic guidance, minus ``--guidance`` times the mixing penalty of the chosen
  instance (the latency it is estimated to add to the requests there); holding earns
  minus the time until the request is decided again, plus that decision's value.  An
  action's value is so minus the request's latency from then on, less the guidance.
  Exploration takes the heuristic's choice for half of its random actions.
* **Learning**: DQN with experience replay and a target network, Adam on the Huber loss,
  epsilon-greedy from 1 to 0.05 over the first 60% of the decisions.

Every ``--eval-every`` episodes the greedy policy is scored on a validation window, and
the network written is the one that scored best there (``chosen_episode``); the
learning curve (mean end-to-end latency per episode, beside round robin's and the
heuristic's on the same window) goes to ``OUT.png`` (with matplotlib), and a final
comparison on the held-out end of the trace (round robin, the heuristic, the learned
policy, ``block``: least predicted latency by the same simulator, and ``block
--delay-weight 1``: that plus the latency it adds to the others, the requests expected
to arrive included) is printed as JSON with the training cost.  Where this departs
from the paper, and why, is in the README.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import orjson

from blockproxy import simulator
from blockproxy.cluster.arrivals import ArrivalProcess
from blockproxy.profile import Profile, load_profile
from blockproxy.routing.lengths import BucketHead
from blockproxy.routing.policies.intelligent_router import mixing_estimate
from blockproxy.routing.qnet import Adam, QNet, action_inputs, load_features

#: a request: (arrival s, prompt tokens, output tokens)
Request = tuple[float, int, int]


class Decision(NamedTuple):
    """One request to place now."""

    rid: int
    prompt: int
    output: int
    arrival: float
    held: int  # requests held at the router besides it
    must: bool  # held too often already: a route is required


#: decides where a request goes: an instance, or -1 to hold it
Chooser = Callable[["ClusterModel", Decision], int]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", required=True,
                        help="the workload: a loadgen workload file (JSON Lines of "
                             "arrival_s, prompt_tokens, output_tokens)")
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--profile", default="llama-3.1-8b-h100-tp1")
    parser.add_argument("--num-requests", type=int, default=8000,
                        help="requests read from the file: the first 75%% train, the "
                             "next 5%% validate, the last 20%% are the final comparison")
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--episode-requests", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--guidance", type=float, default=0.5,
                        help="weight of the chosen instance's mixing penalty in the reward")
    parser.add_argument("--hold-tick", type=float, default=0.05)
    parser.add_argument("--max-holds", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", required=True, help="weights file to write (.npz)")


class ClusterModel:
    """``n`` instances of the simulator, stepped together; what finished, when."""

    def __init__(self, profile: Profile, n: int, arrival_window: float = 30.0) -> None:
        self.step = profile.step_time
        self.models = [simulator.model_from_profile(profile) for _ in range(n)]
        self.tables = [np.zeros((simulator.NUM_COLUMNS, 256), dtype=np.int64)
                       for _ in range(n)]
        self.ids = [np.zeros(256, dtype=np.int64) for _ in range(n)]
        self.n = [0] * n
        self.clock = [0.0] * n
        self.now = 0.0
        self._first = np.empty(256)
        self._done = np.empty(256)
        self.arrival: dict[int, float] = {}
        #: each instance's recent arrivals, as the proxy keeps them (the simulator's
        #: expected future load)
        self.recent = [ArrivalProcess(arrival_window) for _ in range(n)]
        self.ttft: dict[int, float] = {}
        #: finished requests: (id, ttft, e2e) seconds
        self.finished: list[tuple[int, float, float]] = []

    def __len__(self) -> int:
        return len(self.models)

    def in_flight(self) -> int:
        return sum(self.n)

    def advance(self, t: float) -> None:
        """Every instance to time ``t`` (one whose last step ends later stays there)."""
        self.now = t
        for i, model in enumerate(self.models):
            c = self.clock[i]
            if c >= t:
                continue
            k = self.n[i]
            if k == 0:
                self.clock[i] = t
                continue
            table, ids = self.tables[i], self.ids[i]
            end, _ = model.advance(table, k, t - c, self._first, self._done)
            first, done = self._first[:k], self._done[:k]
            for j in np.flatnonzero(np.isfinite(first)):
                rid = int(ids[j])
                self.ttft[rid] = c + float(first[j]) - self.arrival[rid]
            ended = np.isfinite(done)
            if ended.any():
                for j in np.flatnonzero(ended):
                    rid = int(ids[j])
                    self.finished.append((rid, self.ttft.pop(rid),
                                          c + float(done[j]) - self.arrival.pop(rid)))
                keep = ~ended
                m = int(keep.sum())
                table[:, :m] = table[:, :k][:, keep]
                ids[:m] = ids[:k][keep]
                self.n[i] = m
            self.clock[i] = c + end

    def dispatch(self, i: int, rid: int, prompt: int, output: int, arrival: float) -> None:
        k = self.n[i]
        if k == self.tables[i].shape[1]:
            self.tables[i] = np.concatenate([self.tables[i], np.zeros_like(self.tables[i])],
                                            axis=1)
            self.ids[i] = np.concatenate([self.ids[i], np.zeros_like(self.ids[i])])
            if 2 * k > len(self._first):  # room for the largest instance's rows
                self._first = np.empty(2 * k)
                self._done = np.empty(2 * k)
        self.tables[i][:, k] = (prompt, 0, 0, output, 0)
        self.ids[i][k] = rid
        self.n[i] = k + 1
        self.arrival[rid] = arrival
        self.recent[i].record(self.now, prompt, 0, output)

    def estimates(self, prompt: int, decode: int) -> list[tuple[float, float]]:
        """The heuristic's (own, penalty) per instance."""
        return [mixing_estimate(self.step, 1.0, self.tables[i], self.n[i], prompt, decode)
                for i in range(len(self))]

    def inputs(self, prompt: int, decode: int, held: int
               ) -> tuple[np.ndarray, list[tuple[float, float]]]:
        est = self.estimates(prompt, decode)
        loads = [load_features(self.tables[i], self.n[i], own, pen)
                 for i, (own, pen) in enumerate(est)]
        return action_inputs(loads, prompt, decode, held), est


_BUCKETS = BucketHead()


def bucket_tokens(output: int) -> int:
    """The representative length of ``output``'s log2 bucket (a perfect classifier)."""
    return max(_BUCKETS.tokens(_BUCKETS.bucket_of(output)), 1)


def run_episode(profile: Profile, n: int, requests: Sequence[Request], choose: Chooser,
                hold_tick: float, max_holds: int, arrival_window: float = 30.0
                ) -> list[tuple[int, float, float]]:
    """Serve ``requests`` with ``choose``; returns (id, ttft, e2e) of every request.
    Decisions come at each arrival and, while requests are held, every ``hold_tick``
    (held requests first, in the order they came).  ``arrival_window``: the decay time
    of each instance's recent arrivals (``--arrival-window``, in the cluster's seconds)."""
    cluster = ClusterModel(profile, n, arrival_window)
    held: list[tuple[int, int, int, float, int]] = []  # id, prompt, output, arrival, holds
    k = 0
    t_prev = 0.0
    while k < len(requests) or held:
        next_arrival = requests[k][0] if k < len(requests) else math.inf
        t = min(next_arrival, t_prev + hold_tick) if held else next_arrival
        cluster.advance(t)
        t_prev = t
        todo, held = held, []
        if t == next_arrival:
            _, p, o = requests[k]
            todo.append((k, p, o, t, 0))
            k += 1
        for rid, p, o, arrival, holds in todo:
            action = choose(cluster, Decision(rid, p, o, arrival, len(held),
                                              holds >= max_holds))
            if action < 0:
                held.append((rid, p, o, arrival, holds + 1))
            else:
                cluster.dispatch(action, rid, p, o, arrival)
    for _ in range(100):  # nothing more arrives: the cluster finishes what it has
        if not cluster.in_flight():
            break
        cluster.advance(max(cluster.clock) + 1e6)
    return list(cluster.finished)


def summarize(results: list[tuple[int, float, float]]) -> dict[str, float]:
    ttft = np.array([r[1] for r in results])
    e2e = np.array([r[2] for r in results])
    return {"requests": len(results), "mean_e2e_s": float(e2e.mean()),
            "p99_e2e_s": float(np.percentile(e2e, 99)), "mean_ttft_s": float(ttft.mean()),
            "p99_ttft_s": float(np.percentile(ttft, 99))}


def round_robin() -> Chooser:
    turn = [0]

    def choose(cluster: ClusterModel, d: Decision) -> int:
        turn[0] = (turn[0] + 1) % len(cluster)
        return turn[0]
    return choose


def heuristic(cluster: ClusterModel, d: Decision) -> int:
    est = cluster.estimates(d.prompt, bucket_tokens(d.output))
    return int(np.argmin([own + pen for own, pen in est]))


def block(delay_weight: float = 0.0, delay_slack: float = math.inf,
          length: int | Sequence[int] = 0, tie_tolerance: float = 0.0,
          seed: int = 1, arrivals: bool = True, prefill_stall: float = 0.0) -> Chooser:
    """Least predicted end-to-end latency, from each instance's state (``block``; an
    instance whose last step ends after now starts later by as much).  With
    ``delay_weight`` w: least own latency plus w times the latency it adds to the others
    (``Prediction.delay``), the requests expected to arrive meanwhile included, among
    the instances where its own is within ``delay_slack`` of its best (``block
    --delay-weight --delay-slack``).  With ``length`` > 0 it knows no output length:
    every request, the new one, those in flight and those expected, is predicted at
    ``length`` tokens (a proxy whose length model has learned nothing but the typical
    length), while the cluster runs on the true ones.  With ``length`` a sequence, each
    request is predicted at its own entry (indexed by request id: what a served proxy's
    length model predicted for it), the expected arrivals at the decayed mean of the
    predictions of those this router sent there.  With ``tie_tolerance`` the
    candidates within that fraction of the best score are ties, broken as the proxy's
    policy breaks them: the earliest first token (within the tolerance), then the fewest
    requests, then at random (seeded); without it, the best score wins.  With
    ``arrivals`` False the simulations leave out the expected arrivals: the delay counts
    only the requests already on the instance (``--future-arrivals 0``).  With
    ``prefill_stall`` s the score also holds s times the request's prefill time times the
    requests running on the instance (``block --prefill-stall``), and the simulations
    include the expected arrivals as with the delay weight."""
    rng = random.Random(seed)
    constant = length if isinstance(length, int) else 0
    each = None if isinstance(length, int) else np.asarray(length, dtype=np.int64)
    #: with per-request predictions: each instance's arrivals at their predicted lengths
    recent: list[ArrivalProcess] = []

    def choose(cluster: ClusterModel, d: Decision) -> int:
        e2e, delay, ttft, stall = [], [], [], []
        weighted = bool(delay_weight or prefill_stall)
        if each is not None and not recent:
            recent.extend(ArrivalProcess(r.window) for r in cluster.recent)
        output = int(each[d.rid]) if each is not None else constant or d.output
        for i, model in enumerate(cluster.models):
            future = (cluster.recent[i].expected(cluster.now)
                      if weighted and arrivals else ())
            table, n = cluster.tables[i], cluster.n[i]
            if each is not None:
                table = table[:, :n].copy()
                table[simulator.COL_PREDICTED] = each[cluster.ids[i][:n]]
                if future:
                    future = recent[i].expected(cluster.now)
            elif constant:
                table = table[:, :n].copy()
                table[simulator.COL_PREDICTED] = constant
                if future:
                    future = (*future[:3], constant, future[4])
            p = model.predict(table, n, d.prompt, 0, output, math.inf, *future)
            lag = max(cluster.clock[i] - cluster.now, 0.0)
            e2e.append(p[1] + lag)
            ttft.append(p[0] + lag)
            delay.append(p[6])
            if prefill_stall:
                running = np.count_nonzero(cluster.tables[i][simulator.COL_STARTED, :n])
                stall.append(prefill_stall * cluster.step.per_prefill_token_s * d.prompt
                             * int(running))
            else:
                stall.append(0.0)
        limit = min(e2e) * (1.0 + delay_slack) if weighted else min(e2e)
        score = [e2e[i] + delay_weight * delay[i] + stall[i] for i in range(len(e2e))]
        pool = [i for i in range(len(e2e)) if e2e[i] <= limit]
        best = min(score[i] for i in pool)
        if not tie_tolerance:
            chosen = next(i for i in pool if score[i] == best)
        else:
            ties = [i for i in pool if score[i] <= best * (1.0 + tie_tolerance)]
            first = min(ttft[i] for i in ties) * (1.0 + tie_tolerance)
            ties = [i for i in ties if ttft[i] <= first]
            fewest = min(cluster.n[i] for i in ties)
            chosen = rng.choice([i for i in ties if cluster.n[i] == fewest])
        if recent:
            recent[chosen].record(cluster.now, d.prompt, 0, output)
        return chosen
    return choose


def greedy(net: QNet) -> Chooser:
    def choose(cluster: ClusterModel, d: Decision) -> int:
        x, _ = cluster.inputs(d.prompt, bucket_tokens(d.output), d.held)
        q = net.q(x)
        a = int(np.argmax(q[:-1] if d.must else q))
        return -1 if a == len(cluster) else a
    return choose


def read_requests(path: str, limit: int) -> list[Request]:
    """The first ``limit`` requests of a ``loadgen workload`` file (JSON Lines)."""
    requests: list[Request] = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if len(requests) >= limit:
                break
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
                request = (float(rec["arrival_s"]), int(rec["prompt_tokens"]),
                           int(rec["output_tokens"]))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{number}: expected arrival_s, prompt_tokens and "
                                 f"output_tokens ({exc})") from None
            if request[1] < 1 or request[2] < 1:
                raise ValueError(f"{path}:{number}: token counts must be >= 1")
            requests.append(request)
    return requests


def rebase(requests: Sequence[Request]) -> list[Request]:
    t0 = requests[0][0]
    return [(t - t0, p, o) for t, p, o in requests]


class _Transition:
    """The chosen action's inputs, its reward, the request's next decision's inputs."""

    __slots__ = ("arrival", "at", "reward", "routed", "shaping", "x", "x_next")

    def __init__(self, x: np.ndarray, at: float) -> None:
        self.x = x
        self.at = at  # when it was decided
        self.x_next: np.ndarray | None = None
        self.reward: float | None = None
        self.shaping = 0.0
        self.arrival = 0.0
        self.routed = False


class Trainer:
    """The DQN: replay, target network, epsilon-greedy with heuristic guidance.

    A transition is (the chosen action's inputs, its reward, the inputs of the request's
    next decision, or none).  Routing a request ends its transitions: it earns minus its
    latency from that decision to its last token (known once it finishes: training is
    offline, so the reward waits for it) minus ``guidance`` x the mixing penalty of the
    chosen instance (the latency it is estimated to add to the requests there).  Holding
    earns minus the time until the request is decided again, plus the value of that
    decision.  So an action's value is minus the request's latency from now on, less the
    guidance: a hold is worth what waiting then routing is."""

    def __init__(self, args: argparse.Namespace, n: int, total_decisions: int) -> None:
        self.args = args
        self.n = n
        self.rng = np.random.default_rng(args.seed)
        self.net = QNet(args.hidden, args.seed)
        self.target = self.net.copy()
        self.opt = Adam(self.net, 1e-3)
        cap = 30_000
        width = len(action_inputs([], 0, 0, 0)[0])
        self.x = np.zeros((cap, width))
        self.r = np.zeros(cap)
        self.next = np.zeros((cap, n + 1, width))
        self.last = np.zeros(cap, dtype=bool)  # no next decision: the reward is all
        self.size = 0
        self.pos = 0
        self.total = total_decisions
        self.decisions = 0
        self.updates = 0
        self.losses: list[float] = []
        self._held: dict[int, _Transition] = {}  # held requests' last transitions
        self._open: dict[int, _Transition] = {}  # routed, unfinished: rid -> transition
        self._seen = 0  # finished requests looked at
        self._cluster: ClusterModel | None = None

    def epsilon(self) -> float:
        return max(0.05, 1.0 - 0.95 * self.decisions / (0.6 * self.total))

    def choose(self, cluster: ClusterModel, d: Decision) -> int:
        if cluster is not self._cluster:  # a new episode
            self._cluster, self._held, self._open, self._seen = cluster, {}, {}, 0
        self._collect(cluster)
        x, est = cluster.inputs(d.prompt, bucket_tokens(d.output), d.held)
        options = self.n if d.must else self.n + 1
        held = self._held.pop(d.rid, None)
        if held is not None:  # its hold ends here: it cost the time until now
            held.x_next = x
            held.reward = -(cluster.now - held.at)
            self._push(held)
        if self.rng.random() < self.epsilon():
            if self.rng.random() < 0.5:
                a = int(np.argmin([own + pen for own, pen in est]))
            else:
                a = int(self.rng.integers(options))
        else:
            a = int(np.argmax(self.net.q(x)[:options]))
        t = _Transition(x[a].copy(), cluster.now)
        if a < self.n:
            t.routed = True
            t.shaping = -self.args.guidance * est[a][1]
            t.arrival = d.arrival
            self._open[d.rid] = t
        else:
            self._held[d.rid] = t
        self.decisions += 1
        self._learn()
        return -1 if a == self.n else a

    def _collect(self, cluster: ClusterModel) -> None:
        """Rewards of the routed requests that finished since the last look: minus
        their latency from the decision, plus the guidance."""
        for rid, _, e2e in cluster.finished[self._seen:]:
            t = self._open.pop(rid, None)
            if t is not None:
                t.reward = -(t.arrival + e2e - t.at) + t.shaping
                self._push(t)
        self._seen = len(cluster.finished)

    def _push(self, t: _Transition) -> None:
        """Into the replay once its reward (and, for a hold, its next inputs) is known."""
        if t.reward is None or (not t.routed and t.x_next is None):
            return
        i = self.pos
        self.x[i] = t.x
        self.r[i] = t.reward
        self.last[i] = t.routed
        if t.x_next is not None:
            self.next[i] = t.x_next
        self.pos = (self.pos + 1) % len(self.r)
        self.size = min(self.size + 1, len(self.r))

    def _learn(self, batch: int = 32) -> None:
        if self.size < 1000:
            return
        idx = self.rng.integers(0, self.size, batch)
        nxt = self.next[idx]
        q_next = self.target.q(nxt.reshape(-1, nxt.shape[2])).reshape(batch, -1).max(axis=1)
        target = self.r[idx] + np.where(self.last[idx], 0.0, q_next)
        loss, grads = self.net.gradients(self.x[idx], target)
        self.opt.step(grads)
        self.losses.append(loss)
        self.updates += 1
        if self.updates % 1000 == 0:
            self.target = self.net.copy()


def train(args: argparse.Namespace, requests: list[Request], profile: Profile,
          progress: Callable[[str], None]) -> dict[str, Any]:
    n = args.instances
    cut_train = int(0.75 * len(requests))
    cut_val = int(0.8 * len(requests))
    train_part, val_part = requests[:cut_train], rebase(requests[cut_train:cut_val])
    test_part = rebase(requests[cut_val:])
    per = min(args.episode_requests, len(train_part))
    trainer = Trainer(args, n, args.episodes * per)
    rng = np.random.default_rng(args.seed)
    tick, holds = args.hold_tick, args.max_holds

    def score(choose: Chooser, part: Sequence[Request]) -> dict[str, float]:
        return summarize(run_episode(profile, n, part, choose, tick, holds))
    baseline = {"round_robin": score(round_robin(), val_part),
                "heuristic": score(heuristic, val_part)}
    curve: list[dict[str, Any]] = []
    best: tuple[float, int, QNet] = (math.inf, 0, trainer.net)
    started = time.perf_counter()
    simulated = 0.0
    for episode in range(1, args.episodes + 1):
        start = int(rng.integers(0, max(len(train_part) - per, 0) + 1))
        part = rebase(train_part[start:start + per])
        results = run_episode(profile, n, part, trainer.choose, tick, holds)
        simulated += part[-1][0]
        point: dict[str, Any] = {"episode": episode, "epsilon": trainer.epsilon(),
                                 "train_mean_e2e_s": summarize(results)["mean_e2e_s"],
                                 "loss": float(np.mean(trainer.losses[-500:]))
                                 if trainer.losses else None}
        if episode % args.eval_every == 0 or episode == args.episodes:
            point["validation"] = score(greedy(trainer.net), val_part)
            if point["validation"]["mean_e2e_s"] < best[0]:  # keep the best network
                best = (point["validation"]["mean_e2e_s"], episode, trainer.net.copy())
        curve.append(point)
        val = point.get("validation", {}).get("mean_e2e_s")
        progress(f"episode {episode}/{args.episodes}: epsilon {point['epsilon']:.2f}, "
                 f"mean E2E {point['train_mean_e2e_s']:.3f} s"
                 + (f", validation {val:.3f} s (round robin "
                    f"{baseline['round_robin']['mean_e2e_s']:.3f}, heuristic "
                    f"{baseline['heuristic']['mean_e2e_s']:.3f})" if val else ""))
    seconds = time.perf_counter() - started
    comparison = {}
    net = best[2]
    for name, choose in (("round_robin", round_robin()), ("heuristic", heuristic),
                         ("learned", greedy(net)), ("block", block()),
                         ("block --delay-weight 1", block(1.0))):
        began = time.perf_counter()
        comparison[name] = score(choose, test_part)
        wall = time.perf_counter() - began
        comparison[name]["simulated_seconds_per_wall_second"] = test_part[-1][0] / wall
        comparison[name]["decisions_per_wall_second"] = len(test_part) / wall
    return {"net": net, "chosen_episode": best[1], "curve": curve,
            "validation_baselines": baseline, "comparison": comparison,
            "training": {"seconds": seconds, "decisions": trainer.decisions,
                         "updates": trainer.updates,
                         "simulated_seconds": simulated,
                         "simulated_seconds_per_wall_second": simulated / seconds}}


def plot(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    curve = report["curve"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([p["episode"] for p in curve], [p["train_mean_e2e_s"] for p in curve],
            color="0.7", label="training episode (epsilon-greedy)")
    val = [p for p in curve if "validation" in p]
    ax.plot([p["episode"] for p in val], [p["validation"]["mean_e2e_s"] for p in val],
            "o-", label="learned, greedy (validation window)")
    for name, style in (("round_robin", ":"), ("heuristic", "--")):
        ax.axhline(report["validation_baselines"][name]["mean_e2e_s"], linestyle=style,
                   color="k", label=f"{name} (validation window)")
    ax.set_xlabel("episode")
    ax.set_ylabel("mean end-to-end latency (s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def run(args: argparse.Namespace) -> int:
    try:
        if args.instances < 1 or args.episodes < 1 or args.episode_requests < 10:
            raise ValueError("--instances and --episodes must be >= 1, "
                             "--episode-requests >= 10")
        profile = load_profile(args.profile)
        requests = read_requests(args.requests, args.num_requests)
        if len(requests) < 100:
            raise ValueError(f"{args.requests}: {len(requests)} requests, at least 100 "
                             "needed")
    except (OSError, ValueError) as exc:
        print(f"blockproxy train-router: {exc}", file=sys.stderr)
        return 1

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)
    report = train(args, requests, profile, progress)
    net = report.pop("net")
    net.save(args.out, {"requests": str(args.requests), "instances": args.instances,
                        "profile": args.profile, "episodes": args.episodes,
                        "guidance": args.guidance})
    png = Path(args.out).with_suffix(".png")
    report["out"] = str(args.out)
    report["learning_curve"] = str(png) if plot(report, png) else None
    print(json.dumps(report, indent=1))
    return 0
