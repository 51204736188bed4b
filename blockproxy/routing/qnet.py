"""The learned Intelligent Router's Q-network: features, a small MLP, its weight file.

One network scores every action of a decision: each candidate instance, and holding the
request at the router.  Its input for an action is that instance's load (requests waiting
and running, prefill queued, decode tokens left), the heuristic's estimates of the
request's own latency there and of the latency it adds to the others (the mixing penalty:
:func:`blockproxy.routing.policies.intelligent_router.mixing_estimate`), the request's
sizes, the cluster's mean of the same load features, and how many requests are already
held; the hold action has its own flag and zeros for the instance.  Sharing the weights
across instances (where the paper's DQN has one output per instance) makes a trained
network serve a cluster of any size, in any order.

The MLP (:class:`QNet`: two ReLU layers) is plain NumPy: it is trained offline by
``blockproxy train-router`` (:mod:`blockproxy.train_router`: DQN with a target network
and experience replay, Adam on the Huber loss) and evaluated at serve time with no
deep-learning framework.  The weight file is ``.npz``: the layers' arrays and a JSON
``meta`` naming the feature layout (:data:`FEATURES`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from blockproxy import simulator

FORMAT = "blockproxy-router-qnet-1"
#: the inputs of one action, in order
FEATURES = ("hold", "waiting", "running", "queued_prefill", "decode_left", "own_s",
            "penalty_s", "prompt", "bucket", "mean_waiting", "mean_running",
            "mean_queued_prefill", "mean_decode_left", "mean_own_s", "mean_penalty_s",
            "held")
INSTANCE = slice(1, 7)  # the instance's six load features
CLUSTER = slice(9, 15)  # their means over the candidates


def load_features(table: np.ndarray, n: int, own: float, penalty: float) -> list[float]:
    """An instance's six load features (scaled to about 0-1 at ordinary loads)."""
    if n == 0:
        return [0.0, 0.0, 0.0, 0.0, own, penalty]
    started = table[simulator.COL_STARTED, :n] != 0
    running = int(started.sum())
    queued = int(((table[simulator.COL_PROMPT, :n] - table[simulator.COL_CACHED, :n])
                  * ~started).sum())
    left = int(np.maximum(table[simulator.COL_PREDICTED, :n]
                          - table[simulator.COL_GENERATED, :n], 0).sum())
    return [(n - running) / 16.0, running / 64.0, queued / 8192.0, left / 16384.0, own,
            penalty]


def action_inputs(loads: list[list[float]], prompt: int, bucket: int, held: int
                  ) -> np.ndarray:
    """The network's inputs for every action of one decision: one row per candidate
    (``loads``: their :func:`load_features`), then the hold row."""
    k = len(loads)
    x = np.zeros((k + 1, len(FEATURES)))
    inst = np.array(loads, dtype=np.float64).reshape(k, 6)
    x[:k, INSTANCE] = inst
    x[:, 7] = np.log1p(prompt) / 10.0
    x[:, 8] = np.log1p(bucket) / 10.0
    if k:
        x[:, CLUSTER] = inst.mean(axis=0)
    x[:, 15] = held / 8.0
    x[k, 0] = 1.0
    return x


class QNet:
    """Two ReLU layers and a linear output: one Q-value per row of inputs."""

    def __init__(self, hidden: int = 64, seed: int = 0, inputs: int = len(FEATURES)) -> None:
        rng = np.random.default_rng(seed)
        self.params = {
            "w1": rng.normal(0, np.sqrt(2.0 / inputs), (inputs, hidden)),
            "b1": np.zeros(hidden),
            "w2": rng.normal(0, np.sqrt(2.0 / hidden), (hidden, hidden)),
            "b2": np.zeros(hidden),
            "w3": rng.normal(0, np.sqrt(1.0 / hidden), (hidden, 1)),
            "b3": np.zeros(1),
        }

    def q(self, x: np.ndarray) -> np.ndarray:
        p = self.params
        h1 = np.maximum(x @ p["w1"] + p["b1"], 0.0)
        h2 = np.maximum(h1 @ p["w2"] + p["b2"], 0.0)
        return (h2 @ p["w3"] + p["b3"])[:, 0]  # type: ignore[no-any-return]

    def gradients(self, x: np.ndarray, target: np.ndarray, delta: float = 1.0
                  ) -> tuple[float, dict[str, np.ndarray]]:
        """Mean Huber loss of ``q(x)`` against ``target``, and its gradients."""
        p = self.params
        z1 = x @ p["w1"] + p["b1"]
        h1 = np.maximum(z1, 0.0)
        z2 = h1 @ p["w2"] + p["b2"]
        h2 = np.maximum(z2, 0.0)
        out = (h2 @ p["w3"] + p["b3"])[:, 0]
        err = out - target
        small = np.abs(err) <= delta
        loss = float(np.where(small, 0.5 * err * err, delta * (np.abs(err) - 0.5 * delta))
                     .mean())
        g_out = (np.where(small, err, delta * np.sign(err)) / len(x))[:, None]
        grads = {"w3": h2.T @ g_out, "b3": g_out.sum(axis=0)}
        g_h2 = (g_out @ p["w3"].T) * (z2 > 0)
        grads["w2"] = h1.T @ g_h2
        grads["b2"] = g_h2.sum(axis=0)
        g_h1 = (g_h2 @ p["w2"].T) * (z1 > 0)
        grads["w1"] = x.T @ g_h1
        grads["b1"] = g_h1.sum(axis=0)
        return loss, grads

    def copy(self) -> QNet:
        other = QNet.__new__(QNet)
        other.params = {k: v.copy() for k, v in self.params.items()}
        return other

    def save(self, path: str | Path, meta: dict[str, Any]) -> None:
        info = {"format": FORMAT, "features": list(FEATURES), **meta}
        with open(path, "wb") as f:  # np.savez would append ".npz" to another suffix
            arrays: dict[str, Any] = {"meta": np.array(json.dumps(info)), **self.params}
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> tuple[QNet, dict[str, Any]]:
        """A network saved by :meth:`save`, and its meta; ValueError for anything else."""
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                if meta.get("format") != FORMAT or meta.get("features") != list(FEATURES):
                    raise ValueError("not a blockproxy router network of this version")
                net = cls(hidden=int(data["w1"].shape[1]))
                for name, array in net.params.items():
                    if data[name].shape != array.shape:
                        raise ValueError(f"{name} has shape {data[name].shape}")
                    net.params[name] = np.array(data[name], dtype=np.float64)
        except (OSError, KeyError, TypeError, json.JSONDecodeError, ValueError) as exc:
            raise ValueError(f"cannot load router weights {path}: {exc}") from None
        return net, meta


class Adam:
    """Adam on a :class:`QNet`'s parameters."""

    def __init__(self, net: QNet, rate: float = 1e-3, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8) -> None:
        self.net = net
        self.rate, self.beta1, self.beta2, self.eps = rate, beta1, beta2, eps
        self.m = {k: np.zeros_like(v) for k, v in net.params.items()}
        self.v = {k: np.zeros_like(v) for k, v in net.params.items()}
        self.t = 0

    def step(self, grads: dict[str, np.ndarray]) -> None:
        self.t += 1
        c1 = 1.0 - self.beta1 ** self.t
        c2 = 1.0 - self.beta2 ** self.t
        for k, g in grads.items():
            self.m[k] = self.beta1 * self.m[k] + (1.0 - self.beta1) * g
            self.v[k] = self.beta2 * self.v[k] + (1.0 - self.beta2) * g * g
            self.net.params[k] -= self.rate * (self.m[k] / c1) / (np.sqrt(self.v[k] / c2)
                                                                  + self.eps)
