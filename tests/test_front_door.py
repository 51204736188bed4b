"""The front door's guarantees, in process (aiohttp's pytest plugin) in front of real
emulated instances served in the same event loop: only the OpenAI paths are routed and
nothing else reaches an instance; a POST that reached an instance is never sent to another;
ejection has a floor; the proxy's own listener enforces its timeouts and limits."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from blockproxy.backends import BackendSpec
from blockproxy.config import ProxyConfig
from blockproxy.front.app import Proxy
from loadgen import emulate, promtext
from loadgen.emulator.server import create_app

Client = TestClient[web.Request, web.Application]


async def _emulated(aiohttp_server: Callable[..., Awaitable[TestServer]], n: int,
                    time_scale: float) -> AsyncIterator[list[str]]:
    parser = argparse.ArgumentParser()
    emulate.add_arguments(parser)
    args = parser.parse_args(["--instances", str(n), "--time-scale", str(time_scale),
                              "--stall-prob", "0", "--seed", "1"])
    insts = emulate.build_instances(args)
    engines = [asyncio.create_task(i.engine.run()) for i in insts]
    urls = []
    for inst in insts:
        server = await aiohttp_server(create_app(inst))
        urls.append(str(server.make_url("")).rstrip("/"))
    yield urls
    for e in engines:
        e.cancel()
    await asyncio.gather(*engines, return_exceptions=True)


@pytest.fixture
async def two_urls(aiohttp_server: Callable[..., Awaitable[TestServer]]
                   ) -> AsyncIterator[list[str]]:
    """Two emulated H100s at real speed: a 150-token answer takes about a second."""
    async for urls in _emulated(aiohttp_server, 2, 1.0):
        yield urls


def _proxy(urls: list[str], **config: Any) -> Proxy:
    cfg = ProxyConfig(backends="(in process)", scrape_interval=0.0, **config)
    return Proxy(cfg, [BackendSpec(url=u, name=f"i{k}", models=("tiny",))
                       for k, u in enumerate(urls)])


async def _raw(client: Client, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send bytes exactly as written (no client-side path normalisation)."""
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(head.encode() + b"\r\n" + body)
    data = await reader.read()
    writer.close()
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


async def _engine_requests(client: Client, url: str) -> float:
    async with client.session.get(url + "/metrics") as resp:
        text = await resp.text()
    return promtext.find(text, "vllm:prompt_tokens_total") or 0.0


#: path as sent -> (status of GET, status of POST): a path that is not a route as written
#: is read as nginx reads it, and served by the proxy's own route it names, if any
PATHS = {
    "/v1/../metrics": (200, 405), "/v1/%2e%2e/metrics": (200, 405),
    "/v1/./completions": (405, 200), "/v1//completions": (405, 200),
    "/v1/../debug/engine": (404, 404), "/v1/completions/": (404, 404),
    "/v1/anything": (404, 404), "/v1/responses": (404, 404), "/metrics/../x": (404, 404),
    "/../v1/completions": (400, 400), "/v1/%ff": (400, 400),
}


@pytest.mark.parametrize("path", list(PATHS))
async def test_only_the_openai_paths_are_routed(two_urls: list[str], path: str,
                                                aiohttp_client: Any) -> None:
    proxy = _proxy(two_urls)
    client = await aiohttp_client(proxy.make_app())
    body = b'{"model": "tiny", "prompt": "hello", "max_tokens": 2}'
    for method, expected in zip(("GET", "POST"), PATHS[path], strict=True):
        status, payload = await _raw(
            client, f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n", body)
        assert status == expected, (method, path, payload[:200])
        assert b"vllm:" not in payload and b"num_steps" not in payload
        if status != 200:
            assert b'"error"' in payload
        elif method == "GET":
            assert b"blockproxy_requests_total" in payload  # the proxy's own metrics
    # Only a completions request read as /v1/completions reached an instance, through the
    # proxy's own handling (reserved, counted, released).
    runs = [await _engine_requests(client, u) for u in two_urls]
    assert sum(runs) == (1 if PATHS[path][1] == 200 else 0)  # "hello": one prompt token
    assert all(i.active == 0 for i in proxy.view.instances.values())


async def test_pass_through_paths_are_forwarded_to_their_own_path(
        two_urls: list[str], aiohttp_client: Any) -> None:
    client = await aiohttp_client(_proxy(two_urls).make_app())
    resp = await client.post("/tokenize", json={"model": "tiny", "prompt": "one two three"})
    assert resp.status == 200
    assert (await resp.json())["count"] == 3
    resp = await client.post("/tokenize", json={"model": "nope", "prompt": "x"})
    assert resp.status == 404 and (await resp.json())["error"]["type"] == "NotFoundError"
    resp = await client.get("/v1/completions")
    assert resp.status == 405 and resp.headers["Allow"] == "POST"


async def test_a_unary_request_longer_than_the_read_timeout_runs_once(
        two_urls: list[str], aiohttp_client: Any) -> None:
    proxy = _proxy(two_urls, read_timeout=0.3)
    client = await aiohttp_client(proxy.make_app())
    body = {"model": "tiny", "prompt": "hello there", "max_tokens": 150, "ignore_eos": True}
    resp = await client.post("/v1/completions", json=body)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["usage"]["completion_tokens"] == 150
    runs = [await _engine_requests(client, u) for u in two_urls]
    assert sorted(runs) == [0, 2], runs  # one instance saw its two prompt tokens, once
    assert all(i.failures == 0 and i.healthy for i in proxy.view.instances.values())


async def test_a_unary_request_past_its_deadline_is_504_and_not_retried(
        two_urls: list[str], aiohttp_client: Any) -> None:
    proxy = _proxy(two_urls, unary_timeout=0.3)
    client = await aiohttp_client(proxy.make_app())
    body = {"model": "tiny", "prompt": "hello there", "max_tokens": 150, "ignore_eos": True}
    resp = await client.post("/v1/completions", json=body)
    assert resp.status == 504
    error = (await resp.json())["error"]
    assert error["type"] == "GatewayTimeoutError" and "http://" not in error["message"]
    await asyncio.sleep(0.2)
    runs = [await _engine_requests(client, u) for u in two_urls]
    assert sorted(runs) == [0, 2], runs


async def test_ejection_has_a_floor(aiohttp_server: Callable[..., Awaitable[TestServer]],
                                    aiohttp_client: Any) -> None:
    """Instances answering 503 to every generation (healthy to probes) are ejected, but
    never more than half of them at once, and each 503 is the client's answer: passed
    through, not retried on the next instance, and not turned into 'no instance'."""
    hits: list[int] = []

    def backend(k: int) -> web.Application:
        async def fail(request: web.Request) -> web.Response:
            hits.append(k)
            return web.json_response({"error": {"message": "overloaded"}}, status=503)

        async def health(request: web.Request) -> web.Response:
            return web.Response()
        app = web.Application()
        app.router.add_post("/v1/completions", fail)
        app.router.add_get("/health", health)
        return app

    urls = [str((await aiohttp_server(backend(k))).make_url("")).rstrip("/") for k in range(4)]
    proxy = _proxy(urls, eject_after=1, probe_interval=30.0)
    client = await aiohttp_client(proxy.make_app())
    for n in range(12):
        resp = await client.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert resp.status == 503
        assert (await resp.json())["error"]["message"] == "overloaded"
        assert len(hits) == n + 1  # one instance per request
        assert sum(not i.healthy for i in proxy.view.instances.values()) <= 2
    assert sum(not i.healthy for i in proxy.view.instances.values()) == 2


async def test_panic_routes_to_all_when_every_instance_is_ejected(two_urls: list[str],
                                                                  aiohttp_client: Any
                                                                  ) -> None:
    proxy = _proxy(two_urls, probe_interval=30.0)
    client = await aiohttp_client(proxy.make_app())
    for inst in proxy.view.instances.values():  # e.g. ejected, then the cap was lowered
        inst.healthy = False
    resp = await client.post("/v1/completions", json={"model": "tiny", "prompt": "x",
                                                       "max_tokens": 2})
    assert resp.status == 200


async def _raw_backend(reply: bytes) -> tuple[asyncio.Server, str]:
    """A backend that answers every request with ``reply`` and closes."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@pytest.mark.parametrize(("reply", "status", "counted"), [
    # a unary body cut short: the instance broke after the request was sent
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
     b'{"id": "x",', 502, True),
    # the engine's own 500 for this request: passed through, not the instance's fault
    (b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
     b'Content-Length: 21\r\n\r\n{"error": "bad args"}', 500, False),
    # the connection closes with no answer at all: it may have run, so not retried
    (b"", 502, True),
])
async def test_failures_after_the_request_was_sent(reply: bytes, status: int, counted: bool,
                                                   aiohttp_client: Any) -> None:
    servers = [await _raw_backend(reply) for _ in range(2)]
    proxy = _proxy([url for _, url in servers])
    client = await aiohttp_client(proxy.make_app())
    resp = await client.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert resp.status == status
    text = await resp.text()
    assert "127.0.0.1" not in text and "http://" not in text
    if status == 502:
        assert (await resp.json())["error"]["type"] == "BadGatewayError"
    failures = sorted(i.failures for i in proxy.view.instances.values())
    assert failures == ([0, 1] if counted else [0, 0])  # one instance tried, no retry
    for server, _ in servers:
        server.close()


# ---- the listener: what the proxy's own socket enforces ------------------------------
class Served:
    """A proxy served as ``blockproxy serve`` serves it (guarded socket), in this loop."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.runner = web.AppRunner(proxy.make_app(), handler_cancellation=True,
                                    keepalive_timeout=proxy.config.keepalive_timeout)
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Served:
        from blockproxy.serve import listen

        await self.runner.setup()
        self.server = await listen(self.proxy, self.runner, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.runner.cleanup()

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)

    def metric(self, name: str, **labels: str) -> float:
        return promtext.find(self.proxy.metrics.render().decode(), name, **labels) or 0.0


async def _response(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout)


async def test_headers_must_arrive_in_time(two_urls: list[str]) -> None:
    async with Served(_proxy(two_urls, header_timeout=0.3)) as served:
        reader, writer = await served.connect()  # says nothing at all
        trickle_r, trickle_w = await served.connect()
        trickle_w.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")  # never finishes
        ok_r, ok_w = await served.connect()
        ok_w.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await _response(ok_r)).startswith(b"HTTP/1.1 200")
        for r in (reader, trickle_r):
            data = await _response(r, 2.0)
            assert data.startswith(b"HTTP/1.1 408") and b'"RequestTimeout"' in data
        assert served.metric("blockproxy_client_timeouts_total", kind="header") == 2
        for w in (writer, trickle_w, ok_w):
            w.close()


async def test_a_keep_alive_connection_is_not_timed_while_a_request_runs(
        two_urls: list[str]) -> None:
    """The header timer covers headers only: a request slower than it completes, and the
    connection then serves another."""
    async with Served(_proxy(two_urls, header_timeout=0.3)) as served:
        reader, writer = await served.connect()
        body = b'{"model": "tiny", "prompt": "x", "max_tokens": 80, "ignore_eos": true}'
        for close in (b"", b"Connection: close\r\n"):
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\n" + close +
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            assert b'"completion_tokens":80' in await reader.readexactly(length)
        writer.close()


async def test_the_connection_cap_refuses_with_503(two_urls: list[str]) -> None:
    async with Served(_proxy(two_urls, max_connections=2)) as served:
        held = [await served.connect() for _ in range(2)]
        await asyncio.sleep(0.05)
        reader, writer = await served.connect()
        data = await _response(reader)
        assert data.startswith(b"HTTP/1.1 503") and b"too many connections" in data
        assert served.metric("blockproxy_rejected_connections_total") == 1
        held[0][1].close()
        await asyncio.sleep(0.05)
        reader, writer = await served.connect()  # a slot is free again
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await _response(reader)).startswith(b"HTTP/1.1 200")
        for _, w in held:
            w.close()


async def test_a_body_must_arrive_in_time(two_urls: list[str]) -> None:
    async with Served(_proxy(two_urls, body_timeout=0.3)) as served:
        reader, writer = await served.connect()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 100\r\n\r\n{\"model\": ")
        data = await _response(reader)
        assert data.startswith(b"HTTP/1.1 408") and b"did not arrive" in data
        assert all(i.active == 0 for i in served.proxy.view.instances.values())


async def test_a_client_that_stops_reading_is_let_go(
        aiohttp_server: Callable[..., Awaitable[TestServer]]) -> None:
    """Send timeout: a stream whose client reads nothing is closed after it, and its
    generation aborted on the instance; a concurrent stream is unaffected."""
    import socket

    async for urls in _emulated(aiohttp_server, 1, 0.01):
        async with Served(_proxy(urls, send_timeout=0.5)) as served:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", served.port))
            _reader, writer = await asyncio.open_connection(sock=sock)
            body = (b'{"model": "tiny", "prompt": "x", "max_tokens": 60000, "stream": true, '
                    b'"ignore_eos": true}')
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            inst = served.proxy.view.instances["i0"]
            for _ in range(200):  # it never reads: the proxy gives up on it
                await asyncio.sleep(0.05)
                if served.metric("blockproxy_client_timeouts_total", kind="send"):
                    break
            assert served.metric("blockproxy_client_timeouts_total", kind="send") == 1
            await asyncio.sleep(0.1)
            assert inst.active == 0  # released, and the upstream connection aborted
            writer.close()


# ---- background loops --------------------------------------------------------------
async def test_an_odd_models_answer_stops_neither_discovery_nor_probing(
        two_urls: list[str], aiohttp_server: Callable[..., Awaitable[TestServer]],
        aiohttp_client: Any) -> None:
    """A backend whose /v1/models has the wrong shape is ignored; probing and discovery of
    the other instances go on; a loop that keeps failing turns /health to 503."""
    async def odd_models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": ["not", "a", "name"]}, {"id": 7}, "x"]})

    odd = web.Application()
    odd.router.add_get("/v1/models", odd_models)
    odd_url = str((await aiohttp_server(odd)).make_url("")).rstrip("/")
    cfg = ProxyConfig(backends="(in process)", scrape_interval=0.0, probe_interval=0.1)
    proxy = Proxy(cfg, [BackendSpec(url=odd_url, name="odd"),
                        BackendSpec(url=two_urls[0], name="good")])
    good = proxy.view.instances["good"]
    good.record_failure(0.0, 1, 0.1)  # ejected; its probe is due
    client = await aiohttp_client(proxy.make_app())
    for _ in range(50):
        await asyncio.sleep(0.1)
        if good.healthy and good.models:
            break
    assert good.healthy and good.models == {"tiny"}
    assert proxy.view.instances["odd"].models == set()
    assert (await client.get("/health")).status == 200
    assert proxy.metrics.task_restarts.labels("probe")._value.get() == 0

    async def broken() -> None:
        raise RuntimeError("always")
    proxy.supervisor.every("broken", 0.01, broken)
    proxy.supervisor.start_one("broken")
    for _ in range(50):
        await asyncio.sleep(0.1)
        resp = await client.get("/health")
        if resp.status == 503:
            break
    assert resp.status == 503
    assert (await resp.json())["failing_loops"] == ["broken"]


async def test_several_sequences_do_not_feed_calibration(
        aiohttp_server: Callable[..., Awaitable[TestServer]], aiohttp_client: Any) -> None:
    """n = 3: three events per engine step.  The request is estimated, not observed: its
    events do not calibrate the instance's speed, and its length is learned per sequence."""
    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _step in range(40):
            for choice in range(3):
                await resp.write(b'data: {"choices":[{"index":%d,"text":" w"}]}\n\n' % choice)
            await asyncio.sleep(0.002)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", stream)
    url = str((await aiohttp_server(app)).make_url("")).rstrip("/")
    proxy = _proxy([url])
    client = await aiohttp_client(proxy.make_app())
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 40, "n": 3, "stream": True}
    resp = await client.post("/v1/completions", json=body)
    assert resp.status == 200 and (await resp.text()).count('"text"') == 120
    inst = proxy.view.instances["i0"]
    assert inst.calibration.samples == 0 and inst.active == 0
    assert proxy.predictor.learned("tiny", 1) is None  # one observation: not yet learned
    assert proxy.predictor._global.quantile(0.5) == 40


def test_fuzzed_requests_get_success_or_openai_errors(tmp_path: Any) -> None:
    """hypothesis-generated methods, paths, headers and bodies against a live proxy
    (scripts/front_door.py fuzz, fewer examples): every answer a success or a well-formed
    OpenAI error, nothing the proxy refused reaching the backend, descriptors flat."""
    import importlib.util

    from tests.procs import ROOT

    spec = importlib.util.spec_from_file_location("front_door",
                                                  ROOT / "scripts" / "front_door.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.fuzz(argparse.Namespace(examples=150), tmp_path)
    assert result["violations"] == [] and result["examples"] == 150
    assert result["backend_requests"] > 0  # the valid ones did get through
    assert result["proxy_after"]["fds"] <= result["proxy_before"]["fds"] + 4
