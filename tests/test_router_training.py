"""The learned Intelligent Router: its network, the cluster model it trains on,
``blockproxy train-router`` and a policy serving the weights it writes."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from blockproxy.backends import BackendSpec
from blockproxy.cluster import ClusterView
from blockproxy.profile import load_profile
from blockproxy.routing.job import Job
from blockproxy.routing.policies import make_policy
from blockproxy.routing.qnet import FEATURES, QNet, action_inputs
from blockproxy.simulator import model_from_profile
from blockproxy.train_router import ClusterModel, Decision, block, round_robin, run_episode
from loadgen.procs import command

PROFILE = "llama-3.1-8b-h100-tp1"


def test_the_network_gradients_are_the_loss_s() -> None:
    net = QNet(hidden=8, seed=3)
    rng = np.random.default_rng(0)
    for name in ("b1", "b2"):  # off zero: a sample whose units are all off sits on a kink
        net.params[name] = rng.normal(size=8) * 0.1
    x = rng.normal(size=(5, len(FEATURES)))
    target = rng.normal(size=5) * 3  # some errors beyond the Huber threshold
    _, grads = net.gradients(x, target)
    for name in ("w1", "b2", "w3"):
        param = net.params[name]
        idx = tuple(0 for _ in param.shape)
        old = param[idx]
        param[idx] = old + 1e-6
        up, _ = net.gradients(x, target)
        param[idx] = old - 1e-6
        down, _ = net.gradients(x, target)
        param[idx] = old
        assert grads[name][idx] == pytest.approx((up - down) / 2e-6, rel=1e-4, abs=1e-8)


def test_weights_round_trip_and_a_bad_file_is_refused(tmp_path: Path) -> None:
    net = QNet(hidden=16, seed=1)
    net.save(tmp_path / "w.npz", {"instances": 4})
    loaded, meta = QNet.load(tmp_path / "w.npz")
    x = action_inputs([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]] * 3, 1000, 200, 1)
    assert (loaded.q(x) == net.q(x)).all() and meta["instances"] == 4
    np.savez(tmp_path / "other.npz", w1=np.zeros(3))
    for bad in (tmp_path / "other.npz", tmp_path / "missing.npz"):
        with pytest.raises(ValueError, match="cannot load router weights"):
            QNet.load(bad)


def test_the_cluster_model_gives_the_simulator_s_latencies() -> None:
    profile = load_profile(PROFILE)
    cluster = ClusterModel(profile, 2)
    cluster.dispatch(0, 7, 3000, 200, 0.0)
    cluster.advance(1e6)
    ((rid, ttft, e2e),) = cluster.finished
    state = np.zeros((5, 1), dtype=np.int64)
    expected = model_from_profile(profile).predict(state, 0, 3000, 0, 200)
    assert rid == 7 and (ttft, e2e) == (expected[0], expected[1])
    # a stream of requests: every one finishes, in order of its own times
    requests = [(0.01 * k, 500 + 37 * k, 20 + k) for k in range(200)]
    results = run_episode(profile, 4, requests, round_robin(), 0.05, 3)
    assert sorted(r[0] for r in results) == list(range(200))
    assert all(0 < ttft <= e2e for _, ttft, e2e in results)


def test_the_cluster_model_s_block_counts_the_delay_when_weighted() -> None:
    """As ``block --delay-weight`` (tests/test_policies.py): one long prompt queued on
    instance 0, thirty long decodes on instance 1; a long prompt's own latency is lower on
    1, the delay it adds there many times higher: it goes to 0 if it may give up the
    share of its own latency that costs it."""
    cluster = ClusterModel(load_profile(PROFILE), 2)
    for rid in range(30):
        cluster.dispatch(1, rid, 50, 2000, 0.0)
    cluster.advance(0.5)  # all thirty decoding
    cluster.dispatch(0, 30, 6000, 300, 0.5)
    d = Decision(31, 16000, 10, 0.5, 0, True)
    p = [cluster.models[i].predict(cluster.tables[i], cluster.n[i], 16000, 0, 10, math.inf,
                                   *cluster.recent[i].expected(0.5)) for i in range(2)]
    assert p[1][1] < p[0][1] and p[1][6] > 10 * p[0][6]
    cost = p[0][1] / p[1][1] - 1.0  # what instance 0 costs it, a fraction of its best
    assert block()(cluster, d) == 1
    assert block(1.0, cost * 0.95)(cluster, d) == 1
    assert block(1.0, cost * 1.05)(cluster, d) == 0
    # charged its prefill time for each of the thirty running there (``--prefill-stall``)
    assert block(prefill_stall=2.0)(cluster, d) == 0
    assert block(delay_slack=cost * 0.95, prefill_stall=2.0)(cluster, d) == 1


def test_the_cluster_model_s_weighted_block_expects_each_instance_s_arrivals() -> None:
    """As the proxy's (tests/test_policies.py): long prompts with short answers keep
    arriving at instance 0, forty long decodes run on instance 1.  A long answer is
    predicted sooner done on 0 by what is there now, and with 0's arrivals on 1; with
    the arrivals left out (``--future-arrivals 0``) the weighted router sees only what is
    there now."""
    cluster = ClusterModel(load_profile(PROFILE), 2, arrival_window=5.0)
    for rid in range(40):
        cluster.dispatch(1, rid, 200, 2000, 0.0)
    for k in range(50):  # 10 per second for 5 s
        cluster.advance(0.1 * k)
        cluster.dispatch(0, 100 + k, 3000, 20, 0.1 * k)
    cluster.advance(5.0)
    assert cluster.recent[0].rate(5.0) == pytest.approx(10.0, rel=0.05)
    d = Decision(500, 100, 1500, 5.0, 0, True)
    assert block()(cluster, d) == 0
    assert block(1.0)(cluster, d) == 1
    assert block(1.0, arrivals=False)(cluster, d) == 0


def test_the_cluster_model_s_block_blind_to_lengths_takes_every_answer_at_one_length(
        ) -> None:
    """Instance 0 decodes one answer of 4,000 tokens, instance 1 two of 8.  Knowing the
    lengths, 1 is nearly free; taking every answer at the same length, 1 is the busier."""
    cluster = ClusterModel(load_profile(PROFILE), 2)
    cluster.dispatch(0, 0, 100, 4000, 0.0)
    cluster.dispatch(1, 1, 100, 8, 0.0)
    cluster.dispatch(1, 2, 100, 8, 0.0)
    cluster.advance(0.02)
    assert cluster.n == [1, 2]
    d = Decision(3, 100, 500, 0.02, 0, True)
    assert block()(cluster, d) == 1
    assert block(length=4000)(cluster, d) == 0
    assert cluster.tables[1][3, :2].tolist() == [8, 8]  # the model's own state is kept


def test_the_cluster_model_s_block_takes_each_request_at_its_own_predicted_length(
        ) -> None:
    """Per-request lengths: told the true ones, it chooses as told nothing; told wrong
    ones for the requests in flight, it chooses as if they were true."""
    rng = np.random.default_rng(5)
    t = np.cumsum(rng.exponential(1 / 60, 80))
    requests = [(float(x), int(p), int(o)) for x, p, o in zip(
        t, rng.integers(100, 3000, 80), rng.integers(10, 600, 80), strict=True)]
    profile = load_profile(PROFILE)

    def chosen(router) -> list[int]:
        out: list[int] = []

        def choose(cluster: ClusterModel, d: Decision) -> int:
            out.append(router(cluster, d))
            return out[-1]
        run_episode(profile, 3, requests, choose, 0.05, 0, 2.0)
        return out
    # weighted: the expected arrivals at the predicted lengths of those sent there
    assert chosen(block(1.0, length=[o for _, _, o in requests])) == chosen(block(1.0))
    assert chosen(block(length=[150] * len(requests))) == chosen(block(length=150))
    # the example above, each request told apart: 0's answer said to be short, 1's long
    cluster = ClusterModel(profile, 2)
    cluster.dispatch(0, 0, 100, 4000, 0.0)
    cluster.dispatch(1, 1, 100, 8, 0.0)
    cluster.dispatch(1, 2, 100, 8, 0.0)
    cluster.advance(0.02)
    d = Decision(3, 100, 500, 0.02, 0, True)
    assert block(length=[8, 4000, 4000, 500])(cluster, d) == 0
    assert block(length=[4000, 8, 8, 500])(cluster, d) == 1


def test_a_held_request_is_decided_again_until_it_must_be_routed() -> None:
    profile = load_profile(PROFILE)
    seen: list[tuple[int, bool]] = []

    def holder(cluster: ClusterModel, d: Decision) -> int:
        seen.append((d.rid, d.must))
        return 0 if d.must else -1
    requests = [(0.5 * k, 200, 10) for k in range(6)]
    results = run_episode(profile, 2, requests, holder, 0.05, 2)
    assert sorted(r[0] for r in results) == list(range(6))
    # each decided three times: held twice, then routed; 0.1 s of holding in its TTFT
    assert [rid for rid, _ in seen] == [k for k in range(6) for _ in range(3)]
    assert [must for _, must in seen] == [False, False, True] * 6
    assert all(ttft >= 0.1 for _, ttft, _ in results)


def test_train_router_writes_weights_a_curve_and_a_comparison(tmp_path: Path) -> None:
    out = tmp_path / "router.npz"
    workload = tmp_path / "azure.jsonl"
    made = subprocess.run(
        [*command("loadgen"), "workload", "--trace", "azure-conv",
         "--rate-multiplier", "40", "--num-requests", "1200", "--out", str(workload)],
        capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    first = json.loads(workload.read_text().splitlines()[1])
    assert set(first) == {"arrival_s", "prompt_tokens", "output_tokens"}
    proc = subprocess.run(
        [sys.executable, "-m", "blockproxy", "train-router", "--requests", str(workload),
         "--instances", "4", "--num-requests", "1200",
         "--episodes", "3", "--episode-requests", "200", "--eval-every", "2",
         "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report["comparison"]) == {"round_robin", "heuristic", "learned", "block",
                                         "block --delay-weight 1"}
    assert all(r["requests"] == 240 and r["decisions_per_wall_second"] > 0
               for r in report["comparison"].values())
    assert [p["episode"] for p in report["curve"]] == [1, 2, 3]
    assert "validation" in report["curve"][1] and "validation" in report["curve"][2]
    best = min((p["validation"]["mean_e2e_s"], p["episode"]) for p in report["curve"][1:])
    assert report["chosen_episode"] == best[1]  # the network written is the best one
    assert report["training"]["decisions"] >= 600 and report["training"]["seconds"] > 0
    assert "episode 3/3" in proc.stderr
    assert Path(report["learning_curve"]).stat().st_size > 1000
    _, meta = QNet.load(out)
    assert meta["instances"] == 4 and meta["requests"] == str(workload)
    # the proxy's policy serves it
    view = ClusterView(PROFILE)
    view.apply([BackendSpec(url=f"http://127.0.0.1:{9000 + i}", name=f"i{i}")
                for i in range(3)])
    insts = list(view.instances.values())
    policy = make_policy("intelligent_router", random.Random(0), router_weights=str(out))
    for k in range(20):
        chosen, _ = policy.choose(insts, Job(200 + 100 * k, 50, bucket_tokens=64))
        chosen.reserve(200 + 100 * k, 50, 0.0)
    assert sum(inst.active for inst in insts) == 20
    with pytest.raises(ValueError, match="cannot load router weights"):
        make_policy("intelligent_router", router_weights=str(tmp_path / "none.npz"))
    bad = subprocess.run([sys.executable, "-m", "blockproxy", "train-router", "--requests",
                          "nowhere.jsonl", "--out", str(out)], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 1 and "nowhere.jsonl" in bad.stderr
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"arrival_s": 0.0, "prompt_tokens": 10}\n')
    bad = subprocess.run([sys.executable, "-m", "blockproxy", "train-router", "--requests",
                          str(broken), "--out", str(out)], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 1 and "broken.jsonl:1: expected arrival_s" in bad.stderr
