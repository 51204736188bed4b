"""Real nginx in front of two blockproxy processes, configured by examples/nginx.conf.

The ``nginx`` tier: deselected by the default ``pytest`` run, run by ``.ci/run`` (which
installs nginx) with ``pytest -m nginx``.  Backends are emulated vLLM instances, so only
nginx and blockproxy are under test here.  nginx runs as a non-daemon child with its own
prefix, config, pid and log files, on a free loopback port, stopped by PID.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import openai
import pytest

from loadgen.procs import wait_for
from tests.procs import (
    ROOT,
    Emulator,
    Proc,
    Proxy,
    free_ports,
    http_get,
    metric_value,
    write_backends,
)

pytestmark = pytest.mark.nginx

NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
MODEL = "tiny"


def nginx_config(example: str, listen_port: int, upstreams: Sequence[int]) -> str:
    """The shipped example with this test's listen port and blockproxy ports."""
    servers = [m for m in re.finditer(r"^(\s*)server 127\.0\.0\.1:\d+(.*);$", example, re.M)]
    assert len(servers) >= 2, "examples/nginx.conf: expected upstream server lines"
    indent, options = servers[0][1], servers[0][2]
    block = "\n".join(f"{indent}server 127.0.0.1:{p}{options};" for p in upstreams)
    text = example[:servers[0].start()] + block + example[servers[-1].end():]
    text, n = re.subn(r"listen 127\.0\.0\.1:\d+;", f"listen 127.0.0.1:{listen_port};", text)
    assert n == 1, "examples/nginx.conf: expected one listen line"
    return text


class Nginx(Proc):
    """``nginx -g 'daemon off;'`` under a prefix of its own, on a free loopback port."""

    def __init__(self, prefix: Path, upstreams: Sequence[int]) -> None:
        assert NGINX is not None
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.prefix = prefix
        prefix.mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_config((ROOT / "examples" / "nginx.conf").read_text(),
                                     self.port, upstreams))
        # As root, workers would switch to an unprivileged user that cannot enter pytest's
        # private temp directories; keep them as the test's user.
        globals_ = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")
        super().__init__([NGINX, "-p", str(prefix), "-c", str(conf), "-e",
                          str(prefix / "error.log"), "-g", globals_], prefix / "stdout.log")
        deadline = time.monotonic() + 10
        while True:
            if self.popen.poll() is not None:
                raise RuntimeError(f"nginx exited {self.popen.returncode}: {self.errors()}")
            try:
                if http_get(self.url + "/health", timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"nginx not answering: {self.errors()}")
            time.sleep(0.05)

    def errors(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""


def gossip_args(tmp: Path, gossip_ports: Sequence[int], mine: int) -> list[str]:
    """Gossip flags for proxy ``mine`` if this blockproxy has them, else none."""
    help_text = subprocess.run([sys.executable, "-m", "blockproxy", "serve", "--help"],
                               capture_output=True, text=True, cwd=ROOT).stdout
    flags = set(re.findall(r"--[a-z][a-z-]*", help_text))
    if "--gossip-bind" not in flags:
        return []
    args = ["--gossip-bind", f"127.0.0.1:{gossip_ports[mine]}"]
    peers = ",".join(f"127.0.0.1:{p}" for i, p in enumerate(gossip_ports) if i != mine)
    if "--gossip-seeds" in flags:
        args += ["--gossip-seeds", peers]
    if "--gossip-key-file" in flags:
        key = tmp / "gossip.key"
        key.write_text("test-tier-shared-key\n")
        args += ["--gossip-key-file", str(key)]
    return args


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("nginx")


@pytest.fixture(scope="module")
def emulator(tmp_module: Path):
    with Emulator(tmp_module, instances=2) as emu:
        yield emu


@pytest.fixture(scope="module")
def proxies(tmp_module: Path, emulator: Emulator):
    backends = write_backends(tmp_module / "backends.yaml",
                              [{"url": u, "name": f"i{n}"} for n, u in enumerate(emulator.urls)])
    gossip_ports = free_ports(2)
    with Proxy(tmp_module, backends, gossip_args(tmp_module, gossip_ports, 0)) as a, \
            Proxy(tmp_module, backends, gossip_args(tmp_module, gossip_ports, 1)) as b:
        yield [a, b]


@pytest.fixture(scope="module")
def nginx(tmp_module: Path, proxies: list[Proxy]):
    if NGINX is None:
        pytest.skip("nginx is not installed (apt-get install nginx); .ci/run installs it")
    with Nginx(tmp_module / "nginx", [p.port for p in proxies]) as server:
        yield server


def running(url: str) -> float:
    return metric_value(http_get(url + "/metrics")[1].decode(), "vllm:num_requests_running")



def test_openai_client_through_nginx(nginx: Nginx, proxies: list[Proxy]):
    client = openai.OpenAI(base_url=nginx.url + "/v1", api_key="unused", max_retries=0)
    for _ in range(4):
        out = client.completions.create(model=MODEL, prompt="one two three", max_tokens=5,
                                        extra_body={"ignore_eos": True})
        assert out.usage is not None and out.usage.completion_tokens == 5
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True,
        extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices).split()
    # Both proxies took requests (least_conn over idle upstreams alternates).
    served = [metric_value(p.metrics(), "blockproxy_requests_total") for p in proxies]
    assert all(n >= 1 for n in served), served


async def test_stream_chunks_reach_the_client_as_generated(nginx: Nginx):
    """With proxy_buffering off every token arrives when it is generated, not at the end."""
    body = {"model": MODEL, "prompt": "tell me a story", "max_tokens": 300, "stream": True,
            "ignore_eos": True}
    arrivals: list[float] = []
    async with aiohttp.ClientSession() as session:
        t0 = time.monotonic()
        async with session.post(nginx.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            buf = b""
            async for data in resp.content.iter_any():
                buf += data
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    if event.startswith(b"data: {"):
                        arrivals.append(time.monotonic() - t0)
    assert len(arrivals) == 300
    first, last = arrivals[0], arrivals[-1]
    # 300 emulated H100 decode steps take ~2 s; a buffering hop would deliver the first
    # chunk together with (or a few KiB before) the last.
    assert last > 1.0
    assert first < last / 4, (first, last)
    assert arrivals[len(arrivals) // 2] < last * 0.8


async def test_client_disconnect_at_nginx_cancels_upstream(nginx: Nginx, proxies: list[Proxy],
                                                           emulator: Emulator):
    cancelled_before = sum(metric_value(p.metrics(), "blockproxy_cancellations_total")
                           for p in proxies)
    body = {"model": MODEL, "prompt": "tell me a story", "max_tokens": 5000, "stream": True,
            "ignore_eos": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(nginx.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200
            for _ in range(3):
                assert (await resp.content.readuntil(b"\n\n")).startswith(b"data: {")
            assert sum(running(u) for u in emulator.urls) == 1
            if all(p.cluster().get("gossip") for p in proxies):
                # With gossip each proxy's view holds the request, whichever one took it.
                assert await wait_for(lambda: all(
                    sum(i["active_requests"] for i in p.cluster()["instances"]) == 1
                    for p in proxies))
    # The client is gone: nginx closes its upstream connection, the proxy aborts on vLLM.
    assert await wait_for(lambda: sum(running(u) for u in emulator.urls) == 0)
    assert await wait_for(lambda: all(i["active_requests"] == 0 for p in proxies
                                      for i in p.cluster()["instances"]))
    cancelled = sum(metric_value(p.metrics(), "blockproxy_cancellations_total") for p in proxies)
    assert cancelled == cancelled_before + 1
