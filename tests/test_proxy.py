"""blockproxy in front of emulated vLLM instances: real processes on loopback.

The official ``openai`` client talks to a real ``blockproxy serve`` process, which talks
to real ``loadgen emulate`` processes.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import aiohttp
import openai
import pytest

from loadgen.procs import wait_for
from tests.procs import Emulator, Proxy, free_ports, http_get, metric_value, write_backends

MODEL = "tiny"


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("proxy")


@pytest.fixture(scope="module")
def emulator(tmp_module: Path):
    with Emulator(tmp_module, instances=2) as emu:
        yield emu


@pytest.fixture(scope="module")
def proxy(tmp_module: Path, emulator: Emulator):
    backends = write_backends(tmp_module / "two.yaml", [{"url": u} for u in emulator.urls])
    with Proxy(tmp_module, backends) as p:
        yield p


@pytest.fixture(scope="module")
def client(proxy: Proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)


# ---- the OpenAI client --------------------------------------------------------------------

def test_completions_non_streaming(client: openai.OpenAI):
    out = client.completions.create(model=MODEL, prompt="one two three", max_tokens=5,
                                    extra_body={"ignore_eos": True})
    assert out.object == "text_completion"
    assert len(out.choices[0].text.split()) == 5
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.completion_tokens == 5
    assert out.usage.prompt_tokens == 3


def test_completions_streaming(client: openai.OpenAI):
    stream = client.completions.create(model=MODEL, prompt="one two three", max_tokens=6,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    texts, usage, finish = [], None, None
    for chunk in stream:
        if chunk.choices:
            texts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert len(texts) == 6 and finish == "length"
    assert usage is not None and usage.completion_tokens == 6


def test_chat_non_streaming(client: openai.OpenAI):
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello there"}], max_tokens=4,
        extra_body={"ignore_eos": True})
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content is not None and out.usage is not None
    assert len(out.choices[0].message.content.split()) == 4
    assert out.usage.completion_tokens == 4


def test_chat_streaming(client: openai.OpenAI):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello there"}], max_tokens=4,
        stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(content.split()) == 4
    assert chunks[-1].choices[0].finish_reason == "length"


def test_client_errors_have_openai_types(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError) as not_found:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    assert "does not exist" in not_found.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=-3)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=1)


def test_models_is_the_union_of_instances(proxy: Proxy):
    status, body = http_get(proxy.url + "/v1/models")
    assert status == 200
    assert [m["id"] for m in json.loads(body)["data"]] == [MODEL]


# ---- bad input ----------------------------------------------------------------------------

BAD_INPUTS = [
    ("/v1/completions", b'{"model": "tiny", "prompt": ', "application/json", 400),
    ("/v1/completions", b'["not", "an", "object"]', "application/json", 400),
    ("/v1/completions", b'{"prompt": "x"}', "application/json", 400),
    ("/v1/completions", b'{"model": "tiny"}', "application/json", 400),
    ("/v1/completions", b'{"model": 7, "prompt": "x"}', "application/json", 400),
    ("/v1/completions", b'{"model": "tiny", "prompt": 42}', "application/json", 400),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "stream": "yes"}',
     "application/json", 400),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x", "max_tokens": "many"}',
     "application/json", 400),
    ("/v1/chat/completions", b'{"model": "tiny"}', "application/json", 400),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"content": "hi"}]}',
     "application/json", 400),
    ("/v1/completions", b'{"model": "gpt-17", "prompt": "x"}', "application/json", 404),
    ("/v1/completions", b'{"model": "tiny", "prompt": "x"}', "text/plain", 415),
    ("/v1/completions", b'', "application/json", 400),
]


@pytest.mark.parametrize("path, body, ctype, status", BAD_INPUTS)
async def test_bad_input_gets_openai_error(proxy: Proxy, path: str, body: bytes, ctype: str,
                                           status: int):
    async with aiohttp.ClientSession() as session, session.post(proxy.url + path, data=body,
                            headers={"Content-Type": ctype}) as resp:
        assert resp.status == status
        payload = await resp.json()
    err = payload["error"]
    assert err["code"] == status and err["message"] and err["type"]
    assert "param" in err


async def test_oversized_body_is_413(proxy: Proxy):
    big = json.dumps({"model": MODEL, "prompt": "x " * (3 * 1024 * 1024)}).encode()
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy.url + "/v1/completions", data=big,
                                headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"]["code"] == 413


# ---- streaming helpers --------------------------------------------------------------------

async def stream_events(session: aiohttp.ClientSession, url: str, max_tokens: int,
                        stop_after: int | None = None) -> list[bytes]:
    """POST a streaming completion; return the raw SSE events (or the first few)."""
    body = {"model": MODEL, "prompt": "tell me a story", "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True}
    events: list[bytes] = []
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers.get("X-Accel-Buffering") == "no"
        buf = b""
        async for data in resp.content.iter_any():
            buf += data
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                events.append(event)
                if stop_after is not None and len(events) >= stop_after:
                    return events
    return events


def emulator_running(url: str) -> float:
    return metric_value(http_get(url + "/metrics")[1].decode(), "vllm:num_requests_running")



async def test_client_disconnect_cancels_upstream(tmp_path: Path):
    with Emulator(tmp_path, instances=1) as emu:
        backends = write_backends(tmp_path / "one.yaml", [{"url": emu.urls[0]}])
        with Proxy(tmp_path, backends) as proxy:
            async with aiohttp.ClientSession() as session:
                events = await stream_events(session, proxy.url, 5000, stop_after=3)
                assert len(events) == 3
                assert emulator_running(emu.urls[0]) == 1
            # The session is closed: the proxy must abort the request upstream.
            assert await wait_for(lambda: emulator_running(emu.urls[0]) == 0)
            assert await wait_for(lambda: proxy.cluster()["instances"][0]
                                  ["active_requests"] == 0)
            assert metric_value(proxy.metrics(), "blockproxy_cancellations_total") >= 1


async def test_backend_down_before_first_byte_is_retried_and_ejected(tmp_path: Path):
    with Emulator(tmp_path, instances=1) as alive, Emulator(tmp_path, instances=1) as doomed:
        backends = write_backends(tmp_path / "two.yaml", [{"url": alive.urls[0], "name": "a"},
                                                         {"url": doomed.urls[0], "name": "b"}])
        with Proxy(tmp_path, backends, ["--policy", "round_robin", "--eject-after", "2",
                                        "--probe-interval", "0.2"]) as proxy:
            doomed.stop()
            async with aiohttp.ClientSession() as session:
                for _ in range(6):
                    events = await stream_events(session, proxy.url, 3)
                    assert events[-1] == b"data: [DONE]"
            text = proxy.metrics()
            assert metric_value(text, "blockproxy_retries_total", instance="b") >= 2
            assert metric_value(text, "blockproxy_ejections_total", instance="b") == 1
            health = {i["name"]: i["healthy"] for i in proxy.cluster()["instances"]}
            assert health == {"a": True, "b": False}


async def test_backend_comes_back_after_probe(tmp_path: Path):
    with Emulator(tmp_path, instances=1) as alive:
        with Emulator(tmp_path, instances=1) as flaky:
            port = flaky.base_port
            backends = write_backends(tmp_path / "b.yaml", [{"url": alive.urls[0], "name": "a"},
                                                           {"url": flaky.urls[0], "name": "b"}])
            proxy = Proxy(tmp_path, backends, ["--policy", "round_robin", "--eject-after", "1",
                                               "--probe-interval", "0.1"])
        with proxy:
            async with aiohttp.ClientSession() as session:
                await stream_events(session, proxy.url, 2)
                await stream_events(session, proxy.url, 2)
            assert not {i["name"]: i["healthy"] for i in proxy.cluster()["instances"]}["b"]
            revived = Emulator.on_port(tmp_path, port)
            with revived:
                assert await wait_for(lambda: {i["name"]: i["healthy"] for i in
                                               proxy.cluster()["instances"]}["b"], timeout=10)


async def test_backend_killed_mid_stream_ends_with_error_event(tmp_path: Path):
    with Emulator(tmp_path, instances=1) as emu:
        backends = write_backends(tmp_path / "one.yaml", [{"url": emu.urls[0]}])
        with Proxy(tmp_path, backends) as proxy:
            async with aiohttp.ClientSession() as session:
                body = {"model": MODEL, "prompt": "x", "max_tokens": 3000, "stream": True,
                        "ignore_eos": True}
                async with session.post(proxy.url + "/v1/completions", json=body) as resp:
                    first = await resp.content.readuntil(b"\n\n")
                    assert first.startswith(b"data: {")
                    emu.popen.kill()
                    rest = await resp.content.read()
            events = [e for e in rest.split(b"\n\n") if e]
            assert events[-1] == b"data: [DONE]"
            error = json.loads(events[-2][len(b"data: "):])["error"]
            assert error["code"] == 502 and "mid-stream" in error["message"]
            assert metric_value(proxy.metrics(), "blockproxy_stream_failures_total") == 1


# ---- operations ---------------------------------------------------------------------------

def decisions(proxy: Proxy) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in proxy.metrics().splitlines():
        if line.startswith("blockproxy_decisions_total{"):
            name = line.split('instance="', 1)[1].split('"', 1)[0]
            out[name] = float(line.rsplit(" ", 1)[1])
    return out


async def test_hot_reload_add_drain_remove(tmp_path: Path):
    with Emulator(tmp_path, instances=2) as emu:
        a, b = emu.urls
        path = write_backends(tmp_path / "live.yaml", [{"url": a, "name": "a"}])
        # --handoff-tokens 0: a drained instance's streams finish there (the hand-off is
        # tests/test_failover.py's)
        with Proxy(tmp_path, path, ["--reload-interval", "0.1", "--handoff-tokens", "0",
                                    "--policy", "round_robin"]) as proxy:
            names = lambda: sorted(i["name"] for i in proxy.cluster()["instances"])  # noqa: E731
            write_backends(path, [{"url": a, "name": "a"}, {"url": b, "name": "b"}])
            assert await wait_for(lambda: names() == ["a", "b"])
            async with aiohttp.ClientSession() as session:
                await asyncio.gather(*(stream_events(session, proxy.url, 2) for _ in range(4)))
                assert decisions(proxy).get("b", 0) >= 1
                # Drain a while one of its streams is running: the stream finishes, new
                # requests all go to b.
                before = decisions(proxy)
                long_stream = asyncio.create_task(stream_events(session, proxy.url, 150))
                await wait_for(lambda: any(i["active_requests"] for i in
                                           proxy.cluster()["instances"]))
                busy = next(i["name"] for i in proxy.cluster()["instances"]
                            if i["active_requests"])
                other = "b" if busy == "a" else "a"
                write_backends(path, [{"url": a, "name": "a",
                                       "state": "draining" if busy == "a" else "active"},
                                      {"url": b, "name": "b",
                                       "state": "draining" if busy == "b" else "active"}])
                assert await wait_for(lambda: {i["name"]: i["state"] for i in
                                               proxy.cluster()["instances"]}[busy] == "draining")
                mid = decisions(proxy)
                for _ in range(4):
                    await stream_events(session, proxy.url, 2)
                after = decisions(proxy)
                assert after.get(busy, 0) == mid.get(busy, 0)
                assert after[other] - mid.get(other, 0) == 4
                events = await long_stream
                assert events[-1] == b"data: [DONE]" and len(events) == 151
                assert sum(before.values()) < sum(after.values())
            # Remove it altogether.
            write_backends(path, [{"url": emu.urls[1] if busy == "a" else a, "name": other}])
            assert await wait_for(lambda: names() == [other])


async def test_bad_reload_keeps_last_good_file(tmp_path: Path):
    with Emulator(tmp_path, instances=1) as emu:
        path = write_backends(tmp_path / "live.yaml", [{"url": emu.urls[0], "name": "a"}])
        with Proxy(tmp_path, path, ["--reload-interval", "0.1"]) as proxy:
            path.write_text("backends:\n  - url: http://127.0.0.1:1\n    max_num_seqs: -4\n")
            await asyncio.sleep(0.5)
            assert [i["name"] for i in proxy.cluster()["instances"]] == ["a"]
            assert "max_num_seqs" in proxy.output()


def test_bad_backends_file_at_start_names_the_field(tmp_path: Path):
    import subprocess
    import sys

    path = tmp_path / "bad.yaml"
    path.write_text("backends:\n  - url: http://127.0.0.1:9\n    wieght: 2\n")
    done = subprocess.run([sys.executable, "-m", "blockproxy", "--backends", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "bad.yaml:3" in done.stderr and "wieght" in done.stderr


async def test_sigterm_lets_streams_finish(tmp_path: Path):
    with Emulator(tmp_path, instances=1) as emu:
        backends = write_backends(tmp_path / "one.yaml", [{"url": emu.urls[0]}])
        proxy = Proxy(tmp_path, backends)
        with proxy:
            async with aiohttp.ClientSession() as session:
                task = asyncio.create_task(stream_events(session, proxy.url, 100))
                await wait_for(lambda: proxy.cluster()["in_flight"] == 1)
                proxy.signal(signal.SIGTERM)
                events = await task
            assert events[-1] == b"data: [DONE]" and len(events) == 101
            assert await asyncio.to_thread(proxy.wait, 10) == 0


async def test_sigterm_keeps_serving_through_the_grace(tmp_path: Path):
    """SIGTERM: /ready turns 503 at once while requests (new connections too) are still
    served with Connection: close for the grace period; then the port closes."""
    with Emulator(tmp_path, instances=1, time_scale=0.1) as emu:
        backends = write_backends(tmp_path / "one.yaml", [{"url": emu.urls[0]}])
        with Proxy(tmp_path, backends, ["--drain-grace", "2"]) as proxy:
            proxy.signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            async with aiohttp.ClientSession() as session:
                async with session.get(proxy.url + "/ready") as resp:
                    assert resp.status == 503
                body = {"model": MODEL, "prompt": "hello", "max_tokens": 3}
                async with session.post(proxy.url + "/v1/completions", json=body) as resp:
                    assert resp.status == 200
                    assert resp.headers["Connection"] == "close"
            assert proxy.popen.poll() is None  # still within the grace
            assert await asyncio.to_thread(proxy.wait, 10) == 0
            assert "still serving for 2 s" in proxy.output()


async def test_half_sent_requests_cannot_exhaust_descriptors(tmp_path: Path):
    """Under ``ulimit -n 1024``, 1,100 connections that send half a request: the proxy
    keeps (1024 - 256) / 2 = 384 of them, refuses the rest with 503, never runs out of
    descriptors and never blames a backend; once they go, requests are served again."""
    with Emulator(tmp_path, instances=2, time_scale=0.1) as emu:
        backends = write_backends(tmp_path / "two.yaml", [{"url": u} for u in emu.urls])
        with Proxy(tmp_path, backends, nofile=1024) as proxy:
            conns = []
            for _ in range(1100):
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
                conns.append((reader, writer))
            await asyncio.sleep(0.5)
            answered = reset = 0  # refused with a 503, or (past 64 at once) a plain close
            for reader, _ in conns:
                try:
                    data = await asyncio.wait_for(reader.read(200), 0.01)
                except asyncio.TimeoutError:
                    continue
                except ConnectionResetError:
                    reset += 1
                    continue
                answered += data.startswith(b"HTTP/1.1 503")
                reset += data == b""
            assert answered + reset == 1100 - 384 and answered >= 64
            fds = len(list(Path(f"/proc/{proxy.popen.pid}/fd").iterdir()))
            assert fds < 1024 - 128
            for _, writer in conns:
                writer.close()
            await asyncio.sleep(0.5)
            view = proxy.cluster()
            assert all(i["healthy"] and i["failures"] == 0 for i in view["instances"])
            status, _ = http_get(proxy.url + "/v1/models")
            assert status == 200
            assert metric_value(proxy.metrics(), "blockproxy_rejected_connections_total") \
                == 1100 - 384


async def test_api_key_request_id_access_log_and_admin_port(tmp_path: Path):
    log = tmp_path / "access.log"
    admin_port = free_ports(1)[0]
    with Emulator(tmp_path, instances=1, time_scale=0.1) as emu:
        backends = write_backends(tmp_path / "one.yaml", [{"url": emu.urls[0]}])
        with Proxy(tmp_path, backends, ["--api-key", "k1,k2", "--access-log", str(log),
                                        "--admin-port", str(admin_port)]) as proxy:
            async with aiohttp.ClientSession() as session:
                body = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
                url = proxy.url + "/v1/completions"
                async with session.post(url, json=body) as resp:
                    assert resp.status == 401
                    assert (await resp.json())["error"]["type"] == "AuthenticationError"
                async with session.post(url, json=body,
                                        headers={"Authorization": "Bearer k3"}) as resp:
                    assert resp.status == 401
                async with session.post(url, json=body, headers={
                        "Authorization": "Bearer k2", "X-Request-Id": "abc-123"}) as resp:
                    assert resp.status == 200 and resp.headers["X-Request-Id"] == "abc-123"
                async with session.post(url, json=body,
                                        headers={"Authorization": "Bearer k1"}) as resp:
                    generated = resp.headers["X-Request-Id"]
                    assert resp.status == 200 and len(generated) == 32
                for path in ("/health", "/ready"):  # probes need no key
                    async with session.get(proxy.url + path) as resp:
                        assert resp.status == 200
                async with session.get(proxy.url + "/metrics") as resp:  # on the admin port
                    assert resp.status == 404
                admin = f"http://127.0.0.1:{admin_port}"
                async with session.get(admin + "/metrics") as resp:
                    assert resp.status == 200
                    assert "blockproxy_unauthorized_requests_total 2.0" in await resp.text()
                async with session.get(admin + "/debug/cluster",
                                       headers={"Authorization": "Bearer k1"}) as resp:
                    assert resp.status == 200
    lines = log.read_text().splitlines()
    assert any('"POST /v1/completions HTTP/1.1" 200' in line and line.endswith(" abc-123")
               for line in lines)
    assert any(line.endswith(" " + generated) for line in lines)
    assert sum('" 401 ' in line for line in lines) == 2


# ---- routing ------------------------------------------------------------------------------

POLICIES = ["block", "block_ttft", "round_robin", "random", "least_requests", "power_of_two",
            "least_tokens", "llumnix"]


@pytest.mark.parametrize("policy", POLICIES)
async def test_every_policy_serves_a_burst(tmp_module: Path, emulator: Emulator, policy: str):
    backends = write_backends(tmp_module / f"{policy}.yaml", [{"url": u} for u in emulator.urls])
    with Proxy(tmp_module, backends, ["--policy", policy]) as proxy:
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(*(stream_events(session, proxy.url, 8)
                                             for _ in range(16)))
        assert all(r[-1] == b"data: [DONE]" and len(r) == 9 for r in results)
        assert sum(decisions(proxy).values()) == 16
        assert proxy.cluster()["in_flight"] == 0


async def test_block_spreads_a_burst_over_equal_instances(tmp_path: Path):
    with Emulator(tmp_path, instances=4) as emu:
        backends = write_backends(tmp_path / "four.yaml",
                                  [{"url": u, "name": f"i{k}"} for k, u in enumerate(emu.urls)])
        with Proxy(tmp_path, backends) as proxy:
            async with aiohttp.ClientSession() as session:
                await asyncio.gather(*(stream_events(session, proxy.url, 40)
                                       for _ in range(40)))
            counts = decisions(proxy)
    assert sum(counts.values()) == 40
    assert min(counts.get(f"i{k}", 0) for k in range(4)) >= 6, counts


async def test_block_prefers_the_faster_instance(tmp_path: Path):
    with Emulator(tmp_path, instances=1, profile="llama-3.1-8b-h100-tp1") as fast, \
            Emulator(tmp_path, instances=1, profile="llama-3.1-8b-a100-80gb-tp1") as slow:
        backends = write_backends(tmp_path / "mixed.yaml", [
            {"url": fast.urls[0], "name": "h100", "profile": "llama-3.1-8b-h100-tp1"},
            {"url": slow.urls[0], "name": "a100", "profile": "llama-3.1-8b-a100-80gb-tp1"}])
        with Proxy(tmp_path, backends) as proxy:
            async with aiohttp.ClientSession() as session:
                for _ in range(3):
                    await asyncio.gather(*(stream_events(session, proxy.url, 30)
                                           for _ in range(10)))
            counts = decisions(proxy)
    assert counts["h100"] >= 2 * counts.get("a100", 0), counts


async def test_other_v1_paths_are_forwarded_unchanged(proxy: Proxy, emulator: Emulator):
    async with aiohttp.ClientSession() as session:
        body = {"model": MODEL, "input": "hello"}
        async with session.post(proxy.url + "/v1/embeddings?x=1", json=body) as via_proxy:
            proxied = (via_proxy.status, await via_proxy.read())
        async with session.post(emulator.urls[0] + "/v1/embeddings?x=1", json=body) as direct:
            expected = (direct.status, await direct.read())
    assert proxied == expected
