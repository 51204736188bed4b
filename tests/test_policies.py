"""Each policy, on a hand-built cluster view."""

from __future__ import annotations

import math
import random
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest

from blockproxy.backends import BackendSpec
from blockproxy.cluster import ClusterView
from blockproxy.routing.job import Job
from blockproxy.routing.policies import make_policy, policy_names
from blockproxy.routing.policies.block import BlockPolicy
from blockproxy.routing.policies.intelligent_router import IntelligentRouterPolicy
from blockproxy.simulator import Prediction

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
                                  "llumnix", "intelligent_router"])
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


def test_block_delay_weight_counts_the_latency_added_to_the_others(
        monkeypatch: pytest.MonkeyPatch):
    """i0 has one long prompt queued, i1 thirty long decodes.  The new long prompt's own
    latency is lower on i1 (no prefill ahead of it), but its prefill there stalls thirty
    decodes: with the delay it adds counted, it goes to i0, if it may give up the share of
    its own latency that costs it (``delay_slack``)."""
    frozen(monkeypatch)  # long after the requests there arrived: none expected
    insts = cluster(2)
    load(insts[0], 1, prompt=6000, output=300, started=False)
    load(insts[1], 30, prompt=50, output=2000)
    job = Job(prompt_tokens=16000, output_tokens=10)
    p0, p1 = insts[0].predict_job(job), insts[1].predict_job(job)
    assert p1.e2e < p0.e2e and p1.delay > 10 * p0.delay
    assert make_policy("block", random.Random(0)).choose(insts, job)[0] is insts[1]
    cost = p0.e2e / p1.e2e - 1.0  # what i0 costs the request, a fraction of its best
    weighted = make_policy("block", random.Random(0), delay_weight=1.0,
                           delay_slack=cost * 1.05)
    chosen, prediction = weighted.choose(insts, job)
    assert chosen is insts[0] and prediction == p0
    stingy = make_policy("block", random.Random(0), delay_weight=1.0,
                         delay_slack=cost * 0.95)
    assert stingy.choose(insts, job)[0] is insts[1]
    for option in ("delay_weight", "delay_slack"):
        with pytest.raises(ValueError, match=option):
            make_policy("block", random.Random(0), **{option: -0.5})
    for share in (1.5, math.nan):
        with pytest.raises(ValueError, match="delay_decodes"):
            make_policy("block_ttft", random.Random(0), delay_decodes=share)
    for name, own in (("block", 1.0), ("block_ttft", 0.0)):  # the delay to what it minimises
        policy = make_policy(name, random.Random(0))
        assert isinstance(policy, BlockPolicy) and policy.delay_decodes == own


def test_block_ttft_delay_weight_counts_only_the_first_tokens_it_delays(
        monkeypatch: pytest.MonkeyPatch):
    """The same two instances: the thirty decodes on i1 have their first tokens, so the
    long prompt's prefill there delays none (``block_ttft``), while on i0 it waits behind
    the queued prompt.  ``block`` with the delay weight sends it to wait behind the queue
    on i0, ``block_ttft`` with the same weight and no slack limit to i1."""
    frozen(monkeypatch)
    insts = cluster(2)
    load(insts[0], 1, prompt=6000, output=300, started=False)
    load(insts[1], 30, prompt=50, output=2000)
    job = Job(prompt_tokens=16000, output_tokens=10)
    options = {"delay_weight": 1.0, "delay_slack": math.inf}
    assert make_policy("block", random.Random(0), **options).choose(insts, job)[0] is insts[0]
    chosen, prediction = make_policy("block_ttft", random.Random(0), **options).choose(
        insts, job)
    assert chosen is insts[1] and prediction is not None and prediction.delay == 0.0
    assert prediction.ttft < insts[0].predict_job(job).ttft
    # the prompt waiting on i0 has no first token yet: a prefill beside its own delays it
    first = insts[0].predict(6000, 0, 10, delay_weight=1.0, decode_delay=0.0)
    assert first.delay > 0.0


@pytest.mark.parametrize("name, delay_weight, delay_slack, decodes, stall",
                         [("block", 0.0, 0.0, 1.0, 0.0), ("block", 1.0, 0.2, 1.0, 0.0),
                          ("block", 1.0, 5.0, 1.0, 0.0), ("block", 1.0, math.inf, 1.0, 0.0),
                          ("block", 1.0, math.inf, 0.25, 0.0),
                          ("block_ttft", 1.0, math.inf, 0.0, 0.0),
                          ("block_ttft", 1.0, math.inf, 0.25, 0.0),
                          ("block_ttft", 0.5, math.inf, 1.0, 0.0),
                          ("block", 0.0, math.inf, 1.0, 2.0), ("block", 1.0, 0.2, 1.0, 1.0),
                          ("block", 1.0, math.inf, 1.0, 1.0)])
def test_block_branch_and_bound_chooses_as_full_simulation_would(
        name: str, delay_weight: float, delay_slack: float, decodes: float, stall: float,
        monkeypatch: pytest.MonkeyPatch):
    """The bounded runs choose what full simulations would: the best score, whose own
    latency (end-to-end, or for ``block_ttft`` the first token) is within the slack."""
    frozen(monkeypatch)
    rng = random.Random(5)
    insts = cluster(8)
    for inst in insts:
        load(inst, rng.randint(0, 120), prompt=rng.randint(100, 3000),
             output=rng.randint(50, 600))
        arrive(inst, rng.uniform(0.0, 40.0), rng.randint(100, 3000), rng.randint(50, 600))
    policy = make_policy(name, random.Random(0), tie_tolerance=0.0, delay_weight=delay_weight,
                         delay_slack=delay_slack, delay_decodes=decodes, prefill_stall=stall)
    idx = 0 if name == "block_ttft" else 1
    runs: list[int] = []
    cuts: list[int] = []
    future = delay_weight > 0.0 or stall > 0.0  # the others include those still to arrive
    cut = []  # the simulations stopped at their bound
    for inst in insts:
        def predict(*args: Any, _predict: Any = inst.predict) -> Prediction:
            prediction = _predict(*args)
            cut.append(prediction.e2e == math.inf)
            return prediction
        monkeypatch.setattr(inst, "predict", predict)
    for _ in range(30):
        job = Job(rng.randint(10, 4000), rng.randint(1, 800))
        full = {inst.name: inst.predict(job.prompt_tokens, inst.cached_tokens(job),
                                        job.output_tokens, math.inf, future, delay_weight,
                                        math.inf, decodes, idx == 0)
                for inst in insts}
        stalls = {inst.name: stall * inst.prefill_stall(job.prompt_tokens
                                                        - inst.cached_tokens(job))
                  for inst in insts}
        assert stall == 0.0 or max(stalls.values()) > 0.0
        own = min(p[idx] for p in full.values())
        best = min(p[idx] + delay_weight * p.delay + stalls[n] for n, p in full.items()
                   if p[idx] <= own * (1 + delay_slack))
        cut.clear()
        chosen, prediction = policy.choose(insts, job)
        assert prediction is not None
        assert prediction == full[chosen.name]
        assert prediction[idx] + delay_weight * prediction.delay + stalls[chosen.name] == best
        runs.append(len(cut))
        cuts.append(sum(cut))
    # the bound stops some runs (with the delay weight and no slack limit, at the best
    # score so far; with a limit, only runs past it, which are rare here)
    assert sum(runs) == 30 * len(insts)
    if delay_weight == 0.0 or delay_slack == math.inf:
        assert sum(cuts) > 0.2 * sum(runs), cuts


def test_block_prefill_stall_keeps_a_long_prompt_away_from_running_requests(
        monkeypatch: pytest.MonkeyPatch):
    """i0 runs thirty short answers, i1 has one long prompt queued and nothing running.
    A long prompt's own latency is lower on i0; charged its prefill time for each of the
    thirty running there (``prefill_stall``), it goes to wait on i1, unless the slack
    forbids giving up that much of its own latency."""
    frozen(monkeypatch)
    insts = cluster(2)
    load(insts[0], 30, prompt=50, output=20)
    load(insts[1], 1, prompt=6000, output=300, started=False)
    job = Job(prompt_tokens=16000, output_tokens=10)
    step = insts[0].profile.step_time
    assert insts[0].prefill_stall(16000) == pytest.approx(
        step.per_prefill_token_s * insts[0].model.speed * 16000 * 30)
    assert insts[1].prefill_stall(16000) == 0.0
    free = {"delay_slack": math.inf}
    assert make_policy("block", random.Random(0)).choose(insts, job)[0] is insts[0]
    chosen, prediction = make_policy("block", random.Random(0), prefill_stall=2.0,
                                     **free).choose(insts, job)
    assert chosen is insts[1] and prediction is not None
    # the slack still bounds what its own latency may give up
    cost = insts[1].predict_job(job).e2e / insts[0].predict_job(job).e2e - 1.0
    assert make_policy("block", random.Random(0), prefill_stall=2.0,
                       delay_slack=cost * 0.5).choose(insts, job)[0] is insts[0]
    with pytest.raises(ValueError, match="prefill_stall"):
        make_policy("block", random.Random(0), prefill_stall=-0.5)


NOW = 1000.0  # the proxy's clock, frozen by :func:`frozen`


def frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    """Predictions read each instance's recent arrivals at :data:`NOW`."""
    from blockproxy.cluster import instance
    monkeypatch.setattr(instance, "time", SimpleNamespace(perf_counter=lambda: NOW))


def arrive(inst, rate: float, prompt: int, output: int, seconds: float = 20.0) -> None:
    """A steady stream of ``rate`` requests per second reached ``inst`` until :data:`NOW`."""
    k = int(rate * seconds)
    for j in range(k):
        inst.requests.recent.record(NOW - seconds + (j + 1) / rate, prompt, 0, output)


def test_block_delay_weight_counts_the_requests_still_to_arrive(monkeypatch: pytest.MonkeyPatch):
    """Long prompts keep arriving at i0, none at i1; i0 has fewer decodes now.  A long
    answer finishes sooner on i0 by what is there now, but the prefills arriving there
    while it decodes stretch its steps, and it delays them: with the delay weight the
    simulations include the expected arrivals, and it goes to i1."""
    frozen(monkeypatch)
    insts = cluster(2)
    load(insts[0], 4, prompt=200, output=2000)
    load(insts[1], 12, prompt=200, output=2000)
    arrive(insts[0], 20.0, prompt=3000, output=20)
    job = Job(prompt_tokens=100, output_tokens=1500)
    now = [inst.predict_job(job) for inst in insts]
    assert now[0].e2e < now[1].e2e
    assert make_policy("block", random.Random(0)).choose(insts, job)[0] is insts[0]
    later = [inst.predict_job(job, future=True) for inst in insts]
    assert later[1] == now[1]  # nothing arrives at i1
    assert later[0].delay > now[0].delay
    chosen, prediction = make_policy("block", random.Random(0), delay_weight=1.0,
                                     delay_slack=math.inf).choose(insts, job)
    assert chosen is insts[1] and prediction == later[1]


@pytest.mark.parametrize("delay_weight", [0.0, 1.0])
def test_the_dispatcher_records_the_prediction_with_arrivals_once(
        delay_weight: float, monkeypatch: pytest.MonkeyPatch):
    """The chosen instance's recorded prediction includes its expected arrivals; where the
    policy's own simulations already did (the delay weight), it is not simulated again."""
    from blockproxy.metrics import Metrics
    from blockproxy.routing.dispatch import Dispatcher

    frozen(monkeypatch)
    insts = cluster(3)
    for i, inst in enumerate(insts):
        load(inst, 4 * i, prompt=800, output=300)
        arrive(inst, 5.0, prompt=2000, output=100)
    job = Job(prompt_tokens=1200, output_tokens=200)
    expected = {inst.name: inst.predict_job(job, future=True) for inst in insts}
    calls: list[bool] = []
    for inst in insts:
        def predict(*args: Any, _predict: Any = inst.predict) -> Prediction:
            calls.append(args[4] if len(args) > 4 else False)
            return _predict(*args)
        monkeypatch.setattr(inst, "predict", predict)
    policy = make_policy("block", random.Random(0), delay_weight=delay_weight)
    view = ClusterView("llama-3.1-8b-h100-tp1")
    entry = Dispatcher(policy, Metrics(view)).dispatch(insts, job)
    chosen = expected[entry.instance.name]
    assert (entry.predicted_ttft, entry.predicted_e2e) == (chosen.ttft, chosen.e2e)
    assert len(calls) == len(insts) + (delay_weight == 0.0)
    assert calls.count(True) == (len(insts) if delay_weight else 1)


def test_every_policy_option_is_a_proxy_flag() -> None:
    # blockproxy serve builds a policy from the config fields its OPTIONS name
    from blockproxy.config import ProxyConfig
    from blockproxy.front.app import policy_options
    from blockproxy.routing.policies import policy_class, policy_names

    for name in policy_names():
        config = ProxyConfig(backends="x", policy=name)
        assert set(policy_options(config)) == set(policy_class(name).OPTIONS), name
        make_policy(name, random.Random(0), **policy_options(config))


# ---- intelligent_router: the mixing penalty ---------------------------------------------------

def _ir(mixing_weight: float = 1.0) -> IntelligentRouterPolicy:
    return IntelligentRouterPolicy("intelligent_router", random.Random(0), mixing_weight)


def test_intelligent_router_keeps_a_long_prompt_away_from_many_decodes():
    """Same number of requests on both: 8 decoding on i0, 8 still waiting for short
    prefills on i1.  A long prompt stalls the eight decodes on i0 for its prefill; on i1
    it waits only for 8 x 50 tokens of prefill, so it goes there."""
    insts = cluster(2)
    load(insts[0], 8, prompt=50, output=2000)
    load(insts[1], 8, prompt=50, output=20, started=False)
    policy = _ir()
    long_prompt = Job(prompt_tokens=16000, output_tokens=10, bucket_tokens=10)
    own0, pen0 = policy.estimate(insts[0], long_prompt)
    own1, pen1 = policy.estimate(insts[1], long_prompt)
    assert pen0 > pen1 and own0 + pen0 > own1 + pen1
    assert policy.choose(insts, long_prompt)[0] is insts[1]
    # without the penalty, its own latency alone prefers the instance with no queued
    # prefill (i0): the penalty is what decides
    assert own0 < own1
    alone = _ir(mixing_weight=0.0)
    assert alone.choose(insts, long_prompt)[0] is insts[0]


def test_intelligent_router_routes_on_the_length_bucket():
    """i0 runs 40 short answers nearly done, i1 four long ones.  A short answer is done
    before it would slow i1's four much, and the smaller batch is quicker; a long answer
    decodes beside i0's forty for only their few remaining steps."""
    insts = cluster(2)
    load(insts[0], 40, prompt=100, output=5)
    load(insts[1], 4, prompt=100, output=3000)
    policy = _ir()
    short = Job(prompt_tokens=100, output_tokens=500, bucket_tokens=8)
    long = Job(prompt_tokens=100, output_tokens=500, bucket_tokens=4000)
    assert policy.choose(insts, short)[0] is insts[1]
    assert policy.choose(insts, long)[0] is insts[0]
    # the regression's median (500) is used when no bucket was predicted
    assert policy.estimate(insts[0], Job(100, 500)) == policy.estimate(
        insts[0], Job(100, 500, bucket_tokens=500))


def test_intelligent_router_counts_the_cached_prefix_and_the_speed():
    insts = cluster(2)
    load(insts[0], 4)
    load(insts[1], 4)
    policy = _ir()
    base = policy.estimate(insts[0], JOB)
    insts[1].model.speed = 2.0  # calibrated twice as slow
    assert policy.estimate(insts[1], JOB) == pytest.approx((2 * base[0], 2 * base[1]))
    assert policy.choose(insts, JOB)[0] is insts[0]
    with pytest.raises(ValueError, match="mixing_weight"):
        make_policy("intelligent_router", mixing_weight=-1.0)
