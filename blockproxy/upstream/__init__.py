"""The upstream HTTP client: pooled keep-alive connections to the instances.

Everything that talks to an instance goes through here (:mod:`.http1` holds the connections).
A failure raises :class:`UpstreamError`, which says whether the request had been written
(``sent``): only a request that was not may be tried on another instance, since one that
was may already be running on its engine.  Responses of any status are returned; what a
status means for the instance is the caller's business.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any
from urllib.parse import urlsplit

import orjson

from blockproxy.upstream.http1 import (
    Connection,
    Failure,
    HttpError,
    Pool,
    header_block,
    request_head,
)

# Hop-by-hop headers (RFC 9110 7.6.1), those this client sets itself, and ``Expect`` (the
# body is always sent whole).
_DROP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
                   b"te", b"trailer", b"transfer-encoding", b"upgrade", b"host",
                   b"content-length", b"accept-encoding", b"expect"})


class UpstreamError(Failure):
    """An instance failed to answer (``sent``, ``local``, ``timeout``: see
    :class:`~.http1.Failure`; a request that was sent may be running on the engine, so it
    is never retried).  The message names no URL (clients may see it)."""

    @classmethod
    def of(cls, prefix: str, exc: HttpError) -> UpstreamError:
        return cls(f"{prefix}{exc}", sent=exc.sent, local=exc.local, timeout=exc.timeout)


class _Origin:
    """``scheme://host:port`` of an instance, split once."""

    __slots__ = ("host", "host_header", "port")

    def __init__(self, base: str) -> None:
        parts = urlsplit(base)
        if parts.scheme != "http" or not parts.hostname:
            raise UpstreamError(f"{base}: only http:// instance URLs are supported")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.host_header = parts.netloc.encode()


class UpstreamResponse:
    """An open response from an instance."""

    __slots__ = ("_closed", "_conn", "_origin", "_pool", "_timeout", "content_type", "status")

    def __init__(self, pool: Pool, origin: _Origin, conn: Connection, timeout: float) -> None:
        self._pool = pool
        self._origin = origin
        self._conn = conn
        self._timeout = timeout
        self._closed = False
        self.status = conn.status
        ctype = conn.header(b"content-type")
        self.content_type = ctype.split(b";", 1)[0].strip().decode("latin-1") if ctype else ""

    async def read(self, timeout: float | None = None) -> bytes:
        """The whole body, within ``timeout`` seconds if given, else waiting up to the
        read timeout for each part."""
        conn = self._conn
        try:
            if timeout is None:
                return await conn.read_body(self._timeout)
            return await asyncio.wait_for(conn.read_body(max(timeout, 0.001)),
                                          max(timeout, 0.001))
        except asyncio.TimeoutError:
            raise UpstreamError(f"no complete response within {timeout:g} s",
                                timeout=True) from None
        except HttpError as exc:
            raise UpstreamError.of("reading the response failed: ", exc) from exc

    async def chunk(self, timeout: float | None = None) -> bytes:
        """The body bytes buffered so far, waiting up to ``timeout`` (else the read
        timeout) for some; ``b""`` at the end."""
        try:
            return await self._conn.read_chunk(timeout or self._timeout)
        except HttpError as exc:
            raise UpstreamError.of("the stream broke: ", exc) from exc

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Bytes as they arrive, no buffering."""
        while data := await self.chunk():
            yield data

    def close(self) -> None:
        """Keep the connection if the response was read to the end, else abort it (on vLLM:
        aborts the generation).  Closing twice does nothing more."""
        if not self._closed:
            self._closed = True
            self._pool.release(self._origin.host, self._origin.port, self._conn)


class Upstream:
    """Pooled client for all instances."""

    def __init__(self, connect_timeout: float, read_timeout: float,
                 max_connections_per_instance: int = 0) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.pool = Pool(connect_timeout, max_per_host=max_connections_per_instance)
        self._origins: dict[str, _Origin] = {}

    async def close(self) -> None:
        self.pool.close()

    @staticmethod
    def forward_headers(raw_headers: Iterable[tuple[bytes, bytes]],
                        request_id: str | None = None) -> bytes:
        """The client's headers (as received: ``request.raw_headers``) minus hop-by-hop
        ones, as a prebuilt header block; with ``X-Request-Id: request_id`` when the client
        sent none."""
        kept = [(k, v) for k, v in raw_headers if k.lower() not in _DROP]
        if request_id is not None and not any(k.lower() == b"x-request-id" for k, _ in kept):
            kept.append((b"X-Request-Id", request_id.encode()))
        return header_block(kept)

    def _split(self, url: str) -> tuple[_Origin, str]:
        slash = url.find("/", url.find("//") + 2)
        base, path = (url, "/") if slash < 0 else (url[:slash], url[slash:])
        origin = self._origins.get(base)
        if origin is None:
            if len(self._origins) > 1024:  # instance URLs are few; never let this grow
                self._origins.clear()
            origin = self._origins[base] = _Origin(base)
        return origin, path

    async def _send(self, method: str, url: str, body: bytes, headers: bytes,
                    timeout: float) -> UpstreamResponse:
        origin, path = self._split(url)
        pool = self.pool
        try:
            conn = await pool.acquire(origin.host, origin.port,
                                      min(self.connect_timeout, timeout))
        except HttpError as exc:
            raise UpstreamError.of("", exc) from exc
        length = len(body) if body or method not in ("GET", "HEAD") else None
        conn.send(request_head(method, path, origin.host_header, headers, length) + body)
        try:
            await conn.read_headers(timeout)
        except HttpError as exc:
            conn.abort()
            raise UpstreamError.of("", exc) from exc
        except BaseException:  # cancelled while waiting: abort the request upstream
            conn.abort()
            raise
        if method == "HEAD":  # no body follows, whatever the headers say
            conn.complete = True
            conn.abort()
        return UpstreamResponse(pool, origin, conn, timeout)

    async def open(self, url: str, body: bytes, headers: bytes,
                   timeout: float | None = None) -> UpstreamResponse:
        """POST and wait for the response headers (up to ``timeout``, else the read
        timeout), whatever their status."""
        return await self._send("POST", url, body, headers, timeout or self.read_timeout)

    async def passthrough(self, method: str, url: str, body: bytes, headers: bytes,
                          timeout: float | None = None) -> tuple[int, str, bytes]:
        """Forward one request unchanged and read the whole response within ``timeout``
        (else the read timeout per wait); returns (status, content type, body)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        resp = await self._send(method, url, body, headers, timeout or self.read_timeout)
        try:
            return resp.status, resp.content_type, await resp.read(
                None if timeout is None else timeout - (loop.time() - start))
        finally:
            resp.close()

    async def _get(self, url: str, timeout: float) -> tuple[int, bytes] | None:
        try:
            resp = await self._send("GET", url, b"", b"", timeout)
        except UpstreamError:
            return None
        try:
            return resp.status, await resp.read()
        except UpstreamError:
            return None
        finally:
            resp.close()

    async def healthy(self, base_url: str, timeout: float = 2.0) -> bool:
        """Whether ``/health`` answers 200."""
        got = await self._get(base_url + "/health", timeout)
        return got is not None and got[0] == 200

    async def get_text(self, url: str, timeout: float = 2.0) -> str | None:
        """GET ``url`` as text (an instance's ``/metrics``), or None if it does not answer."""
        got = await self._get(url, timeout)
        if got is None or got[0] != 200:
            return None
        return got[1].decode("utf-8", "replace")

    async def models(self, base_url: str, timeout: float = 2.0) -> list[dict[str, Any]] | None:
        """The instance's ``/v1/models`` cards, or None if it does not answer."""
        got = await self._get(base_url + "/v1/models", timeout)
        if got is None or got[0] != 200:
            return None
        try:
            data = orjson.loads(got[1])
        except orjson.JSONDecodeError:
            return None
        cards = data.get("data") if isinstance(data, dict) else None
        if not isinstance(cards, list):
            return None
        return [c for c in cards if isinstance(c, dict) and isinstance(c.get("id"), str)
                and 0 < len(c["id"].encode()) <= 200]
