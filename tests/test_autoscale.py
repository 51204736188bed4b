"""Auto-provisioning: the what-if simulation, scaling up and down with hysteresis, the
queue-length baseline, and the proxy's gauge, ``/autoscale`` and scale command."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from blockproxy.backends import BackendSpec
from blockproxy.cluster.autoscale import Autoscaler, Objective
from blockproxy.cluster.instance import Instance
from blockproxy.cluster.view import ClusterView
from blockproxy.config import ProxyConfig
from blockproxy.front.app import Proxy
from loadgen import promtext

Client = TestClient[web.Request, web.Application]
PROFILE = "llama-3.1-8b-h100-tp1"
#: the Azure conversation trace's mean sizes (README): ~20.5 ms of prefill each on an
#: H100, so one instance serves at most ~45 requests per second
PROMPT, OUTPUT = 1183, 254


def _view(active: int, standby: int = 0, draining: int = 0,
          slo_ttft_ms: float = 2000.0) -> ClusterView:
    view = ClusterView(PROFILE, slo_ttft_ms=slo_ttft_ms)
    specs = [BackendSpec(url=f"http://127.0.0.1:{9000 + i}", name=f"a{i}", models=("m",))
             for i in range(active)]
    specs += [BackendSpec(url=f"http://127.0.0.1:{9100 + i}", name=f"s{i}", models=("m",),
                          state="standby") for i in range(standby)]
    specs += [BackendSpec(url=f"http://127.0.0.1:{9200 + i}", name=f"d{i}", models=("m",),
                          state="draining") for i in range(draining)]
    view.apply(specs)
    return view


def _load(view: ClusterView, rate: float, start: float = 0.0, seconds: float = 20.0) -> float:
    """Record ``rate`` requests per second of the trace's mean sizes, spread over the
    active instances, for ``seconds``; returns the time of the last."""
    active = [i for i in view.instances.values() if i.state == "active"]
    t = start
    k = 0
    while t < start + seconds:
        active[k % len(active)].requests.recent.record(t, PROMPT, 0, OUTPUT)
        k += 1
        t = start + k / rate
    return t


def _scaler(view: ClusterView, **kw: object) -> Autoscaler:
    options: dict[str, object] = dict(mode="act", down_after=30.0, up_cooldown=10.0)
    options.update(kw)
    return Autoscaler(view, **options)  # type: ignore[arg-type]


def test_what_if_needs_more_instances_than_one_can_serve() -> None:
    view = _view(3)
    now = _load(view, 60.0)
    scaler = _scaler(view)
    load = scaler.load("m", now)
    assert load[0] == pytest.approx(60.0, rel=0.1)
    assert load[1:] == (PROMPT, 0, OUTPUT)
    insts = list(view.instances.values())
    goal = Objective(*view.objective("m"))
    assert goal == Objective(ttft=2.0)
    one, two, three = (scaler.what_if(insts[:k], load, goal) for k in (1, 2, 3))
    # 60/s on one instance is beyond its ~45/s: the queue grows over the horizon
    assert not one.meets and one.ttft > 2.0
    assert two.meets and three.meets and three.ttft <= two.ttft < 1.0
    # with no load at all, a lone request's latency
    idle = scaler.what_if(insts[:1], (0.0, 0, 0, 0), goal)
    assert idle.meets and idle.ttft < 0.1


def test_scales_up_to_what_is_needed_after_two_evaluations_then_cools_down() -> None:
    view = _view(2, standby=6)
    now = _load(view, 120.0)
    scaler = _scaler(view)
    fed = [now]

    def at(t: float, rate: float) -> list[tuple[str, str, Instance]]:  # the load goes on
        fed[0] = _load(view, rate, fed[0], now + t - fed[0])
        return scaler.evaluate(now + t)
    assert scaler.evaluate(now) == []  # once is not yet a trend
    report = scaler.models["m"].report
    need = report["needed"]
    assert 3 <= need <= 5 and report["desired"] == 2
    assert "second evaluation" in report["reason"]
    changes = at(2, 120.0)  # every instance needed at once, in the file's order
    assert [(a, i.name) for _, a, i in changes] == [("up", f"s{k}") for k in range(need - 2)]
    assert all(i.state == "active" for _, _, i in changes)
    assert scaler.history[-1]["action"] == "up"
    # the load triples: more needed, but not within the cooldown (10 s)
    assert at(4, 360.0) == [] and at(6, 360.0) == []
    assert scaler.models["m"].desired > need
    added = at(13, 360.0)
    assert added and all(a == "up" for _, a, _ in added)
    # past the last standby instance the wish stays, for an HPA to act on
    for t in (30, 32, 34):
        at(t, 600.0)
    assert at(36, 600.0) == [] and scaler.models["m"].desired > 8
    assert sum(i.state == "active" for i in view.instances.values()) == 8


def test_scales_down_only_after_a_sustained_surplus_and_drains_first() -> None:
    view = _view(3)
    now = _load(view, 20.0)  # one instance is plenty
    view.instances["a2"].model.speed = 1.3  # the slowest: the least useful
    scaler = _scaler(view, min_instances=2)
    for t in (0, 10, 20):
        assert scaler.evaluate(now + t) == []
    assert "of the 30 s needed" in scaler.models["m"].report["reason"]
    entry = view.instances["a2"].requests.reserve(100, 10, now)
    ((_, action, inst),) = scaler.evaluate(now + 31)
    assert (action, inst.name, inst.state) == ("down", "a2", "draining")
    assert scaler.evaluate(now + 32) == []  # still busy: stays draining
    view.instances["a2"].requests.release(entry)
    ((_, action, inst),) = scaler.evaluate(now + 33)
    assert (action, inst.name, inst.state) == ("standby", "a2", "standby")
    # and never below --min-instances
    for t in range(40, 200, 10):
        assert scaler.evaluate(now + t) == []
    assert scaler.models["m"].desired == 2


def test_scales_down_one_instance_per_step_and_takes_a_busy_drained_one_back_first() -> None:
    view = _view(6)
    fed = [_load(view, 20.0)]  # one instance is plenty
    now = fed[0]
    scaler = _scaler(view, down_step=5.0)

    def at(t: float, rate: float = 20.0) -> list[tuple[str, str, Instance]]:
        active = [i for i in view.instances.values() if i.state == "active"]
        k = 0
        while fed[0] < now + t:  # the load goes on, over the instances still active
            active[k % len(active)].requests.recent.record(fed[0], PROMPT, 0, OUTPUT)
            k += 1
            fed[0] += 1 / rate
        return scaler.evaluate(now + t)
    assert at(0) == [] and at(20) == []
    busy = view.instances["a5"].requests.reserve(100, 10, now + 30)
    ((_, action, inst),) = at(31)  # one, not the whole surplus
    assert (action, inst.name, inst.state, inst.finish_in_place) == \
        ("down", "a5", "draining", True)
    assert at(33) == []  # the next step waits --scale-down-step (5 s)
    ((_, action, inst),) = at(36)
    assert (action, inst.name) == ("down", "a4")
    assert [a for _, a, _ in at(37)] == ["standby"]  # a4 was idle: back to standby
    assert view.instances["a4"].finish_in_place is False
    # a burst: the instance still draining (warm, paid for) is taken back first
    for _ in range(50):
        scaler.observe("m", now + 38, missed=True)
    at(38, 20.0)
    changes = at(39, 20.0)
    assert (changes[0][1], changes[0][2].name) == ("up", "a5")
    assert view.instances["a5"].state == "active"
    assert not view.instances["a5"].finish_in_place
    view.instances["a5"].requests.release(busy)


def test_the_file_taking_an_instance_back_hands_its_streams_over_again() -> None:
    view = _view(2)
    now = _load(view, 10.0)
    scaler = _scaler(view, down_after=1.0)
    scaler.evaluate(now)
    ((_, action, inst),) = scaler.evaluate(now + 2)
    assert (action, inst.name, inst.finish_in_place) == ("down", "a1", True)
    # the operator drains it through the backends file: an operator's drain hands over
    specs = [i.spec for i in view.instances.values()]
    specs[1] = dataclasses.replace(specs[1], state="draining", weight=2.0)
    view.apply(specs)
    assert view.instances["a1"].state == "draining"
    assert not view.instances["a1"].finish_in_place


def test_predicted_misses_at_dispatch_scale_up_even_when_the_load_looks_fine() -> None:
    view = _view(2, standby=1)
    now = _load(view, 5.0)
    scaler = _scaler(view)
    for k in range(10):
        scaler.observe("m", now + k * 0.1, missed=k % 2 == 0)
    scaler.evaluate(now + 1)
    ((_, action, _),) = scaler.evaluate(now + 2)
    assert action == "up"
    assert "every instance" in scaler.history[-1]["reason"]


def test_a_surplus_interrupted_by_a_miss_starts_over() -> None:
    view = _view(3)
    now = _load(view, 20.0)
    scaler = _scaler(view)
    scaler.evaluate(now)
    scaler.evaluate(now + 20)
    for _ in range(5):
        scaler.observe("m", now + 21, missed=True)
    scaler.evaluate(now + 22)
    assert scaler.evaluate(now + 35) == []  # the surplus clock restarted after the miss


def test_advise_computes_but_changes_nothing() -> None:
    view = _view(1, standby=1)
    now = _load(view, 90.0)
    scaler = _scaler(view, mode="advise")
    scaler.evaluate(now)
    assert scaler.evaluate(now + 2) == []
    assert scaler.models["m"].desired == 2 and view.instances["s0"].state == "standby"
    report = scaler.describe()["models"]["m"]
    assert [w["instances"] for w in report["what_if"]] == [1, 2]
    assert report["what_if"][0]["meets_objective"] is False


def test_the_files_draining_instance_is_left_to_the_file() -> None:
    view = _view(2, draining=1)
    scaler = _scaler(view)
    scaler.evaluate(0.0)
    assert view.instances["d0"].state == "draining"


def test_queue_signal_scales_like_an_hpa_on_waiting_requests() -> None:
    view = _view(2, standby=2, slo_ttft_ms=0.0)
    scaler = Autoscaler(view, mode="act", signal="queue", queue_target=4.0,
                        down_after=30.0, up_cooldown=0.0)
    entries = [view.instances[f"a{k % 2}"].requests.reserve(100, 10, 0.0) for k in range(20)]
    # 20 waiting: 5 instances' worth, all there are at once (as an HPA scales)
    assert [(a, i.name) for _, a, i in scaler.evaluate(1.0)] == [("up", "s0"), ("up", "s1")]
    assert scaler.models["m"].desired == 5 and scaler.models["m"].report["waiting"] == 20
    assert scaler.evaluate(2.0) == []  # none left
    for entry in entries[:4]:  # 16 over 4 instances: on target, no wish to change
        entry.instance.requests.release(entry)
    scaler.evaluate(3.0)
    assert scaler.models["m"].desired == 4
    for entry in entries[4:]:  # nothing waits: fewer, but only after 30 s of it
        entry.instance.requests.release(entry)
    assert scaler.evaluate(4.0) == [] and scaler.evaluate(33.0) == []
    ((_, action, inst),) = scaler.evaluate(35.0)
    assert action == "down" and inst.state == "draining"


def test_objectives_and_modes_are_checked() -> None:
    view = _view(2, standby=1, slo_ttft_ms=0.0)
    scaler = Autoscaler(view, mode="act")
    _load(view, 200.0)
    assert scaler.evaluate(20.0) == [] and scaler.evaluate(22.0) == []  # nothing to aim at
    assert "no objective" in scaler.models["m"].report["reason"]
    with pytest.raises(ValueError, match="mode"):
        Autoscaler(view, mode="sometimes")
    assert Objective(ttft=1.0, e2e=5.0).met(0.9, 4.0)
    assert not Objective(ttft=1.0, e2e=5.0).met(0.9, 6.0)
    assert not Objective(ttft=1.0).met(0.7, math.inf, factor=0.6)


# ---- in the proxy ---------------------------------------------------------------------------
async def test_the_proxy_exports_the_decision_and_runs_the_scale_command(
        instance_url: str, tmp_path: Path,
        aiohttp_client: Callable[..., Awaitable[Client]]) -> None:
    out = tmp_path / "scaled"
    config = ProxyConfig(backends="(in process)", scrape_interval=0.0, slo_ttft_ms=2000.0,
                         autoscale="act", autoscale_interval=0.05,
                         scale_command=f"echo $BLOCKPROXY_MODEL $BLOCKPROXY_DESIRED_INSTANCES "
                                       f"$BLOCKPROXY_ACTIVE_INSTANCES > {out}")
    proxy = Proxy(config, [
        BackendSpec(url=instance_url, name="i0", models=("tiny",)),
        BackendSpec(url="http://127.0.0.1:9", name="spare", models=("tiny",),
                    state="standby")])
    client = await aiohttp_client(proxy.make_app())
    for _ in range(100):
        if out.exists() and out.read_text():
            break
        await asyncio.sleep(0.05)
    assert out.read_text().split() == ["tiny", "1", "1"]
    for _ in range(100):  # the spare does not answer: probed, marked down, not counted on
        model = (await (await client.get("/autoscale")).json())["models"]["tiny"]
        if not model["standby"]:
            break
        await asyncio.sleep(0.05)
    assert model["active"] == ["i0"] and model["standby"] == [] and model["desired"] == 1
    assert [w["instances"] for w in model["what_if"]] == [1]
    assert model["what_if"][0]["meets_objective"] is True
    text = await (await client.get("/metrics")).text()
    assert promtext.find(text, "blockproxy_desired_instances", model="tiny") == 1
    assert promtext.find(text, "blockproxy_active_instances", model="tiny") == 1
    assert promtext.find(text, "blockproxy_instance_healthy", instance="spare") == 0
    assert (promtext.find(text, "blockproxy_instance_seconds_total", model="tiny") or 0) > 0


def test_a_burst_counts_at_once_through_the_last_seconds_arrivals() -> None:
    view = _view(2, standby=6)
    now = _load(view, 20.0)  # the decayed window says 20/s: two are plenty
    scaler = _scaler(view)
    scaler.evaluate(now)
    assert scaler.models["m"].report["needed"] <= 2
    for k in range(2000):  # but 200/s have arrived over the last 10 s
        scaler.observe("m", now + k * 0.005, missed=False)
    scaler.evaluate(now + 10)
    report = scaler.models["m"].report
    assert report["arrival_rate_per_s"] == pytest.approx(200.0, rel=0.05)
    assert report["needed"] >= 4


def test_a_ramp_is_planned_for_where_it_is_heading_not_where_it_was() -> None:
    view = _view(2)
    scaler = _scaler(view)
    m = scaler._model("m")
    t = 0.0
    while t < 60.0:  # 20/s for a minute, then +5/s every second
        scaler.observe("m", t, missed=False)
        t += 1 / 20.0
    while t < 80.0:
        rate = 20.0 + 5.0 * (t - 60.0)
        scaler.observe("m", t, missed=False)
        t += 1 / rate
    scaler._decay(m, t)
    now_rate = 20.0 + 5.0 * (t - 60.0)  # 120/s
    lagging = m.arrivals / scaler.window
    assert lagging < 0.7 * now_rate  # the last 10 s's rate trails it by over 40/s
    # two windows into the ramp the extrapolation has caught up most of that (exact on a
    # ramp lasting several windows), and does not overshoot
    assert 0.75 * now_rate < scaler._recent_rate(m, t) < 1.05 * now_rate
    while t < 100.0:  # and back down to 20/s: not extrapolated below the recent rate
        scaler.observe("m", t, missed=False)
        t += 1 / 20.0
    scaler._decay(m, t)
    assert scaler._recent_rate(m, t) == pytest.approx(m.arrivals / scaler.window, rel=0.01)


def test_the_requests_already_waiting_are_simulated_as_a_backlog() -> None:
    view = _view(2, standby=6)
    now = _load(view, 10.0)
    scaler = _scaler(view)
    scaler.evaluate(now)
    assert scaler.models["m"].report["needed"] <= 2
    for k in range(20):  # 20 short prompts waiting: a fraction of a second of prefill
        view.instances[f"a{k % 2}"].requests.reserve(100, 10, now)
    scaler.evaluate(now + 1)
    report = scaler.models["m"].report
    assert report["waiting"] == 20 and report["needed"] <= 2
    assert report["waiting_mean_tokens"] == {"prompt": 100, "cached": 0, "output": 10}
    for k in range(100):  # 100 long ones more: seconds of prefill, beyond two instances
        view.instances[f"a{k % 2}"].requests.reserve(8000, 10, now)
    scaler.evaluate(now + 2)
    report = scaler.models["m"].report
    assert report["waiting"] == 120
    need = report["needed"]
    assert 6 <= need <= 10, report
    # the request arriving now, behind its instance's share of the backlog, is in time
    # with that many and not with one fewer
    assert report["what_if_needed"]["meets_objective"]
    backlog = scaler._waiting([i for i in view.instances.values() if i.state == "active"])
    fewer = scaler.what_if(list(view.instances.values())[:need - 1],
                           scaler.load("m", now + 2), Objective(ttft=2.0), backlog=backlog,
                           probe=scaler.tail("m"))
    assert not fewer.meets and fewer.ttft > 2.0


def _mixed_load(view: ClusterView, rate: float, long_prompt: int, every: int = 20,
                seconds: float = 20.0) -> float:
    """``rate`` requests per second over the active instances for ``seconds``: one in
    ``every`` has ``long_prompt`` tokens and 4x the output, the rest the trace's mean
    sizes; returns the time of the last."""
    active = [i for i in view.instances.values() if i.state == "active"]
    k = 0
    t = 0.0
    while t < seconds:
        long = k % every == every - 1
        active[k % len(active)].requests.recent.record(
            t, long_prompt if long else PROMPT, 0, 4 * OUTPUT if long else OUTPUT)
        k += 1
        t = k / rate
    return t


def test_the_tail_request_is_the_99th_percentile_of_recent_sizes() -> None:
    view = _view(2)
    scaler = _scaler(view)
    assert scaler.tail("m") is None
    insts = list(view.instances.values())
    for k in range(100):  # uncached prompts 100..199 (cached 10), outputs 1..100
        insts[k % 2].requests.recent.record(k * 0.01, 110 + 99 - k, 10, k + 1)
    prompt, cached, output = scaler.tail("m")  # type: ignore[misc]
    assert (prompt - cached, cached, output) == (198, 10, 99)
    for k in range(300):  # only the last SIZE_SAMPLES per instance are kept
        insts[k % 2].requests.recent.record(1 + k * 0.01, 50, 0, 5)
    assert scaler.tail("m") == (50, 0, 5)


def test_a_long_tail_of_prompts_needs_more_instances_than_the_mean_request() -> None:
    view = _view(4, standby=8, slo_ttft_ms=1000.0)
    now = _mixed_load(view, 80.0, long_prompt=32000)
    scaler = _scaler(view)
    load = scaler.load("m", now)
    tail = scaler.tail("m")
    assert tail is not None and tail[0] == 32000
    pool = list(view.instances.values())
    goal = Objective(ttft=1.0)
    mean_need, _ = scaler.needed(pool, load, goal)
    tail_need, at = scaler.needed(pool, load, goal, probe=tail)
    assert tail_need > mean_need and at.meets, (mean_need, tail_need)
    scaler.evaluate(now)
    report = scaler.models["m"].report
    assert report["quantile"] == 0.99 and report["needed"] == tail_need
    assert report["probe_tokens"] == {"prompt": 32000, "cached": 0, "output": 4 * OUTPUT}
    assert report["tail_alone"]["meets_objective"]


def test_a_tail_too_long_for_any_instance_falls_back_to_the_mean_request() -> None:
    # a 100,000-token prompt takes seconds to prefill on an idle H100: more instances
    # cannot make it meet 1 s, so it must not ask for every instance there is
    view = _view(4, standby=8, slo_ttft_ms=1000.0)
    now = _mixed_load(view, 10.0, long_prompt=100_000)
    scaler = _scaler(view)
    scaler.evaluate(now)
    report = scaler.models["m"].report
    assert report["tail_alone"]["meets_objective"] is False
    assert report["tail_alone"]["ttft_s"] > 1.0
    assert report["quantile"] is None and report["probe_tokens"]["prompt"] < 100_000
    assert report["needed"] < 4, report
