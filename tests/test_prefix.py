"""Prefix caching in the proxy: the block hash chain (compiled and twin), the prompt bytes
it covers, the per-instance cache model, and the policies that read it."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from blockproxy import profile as profiles
from blockproxy.backends import BackendSpec
from blockproxy.cluster import prefix as cache_model
from blockproxy.cluster.instance import Instance
from blockproxy.cluster.prefix import PrefixCachePy
from blockproxy.cluster.requests import PHANTOM
from blockproxy.request import CHAT, COMPLETIONS, RequestInfo, parse_request
from blockproxy.routing import prefix
from blockproxy.routing.job import Job
from blockproxy.routing.policies import make_policy

try:
    from blockproxy._fastcore import PrefixCacheC
    from blockproxy._fastcore import prefix_hashes as compiled
except ImportError:
    compiled = PrefixCacheC = None

#: the cache model's implementations: every behaviour test runs on each
CACHES = [PrefixCachePy] + ([PrefixCacheC] if PrefixCacheC is not None else [])


def test_the_cache_model_sizes_blocks_as_the_hasher_cuts_them() -> None:
    assert cache_model.TOKENS_PER_BLOCK == prefix.BLOCK_BYTES // prefix.ID_BYTES


@pytest.mark.skipif(compiled is None, reason="extension not built")
@pytest.mark.parametrize("seed", range(5))
def test_compiled_and_twin_hashes_agree(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(20):
        data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 3000)))
        block = rng.choice([8, 16, 64, 128])
        limit = rng.choice([0, 1, 5, 1000])
        assert compiled(data, block, limit) == prefix.prefix_hashes_py(data, block, limit)
    with pytest.raises(ValueError):
        compiled(b"x" * 64, 12, 10)


def test_hashes_are_a_chain_over_whole_blocks() -> None:
    h = prefix.prefix_hashes
    base = bytes(range(256)) * 4  # 1024 bytes: 8 blocks of 128
    hashes = h(base, 128, 100)
    assert len(hashes) == 8 and len(set(hashes)) == 8
    assert all(0 <= x < 1 << 63 for x in hashes)
    assert h(base + b"tail", 128, 100) == hashes  # a partial last block has no hash
    assert h(base[:300], 128, 100) == hashes[:2]
    changed = bytearray(base)
    changed[3 * 128 + 5] ^= 1
    other = h(bytes(changed), 128, 100)
    assert other[:3] == hashes[:3] and all(a != b for a, b in zip(other[3:], hashes[3:]))
    assert h(base, 128, 3) == hashes[:3]
    # the same bytes behind another start do not collide: the chain covers the whole prefix
    assert h(b"z" * 128 + base, 128, 100)[1:] != hashes[:8]


def _info(route: str, body: dict[str, Any]) -> RequestInfo:
    return parse_request(route, orjson.dumps(body))


def test_chat_turns_extend_the_previous_turns_bytes() -> None:
    turn1 = [{"role": "system", "content": "You are terse. " * 20},
             {"role": "user", "content": "hello " * 40}]
    turn2 = [*turn1, {"role": "assistant", "content": "hi " * 30},
             {"role": "user", "content": [{"type": "text", "text": "and more " * 30}]}]
    a = prefix.prompt_bytes(_info(CHAT, {"model": "m", "messages": turn1}))
    b = prefix.prompt_bytes(_info(CHAT, {"model": "m", "messages": turn2}))
    assert a is not None and b is not None and not a[1]
    assert b[0].startswith(a[0]) and len(b[0]) > len(a[0])
    ba = prefix.prompt_blocks(_info(CHAT, {"model": "m", "messages": turn1}))
    bb = prefix.prompt_blocks(_info(CHAT, {"model": "m", "messages": turn2}))
    assert ba and bb and bb.hashes[:len(ba.hashes)] == ba.hashes


def test_completions_prompts_text_ids_and_batches() -> None:
    text = prefix.prompt_bytes(_info(COMPLETIONS, {"model": "m", "prompt": "é" * 10}))
    assert text == (("é" * 10).encode(), False)
    ids = prefix.prompt_blocks(_info(COMPLETIONS, {"model": "m", "prompt": list(range(100))}))
    assert ids is not None and ids.token_ids and len(ids.hashes) == 100 * 4 // 128
    assert prefix.prompt_blocks(_info(COMPLETIONS, {"model": "m", "prompt": ["a", "b"]})) \
        is None
    assert prefix.prompt_blocks(_info(COMPLETIONS, {"model": "m", "prompt": "short"})) is None


def test_a_huge_prompt_hashes_a_bounded_number_of_blocks() -> None:
    info = _info(COMPLETIONS, {"model": "m", "prompt": "a" * (4 << 20)})
    blocks = prefix.prompt_blocks(info)
    assert blocks is not None and len(blocks.hashes) == prefix.MAX_BLOCKS


# ---- the cache model ---------------------------------------------------------------------


@pytest.mark.parametrize("PrefixCache", CACHES)
def test_lookup_finds_the_longest_cached_run_of_leading_blocks(PrefixCache: Any) -> None:
    cache = PrefixCache(100)
    cache.acquire([1, 2, 3, 4])
    assert cache.match([1, 2, 3, 4, 5, 6]) == 4
    assert cache.match([1, 2, 9]) == 2
    assert cache.match([9, 1, 2]) == 0
    assert cache.match([]) == 0


@pytest.mark.parametrize("PrefixCache", CACHES)
def test_held_blocks_are_never_evicted_and_free_ones_go_tail_first(PrefixCache: Any) -> None:
    cache = PrefixCache(6)
    cache.acquire([1, 2, 3, 4])
    cache.acquire([10, 11, 12, 13])  # over capacity, but everything is held
    assert len(cache) == 8 and cache.match([1, 2, 3, 4]) == 4
    cache.release([1, 2, 3, 4])  # free queue: 4, 3, 2, 1 (the tail first)
    assert len(cache) == 6 and cache.match([1, 2, 3, 4]) == 2  # 4 and 3 went first
    assert cache.match([10, 11, 12, 13]) == 4
    cache.release([10, 11, 12, 13])
    cache.acquire([20, 21, 22, 23, 24])  # needs room: oldest free blocks go
    assert cache.match([20, 21, 22, 23, 24]) == 5
    assert cache.match([1, 2]) == 0  # 2 and 1 were freed before 13..10
    assert cache.match([10]) == 1
    assert cache.evictions == 7  # 4, 3, then 2, 1, 13, 12, 11


@pytest.mark.parametrize("PrefixCache", CACHES)
def test_shared_blocks_are_counted_per_holder(PrefixCache: Any) -> None:
    cache = PrefixCache(3)
    cache.acquire([1, 2])
    cache.acquire([1, 2, 3])
    cache.release([1, 2])
    cache.acquire([7, 8])  # 1 and 2 are still held by the second request
    assert cache.match([1, 2, 3]) == 3
    cache.clear()
    assert len(cache) == 0 and cache.match([1]) == 0
    cache.release([1, 2, 3])  # a request that ends after a clear changes nothing
    assert len(cache) == 0


@pytest.mark.skipif(PrefixCacheC is None, reason="extension not built")
@pytest.mark.parametrize("seed", range(8))
def test_compiled_and_twin_cache_models_agree(seed: int) -> None:
    """Random acquire / release / insert / remove / match / clear / resize sequences give the same
    results and the same state (free blocks in eviction order, held blocks with their
    counts), step by step, through table growth and node reuse."""
    rng = random.Random(seed)
    capacity = rng.choice([1, 5, 40, 300])
    twin, comp = PrefixCachePy(capacity), PrefixCacheC(capacity)
    keys = [rng.getrandbits(63) for _ in range(rng.choice([20, 200, 2000]))]
    held: list[list[int]] = []
    for _ in range(600):
        op = rng.random()
        if op < 0.35:
            start = rng.randrange(len(keys))
            blocks = keys[start:start + rng.randint(0, 60)]
            assert comp.acquire(blocks) == twin.acquire(blocks)
            held.append(blocks)
        elif op < 0.6 and held:
            blocks = held.pop(rng.randrange(len(held)))
            comp.release(blocks)
            twin.release(blocks)
        elif op < 0.7:
            blocks = rng.sample(keys, rng.randint(0, min(30, len(keys))))
            comp.insert(blocks)
            twin.insert(blocks)
        elif op < 0.75:
            blocks = rng.sample(keys, rng.randint(0, min(30, len(keys))))
            comp.remove(blocks)
            twin.remove(blocks)
        elif op < 0.95:
            start = rng.randrange(len(keys))
            blocks = keys[start:start + rng.randint(0, 80)]
            assert comp.match(blocks) == twin.match(blocks)
        elif op < 0.98:
            comp.capacity = twin.capacity = rng.choice([1, 5, 40, 300])
        else:
            comp.clear()
            twin.clear()
        assert comp.snapshot() == twin.snapshot()
        assert comp.describe() == twin.describe() and len(comp) == len(twin)
        probe = rng.choice(keys)
        assert (probe in comp) == (probe in twin)


@pytest.mark.skipif(PrefixCacheC is None, reason="extension not built")
def test_compiled_cache_model_tells_apart_keys_that_share_a_slot_and_tag() -> None:
    """The compiled table keeps the upper half of each key's mixed hash as a tag beside
    the node: keys whose mixed hashes agree in all those bits (same home slot, same tag)
    must still be told apart by the key itself, through lookups, evictions and removal."""
    mix = 0x9E3779B97F4A7C15
    inverse = pow(mix, -1, 1 << 64)
    # 63-bit keys (as the hasher makes) whose mixed hashes agree in their upper 32 bits
    keys = [k for k in (((0x5DEECE66 << 32 | low) * inverse) % (1 << 64)
                        for low in range(1, 100)) if k < 1 << 63][:6]
    twin, comp = PrefixCachePy(4), PrefixCacheC(4)
    for cache in (twin, comp):
        assert cache.acquire(keys[:3]) == keys[:3]
        assert cache.match(keys[:3]) == 3 and cache.match(keys[3:]) == 0
        cache.release(keys[:3])  # free, oldest first: keys[2], keys[1], keys[0]
        assert cache.acquire(keys[3:]) == keys[3:]  # evicts keys[2] and keys[1]
        cache.remove([keys[0]])
        cache.release(keys[3:])
    assert comp.snapshot() == twin.snapshot() == (keys[:2:-1], {})
    assert [k in comp for k in keys] == [False, False, False, True, True, True]


# ---- instances and policies ---------------------------------------------------------------

PROFILE = profiles.load_profile("llama-3.1-8b-h100-tp1")


def _instances(n: int) -> list[Instance]:
    return [Instance(BackendSpec(url=f"http://127.0.0.1:{9000 + i}", name=f"i{i}"), PROFILE)
            for i in range(n)]


def _job(hashes: list[int], prompt_tokens: int = 4000, per_block: float = 32.0) -> Job:
    return Job(prompt_tokens, 50, hashes, per_block)


def test_cached_tokens_are_whole_engine_blocks_below_the_prompt() -> None:
    inst = _instances(1)[0]
    hashes = list(range(1, 101))
    assert inst.cached_tokens(_job(hashes)) == 0
    inst.prefix.acquire(hashes[:10])
    assert inst.cached_tokens(_job(hashes, per_block=30.0)) == 300 // 16 * 16
    inst.prefix.acquire(hashes)
    assert inst.cached_tokens(_job(hashes, prompt_tokens=3200)) == 3199 // 16 * 16
    assert inst.cached_tokens(Job(100, 10)) == 0


def test_dispatch_holds_the_blocks_and_release_frees_them() -> None:
    inst = _instances(1)[0]
    job = _job(list(range(1, 51)))
    entry = inst.reserve_job(job, 0.0)
    assert inst.prefix.match(job.blocks or []) == 50 and inst.prefix.describe()["in_use"] == 50
    second = inst.reserve_job(job, 0.0)
    assert second.blocks and inst.pending_prefill_tokens() == 4000 + 4000 - 50 * 32 // 16 * 16
    inst.release(entry)
    inst.release(entry)  # twice: no double free
    assert inst.prefix.describe()["in_use"] == 50
    inst.release(second)
    assert inst.prefix.describe() == {"blocks": 50, "in_use": 0,
                                      "capacity": inst.prefix.capacity, "evictions": 0}


def test_requests_sharing_a_prefix_tell_the_simulator_its_blocks_are_held_once() -> None:
    inst = _instances(1)[0]
    system = list(range(1, 129))  # 4,096 tokens, 32 per block: 256 engine blocks
    first = inst.reserve_job(_job(system + [1001, 1002]), 0.0)
    assert inst.model.shared_blocks == 0  # nothing shared yet
    second = inst.reserve_job(_job(system + [2001]), 0.0)
    third = inst.reserve_job(_job(system + [3001, 3002, 3003]), 0.0)
    assert inst.model.shared_blocks == 2 * 128 * 32 // 16  # the system prompt twice more
    inst.release(second)
    inst.release(second)  # twice: counted once
    assert inst.model.shared_blocks == 128 * 32 // 16
    inst.release(first)
    inst.release(third)
    assert inst.model.shared_blocks == 0
    # Running requests holding the same 4,096-token prefix: the engine holds it once, so a
    # new request is not predicted to wait for KV blocks the simulation would count twice.
    small = Instance(BackendSpec(url="http://127.0.0.1:9100", name="s", num_gpu_blocks=800),
                     PROFILE)
    entries = [small.reserve_job(_job(system + [9000 + i], prompt_tokens=4200), 0.0)
               for i in range(3)]
    for e in entries:
        small.first_token(e, 0.0)
    waits = small.predict_job(_job(system + [9999], prompt_tokens=4200))
    small.model.shared_blocks = 0
    counted_twice = small.predict_job(_job(system + [9999], prompt_tokens=4200))
    assert waits.queue_delay < 0.1 < counted_twice.queue_delay


def test_other_proxies_requests_share_their_cached_prefix_as_this_proxys_do() -> None:
    # Four requests of this proxy sharing a 4,096-token system prompt: 3 of the 4 cached
    # prompts are held twice.  Another proxy's requests, whose blocks this proxy does not
    # know, are credited the same share of their cached tokens.
    inst = _instances(1)[0]
    system = list(range(1, 129))
    own = [inst.reserve_job(_job(system + [5000 + i], prompt_tokens=4200), 0.0)
           for i in range(4)]
    cached = sum(e.cached_tokens for e in own)
    assert cached == 3 * 4096 and inst.shared_fraction == pytest.approx(1.0)
    before = inst.model.shared_blocks
    assert before == 3 * 4096 // 16
    remote = [inst.requests.upsert_remote(7, i, 4200, 100, 0, 0, 0.0, cached_tokens=4096)
              for i in range(5)]
    assert inst.model.shared_blocks == before + 5 * 4096 // 16
    inst.requests.remove_remote(7, 0)
    inst.requests.remove_remote(7, 0)  # twice: counted once
    assert inst.model.shared_blocks == before + 4 * 4096 // 16
    # a phantom (load nobody gossiped) shares nothing
    inst.requests.upsert_remote(PHANTOM, 1, 4200, 100, 0, 0, 0.0, cached_tokens=4096)
    assert inst.model.shared_blocks == before + 4 * 4096 // 16
    # this proxy's requests end: the last share seen still applies to the others'
    for e in own:
        inst.release(e)
    assert inst.shared_fraction == pytest.approx(1.0)
    assert inst.model.shared_blocks == 4 * 4096 // 16
    for e in remote[1:]:
        inst.requests.remove_remote(e.origin, e.rid)
    assert inst.model.shared_blocks == 0
    # A proxy measures the share while it has 4 requests or more here: one of these
    # cached the system prompt after its first holder ended, so half is held twice.
    half = _instances(1)[0]
    first = half.reserve_job(_job(system + [8001], prompt_tokens=4200), 0.0)
    half.reserve_job(_job(system + [8002], prompt_tokens=4200), 0.0)
    for i in range(3):
        half.reserve_job(_job(list(range(1000 * i + 900, 1000 * i + 1028)), 4200), 0.0)
    assert half.shared_fraction == pytest.approx(1.0)
    half.release(first)  # one holder left: nothing held twice, but 4,096 tokens cached
    assert half.shared_fraction == pytest.approx(0.0)
    half.reserve_job(_job(system + [8003], prompt_tokens=4200), 0.0)
    assert half.shared_fraction == pytest.approx(0.5)  # 4,096 of 8,192 cached held twice


def test_a_comeback_after_ejection_forgets_the_cache() -> None:
    inst = _instances(1)[0]
    inst.prefix.acquire([1, 2, 3])
    inst.record_failure(0.0, eject_after=1, probe_interval=1.0)
    inst.probe_succeeded()
    assert inst.prefix.match([1, 2, 3]) == 0


def test_block_sends_a_long_cached_prompt_where_it_is_cached() -> None:
    insts = _instances(4)
    hashes = list(range(1, 251))  # 8,000 tokens
    insts[2].prefix.acquire(hashes)
    insts[2].prefix.release(hashes)
    job = _job(hashes, prompt_tokens=8000)
    for name in ("block", "lmetric", "prefix_affinity"):
        chosen, _ = make_policy(name, random.Random(1)).choose(insts, job)
        assert chosen is insts[2], name
    # ... but not onto a queue that costs more than the hit saves
    for _ in range(40):
        insts[2].reserve(8000, 500, 0.0)
    chosen, _ = make_policy("block", random.Random(1)).choose(insts, job)
    assert chosen is not insts[2]
    chosen, _ = make_policy("prefix_affinity", random.Random(1)).choose(insts, job)
    assert chosen is not insts[2]  # 40 vs 0 requests passes its imbalance threshold


def test_block_prices_the_hit_against_the_queue_it_would_join() -> None:
    insts = _instances(2)
    hashes = list(range(1, 251))
    insts[0].prefix.acquire(hashes)
    insts[0].prefix.release(hashes)
    job = _job(hashes, prompt_tokens=8000)
    cached = make_policy("block", random.Random(1)).choose(insts, job)[1]
    plain = insts[1].predict_job(job)
    assert cached is not None and cached.ttft < plain.ttft


# ---- through the proxy, in front of real emulated instances --------------------------------


@pytest.fixture
async def two_instances(aiohttp_server: Any) -> Any:
    import argparse
    import asyncio

    from loadgen import emulate
    from loadgen.emulator.server import create_app

    parser = argparse.ArgumentParser()
    emulate.add_arguments(parser)
    args = parser.parse_args(["--instances", "2", "--time-scale", "0.05", "--stall-prob", "0",
                              "--seed", "1"])
    insts = emulate.build_instances(args)
    engines = [asyncio.create_task(i.engine.run()) for i in insts]
    servers = [await aiohttp_server(create_app(i)) for i in insts]
    yield [str(s.make_url("")).rstrip("/") for s in servers]
    for e in engines:
        e.cancel()
    await asyncio.gather(*engines, return_exceptions=True)


async def test_a_conversation_stays_where_its_history_is_cached(two_instances: list[str],
                                                                aiohttp_client: Any) -> None:
    from blockproxy.config import ProxyConfig
    from blockproxy.front.app import Proxy
    from loadgen import promtext

    config = ProxyConfig(backends="(in process)", scrape_interval=0.0, policy="block")
    proxy = Proxy(config, [BackendSpec(url=u, name=f"i{n}", models=("tiny",))
                           for n, u in enumerate(two_instances)])
    client = await aiohttp_client(proxy.make_app())
    history: list[dict[str, str]] = [{"role": "system", "content": "Be brief. " * 300}]
    for turn in range(6):
        history.append({"role": "user", "content": f"question {turn} " * 50})
        resp = await client.post("/v1/chat/completions", json={
            "model": "tiny", "messages": history, "max_tokens": 8, "stream": False})
        body = await resp.json()
        assert resp.status == 200, body
        history.append({"role": "assistant", "content": body["choices"][0]["message"]
                        ["content"]})
    decisions = {name: n for name, n in (
        (i.name, i.prefix.describe()["blocks"]) for i in proxy.view.instances.values())}
    # every turn went to the instance holding the history: only one model has blocks
    assert sorted(v > 0 for v in decisions.values()) == [False, True], decisions
    hits = 0.0
    for url in two_instances:
        async with client.session.get(url + "/metrics") as r:
            hits += promtext.total(await r.text(), "vllm:prefix_cache_hits_total")
    assert hits > 0


def test_the_cache_model_holds_what_the_kv_cache_holds_at_the_learned_ratio() -> None:
    inst = _instances(1)[0]
    kv = inst.limits.num_gpu_blocks * inst.limits.block_size
    inst.release(inst.reserve_job(_job([1, 2], per_block=25.6), 0.0))
    assert inst.prefix.capacity == int(kv / 25.6)
