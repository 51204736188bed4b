"""``loadgen emulate`` over real HTTP on loopback: vLLM's shapes, errors, metrics and the
engine's behaviour (sequence cap, preemption, prefix caching, time-scale, step timing).

Each emulator runs as a subprocess started and stopped by the fixtures.  The behavioural
timing checks use generous tolerances: this suite runs on small, shared machines.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from loadgen import promtext
from loadgen.headers import OUTPUT_TOKENS_HEADER
from loadgen.procs import wait_for
from loadgen.tokenizer import make_prompt
from tests.emulator_helpers import (
    Emulator,
    health_ok,
    metric,
    parse_metrics,
    run_emulator,
    stream_events,
)

HEADER = OUTPUT_TOKENS_HEADER
NO_STALLS = ("--stall-prob", "0")


@pytest.fixture(scope="module")
def emu() -> Iterator[Emulator]:
    """Three instances at time-scale 1: 0 for shapes, 1 for prefix caching, 2 for timing."""
    with run_emulator(*NO_STALLS, instances=3) as emulator:
        yield emulator


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def get_metrics(session: aiohttp.ClientSession, url: str) -> list[promtext.Sample]:
    async with session.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        return parse_metrics(await resp.text())


# --- HTTP surface ---------------------------------------------------------------------

async def test_health_version_models(emu: Emulator, session: aiohttp.ClientSession) -> None:
    assert await health_ok(session, emu.url())
    async with session.get(f"{emu.url()}/version") as resp:
        assert await resp.json() == {"version": "0.32.0"}
    async with session.get(f"{emu.url()}/v1/models") as resp:
        body = await resp.json()
    assert body["object"] == "list"
    [model] = body["data"]
    assert (model["id"], model["object"], model["owned_by"], model["root"]) == \
        ("tiny", "model", "vllm", "tiny")
    assert model["max_model_len"] == 131072


async def test_completions_stream_shape(emu: Emulator, session: aiohttp.ClientSession) -> None:
    body = {"model": "tiny", "prompt": "one two three", "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}}
    events, _, resp = await stream_events(session, f"{emu.url()}/v1/completions", body,
                                          {HEADER: "50"})
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    *content, usage_chunk = events[:-1]
    assert len(content) == 5  # one chunk per token
    first_id = content[0]["id"]
    assert first_id.startswith("cmpl-")
    for i, chunk in enumerate(content):
        assert list(chunk) == ["id", "object", "created", "model", "choices"]
        assert (chunk["id"], chunk["object"], chunk["model"]) == \
            (first_id, "text_completion", "tiny")
        [choice] = chunk["choices"]
        assert list(choice) == ["index", "text", "logprobs", "finish_reason", "stop_reason"]
        assert choice["index"] == 0 and choice["logprobs"] is None
        assert choice["text"].startswith(" ") and len(choice["text"].split()) == 1
        assert choice["finish_reason"] == ("length" if i == 4 else None)
        assert choice["stop_reason"] is None
    assert list(usage_chunk) == ["id", "object", "created", "model", "choices", "usage"]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 3, "total_tokens": 8,
                                    "completion_tokens": 5}


async def test_finish_reason_stop_and_ignore_eos(emu: Emulator,
                                                 session: aiohttp.ClientSession) -> None:
    url = f"{emu.url()}/v1/completions"
    body = {"prompt": "a b c", "max_tokens": 10, "stream": True}
    events, _, _ = await stream_events(session, url, body, {HEADER: "3"})
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]] == [None, None, "stop"]
    events, _, _ = await stream_events(session, url, dict(body, ignore_eos=True), {HEADER: "3"})
    assert len(events) == 11 and events[-2]["choices"][0]["finish_reason"] == "length"


async def test_chat_stream_shape(emu: Emulator, session: aiohttp.ClientSession) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}],
            "max_completion_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    events, _, resp = await stream_events(session, f"{emu.url()}/v1/chat/completions", body)
    assert resp.headers["content-type"].startswith("text/event-stream")
    role, *content, usage_chunk, done = events
    assert done == "[DONE]"
    assert role["id"].startswith("chatcmpl-") and role["object"] == "chat.completion.chunk"
    assert role["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                "logprobs": None, "finish_reason": None}]
    assert 1 <= len(content) <= 3
    for chunk in content[:-1]:
        assert chunk["choices"] == [{"index": 0, "delta": {"content": chunk["choices"][0][
            "delta"]["content"]}, "logprobs": None, "finish_reason": None}]
    last = content[-1]["choices"][0]
    assert list(last) == ["index", "delta", "logprobs", "finish_reason", "stop_reason"]
    assert last["finish_reason"] in ("stop", "length")
    # 2 words + 3 template tokens + 2 generation-prompt tokens
    assert usage_chunk["usage"]["prompt_tokens"] == 7
    assert usage_chunk["usage"]["completion_tokens"] == len(content)


async def test_non_streaming_shapes(emu: Emulator, session: aiohttp.ClientSession) -> None:
    async with session.post(f"{emu.url()}/v1/completions", headers={HEADER: "4"},
                            json={"model": "tiny", "prompt": [1, 2, 3, 4], "max_tokens": 9}
                            ) as resp:
        body = await resp.json()
    assert list(body) == ["id", "object", "created", "model", "choices", "usage",
                          "kv_transfer_params"]
    assert body["object"] == "text_completion"
    [choice] = body["choices"]
    assert choice["finish_reason"] == "stop" and len(choice["text"].split()) == 4
    assert body["usage"]["prompt_tokens"] == 4 and body["usage"]["completion_tokens"] == 4
    async with session.post(f"{emu.url()}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}) as resp:
        body = await resp.json()
    assert body["object"] == "chat.completion"
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + \
        body["usage"]["completion_tokens"]


async def test_drawn_length_is_deterministic(emu: Emulator,
                                             session: aiohttp.ClientSession) -> None:
    texts = []
    for _ in range(2):
        async with session.post(f"{emu.url()}/v1/completions",
                                json={"prompt": make_prompt(20, seed=5)}) as resp:
            body = await resp.json()
        texts.append((body["choices"][0]["text"], body["choices"][0]["finish_reason"]))
    assert texts[0] == texts[1] and texts[0][1] == "stop"  # max_tokens absent: context limit


@pytest.mark.parametrize(("path", "raw", "status", "err_type", "param"), [
    ("/v1/completions", b'{"model":"x","prompt":"a"}', 404, "NotFoundError", "model"),
    ("/v1/completions", b'{"prompt":"a b",', 400, "BadRequestError", None),
    ("/v1/completions", b'[1,2]', 400, "BadRequestError", None),
    ("/v1/completions", b'{"prompt":"a","n":2}', 400, "BadRequestError", "n"),
    ("/v1/completions", b'{"prompt":{"a":1}}', 400, "BadRequestError", "prompt"),
    ("/v1/completions", b'{"prompt":"a","max_tokens":"9"}', 400, "BadRequestError",
     "max_tokens"),
    ("/v1/completions", b'{"prompt":"a","stream_options":{"include_usage":true}}', 400,
     "BadRequestError", "stream_options"),
    ("/v1/chat/completions", b'{"messages":"hi"}', 400, "BadRequestError", "messages"),
    ("/v1/completions", b'{"prompt":"a b","max_tokens":131071}', 400, "BadRequestError", None),
])
async def test_errors(emu: Emulator, session: aiohttp.ClientSession, path: str, raw: bytes,
                      status: int, err_type: str, param: str | None) -> None:
    async with session.post(f"{emu.url()}{path}", data=raw,
                            headers={"content-type": "application/json"}) as resp:
        assert resp.status == status
        body = await resp.json()
    assert list(body) == ["error"]
    assert list(body["error"]) == ["message", "type", "param", "code"]
    assert (body["error"]["type"], body["error"]["param"], body["error"]["code"]) == \
        (err_type, param, status)
    if status == 404:
        assert body["error"]["message"] == "The model `x` does not exist."


async def test_context_error_message(emu: Emulator, session: aiohttp.ClientSession) -> None:
    async with session.post(f"{emu.url()}/v1/completions",
                            json={"prompt": "a b", "max_tokens": 131071}) as resp:
        message = (await resp.json())["error"]["message"]
    assert "maximum context length is 131072 tokens" in message
    assert "2 input tokens" in message


async def test_metrics_names(emu: Emulator, session: aiohttp.ClientSession) -> None:
    async with session.get(f"{emu.url()}/metrics") as resp:
        text = await resp.text()
    samples = parse_metrics(text)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:num_preemptions_total",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:time_to_first_token_seconds_count",
                 "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_count"):
        metric(samples, name)
    assert metric(samples, "vllm:request_success_total", finished_reason="stop") >= 1
    assert "# TYPE vllm:time_to_first_token_seconds histogram" in text
    assert 'vllm:e2e_request_latency_seconds_bucket{engine="0",model_name="tiny",le="+Inf"}' \
        in text


async def test_disconnect_aborts(emu: Emulator, session: aiohttp.ClientSession) -> None:
    url = emu.url(2)
    async with session.post(f"{url}/v1/completions", headers={HEADER: "100000"},
                            json={"prompt": "go on forever", "stream": True}) as resp:
        await resp.content.readuntil(b"\n\n")
        running = metric(await get_metrics(session, url), "vllm:num_requests_running")
        assert running == 1
        resp.close()  # the client goes away mid-stream

    async def aborted() -> bool:
        samples = await get_metrics(session, url)
        return (metric(samples, "vllm:num_requests_running") == 0
                and metric(samples, "vllm:request_success_total", finished_reason="abort") >= 1
                and metric(samples, "vllm:kv_cache_usage_perc") == 0)
    assert await wait_for(aborted), "condition not reached in time"


async def test_disconnect_aborts_non_streaming(emu: Emulator,
                                              session: aiohttp.ClientSession) -> None:
    url = emu.url(2)
    before = metric(await get_metrics(session, url), "vllm:request_success_total",
                    finished_reason="abort")
    task = asyncio.create_task(session.post(f"{url}/v1/completions", headers={HEADER: "100000"},
                                            json={"prompt": "never answered"}))

    async def running() -> bool:
        return metric(await get_metrics(session, url), "vllm:num_requests_running") == 1
    assert await wait_for(running), "condition not reached in time"
    task.cancel()  # closes the connection while the request is in the batch
    await asyncio.gather(task, return_exceptions=True)

    async def aborted() -> bool:
        samples = await get_metrics(session, url)
        return (metric(samples, "vllm:num_requests_running") == 0 and metric(
            samples, "vllm:request_success_total", finished_reason="abort") == before + 1)
    assert await wait_for(aborted), "condition not reached in time"


# --- engine behaviour -----------------------------------------------------------------

async def test_sequence_cap_shows_running_and_waiting(session: aiohttp.ClientSession) -> None:
    with run_emulator("--max-num-seqs", "4", *NO_STALLS) as emulator:
        url = emulator.url()
        body = {"prompt": "long story", "stream": True}
        tasks = [asyncio.create_task(stream_events(session, f"{url}/v1/completions",
                                                   dict(body, prompt=f"story {i}"),
                                                   {HEADER: "100000"})) for i in range(20)]
        try:
            async def queued() -> bool:
                samples = await get_metrics(session, url)
                return (metric(samples, "vllm:num_requests_running"),
                        metric(samples, "vllm:num_requests_waiting")) == (4, 16)
            assert await wait_for(queued), "condition not reached in time"
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        async def drained() -> bool:  # every disconnected client's request was aborted
            samples = await get_metrics(session, url)
            return (metric(samples, "vllm:num_requests_running"),
                    metric(samples, "vllm:num_requests_waiting")) == (0, 0)
        assert await wait_for(drained), "condition not reached in time"


async def test_small_kv_cache_preempts_and_completes(session: aiohttp.ClientSession) -> None:
    with run_emulator("--num-gpu-blocks", "40", "--block-size", "16", "--time-scale", "0.2",
                      *NO_STALLS) as emulator:
        url = emulator.url()

        async def one(i: int) -> list[Any]:
            events, _, _ = await stream_events(
                session, f"{url}/v1/completions",
                {"prompt": make_prompt(50, seed=i), "max_tokens": 100, "stream": True,
                 "stream_options": {"include_usage": True}}, {HEADER: "100"})
            return events
        results = await asyncio.gather(*(one(i) for i in range(8)))
        for events in results:
            assert events[-1] == "[DONE]"
            assert events[-2]["usage"]["completion_tokens"] == 100
            assert len(events) == 102 and events[-3]["choices"][0]["finish_reason"] == "stop"
        samples = await get_metrics(session, url)
        assert metric(samples, "vllm:num_preemptions_total") > 0
        assert metric(samples, "vllm:request_success_total", finished_reason="stop") == 8
        assert metric(samples, "vllm:num_requests_running") == 0


async def test_repeated_prefix_has_lower_ttft(emu: Emulator,
                                              session: aiohttp.ClientSession) -> None:
    url = f"{emu.url(1)}/v1/completions"

    async def ttft(prompt: str) -> float:
        start = time.perf_counter()
        _, times, _ = await stream_events(session, url, {"prompt": prompt, "stream": True,
                                                         "max_tokens": 1})
        return times[0] - start

    shared = make_prompt(6000, seed=1)
    await ttft(shared + " first")  # fills the prefix cache
    repeated = await ttft(shared + " second")
    fresh = await ttft(make_prompt(6000, seed=2) + " third")
    # ~6 ms (one decode-sized step) vs ~110 ms (6000 prefill tokens)
    assert repeated < 0.5 * fresh
    samples = await get_metrics(session, emu.url(1))
    assert metric(samples, "vllm:prefix_cache_hits_total") >= 5984


async def _timed_workload(url: str, session: aiohttp.ClientSession) -> float:
    body: dict[str, Any] = {"prompt": make_prompt(500, seed=9), "max_tokens": 250,
                            "stream": True}
    start = time.perf_counter()
    await asyncio.gather(*(stream_events(session, f"{url}/v1/completions",
                                         dict(body, prompt=body["prompt"] + f" {i}"),
                                         {HEADER: "250"}) for i in range(4)))
    return time.perf_counter() - start


async def test_time_scale_speeds_up(session: aiohttp.ClientSession) -> None:
    walls = {}
    for scale in ("1", "0.1"):
        with run_emulator("--time-scale", scale, "--noise-sigma", "0", *NO_STALLS) as emulator:
            walls[scale] = await _timed_workload(emulator.url(), session)
    ratio = walls["1"] / walls["0.1"]
    assert 5 <= ratio <= 15, walls


async def test_step_times_follow_profile(emu: Emulator, session: aiohttp.ClientSession) -> None:
    url = emu.url(2)
    await asyncio.gather(*(stream_events(
        session, f"{url}/v1/completions", {"prompt": make_prompt(100, seed=i), "stream": True},
        {HEADER: "200"}) for i in range(8)))
    async with session.get(f"{url}/debug/engine", params={"last": "4000"}) as resp:
        debug = await resp.json()
    fields = debug["step_fields"]
    steps = [dict(zip(fields, s)) for s in debug["steps"]]
    # The model: 5.75 ms + 17.3 us/prefill token + 6.0 us/decoding sequence.
    for s in steps:
        expected = 5.75e-3 + 17.3e-6 * s["prefill_tokens"] + 6.0e-6 * s["decode_seqs"]
        assert s["model_s"] == pytest.approx(expected, rel=1e-9)
    # Noise: mean-one lognormal with sigma 0.05.
    noise = [s["true_s"] / s["model_s"] for s in steps]
    assert 0.97 < statistics.fmean(noise) < 1.03
    assert 0.03 < statistics.pstdev(noise) < 0.08
    # Measured: time between the ends of back-to-back steps, against the engine's target.
    ratios_true, ratios_model = [], []
    for prev, cur in zip(steps, steps[1:]):
        if cur["intended_start"] == prev["intended_end"]:
            measured = cur["actual_end"] - prev["actual_end"]
            ratios_true.append(measured / cur["true_s"])
            ratios_model.append(measured / cur["model_s"])
    assert len(ratios_true) > 150
    assert 0.85 < statistics.median(ratios_true) < 1.2
    assert 0.85 < statistics.median(ratios_model) < 1.2
    # The fidelity counters on /metrics add up exactly what the step records show.
    async with session.get(f"{url}/metrics") as resp:
        page = await resp.text()
    values = {s.name: s.value for s in promtext.samples(page) if s.name.startswith("emulator:")}
    assert values["emulator:steps_total"] == len(steps)
    late = sum(max(0.0, s["actual_end"] - s["intended_end"]) for s in steps)
    assert values["emulator:step_lateness_seconds_total"] == pytest.approx(late, abs=1e-9)
    assert values["emulator:resyncs_total"] == 0
