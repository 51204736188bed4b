"""Helpers for the emulator tests: start ``loadgen emulate`` as a real subprocess on free
loopback ports, talk to it over HTTP, and always stop it (by its own PID)."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent


def free_port_range(count: int, attempts: int = 50) -> int:
    """A base port P such that P..P+count-1 are all free on 127.0.0.1 right now."""
    for _ in range(attempts):
        with socket.socket() as probe:  # let the kernel suggest a free region
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        base = base if base + count < 65000 else random.randint(20000, 60000)
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free port range")


@dataclass
class Emulator:
    """A running emulator process."""

    process: subprocess.Popen[str]
    base_port: int
    instances: int

    def url(self, instance: int = 0) -> str:
        return f"http://127.0.0.1:{self.base_port + instance}"


@contextmanager
def run_emulator(*flags: str, instances: int = 1,
                 startup_timeout: float = 20.0) -> Iterator[Emulator]:
    """Start ``loadgen emulate`` with ``flags``; wait until every instance is ready."""
    base = free_port_range(instances)
    cmd = [sys.executable, "-m", "loadgen.cli", "emulate", "--instances", str(instances),
           "--base-port", str(base), *flags]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # stderr goes to a file: a pipe nobody reads could fill up and block the emulator.
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=stderr, text=True)
        try:
            _wait_ready(process, base, instances, startup_timeout, stderr)
            yield Emulator(process, base, instances)
        finally:
            stop_process(process)


def stop_process(process: subprocess.Popen[str]) -> None:
    """SIGTERM the process we started, then SIGKILL it if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    if process.stdout is not None:
        process.stdout.close()


def _wait_ready(process: subprocess.Popen[str], base: int, instances: int,
                timeout: float, stderr: Any) -> None:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    ready = 0
    while ready < instances:
        line = process.stdout.readline()
        if not line:
            process.wait(timeout=5)
            stderr.seek(0)
            err = stderr.read()
            raise RuntimeError(f"emulator exited early ({process.poll()}): {err}")
        if "listening on" in line:
            ready += 1
        if time.monotonic() > deadline:
            raise RuntimeError("emulator did not start in time")
    # The line is printed after the site is bound; /health proves it answers.
    for i in range(instances):
        while True:
            try:
                with socket.create_connection(("127.0.0.1", base + i), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("emulator port not answering") from None
                time.sleep(0.05)


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


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (comments skipped)."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def metric(samples: dict[str, float], name: str, model: str = "tiny", **labels: str) -> float:
    """One sample with vLLM's ``engine="0",model_name=...`` labels (plus extra ones)."""
    extra = "".join(f',{k}="{v}"' for k, v in labels.items())
    return samples[f'{name}{{engine="0",model_name="{model}"{extra}}}']
