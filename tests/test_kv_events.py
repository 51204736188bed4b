"""Exact mode: the engine's KV events drive the proxy's model of its prefix cache.

Unit tests of the event decoder and :class:`EngineBlocks`, of the emulator's publisher and
tokenizer file, and end-to-end runs with real processes: emulated instances publishing
events over ZeroMQ on loopback, and ``blockproxy serve`` following them.
"""

from __future__ import annotations

import asyncio
from array import array
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest

from blockproxy.backends import BackendsError, load_backends
from blockproxy.cluster.prefix import EngineBlocks, PrefixCachePy
from blockproxy.routing import prefix
from blockproxy.routing import tokenizer as proxy_tokenizer
from blockproxy.upstream.kv_events import apply_batch
from loadgen import tokenizer as words
from loadgen.cluster import EmulatedCluster, ProxyProcess
from loadgen.emulator.kvcache import KVCache
from loadgen.emulator.kvevents import KVEventPublisher
from loadgen.procs import free_ports

BS = 16


def _stored(hashes: list[Any], parent: Any, ids: list[int], array: bool = False) -> Any:
    if array:  # vLLM before 0.30: the tag, then the fields in order
        return ["BlockStored", hashes, parent, ids, BS, None, "GPU"]
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent,
            "token_ids": ids, "block_size": BS, "lora_id": None, "medium": "GPU",
            "lora_name": None}


def _batch(*events: Any) -> bytes:
    return msgpack.packb([1.0, list(events)])


@pytest.mark.parametrize("array", [False, True])
def test_stored_blocks_chain_to_the_hashes_of_the_prompt(array: bool) -> None:
    ids = list(range(100, 100 + 5 * BS + 3))  # 5 full blocks and a partial one
    blocks = EngineBlocks(PrefixCachePy(1000), 1000)
    # two events, the second chained to the first by the engine's (opaque) hashes
    apply_batch(blocks, _batch(_stored([b"e0", b"e1"], None, ids[:2 * BS], array)))
    apply_batch(blocks, _batch(_stored([b"e2", b"e3", b"e4"], b"e1", ids[2 * BS:5 * BS],
                                       array)))
    mine = prefix.token_hashes(ids, BS)
    assert len(mine) == 5 and blocks.cache.match(mine) == 5
    assert blocks.describe()["engine_blocks"] == 5
    # removal by the engine's hash: the chain is cut there
    apply_batch(blocks, _batch({"type": "BlockRemoved", "block_hashes": [b"e3"],
                                "medium": "GPU"}))
    assert blocks.cache.match(mine) == 3
    apply_batch(blocks, _batch({"type": "AllBlocksCleared"}))
    assert blocks.cache.match(mine) == 0 and len(blocks.own) == 0


def test_blocks_that_cannot_be_placed_are_skipped() -> None:
    blocks = EngineBlocks(PrefixCachePy(1000), 1000)
    ids = list(range(BS))
    apply_batch(blocks, _batch(_stored([7], 999, ids)))  # parent never seen
    lora = {**_stored([8], None, ids), "lora_name": "adapter"}
    cpu = {**_stored([9], None, ids), "medium": "CPU"}
    apply_batch(blocks, _batch(lora, cpu, "junk", [], {"type": 3}))
    assert len(blocks.cache) == 0 and blocks.orphans == 1
    for bad in (b"\xc1", msgpack.packb({"ts": 1}), msgpack.packb([1.0, 2])):
        with pytest.raises(ValueError):
            apply_batch(blocks, bad)


def test_lost_removals_cannot_grow_the_map_without_bound() -> None:
    blocks = EngineBlocks(PrefixCachePy(1000), max_blocks=10)
    for i in range(25):
        apply_batch(blocks, _batch(_stored([i], None, [i] * BS)))
    assert len(blocks.own) <= 10 and blocks.resets >= 1


def test_the_continued_chain_is_the_full_chain() -> None:
    ids = list(range(7 * BS))
    full = prefix.token_hashes(ids, BS)
    assert prefix.token_hashes(ids[3 * BS:], BS, parent=full[2]) == full[3:]
    assert prefix.prefix_hashes_py(array("i", ids).tobytes(), BS * 4, 100) == full


# ---- the emulator's side -----------------------------------------------------------------


class _Req:
    def __init__(self, tokens: list[Any]) -> None:
        self.prompt = tokens
        self.num_prompt_tokens = len(tokens)
        self.blocks: list[int] = []
        self.num_hashed_blocks = 0
        from loadgen.emulator.kvcache import prompt_block_hashes
        self.block_hashes = prompt_block_hashes(tokens, BS)


def test_the_emulator_reports_stores_and_evictions_as_vllm_does() -> None:
    events: list[Any] = []
    kv = KVCache(num_blocks=8, block_size=BS, events=events)
    a = _Req(words.make_words(5 * BS, seed=1))
    assert kv.allocate(a, a.num_prompt_tokens)
    kv.free(a)
    b = _Req(words.make_words(6 * BS, seed=2))
    assert kv.allocate(b, b.num_prompt_tokens)  # needs 6 blocks: 3 of a's are evicted
    pub = KVEventPublisher(f"tcp://127.0.0.1:{free_ports(1)[0]}", BS)
    try:
        batch = msgpack.unpackb(pub.encode(events), strict_map_key=False)
    finally:
        pub.close()
    stored = [e for e in batch[1] if e["type"] == "BlockStored"]
    removed = [e for e in batch[1] if e["type"] == "BlockRemoved"]
    assert [len(e["block_hashes"]) for e in stored] == [5, 6]
    assert stored[0]["parent_block_hash"] is None and stored[0]["block_size"] == BS
    assert stored[0]["token_ids"] == words.token_ids(a.prompt[:5 * BS])
    assert len(removed) == 1 and len(removed[0]["block_hashes"]) == 3
    # a's last blocks went first (freed tail first): its head survives
    assert set(removed[0]["block_hashes"]) == set(a.block_hashes[2:])
    # what the proxy makes of it: b's six blocks and a's first two
    model = EngineBlocks(PrefixCachePy(100), 100)
    apply_batch(model, msgpack.packb(batch))
    ids_a = words.token_ids(a.prompt)
    assert model.cache.match(prefix.token_hashes(ids_a, BS)) == 2
    assert model.cache.match(prefix.token_hashes(words.token_ids(b.prompt), BS)) == 6


async def test_the_tokenizer_files_tokenize_as_the_emulator_counts(tmp_path: Path) -> None:
    tok = proxy_tokenizer.load(str(words.write_tokenizer(tmp_path / "tok")))
    text = words.make_prompt(300, seed=3) + " notaword  bada\n keko"
    assert await tok.encode(text) == words.token_ids(words.completion_tokens(text))
    long = words.make_prompt(5000, seed=4)  # over INLINE_CHARS: encoded in a thread
    assert await tok.encode(long) == words.token_ids(words.completion_tokens(long))
    # the chat rule, as the template in tokenizer_config.json renders it
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": words.make_prompt(40, seed=5)},
        {"role": "user", "content": [{"type": "text", "text": "bada keko"},
                                     {"type": "image_url", "image_url": {"url": "x"}},
                                     {"type": "text", "text": "dufo"}]},
        {"role": "assistant", "content": None},
        {"role": "user", "content": words.make_prompt(30, seed=6)}]
    rendered = tok.render_chat({"messages": messages})
    assert rendered is not None
    assert await tok.encode(rendered, special=False) == \
        words.token_ids(words.chat_tokens(messages))
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        proxy_tokenizer.load(str(tmp_path / "missing.json"))


def test_a_chat_template_that_reads_parts_gets_them_and_others_get_text(tmp_path: Path) -> None:
    for template, expect in (
            ("{% for m in messages %}{{ m['content'] }}|{% endfor %}", "a\nb|"),
            ("{% for m in messages %}{% for p in m['content'] %}{{ p['text'] }}+"
             "{% endfor %}{% endfor %}", "a+b+")):
        d = tmp_path / str(len(template))
        words.write_tokenizer(d)
        (d / "chat_template.jinja").write_text(template)
        tok = proxy_tokenizer.load(str(d))
        body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                          {"type": "text", "text": "b"}]}]}
        assert tok.render_chat(body) == expect


def test_backends_file_checks_the_endpoint_and_the_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(words.tokenizer_json())
    good = tmp_path / "good.yaml"
    good.write_text(f"backends:\n  - url: http://127.0.0.1:9000\n    kv_events: "
                    f"tcp://127.0.0.1:5557\n    tokenizer: {tmp_path / 'tok'}\n")
    spec = load_backends(str(good))[0]
    assert spec.kv_events == "tcp://127.0.0.1:5557" and spec.tokenizer == str(tmp_path / "tok")
    for field, value in (("kv_events", "http://127.0.0.1:5557"), ("kv_events", "tcp://*:5557"),
                         ("tokenizer", str(tmp_path / "nothing"))):
        bad = tmp_path / "bad.yaml"
        bad.write_text(f"backends:\n  - url: http://127.0.0.1:9000\n    {field}: {value}\n")
        with pytest.raises(BackendsError, match=field):
            load_backends(str(bad))


# ---- real processes ------------------------------------------------------------------------


async def _cluster_state(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url + "/debug/cluster") as resp:
        data = await resp.json()
    return {inst["name"]: inst["prefix_cache"] for inst in data["instances"]}


async def _metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


async def test_the_proxy_follows_the_emulators_cache_through_evictions() -> None:
    """Two emulated instances with small caches publish events; the proxy's model of each
    follows stores and evictions, and its predicted hits are the engine's hits."""
    cluster = EmulatedCluster(2, profile="llama-3.1-8b-h100-tp1", kv_events=True,
                              extra_args=["--stall-prob", "0", "--num-gpu-blocks", "64"])
    async with cluster:
        proxy = ProxyProcess(cluster.backend_entries(), "block", ["--log-level", "warning",
                                                                  "--scrape-interval", "0"])
        async with proxy, aiohttp.ClientSession() as session:
            await asyncio.sleep(1.0)  # the subscriptions connect
            prompts = [words.make_prompt(40 * BS, seed=s) for s in range(4)]  # 40 blocks
            for text in prompts + prompts[:1]:
                body = {"model": "tiny", "prompt": text, "max_tokens": 2}
                async with session.post(proxy.url + "/v1/completions", json=body) as resp:
                    assert resp.status == 200, await resp.text()
            # a conversation's next turn: its history rendered by the chat template
            history = [{"role": "system", "content": words.make_prompt(20 * BS, seed=9)},
                       {"role": "user", "content": words.make_prompt(3 * BS, seed=10)}]
            for turn in range(2):
                body = {"model": "tiny", "messages": history, "max_tokens": 2}
                async with session.post(proxy.url + "/v1/chat/completions",
                                        json=body) as resp:
                    assert resp.status == 200, await resp.text()
                    answer = (await resp.json())["choices"][0]["message"]["content"]
                history += [{"role": "assistant", "content": answer},
                            {"role": "user", "content": words.make_prompt(BS, seed=turn)}]
                await asyncio.sleep(0.3)
            await asyncio.sleep(0.5)
            state = await _cluster_state(session, proxy.url)
            assert all(s["mode"] == "kv_events" for s in state.values())
            assert sum(s["stored"] for s in state.values()) >= 4 * 39 + 20
            assert sum(s["removed"] for s in state.values()) > 0  # 64-block caches evicted
            assert all(s["engine_blocks"] <= 64 for s in state.values())
            predicted = await _metric(session, proxy.url,
                                      "blockproxy_predicted_cached_tokens_total")
            hits = 0.0
            for url in cluster.urls:
                hits += await _metric(session, url, "vllm:prefix_cache_hits_total")
            assert predicted == hits and predicted >= 20 * BS  # the second turn hit


async def test_chunked_tokenization_is_exact_and_reuses_the_shared_start(tmp_path: Path
                                                                         ) -> None:
    tok = proxy_tokenizer.load(str(words.write_tokenizer(tmp_path / "tok")))
    assert tok.chunks.chunked
    history = words.make_prompt(3000, seed=7)
    for turn in range(3):
        history += " " + words.make_prompt(200, seed=turn) + "\n"
        assert await tok.encode(history) == list(tok.tokenizer.encode(history).ids)
    # turns 2 and 3 found their history's chunks cached
    assert tok.chunks.hits >= 2 * (len(words.make_prompt(3000, seed=7)) // 2100)


def test_a_tokenizer_that_cutting_would_change_encodes_whole() -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    # no pre-tokenizer: the whole text is one piece (one <unk>), two when cut
    tok = Tokenizer(WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    enc = proxy_tokenizer.ChunkedEncoder(lambda t: list(tok.encode(t).ids))
    assert not enc.chunked


async def test_special_tokens_wrap_the_chunked_ids_as_the_tokenizer_adds_them(tmp_path: Path
                                                                              ) -> None:
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    d = words.write_tokenizer(tmp_path / "bos")
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.post_processor = TemplateProcessing(single="<|start|> $A <|end|>",
                                            special_tokens=[("<|start|>", 1), ("<|end|>", 2)])
    tok.save(str(d / "tokenizer.json"))
    model = proxy_tokenizer.load(str(d))
    text = words.make_prompt(1500, seed=11)
    assert await model.encode(text) == list(tok.encode(text).ids)
    assert (await model.encode(text))[0] == 1 and (await model.encode(text))[-1] == 2
    assert await model.encode(text, special=False) == list(
        tok.encode(text, add_special_tokens=False).ids)
