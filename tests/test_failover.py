"""Mid-stream failover: an instance that dies, or stalls, while it streams is continued on
another, and the client reads one uninterrupted stream.  Real processes on loopback: two
``loadgen emulate`` processes (so one can be killed) behind a real ``blockproxy serve``,
read with aiohttp and with the official ``openai`` client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from loadgen import promtext
from loadgen.procs import wait_for
from tests.procs import Emulator, Proxy, http_get, metric_value, write_backends

MODEL = "tiny"
PROMPT = "tell me a story about the sea"  # 7 emulator tokens


def running(url: str) -> float:
    return metric_value(http_get(url + "/metrics")[1].decode(), "vllm:num_requests_running")


def serving(emulators: list[Emulator]) -> Emulator:
    """The emulator whose instance is running the one request."""
    busy = [e for e in emulators if running(e.urls[0]) == 1]
    assert len(busy) == 1, "exactly one instance should be streaming"
    return busy[0]


@pytest.fixture
def pair(tmp_path: Path):
    with Emulator(tmp_path, instances=1) as a, Emulator(tmp_path, instances=1) as b:
        yield [a, b]


def backends(tmp_path: Path, pair: list[Emulator]) -> Path:
    return write_backends(tmp_path / "pair.yaml",
                          [{"url": e.urls[0], "name": n} for e, n in zip(pair, "ab")])


def parse(raw: bytes) -> list[Any]:
    out = []
    for part in raw.split(b"\n\n"):
        if part:
            assert part.startswith(b"data: "), part
            payload = part[len(b"data: "):]
            out.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return out


async def stream_and_break(proxy: Proxy, pair: list[Emulator], route: str,
                           body: dict[str, Any], brk: str) -> list[Any]:
    """Stream ``body``; after 20 events, break the instance serving it (``kill``: SIGKILL;
    ``stop``: SIGSTOP, a stall); return every event the client read."""
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + route, json=body) as resp:
            assert resp.status == 200
            head = b""
            while head.count(b"\n\n") < 20:
                head += await resp.content.readuntil(b"\n\n")
            victim = serving(pair)
            assert resp.headers["X-Blockproxy-Instance"] == "ab"[pair.index(victim)]
            if brk == "kill":
                victim.popen.kill()
            else:
                os.kill(victim.popen.pid, signal.SIGSTOP)
            try:
                rest = await asyncio.wait_for(resp.content.read(), 60)
            finally:
                if brk == "stop":
                    os.kill(victim.popen.pid, signal.SIGCONT)
    return parse(head + rest)


@pytest.mark.parametrize("brk", ["kill", "stop"])
async def test_completions_stream_survives_its_instance(tmp_path: Path, pair: list[Emulator],
                                                        brk: str):
    args = ["--stall-timeout", "1"] if brk == "stop" else []
    with Proxy(tmp_path, backends(tmp_path, pair), args) as proxy:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1500, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        events = await stream_and_break(proxy, pair, "/v1/completions", body, brk)
        assert events[-1] == "[DONE]"
        assert not any("error" in e for e in events[:-1])
        tokens = [e for e in events[:-1] if e["choices"]]
        text = "".join(e["choices"][0]["text"] for e in tokens)
        assert len(text.split()) == len(tokens) == 1500  # every asked token, once
        assert {(e["id"], e["created"], e["model"]) for e in events[:-1]} == \
            {(tokens[0]["id"], tokens[0]["created"], MODEL)}
        reasons = [e["choices"][0]["finish_reason"] for e in tokens]
        assert reasons[-1] == "length" and not any(reasons[:-1])
        usage = events[-2]["usage"]
        assert usage == {"prompt_tokens": 7, "completion_tokens": 1500, "total_tokens": 1507}
        text = proxy.metrics()
        assert metric_value(text, "blockproxy_continuations_total") == 1
        assert metric_value(text, "blockproxy_continuation_gap_seconds_count") == 1
        assert metric_value(text, "blockproxy_stream_failures_total") == 1
        if brk == "stop":  # the stalled generation was aborted, not left to run
            assert await wait_for(lambda: all(running(e.urls[0]) == 0 for e in pair), 10)
        assert await wait_for(lambda: all(i["active_requests"] == 0
                                          for i in proxy.cluster()["instances"]))


def openai_chat(proxy: Proxy, max_tokens: int, headers: dict[str, str] | None = None
                ) -> tuple[openai.AsyncOpenAI, Any]:
    """An ``openai`` client of ``proxy`` and the (awaitable) streamed chat it starts."""
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    return client, client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=max_tokens,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        extra_headers=headers)


async def test_chat_stream_survives_its_instance_through_the_openai_client(
        tmp_path: Path, pair: list[Emulator]):
    with Proxy(tmp_path, backends(tmp_path, pair)) as proxy:
        client, started = openai_chat(proxy, 1200)
        stream = await started
        chunks = []
        async for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 20:
                serving(pair).popen.kill()
        await client.close()
        assert {c.id for c in chunks} == {chunks[0].id}
        with_choices = [c for c in chunks if c.choices]
        roles = [c.choices[0].delta.role for c in with_choices if c.choices[0].delta.role]
        assert roles == ["assistant"]
        words = "".join(c.choices[0].delta.content or "" for c in with_choices).split()
        assert len(words) == 1200
        reasons = [c.choices[0].finish_reason for c in with_choices]
        assert reasons[-1] == "length" and not any(reasons[:-1])
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens == 1200
        assert usage.prompt_tokens == 7 + 5  # the emulator's chat template: 5 tokens
        assert metric_value(proxy.metrics(), "blockproxy_continuations_total") == 1


async def test_what_cannot_be_continued_ends_with_the_error_event(tmp_path: Path,
                                                                   pair: list[Emulator]):
    with Proxy(tmp_path, backends(tmp_path, pair)) as proxy:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1500, "stream": True,
                "ignore_eos": True, "logprobs": 1}  # completions logprobs: not continued
        events = await stream_and_break(proxy, pair, "/v1/completions", body, "kill")
        assert events[-1] == "[DONE]"
        error = events[-2]["error"]
        assert error["code"] == 502 and "not continued: completions logprobs" in \
            error["message"]
        assert promtext.find(proxy.metrics(), "blockproxy_continuations_total") is None


async def test_no_continuation_when_turned_off(tmp_path: Path, pair: list[Emulator]):
    with Proxy(tmp_path, backends(tmp_path, pair), ["--max-continuations", "0"]) as proxy:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1500, "stream": True,
                "ignore_eos": True}
        events = await stream_and_break(proxy, pair, "/v1/completions", body, "kill")
        assert events[-2]["error"]["code"] == 502 and "mid-stream" in \
            events[-2]["error"]["message"]


# ---- drain hand-off -----------------------------------------------------------------------

async def test_a_draining_instance_hands_its_long_streams_over(tmp_path: Path,
                                                               pair: list[Emulator]):
    """Set the instance streaming a long answer to ``draining`` in the backends file: the
    stream moves to the other instance at once (the drained one is idle within seconds,
    not after the whole answer), and the client reads every token, with no failure."""
    path = backends(tmp_path, pair)
    with Proxy(tmp_path, path, ["--reload-interval", "0.2"]) as proxy:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3000, "stream": True,
                "ignore_eos": True}
        async with aiohttp.ClientSession() as session:
            async with session.post(proxy.url + "/v1/completions", json=body) as resp:
                name = resp.headers["X-Blockproxy-Instance"]
                head = b""
                while head.count(b"\n\n") < 20:
                    head += await resp.content.readuntil(b"\n\n")
                drained = pair["ab".index(name)]
                write_backends(path, [{"url": e.urls[0], "name": n,
                                       "state": "draining" if e is drained else "active"}
                                      for e, n in zip(pair, "ab")])
                # idle long before the 3,000-token answer could have ended there
                assert await wait_for(lambda: running(drained.urls[0]) == 0, 5)
                rest = await asyncio.wait_for(resp.content.read(), 60)
        events = parse(head + rest)
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
        assert sum(len(e["choices"][0]["text"].split()) for e in events[:-1]) == 3000
        assert {e["id"] for e in events[:-1]} == {events[0]["id"]}
        text = proxy.metrics()
        assert metric_value(text, "blockproxy_continuations_total", instance=name,
                            reason="drain") == 1
        assert promtext.find(text, "blockproxy_stream_failures_total") is None


async def test_a_stream_about_to_end_finishes_where_it_is(tmp_path: Path,
                                                          pair: list[Emulator]):
    path = backends(tmp_path, pair)
    with Proxy(tmp_path, path, ["--reload-interval", "0.2", "--handoff-tokens", "5000"]
               ) as proxy:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1500, "stream": True,
                "ignore_eos": True}
        async with aiohttp.ClientSession() as session:
            async with session.post(proxy.url + "/v1/completions", json=body) as resp:
                name = resp.headers["X-Blockproxy-Instance"]
                await resp.content.readuntil(b"\n\n")
                write_backends(path, [{"url": e.urls[0], "name": n, "state": "draining"
                                       if n == name else "active"}
                                      for e, n in zip(pair, "ab")])
                events = parse(await resp.content.readuntil(b"\n\n")
                               + await asyncio.wait_for(resp.content.read(), 60))
        assert events[-1] == "[DONE]" and len(events) == 1500  # 1,499 + [DONE] after the first
        assert promtext.find(proxy.metrics(), "blockproxy_continuations_total") is None


async def test_an_instance_auto_provisioning_drains_finishes_its_streams(
        tmp_path: Path, pair: list[Emulator]):
    """Scaled down by ``--autoscale act``: the instance's stream is not handed over (that
    would re-prefill it on the instances left); it ends there, then the instance goes to
    standby."""
    path = backends(tmp_path, pair)
    args = ["--autoscale", "act", "--slo-ttft-ms", "2000", "--autoscale-interval", "0.2",
            "--scale-down-after", "1"]
    with Proxy(tmp_path, path, args) as proxy:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3000, "stream": True,
                "ignore_eos": True}
        async with aiohttp.ClientSession() as session:
            # one stream on each instance: whichever is drained has one
            async with session.post(proxy.url + "/v1/completions", json=body) as one, \
                    session.post(proxy.url + "/v1/completions", json=body) as two:
                assert {one.headers["X-Blockproxy-Instance"],
                        two.headers["X-Blockproxy-Instance"]} == {"a", "b"}
                heads = [await r.content.readuntil(b"\n\n") for r in (one, two)]

                def state() -> dict[str, Any]:
                    doc = json.loads(http_get(proxy.url + "/autoscale")[1])
                    return dict(doc["models"].get(MODEL, {}))
                assert await wait_for(lambda: state().get("draining") == ["b"], 30), state()
                assert running(pair[1].urls[0]) == 1  # still there
                rests = [await asyncio.wait_for(r.content.read(), 90) for r in (one, two)]
            for head, rest in zip(heads, rests):
                events = parse(head + rest)
                assert events[-1] == "[DONE]" and len(events) == 3001
        assert await wait_for(lambda: state().get("standby") == ["b"], 10), state()
        assert promtext.find(proxy.metrics(), "blockproxy_continuations_total") is None


# ---- SCLS slices --------------------------------------------------------------------------

async def test_a_stream_in_slices_reads_as_one(tmp_path: Path, pair: list[Emulator]):
    """``--slice-tokens 100``: a 450-token answer is generated as five slices, each placed
    by the policy; the client reads one stream with one finish and the whole usage."""
    with Proxy(tmp_path, backends(tmp_path, pair), ["--slice-tokens", "100"]) as proxy:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 450, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        async with aiohttp.ClientSession() as session:
            async with session.post(proxy.url + "/v1/completions", json=body) as resp:
                events = parse(await resp.read())
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
        tokens = [e for e in events[:-1] if e["choices"]]
        assert len(tokens) == 450
        assert {e["id"] for e in events[:-1]} == {tokens[0]["id"]}
        reasons = [e["choices"][0]["finish_reason"] for e in tokens]
        assert reasons[-1] == "length" and not any(reasons[:-1])
        assert events[-2]["usage"] == {"prompt_tokens": 7, "completion_tokens": 450,
                                       "total_tokens": 457}
        assert sum(s.value for s in promtext.samples(proxy.metrics())
                   if s.name == "blockproxy_continuations_total"
                   and s.labels["reason"] == "slice") == 4


async def test_slices_per_request_through_the_openai_client(tmp_path: Path,
                                                            pair: list[Emulator]):
    with Proxy(tmp_path, backends(tmp_path, pair)) as proxy:
        client, started = openai_chat(proxy, 130, {"x-blockproxy-slice-tokens": "50"})
        stream = await started
        chunks = [c async for c in stream]
        await client.close()
        with_choices = [c for c in chunks if c.choices]
        assert [c.choices[0].delta.role for c in with_choices
                if c.choices[0].delta.role] == ["assistant"]
        assert len("".join(c.choices[0].delta.content or "" for c in with_choices).split()) \
            == 130
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 130
        assert chunks[-1].usage.prompt_tokens == 12
        bad = await aiohttp.ClientSession().__aenter__()
        try:
            async with bad.post(proxy.url + "/v1/completions",
                                json={"model": MODEL, "prompt": "x", "stream": True},
                                headers={"x-blockproxy-slice-tokens": "many"}) as resp:
                assert resp.status == 400
                assert "x-blockproxy-slice-tokens" in (await resp.json())["error"]["message"]
        finally:
            await bad.close()


async def test_a_token_id_prompt_continues_in_ids(tmp_path: Path, pair: list[Emulator]):
    """With the model's tokenizer configured, a token-id prompt is continued in ids (the
    tokenizer's ids of the text so far), and its usage counts the original ids exactly."""
    from loadgen import tokenizer as words

    tok = words.write_tokenizer(tmp_path / "tok")
    path = write_backends(tmp_path / "ids.yaml", [{"url": e.urls[0], "name": n,
                                                   "tokenizer": str(tok)}
                                                  for e, n in zip(pair, "ab")])
    ids = words.token_ids(PROMPT.split())
    with Proxy(tmp_path, path) as proxy:
        body = {"model": MODEL, "prompt": ids, "max_tokens": 1500, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        events = await stream_and_break(proxy, pair, "/v1/completions", body, "kill")
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
        text = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
        assert len(text.split()) == 1500
        assert events[-2]["usage"] == {"prompt_tokens": 7, "completion_tokens": 1500,
                                       "total_tokens": 1507}
        assert metric_value(proxy.metrics(), "blockproxy_continuations_total",
                            reason="failure") == 1
