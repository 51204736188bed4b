"""Real processes on loopback for tests: emulated vLLM instances and blockproxy.

Built on the project's one process helper, :mod:`loadgen.procs`: every process is started
by PID and stopped by the same handle, also when a test fails (use them through fixtures
or ``with``).
"""

from __future__ import annotations

import json
import shlex
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from loadgen import promtext
from loadgen.procs import (
    ChildProcess,
    command,
    free_port_range,
    free_ports,
    http_get,
    wait_healthy_blocking,
)

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["ROOT", "Emulator", "Proc", "Proxy", "complete", "free_ports", "http_get",
           "metric_value", "write_backends"]


class Proc(ChildProcess):
    """A child process whose output goes to ``log``, stopped on exit (SIGTERM, SIGKILL)."""

    def __init__(self, args: Sequence[str], log: Path, env: dict[str, str] | None = None
                 ) -> None:
        super().__init__(args, log.stem, log.parent, env)


class Emulator(Proc):
    """``loadgen emulate`` with N instances on consecutive ports."""

    def __init__(self, tmp: Path, instances: int = 2, args: Sequence[str] = (),
                 profile: str = "llama-3.1-8b-h100-tp1", time_scale: float = 1.0,
                 base_port: int | None = None) -> None:
        self.base_port = base_port or free_port_range(instances)
        self.urls = [f"http://127.0.0.1:{self.base_port + i}" for i in range(instances)]
        super().__init__([*command("loadgen"), "emulate",
                          "--instances", str(instances), "--base-port", str(self.base_port),
                          "--profile", profile, "--time-scale", str(time_scale),
                          "--stall-prob", "0", *args],
                         tmp / f"emulator-{self.base_port}.log")
        try:
            wait_healthy_blocking(self.urls, [self], timeout=20.0)
        except Exception:
            self.stop()
            raise

    @classmethod
    def on_port(cls, tmp: Path, port: int) -> Emulator:
        """One instance on a given port (to bring a stopped one back)."""
        return cls(tmp, instances=1, base_port=port)


class Proxy(Proc):
    """``blockproxy serve`` on a free port (leaving at once on SIGTERM unless ``args`` give
    a ``--drain-grace``), optionally under an open-files limit."""

    def __init__(self, tmp: Path, backends: str | Path, args: Sequence[str] = (),
                 env: dict[str, str] | None = None, nofile: int | None = None) -> None:
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        grace = [] if "--drain-grace" in args else ["--drain-grace", "0"]
        cmd = [*command("blockproxy"), "serve", "--backends", str(backends),
               "--port", str(self.port), *grace, *args]
        if nofile is not None:
            cmd = ["sh", "-c", f"ulimit -n {nofile} && exec {shlex.join(cmd)}"]
        super().__init__(cmd, tmp / f"proxy-{self.port}.log", env)
        try:
            wait_healthy_blocking([self.url], [self], timeout=20.0)
        except Exception:
            print(self.output())
            self.stop()
            raise

    # Generous timeouts: in the real-vLLM tier both cores are busy with vLLM servers.
    def cluster(self) -> dict[str, Any]:
        return json.loads(http_get(self.url + "/debug/cluster", timeout=10.0)[1])

    def metrics(self) -> str:
        return http_get(self.url + "/metrics", timeout=10.0)[1].decode()


def write_backends(path: Path, entries: Sequence[dict[str, Any]]) -> Path:
    """A YAML backends file (JSON is valid YAML)."""
    path.write_text(json.dumps({"backends": list(entries)}))
    return path


def complete(url: str, max_tokens: int = 4, timeout: float = 30.0) -> dict[str, Any]:
    """One non-streaming completion of exactly ``max_tokens`` tokens through ``url``."""
    request = urllib.request.Request(
        url + "/v1/completions", method="POST",
        data=json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": max_tokens,
                         "ignore_eos": True}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return json.loads(resp.read())


def metric_value(text: str, name: str, **labels: str) -> float:
    """First sample of ``name`` whose labels include ``labels``, in Prometheus text."""
    value = promtext.find(text, name, **labels)
    if value is None:
        pytest.fail(f"metric {name}{labels} not found")
    return value
