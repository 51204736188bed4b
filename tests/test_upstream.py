"""The upstream client (:mod:`blockproxy.upstream`) against real servers on loopback: an
aiohttp app for well-formed HTTP, raw asyncio servers for the misbehaviour a client must
survive (a body cut short, garbage, silence, a close after the headers)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from blockproxy.upstream import Upstream, UpstreamError


class Origin:
    """What the aiohttp origin saw."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []
        self.bodies: list[bytes] = []
        self.peers: list[object] = []
        self.disconnected = asyncio.Event()


@pytest.fixture
async def origin(aiohttp_server: Callable[..., Awaitable[TestServer]]
                 ) -> AsyncIterator[tuple[str, Origin]]:
    seen = Origin()

    async def echo(request: web.Request) -> web.Response:
        seen.headers.append(dict(request.headers))
        seen.bodies.append(await request.read())
        seen.peers.append(request.transport.get_extra_info("peername")
                          if request.transport else None)
        return web.json_response({"ok": True, "n": len(seen.bodies)})

    async def stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        n = int(request.query.get("n", "5"))
        try:
            for i in range(n):
                await resp.write(b"data: %d\n\n" % i)
                await asyncio.sleep(float(request.query.get("gap", "0")))
        except (ConnectionResetError, asyncio.CancelledError):
            seen.disconnected.set()
            raise
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * (3 * 1024 * 1024), content_type="application/json")

    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=int(request.query.get("status", "500")), text="no")

    app = web.Application()
    app.router.add_post("/echo", echo)
    app.router.add_get("/echo", echo)
    app.router.add_post("/stream", stream)
    app.router.add_get("/big", big)
    app.router.add_post("/fail", fail)
    server = await aiohttp_server(app)
    yield str(server.make_url("")).rstrip("/"), seen


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    client = Upstream(connect_timeout=1.0, read_timeout=1.0)
    yield client
    await client.close()


async def raw_server(reply: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                     Awaitable[None]]) -> tuple[asyncio.Server, str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        try:
            await reply(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def test_post_forwards_the_body_and_the_end_to_end_headers(
        origin: tuple[str, Origin], upstream: Upstream) -> None:
    url, seen = origin
    headers = upstream.forward_headers([
        (b"Authorization", b"Bearer k"), (b"Content-Type", b"application/json"),
        (b"X-App", "café".encode()), (b"Connection", b"close"),
        (b"Transfer-Encoding", b"chunked"), (b"Host", b"elsewhere"),
        (b"Expect", b"100-continue")])
    resp = await upstream.open(url + "/echo", b'{"a": 1}', headers)
    assert resp.status == 200 and resp.content_type == "application/json"
    assert await resp.read() == b'{"ok": true, "n": 1}'
    resp.close()
    got = seen.headers[0]
    assert seen.bodies == [b'{"a": 1}']
    assert got["Authorization"] == "Bearer k" and got["X-App"] == "café"
    assert got["Host"] == url.split("//")[1] and got["Content-Length"] == "8"
    assert "Transfer-Encoding" not in got and "Expect" not in got
    assert got.get("Connection", "keep-alive").lower() != "close"


def test_a_header_that_would_split_the_request_is_dropped() -> None:
    block = Upstream.forward_headers([(b"X-Ok", b"1"), (b"X-Bad", b"a\r\nInjected: yes")])
    assert block == b"X-Ok: 1\r\n"


async def test_keep_alive_reuses_one_connection(origin: tuple[str, Origin],
                                                upstream: Upstream) -> None:
    url, seen = origin
    for _ in range(5):
        resp = await upstream.open(url + "/echo", b"{}", b"")
        await resp.read()
        resp.close()
    assert len(set(seen.peers)) == 1


async def test_idle_connections_past_the_idle_timeout_are_not_reused(
        origin: tuple[str, Origin], upstream: Upstream) -> None:
    url, seen = origin
    upstream.pool.idle_timeout = 0.05
    for _ in range(2):
        resp = await upstream.open(url + "/echo", b"{}", b"")
        await resp.read()
        resp.close()
        await asyncio.sleep(0.1)
    assert len(set(seen.peers)) == 2


async def test_a_stream_arrives_in_order_and_ends(origin: tuple[str, Origin],
                                                  upstream: Upstream) -> None:
    url, _ = origin
    resp = await upstream.open(url + "/stream?n=20&gap=0.001", b"{}", b"")
    assert resp.content_type == "text/event-stream"
    data = b"".join([c async for c in resp.iter_chunks()])
    resp.close()
    assert data == b"".join(b"data: %d\n\n" % i for i in range(20)) + b"data: [DONE]\n\n"


async def test_closing_a_stream_early_aborts_it_at_the_origin(
        origin: tuple[str, Origin], upstream: Upstream) -> None:
    url, seen = origin
    resp = await upstream.open(url + "/stream?n=1000&gap=0.01", b"{}", b"")
    async for _ in resp.iter_chunks():
        break
    resp.close()
    await asyncio.wait_for(seen.disconnected.wait(), 5)
    # and the aborted connection is not handed to the next request
    resp = await upstream.open(url + "/echo", b"{}", b"")
    assert (await resp.read()).startswith(b'{"ok"')
    resp.close()


async def test_a_large_body_is_read_whole_through_flow_control(
        origin: tuple[str, Origin], upstream: Upstream) -> None:
    url, _ = origin
    assert await upstream.passthrough("GET", url + "/big", b"", b"") == \
        (200, "application/json", b"x" * (3 * 1024 * 1024))


async def test_any_status_is_returned(origin: tuple[str, Origin], upstream: Upstream
                                      ) -> None:
    """What a 5xx means for the instance is the caller's to decide: the client does not
    raise on it (the request reached the server, so it must not be retried blindly)."""
    url, _ = origin
    for status in (503, 400):
        resp = await upstream.open(url + f"/fail?status={status}", b"{}", b"")
        assert resp.status == status and await resp.read() == b"no"
        resp.close()


async def test_refused_connection_raises(upstream: Upstream) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(UpstreamError, match="connect") as info:
        await upstream.open(f"http://127.0.0.1:{port}/v1/completions", b"{}", b"")
    assert not info.value.sent and not info.value.local  # safe to retry elsewhere


async def test_silence_times_out(upstream: Upstream) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    server, url = await raw_server(silent)
    async with server:
        with pytest.raises(UpstreamError, match="no data for 1 s") as info:
            await upstream.open(url + "/v1/completions", b"{}", b"")
        assert info.value.sent and info.value.timeout  # it may be running: never retry


async def test_connections_per_instance_are_capped() -> None:
    """Beyond the cap a request waits for a connection; past the connect timeout it fails
    as not sent and local (the proxy's limit, not the instance's fault)."""
    release = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n"
                     b"\r\nok")
        await writer.drain()

    server, url = await raw_server(slow)
    client = Upstream(connect_timeout=0.3, read_timeout=5.0, max_connections_per_instance=2)
    async with server:
        first = [asyncio.create_task(client.passthrough("GET", url + "/x", b"", b""))
                 for _ in range(2)]
        await asyncio.sleep(0.1)
        with pytest.raises(UpstreamError, match="stayed busy") as info:
            await client.passthrough("GET", url + "/x", b"", b"")
        assert not info.value.sent and info.value.local
        waiting = asyncio.create_task(client.passthrough("GET", url + "/x", b"", b""))
        await asyncio.sleep(0.05)
        release.set()  # the first two finish; the waiting one gets a connection
        assert [r[2] for r in await asyncio.gather(*first, waiting)] == [b"ok"] * 3
        assert client.pool.open == {}  # every connection closed, every slot freed
    await client.close()


async def test_a_body_cut_short_breaks_the_stream(upstream: Upstream) -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n7\r\ndata: 0\r\n")
        await writer.drain()

    server, url = await raw_server(cut)
    async with server:
        resp = await upstream.open(url + "/v1/completions", b"{}", b"")
        got = []
        with pytest.raises(UpstreamError, match="stream broke"):
            async for chunk in resp.iter_chunks():
                got.append(chunk)
        resp.close()
        assert got == [b"data: 0"]


async def test_garbage_is_an_error_not_a_hang(upstream: Upstream) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    server, url = await raw_server(garbage)
    async with server:
        with pytest.raises(UpstreamError, match="malformed"):
            await upstream.open(url + "/v1/completions", b"{}", b"")


async def test_a_body_delimited_by_close_is_complete(upstream: Upstream) -> None:
    async def http10(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\n\r\n{\"ok\": 1}")
        await writer.drain()

    server, url = await raw_server(http10)
    async with server:
        assert await upstream.passthrough("GET", url + "/x", b"", b"") == \
            (200, "application/json", b'{"ok": 1}')
        assert not upstream.pool._idle.get(("127.0.0.1", int(url.rsplit(":", 1)[1])))


async def test_health_and_text_answer_none_when_the_instance_does_not(
        upstream: Upstream) -> None:
    assert await upstream.healthy("http://127.0.0.1:9", timeout=0.5) is False
    assert await upstream.get_text("http://127.0.0.1:9/metrics", timeout=0.5) is None
    assert await upstream.models("http://127.0.0.1:9", timeout=0.5) is None
