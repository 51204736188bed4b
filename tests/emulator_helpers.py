"""Helpers for the emulator tests: start ``loadgen emulate`` as a real subprocess on free
loopback ports (:mod:`loadgen.procs`: stopped by its own PID), talk to it over HTTP."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from loadgen import promtext
from loadgen.procs import ChildProcess, command, free_port_range, wait_healthy_blocking


@dataclass
class Emulator:
    """A running emulator process."""

    process: ChildProcess
    base_port: int
    instances: int

    def url(self, instance: int = 0) -> str:
        return f"http://127.0.0.1:{self.base_port + instance}"


@contextmanager
def run_emulator(*flags: str, instances: int = 1,
                 startup_timeout: float = 20.0) -> Iterator[Emulator]:
    """Start ``loadgen emulate`` with ``flags``; wait until every instance is healthy."""
    base = free_port_range(instances)
    with tempfile.TemporaryDirectory(prefix="emulator-test-") as log_dir:
        process = ChildProcess([*command("loadgen"), "emulate", "--instances", str(instances),
                                "--base-port", str(base), *flags], "emulator", Path(log_dir))
        with process:
            emulator = Emulator(process, base, instances)
            wait_healthy_blocking([emulator.url(i) for i in range(instances)], [process],
                                  startup_timeout)
            yield emulator


async def health_ok(session: aiohttp.ClientSession, url: str) -> bool:
    async with session.get(f"{url}/health") as resp:
        return resp.status == 200 and await resp.read() == b""


async def stream_events(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                        headers: dict[str, str] | None = None
                        ) -> tuple[list[Any], list[float], aiohttp.ClientResponse]:
    """POST a streaming request; the decoded ``data:`` events and their arrival times."""
    events: list[Any] = []
    times: list[float] = []
    async with session.post(url, json=body, headers=headers) as resp:
        buffer = b""
        async for data in resp.content.iter_any():
            now = time.perf_counter()
            buffer += data
            while b"\n\n" in buffer:
                raw, buffer = buffer.split(b"\n\n", 1)
                assert raw.startswith(b"data: "), raw
                payload = raw[len(b"data: "):]
                events.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
                times.append(now)
        assert buffer == b""
    return events, times, resp


def parse_metrics(text: str) -> list[promtext.Sample]:
    """Prometheus text -> its samples."""
    return promtext.samples(text)


def metric(samples: list[promtext.Sample], name: str, model: str = "tiny",
           **labels: str) -> float:
    """One sample with exactly vLLM's ``engine="0",model_name=...`` labels (plus extra ones)."""
    wanted = {"engine": "0", "model_name": model, **labels}
    for sample in samples:
        if sample.name == name and sample.labels == wanted:
            return sample.value
    raise KeyError(f"{name}{wanted}")
