"""Real processes on loopback for tests: emulated vLLM instances and blockproxy.

Every process is started by PID and stopped by the same handle, also when a test fails
(use them through fixtures or ``with``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Sequence

import pytest

from loadgen.cluster import free_port_range

ROOT = Path(__file__).resolve().parent.parent


def free_ports(count: int) -> list[int]:
    """Ports free right now on 127.0.0.1 (consecutive when possible is not required)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            if http_get(url + "/health", timeout=1.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not healthy after {timeout}s")


class Proc:
    """A child process stopped on exit (SIGTERM, then SIGKILL)."""

    def __init__(self, args: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log
        self._log = open(log, "wb")
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.popen = subprocess.Popen(list(args), stdout=self._log, stderr=subprocess.STDOUT,
                                      env=full_env, cwd=ROOT)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> "Proc":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Emulator(Proc):
    """``loadgen emulate`` with N instances on consecutive ports."""

    def __init__(self, tmp: Path, instances: int = 2, args: Sequence[str] = (),
                 profile: str = "llama-3.1-8b-h100-tp1", time_scale: float = 1.0,
                 base_port: int | None = None) -> None:
        self.base_port = base_port or free_port_range(instances)
        self.urls = [f"http://127.0.0.1:{self.base_port + i}" for i in range(instances)]
        super().__init__([sys.executable, "-m", "loadgen.cli", "emulate",
                          "--instances", str(instances), "--base-port", str(self.base_port),
                          "--profile", profile, "--time-scale", str(time_scale),
                          "--stall-prob", "0", *args],
                         tmp / f"emulator-{self.base_port}.log")
        try:
            for url in self.urls:
                wait_healthy(url, self.popen)
        except Exception:
            self.stop()
            raise

    @classmethod
    def on_port(cls, tmp: Path, port: int) -> "Emulator":
        """One instance on a given port (to bring a stopped one back)."""
        return cls(tmp, instances=1, base_port=port)


class Proxy(Proc):
    """``blockproxy serve`` on a free port."""

    def __init__(self, tmp: Path, backends: str | Path, args: Sequence[str] = (),
                 env: dict[str, str] | None = None) -> None:
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__([sys.executable, "-m", "blockproxy", "serve", "--backends",
                          str(backends), "--port", str(self.port), *args],
                         tmp / f"proxy-{self.port}.log", env)
        try:
            wait_healthy(self.url, self.popen)
        except Exception:
            print(self.output())
            self.stop()
            raise

    # Generous timeouts: in the real-vLLM tier both cores are busy with vLLM servers.
    def cluster(self) -> dict:
        return json.loads(http_get(self.url + "/debug/cluster", timeout=10.0)[1])

    def metrics(self) -> str:
        return http_get(self.url + "/metrics", timeout=10.0)[1].decode()


def write_backends(path: Path, entries: Sequence[dict]) -> Path:
    """A YAML backends file (JSON is valid YAML)."""
    path.write_text(json.dumps({"backends": list(entries)}))
    return path


def metric_value(text: str, name: str, labels: str = "") -> float:
    """First sample of ``name`` (whose label set contains ``labels``) in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    pytest.fail(f"metric {name}{{{labels}}} not found")
