"""SLO admission: the queue's order, fairness, bounds and refusals (against a dispatch that
admits while it has free slots), then the whole proxy overloaded in front of an emulated
instance."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from blockproxy.backends import BackendSpec
from blockproxy.cluster.instance import Instance
from blockproxy.cluster.requests import Entry
from blockproxy.cluster.view import ClusterView
from blockproxy.config import ProxyConfig
from blockproxy.front.admission import Admission, priority_of
from blockproxy.front.app import Proxy
from blockproxy.metrics import Metrics
from blockproxy.request import ApiError
from loadgen import promtext

Client = TestClient[web.Request, web.Application]


class Slots:
    """Admits while fewer than ``free`` requests run (as an instance with that many free
    sequence slots is predicted in time); records who got in, in order."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.order: list[str] = []
        self.instance = _instance()

    def dispatch(self, name: str) -> Callable[[float, bool], Entry | None]:
        def attempt(budget: float, held: bool) -> Entry | None:
            assert budget > 0
            if self.free <= 0:
                return None
            self.free -= 1
            self.order.append(name)
            return self.instance.reserve(100, 10, time.perf_counter())
        return attempt


def _instance() -> Instance:
    view = ClusterView("llama-3.1-8b-h100-tp1")
    view.apply([BackendSpec(url="http://127.0.0.1:9", name="i0")])
    return view.instances["i0"]


def _admission(capacity: int = 64) -> tuple[Admission, Metrics]:
    metrics = Metrics(ClusterView("llama-3.1-8b-h100-tp1"))
    return Admission(capacity, metrics), metrics


def _outcomes(metrics: Metrics) -> dict[str, float]:
    text = metrics.render().decode()
    return {o: promtext.find(text, "blockproxy_admission_total", outcome=o) or 0.0
            for o in ("admitted", "held", "released", "rejected_full", "rejected_deadline",
                      "cancelled")}


def _admit(adm: Admission, slots: Slots, name: str, tenant: str = "",
           priority: int = 0, service: float = 0.001, arrived: float | None = None,
           slo: float = 5.0) -> asyncio.Task[Entry]:
    return asyncio.ensure_future(adm.admit(
        slots.dispatch(name), lambda: service, tenant, priority,
        time.monotonic() if arrived is None else arrived, slo))


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_admitted_at_once_then_held_and_released_in_deadline_order() -> None:
    adm, metrics = _admission()
    slots = Slots(1)
    first = await adm.admit(slots.dispatch("a"), lambda: 0.001, "", 0, time.monotonic(), 5.0)
    assert isinstance(first, Entry) and slots.order == ["a"]
    now = time.monotonic()
    # arrivals out of deadline order: c arrived earlier than b
    b = _admit(adm, slots, "b", arrived=now)
    c = _admit(adm, slots, "c", arrived=now - 1.0)
    await _settle()
    assert adm.held == 2 and not b.done() and not c.done()
    assert promtext.find(metrics.render().decode(), "blockproxy_admission_queue_depth") == 2
    slots.free = 1
    adm.poke()
    await asyncio.wait_for(c, 1)
    assert slots.order == ["a", "c"] and not b.done()
    slots.free = 1
    adm.poke()
    entry = await asyncio.wait_for(b, 1)
    assert slots.order == ["a", "c", "b"] and adm.held == 0
    assert entry.held_s > 0
    assert _outcomes(metrics) == {"admitted": 1, "held": 2, "released": 2,
                                  "rejected_full": 0, "rejected_deadline": 0, "cancelled": 0}


async def test_priority_goes_first_and_tenants_take_turns() -> None:
    adm, _ = _admission()
    slots = Slots(0)
    now = time.monotonic()
    tasks = [_admit(adm, slots, f"a{i}", tenant="A", arrived=now - 1 + i * 0.01)
             for i in range(4)]
    tasks += [_admit(adm, slots, f"b{i}", tenant="B", arrived=now + i * 0.01)
              for i in range(2)]
    tasks.append(_admit(adm, slots, "urgent", tenant="A", priority=5, arrived=now))
    await _settle()
    assert adm.held == 7
    slots.free = 7
    adm.poke()
    await asyncio.wait_for(asyncio.gather(*tasks), 1)
    # A's urgent request leads A's queue; A and B alternate while both wait
    assert slots.order == ["urgent", "b0", "a0", "b1", "a1", "a2", "a3"]


async def test_a_full_queue_refuses_and_a_new_tenant_pushes_out_the_largest() -> None:
    adm, metrics = _admission(capacity=3)
    slots = Slots(0)
    held = [_admit(adm, slots, f"a{i}", tenant="A") for i in range(3)]
    await _settle()
    over = _admit(adm, slots, "a3", tenant="A")
    with pytest.raises(ApiError) as err:
        await asyncio.wait_for(over, 1)
    assert err.value.status == 429 and err.value.type == "RateLimitError"
    assert err.value.headers is not None and int(err.value.headers["Retry-After"]) >= 1
    assert "full" in err.value.message
    other = _admit(adm, slots, "b0", tenant="B")
    await _settle()
    assert held[2].done() and isinstance(held[2].exception(), ApiError)  # A's latest
    assert held[2].exception().status == 429  # type: ignore[union-attr]
    assert adm.held == 3 and not other.done()
    slots.free = 3
    adm.poke()
    await asyncio.wait_for(asyncio.gather(other, held[0], held[1]), 1)
    assert slots.order == ["a0", "b0", "a1"]
    counts = _outcomes(metrics)
    assert counts["rejected_full"] == 2 and counts["released"] == 3


async def test_a_request_that_cannot_start_in_time_is_refused_with_retry_after() -> None:
    adm, metrics = _admission()
    slots = Slots(0)
    start = time.monotonic()
    task = _admit(adm, slots, "late", service=0.05, slo=0.15)
    with pytest.raises(ApiError) as err:
        await asyncio.wait_for(task, 2)
    waited = time.monotonic() - start
    # refused when its deadline came closer than the time an idle instance needs
    assert 0.08 <= waited <= 0.5, waited
    assert err.value.status == 429 and err.value.headers == {"Retry-After": "1"}
    assert adm.held == 0
    # and at once when even an idle instance is too slow
    with pytest.raises(ApiError):
        await asyncio.wait_for(_admit(adm, slots, "hopeless", service=0.2, slo=0.15), 0.05)
    assert _outcomes(metrics)["rejected_deadline"] == 2


async def test_a_client_leaving_while_held_leaves_the_queue() -> None:
    adm, metrics = _admission()
    slots = Slots(0)
    task = _admit(adm, slots, "gone")
    await _settle()
    assert adm.held == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert adm.held == 0 and _outcomes(metrics)["cancelled"] == 1
    slots.free = 1
    adm.poke()
    await asyncio.sleep(0.03)
    assert slots.order == []  # nothing was dispatched for it


def test_priority_header_is_checked() -> None:
    assert priority_of(None) == 0 and priority_of("7") == 7 and priority_of("-3") == -3
    for bad in ("x", "1.5", "1001", ""):
        with pytest.raises(ApiError) as err:
            priority_of(bad)
        assert err.value.status == 400


# ---- the proxy, overloaded -------------------------------------------------------------------
#: the emulated instance's time scale: 0.6x an H100's step times, so a burst outruns it
#: however fast this test's event loop (shared with the instance) accepts the requests
TIME_SCALE = 0.6


@pytest.fixture
async def overloaded(emulated: Callable[[float], Awaitable[str]],
                     aiohttp_client: Callable[..., Awaitable[Client]]
                     ) -> tuple[Client, Proxy]:
    url = await emulated(TIME_SCALE)
    # the proxy is told the instance's speed (no calibration)
    config = ProxyConfig(backends="(in process)", scrape_interval=0.0, speed=TIME_SCALE,
                         slo_ttft_ms=200.0, admission_queue=16, calibrate=False)
    proxy = Proxy(config, [BackendSpec(url=url, name="i0", models=("tiny",))])
    return await aiohttp_client(proxy.make_app()), proxy


#: a burst of 160 requests, all at once, each ~3,000 prompt tokens: a few meet the TTFT
#: objective, some are held, the rest are refused. (Measured on this machine: 4 of 160
#: served all at once; 94 with a 20 ms gap between them, as a loop ten times slower
#: would send them.)
N = 160
GAP = 0.0


async def _stream(client: Client, i: int, gap: float
                  ) -> tuple[int, dict[str, Any] | None, int, str]:
    await asyncio.sleep(i * gap)
    body = {"model": "tiny", "prompt": f"request {i} " + "word " * 3000, "max_tokens": 40,
            "ignore_eos": True, "stream": True}
    resp = await client.post("/v1/completions", json=body)
    if resp.status != 200:
        return resp.status, await resp.json(), 0, resp.headers.get("Retry-After", "")
    text = await resp.text()
    return 200, None, text.count('"text"'), ""


async def test_overload_is_held_then_refused_and_every_accepted_stream_completes(
        overloaded: tuple[Client, Proxy]) -> None:
    client, proxy = overloaded
    results = await asyncio.gather(*(_stream(client, i, GAP) for i in range(N)))
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] != 200]
    assert ok and refused, [r[0] for r in results]
    assert all(tokens == 40 for _, _, tokens, _ in ok)  # accepted means served whole
    for status, body, _, retry in refused:
        assert status == 429 and retry.isdigit() and int(retry) >= 1
        assert body is not None and body["error"]["type"] == "RateLimitError"
        assert body["error"]["code"] == 429
    text = (await (await client.get("/metrics")).text())
    counts = {o: promtext.find(text, "blockproxy_admission_total", outcome=o) or 0.0
              for o in ("admitted", "held", "released", "rejected_full",
                        "rejected_deadline", "cancelled")}
    assert counts["held"] > 0, counts
    assert counts["admitted"] + counts["released"] == len(ok), counts
    assert counts["rejected_full"] + counts["rejected_deadline"] == len(refused), counts
    # every request was admitted, held (then released or refused) or refused on arrival
    assert counts["held"] >= counts["released"], counts
    met = promtext.find(text, "blockproxy_slo_ttft_total", outcome="met") or 0.0
    missed = promtext.find(text, "blockproxy_slo_ttft_total", outcome="missed") or 0.0
    # (whether they met it depends on this test's one event loop, shared with the
    # emulated instance: the loadgen studies measure that, with processes of their own)
    assert met + missed == len(ok), (met, missed)
    assert promtext.find(text, "blockproxy_admission_queue_depth") == 0
    assert proxy.view.instances["i0"].active == 0
