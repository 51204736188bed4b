"""The simulator's knowledge terms on an instance: expected future arrivals (the recent
arrival process) and the learned per-request overhead."""

from __future__ import annotations

import math
import random
import time

import pytest

from blockproxy.backends import BackendSpec
from blockproxy.cluster.arrivals import ArrivalProcess
from blockproxy.cluster.calibration import RequestOverhead
from blockproxy.cluster.instance import Instance
from blockproxy.cluster.requests import PHANTOM
from blockproxy.profile import load_profile


def test_rate_and_mean_sizes_of_a_steady_stream():
    a = ArrivalProcess(window=30.0)
    t = 100.0
    for i in range(3000):
        a.record(t, 1000 + (i % 2) * 200, 100, 250)
        t += 0.05
    interval, prompt, cached, output, limit = a.expected(t)
    assert interval == pytest.approx(0.05, rel=0.01)
    assert (prompt, cached, output, limit) == (1100, 100, 250, 256)


def test_rate_is_right_from_the_first_seconds_and_decays_after_the_stream_stops():
    a = ArrivalProcess(window=30.0)
    for i in range(41):  # 40 intervals of 0.1 s: 10 per second over 4 s
        a.record(i * 0.1, 10, 0, 5)
    assert a.rate(4.0) == pytest.approx(10.0, rel=0.05)
    assert a.rate(4.0 + 30.0) == pytest.approx(a.rate(4.0) * math.exp(-1) * (
        1 - math.exp(-4 / 30)) / (1 - math.exp(-34 / 30)), rel=0.05)
    assert a.rate(1e6) < 1e-6


def test_no_arrivals_or_a_single_one_expect_nothing():
    a = ArrivalProcess()
    assert a.expected(5.0) == (math.inf, 0, 0, 0, 0)
    a.record(5.0, 100, 0, 10)
    assert a.expected(5.001) == (math.inf, 0, 0, 0, 0)  # one arrival is no rate yet
    off = ArrivalProcess(limit=0)
    for i in range(100):
        off.record(i * 0.01, 100, 0, 10)
    assert off.expected(1.0)[0] == math.inf


def test_overhead_is_the_median_residual_floored_at_zero():
    rng = random.Random(3)
    o = RequestOverhead(initial=0.001)
    for i in range(200):
        o.observe(0.004 + rng.gauss(0, 0.0005) + (0.5 if i % 17 == 0 else 0.0))
    assert o.seconds == pytest.approx(0.004, abs=0.0003)
    neg = RequestOverhead()
    for _ in range(64):
        neg.observe(-0.01)
    assert neg.seconds == 0.0
    off = RequestOverhead(enabled=False, initial=0.002)
    for _ in range(64):
        off.observe(0.5)
    assert off.seconds == 0.002


def make_instance(**kw) -> Instance:
    return Instance(BackendSpec(url="http://127.0.0.1:1", name="i0"),
                    load_profile("llama-3.1-8b-h100-tp1"), **kw)


def test_arrivals_slow_the_recorded_prediction_not_the_routing_comparison():
    inst = make_instance()
    now = time.perf_counter()
    for i in range(20):
        e = inst.reserve(1000, 200, now - 2.0 + i * 0.01)
        inst.first_token(e, now)
    baseline = inst.predict(1000, 0, 200)
    # 40 requests per second of 2,000-token prompts arrived over the last 10 s.
    for k in range(400):
        inst.requests.recent.record(now - 10.0 + k * 0.025, 2000, 0, 200)
    assert inst.predict(1000, 0, 200) == baseline  # routing compares without them
    future = inst.predict(1000, 0, 200, future=True)
    assert future.e2e > baseline.e2e * 1.2
    assert future.ttft >= baseline.ttft


def test_own_and_gossiped_requests_are_arrivals_phantoms_are_not():
    inst = make_instance()
    t = time.perf_counter()
    inst.reserve(100, 10, t)
    inst.requests.upsert_remote(7, 1, 100, 10, 0, 0, t + 0.5)
    inst.requests.upsert_remote(7, 1, 100, 10, 1, 3, t + 0.6)  # an update, not an arrival
    inst.requests.upsert_remote(PHANTOM, 2, 100, 10, 0, 0, t + 0.7)
    assert inst.requests.recent.rate(t + 1.0) == pytest.approx(1.0 / 1.0, rel=0.05)


def test_overhead_is_learned_from_requests_scheduled_at_once_and_added_to_predictions():
    inst = make_instance(speed=1.0)
    alone = inst.predict(500, 0, 10)
    for _ in range(32):
        t = time.perf_counter()
        p = inst.predict(500, 0, 10)
        e = inst.reserve(500, 10, t)
        e.predicted_ttft, e.predicted_queue_delay = p.ttft, p.queue_delay
        e.overhead_s = inst.overhead.seconds
        inst.first_token(e, t + (p.ttft - e.overhead_s) + 0.003)  # 3 ms unmodelled
        inst.release(e)
    assert inst.overhead.seconds == pytest.approx(0.003, abs=1e-4)
    later = inst.predict(500, 0, 10)
    assert later.ttft == pytest.approx(alone.ttft + 0.003, abs=1e-4)
    assert later.queue_delay == pytest.approx(0.003, abs=1e-4)
