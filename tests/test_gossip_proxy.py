"""Several real ``blockproxy serve`` processes gossiping over UDP on loopback."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from blockproxy.gossip import codec
from loadgen.procs import free_udp_ports, wait_for
from tests.procs import Emulator, Proxy, metric_value, write_backends

KEY = b"test-key-0123456789abcdef-0123456789"
GOSSIP = ["--gossip-snapshot-interval", "0.2", "--scrape-interval", "0"]


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gossip")


@pytest.fixture(scope="module")
def emulator(tmp_module: Path):
    # Slow enough (time scale 20) that a 30-token request lasts a few seconds.
    with Emulator(tmp_module, instances=2, time_scale=20) as emu:
        yield emu


@pytest.fixture(scope="module")
def backends(tmp_module: Path, emulator: Emulator) -> Path:
    return write_backends(tmp_module / "b.yaml", [{"url": u, "name": f"i{i}"}
                                                 for i, u in enumerate(emulator.urls)])


@pytest.fixture(scope="module")
def key_file(tmp_module: Path) -> Path:
    path = tmp_module / "key"
    path.write_bytes(KEY + b"\n")
    return path


def mesh_args(ports: list[int], i: int, key_file: Path, *extra: str) -> list[str]:
    seeds = ",".join(f"127.0.0.1:{p}" for j, p in enumerate(ports) if j != i)
    return ["--gossip-bind", f"127.0.0.1:{ports[i]}", "--gossip-seeds", seeds,
            "--gossip-key-file", str(key_file), "--speed", "20", *GOSSIP, *extra]


def by_origin(proxy: Proxy) -> dict[str, int]:
    """Entries per origin over all instances, as the proxy's /debug/cluster shows them."""
    out: dict[str, int] = {}
    for inst in proxy.cluster()["instances"]:
        for origin, count in inst["by_origin"].items():
            out[origin] = out.get(origin, 0) + count
    return out



async def send(session: aiohttp.ClientSession, proxy: Proxy, tokens: int = 30) -> None:
    body = {"model": "tiny", "prompt": "hello " * 50, "max_tokens": tokens, "stream": True,
            "ignore_eos": True}
    async with session.post(proxy.url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        await resp.read()


async def converge(proxies: list[Proxy], sender: Proxy, count: int) -> None:
    origin = sender.cluster()["gossip"]["origin"]
    others = [p for p in proxies if p is not sender]
    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(send(session, sender)) for _ in range(count)]
        assert await wait_for(lambda: all(by_origin(p).get(origin) == count for p in others))
        await asyncio.gather(*tasks)
    assert await wait_for(lambda: all(not by_origin(p) for p in others), timeout=3.0)


@pytest.mark.parametrize("loss", [0.0, 0.3])
async def test_three_proxies_converge(tmp_module, backends, key_file, loss):
    ports = free_udp_ports(3)
    extra = ["--gossip-loss", str(loss)]
    proxies = [Proxy(tmp_module, backends, mesh_args(ports, i, key_file, *extra))
               for i in range(3)]
    try:
        await converge(proxies, proxies[0], 4)
        text = proxies[1].metrics()
        assert metric_value(text, "blockproxy_gossip_peers") == 2
        assert metric_value(text, "blockproxy_gossip_bytes_total", direction="in") > 0
        assert metric_value(text, "blockproxy_gossip_propagation_seconds_count") > 0
        if loss:
            assert metric_value(proxies[0].metrics(), "blockproxy_gossip_datagrams_total",
                                direction="out") > 0
    finally:
        for p in proxies:
            p.stop()
    assert "WITHOUT A KEY" not in proxies[0].log_path.read_text()


async def test_killed_proxy_expires_and_restart_replaces(tmp_module, backends, key_file):
    ports = free_udp_ports(2)
    a_args = mesh_args(ports, 0, key_file, "--gossip-id", "alpha", "--gossip-expiry", "1.5")
    b = Proxy(tmp_module, backends, mesh_args(ports, 1, key_file, "--gossip-expiry", "1.5"))
    a = Proxy(tmp_module, backends, a_args)
    try:
        origin = a.cluster()["gossip"]["origin"]
        session = aiohttp.ClientSession()
        tasks = [asyncio.create_task(send(session, a, tokens=200)) for _ in range(3)]
        assert await wait_for(lambda: by_origin(b).get(origin) == 3)
        a.signal(signal.SIGKILL)  # dies without a word: its entries must expire
        await asyncio.gather(*tasks, return_exceptions=True)
        assert await wait_for(lambda: origin not in by_origin(b), timeout=5.0)
        a.stop()
        # Same id, new incarnation, again with requests in flight; then kill and restart
        # at once: the restart replaces the old incarnation before any expiry could.
        a = Proxy(tmp_module, backends, a_args[:-2] + ["--gossip-expiry", "30"])
        tasks = [asyncio.create_task(send(session, a, tokens=200)) for _ in range(2)]
        assert await wait_for(lambda: by_origin(b).get(origin) == 2)
        old = b.cluster()["gossip"]["origins"][origin]["incarnation"]
        a.signal(signal.SIGKILL)
        await asyncio.gather(*tasks, return_exceptions=True)
        a.stop()
        a = Proxy(tmp_module, backends, a_args)
        assert await wait_for(lambda: b.cluster()["gossip"]["origins"].get(origin, {}).get(
            "incarnation", old) > old, timeout=3.0)
        assert origin not in by_origin(b)
        await session.close()
    finally:
        a.stop()
        b.stop()


async def test_bad_datagrams_rejected_and_counted(tmp_module, backends, key_file):
    port = free_udp_ports(1)[0]
    proxy = Proxy(tmp_module, backends, ["--gossip-bind", f"127.0.0.1:{port}",
                                          "--gossip-key-file", str(key_file), *GOSSIP])
    try:
        now = time.time_ns() // 1_000_000
        snap = [1, 0, 1, 0, [["i0", 1, 100, 10, 0, 0]]]
        good = codec.encode(KEY, 77, 1, 1, now, codec.SNAPSHOT, snap)
        sent = {
            "forged": [codec.encode(b"wrong-key-wrong-key", 77, 1, 2, now, codec.SNAPSHOT,
                                    snap), b"\x93" * 60],
            "replayed": [good],  # the second copy of good
            "malformed": [good[:20]],
            "oversized": [good + bytes(1300)],
            "clock": [codec.encode(KEY, 78, 1, 1, now - 60_000, codec.SNAPSHOT, snap)],
        }
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.sendto(good, ("127.0.0.1", port))
        for datagrams in sent.values():
            for d in datagrams:
                sock.sendto(d, ("127.0.0.1", port))
        sock.close()

        def counted() -> bool:
            text = proxy.metrics()
            return all(metric_value(text, "blockproxy_gossip_dropped_total",
                                    reason=r) == len(d) for r, d in sent.items())
        assert await wait_for(counted)
        assert by_origin(proxy) == {f"{77:016x}": 1}  # only the good one applied
        assert proxy.popen.poll() is None
    finally:
        proxy.stop()


async def test_no_key_is_refused_and_insecure_warns(tmp_module, backends):
    port = free_udp_ports(1)[0]
    done = subprocess.run([sys.executable, "-m", "blockproxy", "--backends", str(backends),
                           "--gossip-bind", f"127.0.0.1:{port}"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--gossip-key-file" in done.stderr
    proxy = Proxy(tmp_module, backends, ["--gossip-bind", f"127.0.0.1:{port}",
                                         "--gossip-insecure", *GOSSIP])
    proxy.stop()
    assert "WITHOUT A KEY" in proxy.log_path.read_text()


async def test_phantom_load_from_direct_traffic(tmp_module, backends, emulator):
    proxy = Proxy(tmp_module, backends, ["--scrape-interval", "0.2"])
    try:
        async with aiohttp.ClientSession() as session:
            body = {"model": "tiny", "prompt": "x " * 20, "max_tokens": 60, "stream": True,
                    "ignore_eos": True}

            async def direct() -> None:  # bypasses the proxy
                async with session.post(emulator.urls[1] + "/v1/completions",
                                        json=body) as resp:
                    await resp.read()
            tasks = [asyncio.create_task(direct()) for _ in range(3)]

            def phantoms(n: int) -> bool:
                inst = next(i for i in proxy.cluster()["instances"] if i["name"] == "i1")
                return inst["by_origin"].get("phantom", 0) == n
            assert await wait_for(lambda: phantoms(3), timeout=5.0)
            text = proxy.metrics()
            assert metric_value(text, "blockproxy_phantom_requests", instance="i1") == 3
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            assert await wait_for(lambda: phantoms(0), timeout=5.0)
    finally:
        proxy.stop()


def test_debug_cluster_lists_gossip(tmp_module, backends, key_file):
    ports = free_udp_ports(1)
    proxy = Proxy(tmp_module, backends, mesh_args(ports, 0, key_file))
    try:
        info = proxy.cluster()
        assert info["gossip"]["address"] == ["127.0.0.1", ports[0]]
        assert all("by_origin" in i for i in info["instances"])
        json.dumps(info)
    finally:
        proxy.stop()
