"""Each policy, on a hand-built cluster view."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from blockproxy.backends import BackendSpec
from blockproxy.cluster import ClusterView
from blockproxy.routing.job import Job
from blockproxy.routing.policies import make_policy, policy_names

JOB = Job(prompt_tokens=500, output_tokens=100)


def cluster(n: int = 3, **per_instance: dict) -> list:
    view = ClusterView("llama-3.1-8b-h100-tp1")
    view.apply([BackendSpec(url=f"http://127.0.0.1:{9000 + i}", name=f"i{i}",
                            **per_instance.get(f"i{i}", {})) for i in range(n)])
    return list(view.instances.values())


def load(inst, count: int, prompt: int = 1000, output: int = 300, started: bool = True):
    for _ in range(count):
        e = inst.reserve(prompt, output, 0.0)
        if started:
            inst.first_token(e, 0.0)


def test_registry_has_every_policy():
    assert set(policy_names()) >= {"block", "block_ttft", "round_robin", "random",
                                   "least_requests", "power_of_two", "least_tokens", "llumnix"}
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("fastest")


@pytest.mark.parametrize("name", ["block", "block_ttft", "least_requests", "least_tokens",
                                  "llumnix"])
def test_load_aware_policies_avoid_the_busy_instance(name: str):
    insts = cluster(2)
    load(insts[0], 100)
    policy = make_policy(name, random.Random(1))
    assert policy.choose(insts, JOB)[0] is insts[1]


def test_block_returns_its_prediction_and_prefers_faster_hardware():
    insts = cluster(2, i1={"profile": "llama-3.1-8b-a100-80gb-tp1"})
    chosen, prediction = make_policy("block", random.Random(0)).choose(insts, JOB)
    assert chosen is insts[0]
    assert prediction is not None and prediction[1] == insts[0].predict(500, 0, 100)[1]


def test_block_ties_go_to_the_least_loaded():
    insts = cluster(3)
    load(insts[0], 2, prompt=10, output=10)
    load(insts[1], 1, prompt=10, output=10)
    picks = Counter(make_policy("block", random.Random(s)).choose(insts, Job(10, 10))[0].name
                    for s in range(20))
    assert picks == {"i2": 20}


def test_block_power_of_k_simulates_only_k():
    insts = cluster(8)
    calls = []
    for inst in insts:
        original = inst.predict
        def counted(*a: Any, _o: Any = original, _i: Any = inst) -> Any:
            calls.append(_i)
            return _o(*a)
        inst.predict = counted  # type: ignore[method-assign]
    make_policy("block", random.Random(0), sample_k=2).choose(insts, JOB)
    assert len(calls) == 2


def test_round_robin_cycles_and_respects_weights():
    insts = cluster(2, i0={"weight": 3.0})
    policy = make_policy("round_robin")
    picks = Counter(policy.choose(insts, JOB)[0].name for _ in range(8))
    assert picks == {"i0": 6, "i1": 2}


def test_power_of_two_picks_the_less_loaded_of_its_pair():
    insts = cluster(2)
    load(insts[1], 5)
    policy = make_policy("power_of_two", random.Random(3))
    assert all(policy.choose(insts, JOB)[0] is insts[0] for _ in range(10))


def test_random_uses_every_instance():
    insts = cluster(3)
    policy = make_policy("random", random.Random(7))
    assert {policy.choose(insts, JOB)[0].name for _ in range(60)} == {"i0", "i1", "i2"}


def test_block_branch_and_bound_chooses_as_full_simulation_would():
    rng = random.Random(5)
    insts = cluster(8)
    for inst in insts:
        load(inst, rng.randint(0, 120), prompt=rng.randint(100, 3000),
             output=rng.randint(50, 600))
    policy = make_policy("block", random.Random(0), tie_tolerance=0.0)
    for _ in range(30):
        job = Job(rng.randint(10, 4000), rng.randint(1, 800))
        full = {inst.name: inst.predict_job(job) for inst in insts}
        best = min(p[1] for p in full.values())
        chosen, prediction = policy.choose(insts, job)
        assert prediction is not None
        assert prediction == full[chosen.name]
        assert prediction[1] == best


def test_every_policy_option_is_a_proxy_flag() -> None:
    # blockproxy serve builds a policy from the config fields its OPTIONS name
    from blockproxy.config import ProxyConfig
    from blockproxy.front.app import policy_options
    from blockproxy.routing.policies import policy_class, policy_names

    for name in policy_names():
        config = ProxyConfig(backends="x", policy=name)
        assert set(policy_options(config)) == set(policy_class(name).OPTIONS), name
        make_policy(name, random.Random(0), **policy_options(config))
