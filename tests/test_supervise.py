"""Background loops under the supervisor: a crash is logged, counted and restarted."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import CollectorRegistry, Counter

from blockproxy import supervise
from blockproxy.supervise import Supervisor


def _counter() -> Counter:
    return Counter("restarts", "test", ["task"], registry=CollectorRegistry())


async def test_a_crashing_tick_is_logged_counted_and_restarted(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(supervise, "BACKOFF_S", 0.001)
    calls = []

    def tick() -> None:
        calls.append(1)
        if len(calls) <= 3:
            raise RuntimeError("boom")

    restarts = _counter()
    sup = Supervisor(restarts)
    sup.every("flaky", 0.001, tick)
    with caplog.at_level(logging.ERROR, logger="blockproxy.supervise"):
        sup.start()
        for _ in range(200):
            if len(calls) >= 6:
                break
            await asyncio.sleep(0.005)
        await sup.stop()
    assert len(calls) >= 6  # it kept running after three crashes
    assert restarts.labels("flaky")._value.get() == 3
    assert sum("background loop flaky crashed" in r.message for r in caplog.records) == 3
    assert not sup.tasks


async def test_stop_cancels_a_long_running_loop() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.sleep(3600)

    restarts = _counter()
    sup = Supervisor(restarts)
    sup.loop("forever", forever)
    sup.start()
    await asyncio.wait_for(started.wait(), 5)
    task = sup.tasks["forever"]
    await sup.stop()
    assert task.cancelled()
    assert restarts.labels("forever")._value.get() == 0
