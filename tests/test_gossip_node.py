"""Gossipers in one event loop over real UDP on loopback, each with its own cluster view."""

from __future__ import annotations

import asyncio
import random
import socket

import pytest
from prometheus_client import CollectorRegistry

from blockproxy import simulator
from blockproxy.backends import BackendSpec
from blockproxy.cluster import LOCAL, PHANTOM, ClusterView
from blockproxy.cluster.scraper import MAX_PHANTOMS, Scraper, parse_vllm_gauges
from blockproxy.gossip import codec
from blockproxy.gossip.node import Gossiper
from loadgen.procs import free_udp_ports

KEY = b"0123456789abcdef0123456789abcdef"
NAMES = ("i0", "i1")


def view() -> ClusterView:
    v = ClusterView("llama-3.1-8b-h100-tp1")
    v.apply([BackendSpec(url=f"http://127.0.0.1:{9000 + i}", name=n)
             for i, n in enumerate(NAMES)])
    return v


def remote_rows(v: ClusterView) -> dict:
    out = {}
    for inst in v.instances.values():
        for e in inst.requests.entries:
            if e.origin != LOCAL:
                out[(e.origin, inst.name, e.rid)] = (
                    int(inst.requests.table[simulator.COL_STARTED, e.slot]),
                    int(inst.requests.table[simulator.COL_GENERATED, e.slot]))
    return out


async def eventually(check, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "not converged"
        await asyncio.sleep(0.01)


@pytest.fixture
async def mesh(request):
    loss = getattr(request, "param", 0.0)
    ports = free_udp_ports(3)
    nodes = []
    for i, port in enumerate(ports):
        seeds = ",".join(f"127.0.0.1:{p}" for p in ports if p != port)
        nodes.append(Gossiper(view(), CollectorRegistry(), bind=f"127.0.0.1:{port}",
                              seeds=seeds, key=KEY, origin=100 + i, loss=loss,
                              snapshot_interval=0.1, expiry=1.0, progress_tokens=1,
                              rng=random.Random(i)))
    tasks = []
    for n in nodes:
        await n.start()
        tasks.append(asyncio.create_task(n.run()))
    yield nodes
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for n in nodes:
        n.transport.close()


async def test_three_views_converge(mesh):
    a, b, c = mesh
    inst = a.view.instances["i0"]
    entries = [inst.reserve(100 + i, 50, 0.0) for i in range(3)]
    await eventually(lambda: len(remote_rows(b.view)) == 3 and len(remote_rows(c.view)) == 3)
    inst.first_token(entries[0], 1.0)
    inst.requests.add_tokens(entries[0], 9)
    await eventually(lambda: remote_rows(c.view)[(100, "i0", entries[0].rid)] == (1, 10))
    for e in entries:
        inst.release(e)
    await eventually(lambda: not remote_rows(b.view) and not remote_rows(c.view))
    # Remote entries are never re-gossiped: only the origin speaks for its requests.
    assert all(o == 100 for o, _, _ in remote_rows(b.view)) and not b.local


async def test_prefix_blocks_reach_the_other_views(mesh):
    from blockproxy.routing.job import Job

    a, b, c = mesh
    inst = a.view.instances["i0"]
    hashes = list(range(1000, 1250))  # 250 blocks: three BLOCKS ops
    first = inst.reserve_job(Job(8000, 50, hashes, 32.0), 0.0)
    assert first.new_blocks == hashes
    await eventually(lambda: b.view.instances["i0"].prefix.match(hashes) == 250
                     and c.view.instances["i0"].prefix.match(hashes) == 250)
    assert b.view.instances["i1"].prefix.match(hashes) == 0
    # a second request with the same prefix sends only its new blocks
    second = inst.reserve_job(Job(8100, 50, [*hashes, 7], 32.0), 0.0)
    assert second.new_blocks == [7]
    await eventually(lambda: c.view.instances["i0"].prefix.match([*hashes, 7]) == 251)
    inst.release(first)
    inst.release(second)


@pytest.mark.parametrize("mesh", [0.3], indirect=True)
async def test_converges_with_loss(mesh):
    a, b, c = mesh
    inst = a.view.instances["i1"]
    entries = [inst.reserve(100 + i, 50, 0.0) for i in range(40)]
    for e in entries[::2]:
        inst.first_token(e, 1.0)
        inst.requests.add_tokens(e, 4)
    want = {(100, "i1", e.rid): (int(bool(e.first_token_at)), e.generated) for e in entries}
    await eventually(lambda: remote_rows(b.view) == want and remote_rows(c.view) == want,
                     timeout=10)
    for e in entries[:30]:
        inst.release(e)
    want = {k: v for k, v in want.items() if k[2] in {e.rid for e in entries[30:]}}
    await eventually(lambda: remote_rows(b.view) == want and remote_rows(c.view) == want,
                     timeout=10)


async def test_bye_and_expiry(mesh):
    a, b, c = mesh
    a.view.instances["i0"].reserve(10, 5, 0.0)
    c.view.instances["i1"].reserve(10, 5, 0.0)
    await eventually(lambda: len(remote_rows(b.view)) == 2)
    a.stop()  # leaves with BYE: gone at once
    await eventually(lambda: [k[0] for k in remote_rows(b.view)] == [102], timeout=0.5)
    c.transport.close()  # dies silently: expires
    await eventually(lambda: not remote_rows(b.view), timeout=3.0)


async def test_rejected_datagrams_are_counted(mesh):
    _, b, _ = mesh
    addr = b.transport.address
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    now = __import__("time").time_ns() // 1_000_000
    good = codec.encode(KEY, 555, 1, 1, now, codec.SNAPSHOT, [1, 0, 1, 0, [["i0", 1, 5, 5, 0, 0]]])
    for data in (codec.encode(b"w" * 32, 555, 1, 2, now, codec.DELTA, [1, []]), good, good,
                 good[:10], b"garbage" * 10, good + bytes(1200)):
        sock.sendto(data, addr)
    sock.close()
    dropped = b.metrics.dropped

    def count(reason):
        return dropped.labels(reason)._value.get()
    # wrong key and garbage: forged; a truncated one too short to hold a tag: malformed
    await eventually(lambda: count("forged") == 2 and count("replayed") == 1
                     and count("oversized") == 1 and count("malformed") == 1)
    assert (555, "i0", 1) in remote_rows(b.view)  # the one good datagram applied


async def test_herding_two_proxies_bursts(mesh):
    """Two proxies taking simultaneous bursts, with gossip, spread them over instances."""
    from blockproxy.routing.job import Job
    from blockproxy.routing.policies import make_policy
    a, b, _ = mesh
    pa = make_policy("block", random.Random(1))
    pb = make_policy("block", random.Random(2))
    for _ in range(6):
        for node, pol in ((a, pa), (b, pb)):
            inst, _ = pol.choose(list(node.view.instances.values()), Job(2000, 200))
            inst.reserve(2000, 200, 0.0)
        await asyncio.sleep(0.03)
    await eventually(lambda: len(remote_rows(a.view)) == 6)
    counts = [inst.requests.n for inst in a.view.instances.values()]
    assert counts == [6, 6], counts


def test_scraper_phantoms():
    v = view()
    scraper = Scraper(v, None, CollectorRegistry(), 1.0)
    inst = v.instances["i0"]
    inst.reserve(100, 10, 0.0)
    text = ('vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
            'vllm:num_requests_waiting{engine="0",model_name="m"} 2.0\n'
            'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n')
    gauges = parse_vllm_gauges(text)
    assert gauges == {"vllm:num_requests_running": 3.0, "vllm:num_requests_waiting": 2.0,
                      "vllm:kv_cache_usage_perc": 0.25}
    assert scraper.apply(inst, gauges) == 0  # one excess could be a gossip delay
    assert scraper.apply(inst, gauges) == 4
    phantoms = [e for e in inst.requests.entries if e.origin == PHANTOM]
    assert inst.requests.n == 5 and sum(1 for e in phantoms if e.first_token_at) == 3
    assert scraper.apply(inst, {"vllm:num_requests_running": 2.0}) == 1
    assert scraper.apply(inst, {"vllm:num_requests_running": 1.0}) == 0
    assert inst.requests.n == 1


def test_compare_reads_gossip_metrics():
    from loadgen.compare import parse_gossip_metrics
    text = ('blockproxy_gossip_bytes_total{direction="out"} 1000.0\n'
            'blockproxy_gossip_bytes_total{direction="in"} 3000.0\n'
            'blockproxy_gossip_datagrams_total{direction="out"} 10.0\n'
            'blockproxy_gossip_propagation_seconds_bucket{le="0.001"} 50.0\n'
            'blockproxy_gossip_propagation_seconds_bucket{le="0.002"} 100.0\n'
            'blockproxy_gossip_propagation_seconds_bucket{le="+Inf"} 100.0\n')
    out = parse_gossip_metrics([text, text], duration_s=10.0, requests=20)
    assert out["bytes_out_per_proxy_per_s"] == 100.0 and out["bytes_out_per_request"] == 100.0
    assert out["p50_propagation_ms"] == pytest.approx(1.0)
    assert out["p99_propagation_ms"] == pytest.approx(1.98)


def test_scraper_clears_the_cache_model_of_a_restarted_instance():
    v = view()
    scraper = Scraper(v, None, CollectorRegistry(), 1.0)
    inst = v.instances["i0"]
    inst.prefix.acquire([1, 2, 3])
    page = ('# TYPE vllm:prompt_tokens counter\n'
            'vllm:prompt_tokens_total{engine="0",model_name="m"} %d\n')
    assert not scraper.restarted(inst, parse_vllm_gauges(page % 5000))
    assert not scraper.restarted(inst, parse_vllm_gauges(page % 6000))
    assert inst.prefix.match([1, 2, 3]) == 3
    assert scraper.restarted(inst, parse_vllm_gauges(page % 40))
    assert inst.prefix.match([1, 2, 3]) == 0


@pytest.mark.parametrize(("value", "phantoms"), [("+Inf", 1), ("NaN", 1), ("-5", 1),
                                               ("1e300", MAX_PHANTOMS)])
def test_scraper_survives_absurd_gauges(value: str, phantoms: int):
    """A gauge of inf or NaN is ignored, a negative one is zero, a huge one is capped: the
    scrape goes on and the view stays bounded."""
    v = view()
    scraper = Scraper(v, None, CollectorRegistry(), 1.0)
    inst = v.instances["i0"]
    page = (f"vllm:num_requests_running 1\nvllm:num_requests_waiting {value}\n"
            f"vllm:kv_cache_usage_perc {value}\n")
    gauges = parse_vllm_gauges(page)
    for _ in range(2):
        scraper.apply(inst, gauges)
    assert inst.requests.n == phantoms  # running 1 (+ waiting, when it is a number)
    assert scraper.kv_usage.get("i0", 0.0) <= 1.0


async def test_an_own_datagram_sent_back_does_not_silence_a_peer(mesh):
    """A captured datagram of this proxy's, re-sent with a peer's address as its source,
    must not make this proxy take that peer for itself and stop talking to it."""
    a, b, _ = mesh
    await eventually(lambda: b.transport.address in a.membership.peers())
    now = __import__("time").time_ns() // 1_000_000
    own = codec.encode(KEY, a.origin, a.incarnation, a.seq + 100, now, codec.DELTA, [0, []])
    a._received(own, b.transport.address)
    assert b.transport.address in a.membership.peers()
    assert b.transport.address not in a.membership.own


async def test_an_origin_is_bound_to_the_address_it_speaks_from(mesh):
    """A fresh (not yet seen) datagram of a peer's, re-sent from elsewhere, is refused:
    the origin speaks from its own address, and the sender does not become a peer."""
    a, b, _ = mesh
    await eventually(lambda: b.origin in a.state.origins)
    now = __import__("time").time_ns() // 1_000_000
    forged_from = ("127.0.0.1", 9)
    data = codec.encode(KEY, b.origin, b.incarnation, b.seq + 1000, now, codec.DELTA,
                        [10 ** 6, [[codec.DISPATCH, "i0", 77, 5000, 500, 0, 0]]])
    a._received(data, forged_from)
    assert a.metrics.dropped.labels("address")._value.get() == 1
    assert forged_from not in a.membership.peers()
    assert (b.origin, "i0", 77) not in remote_rows(a.view)


def test_gossip_without_a_key_is_refused_unless_insecure():
    from blockproxy.config import ProxyConfig
    from blockproxy.front.app import Proxy

    specs = [BackendSpec(url="http://127.0.0.1:9000", name="i0")]
    port = free_udp_ports(1)[0]
    with pytest.raises(ValueError, match="--gossip-key-file"):
        Proxy(ProxyConfig(gossip_bind=f"127.0.0.1:{port}"), specs)
    proxy = Proxy(ProxyConfig(gossip_bind=f"127.0.0.1:{port}", gossip_insecure=True), specs)
    assert proxy.gossip is not None and proxy.gossip.key == bytes(32)
