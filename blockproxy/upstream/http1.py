"""A lean HTTP/1.1 client: keep-alive connections on asyncio protocols, parsed by llhttp.

The proxy sends one kind of request many times a second to a handful of instances, so the
general-purpose client's per-request machinery (URL objects, cookie jars, tracing hooks,
header multidicts, payload writers, timers per read) is most of its cost.  Here a request is
one ``transport.write`` of prebuilt bytes on a pooled connection, and the response is parsed
by ``httptools`` (the llhttp parser uvicorn uses) straight into a small buffer that the
reader drains; chunked transfer coding, content-length bodies and keep-alive are the
parser's.

Connections idle longer than ``idle_timeout`` are closed rather than reused, so a request is
never written to a connection the server is about to close (uvicorn's keep-alive is 5 s).
A connection whose response was not read to the end is aborted, never reused: on vLLM that
aborts the generation.
"""

from __future__ import annotations

import asyncio
import collections
import errno
from collections.abc import Iterable
from typing import cast

import httptools

#: pause reading a response when this much of its body is buffered unread
HIGH_WATER = 64 * 1024


class Failure(Exception):
    """A request that failed, and what that means for retrying it.

    ``sent``: whether the request had been written (it may then have reached the server);
    ``local``: this process ran out of something (file descriptors, its connection cap),
    which says nothing about the server; ``timeout``: a wait passed its deadline.
    """

    def __init__(self, message: str, *, sent: bool = True, local: bool = False,
                 timeout: bool = False) -> None:
        super().__init__(message)
        self.sent = sent
        self.local = local
        self.timeout = timeout


class HttpError(Failure):
    """The connection failed, timed out or sent something that is not HTTP."""


class Connection(asyncio.Protocol):
    """One keep-alive connection, one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: Pool) -> None:
        self.loop = loop
        self.pool = pool
        self.deadline = 0.0  # while waiting: when the wait times out
        self.timeout = 0.0
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.keep_alive = False
        self.framed = False  # the body has a length or chunked coding (else: until close)
        self.complete = False
        self.error: HttpError | None = None
        self.closed = False
        self.busy = False
        self.idle_since = 0.0
        self.key: tuple[str, int] = ("", 0)
        self.counted = False  # among the pool's open connections to ``key``

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # nothing is owed on an idle connection: the server misbehaves
            self.abort()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(HttpError(f"malformed HTTP response: {exc}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.closed(self)
        self.closed = True
        if self.busy and not self.complete:
            if self.headers_done and not self.framed:
                self.complete = True  # a body delimited by the connection's close
            else:
                self._fail(HttpError("the connection closed before the response ended"
                                     + (f" ({exc!r})" if exc else "")))
        self._wake()

    # -- llhttp callbacks ---------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True
        self.keep_alive = self.parser.should_keep_alive()  # only valid before the body ends
        self.framed = any(n == b"content-length" or n == b"transfer-encoding"
                          for n, _ in self.headers)
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # -- the request --------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.busy = True
        self.status = 0
        self.headers = []
        self.headers_done = self.complete = self.keep_alive = False
        self.error = None
        if self.closed:
            self.error = HttpError("the connection closed before the request was sent",
                                   sent=False)
            return
        self.transport.write(data)

    async def read_headers(self, timeout: float) -> None:
        while not self.headers_done:
            if self.error is not None:
                raise self.error
            await self._wait(timeout)

    async def read_chunk(self, timeout: float) -> bytes:
        """All body bytes buffered so far (waiting for some), or ``b""`` at the end."""
        while True:
            if self.chunks:
                chunks = self.chunks
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self.buffered = 0
                if self.paused and self.transport is not None:
                    self.paused = False
                    self.transport.resume_reading()
                return data
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            await self._wait(timeout)

    async def read_body(self, timeout: float) -> bytes:
        parts = []
        while data := await self.read_chunk(timeout):
            parts.append(data)
        return b"".join(parts)

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None

    def reusable(self) -> bool:
        return self.complete and not self.closed and not self.chunks and \
            self.error is None and self.keep_alive

    def abort(self) -> None:
        self.closed = True
        self.pool.closed(self)
        if self.transport is not None:
            self.transport.abort()

    # -- waiting ------------------------------------------------------------------------
    async def _wait(self, timeout: float) -> None:
        fut = self.waiter = self.loop.create_future()
        self.timeout = timeout
        self.deadline = self.loop.time() + timeout
        self.pool.watch(self)
        try:
            await fut
        finally:
            self.waiter = None
            self.pool.unwatch(self)

    def _wake(self) -> None:
        fut = self.waiter
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _fail(self, error: HttpError) -> None:
        if self.error is None:
            self.error = error
        self._wake()


class Pool:
    """Idle keep-alive connections per ``host:port``, most recently used first.

    Read timeouts are checked by one watchdog every :data:`TICK` seconds over the
    connections that wait, rather than by a timer armed and cancelled on every read (a
    timer per streamed chunk was a tenth of the client's cost): a timeout fires up to one
    tick late.
    """

    TICK = 0.1

    def __init__(self, connect_timeout: float, idle_timeout: float = 2.0,
                 max_per_host: int = 0) -> None:
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        #: open connections allowed per ``host:port`` (0: no cap); a request beyond it
        #: waits for one to be released, up to the connect timeout
        self.max_per_host = max_per_host
        self.open: dict[tuple[str, int], int] = {}
        self._slot_waiters: dict[tuple[str, int], collections.deque[asyncio.Future[None]]] = {}
        self._idle: dict[tuple[str, int], list[Connection]] = {}
        self._swept_at = 0.0
        self._waiting: set[Connection] = set()
        self._watchdog: asyncio.TimerHandle | None = None

    def watch(self, conn: Connection) -> None:
        self._waiting.add(conn)
        if self._watchdog is None:
            self._watchdog = conn.loop.call_later(self.TICK, self._tick, conn.loop)

    def unwatch(self, conn: Connection) -> None:
        self._waiting.discard(conn)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._watchdog = None
        now = loop.time()
        for conn in [c for c in self._waiting if now >= c.deadline]:
            self._waiting.discard(conn)
            fut = conn.waiter
            if fut is not None and not fut.done():
                fut.set_exception(HttpError(f"no data for {conn.timeout:g} s", timeout=True))
        if self._waiting:
            self._watchdog = loop.call_later(self.TICK, self._tick, loop)

    async def acquire(self, host: str, port: int, connect_timeout: float | None = None
                      ) -> Connection:
        """An idle connection to ``host:port``, or a new one."""
        connect_timeout = connect_timeout or self.connect_timeout
        loop = asyncio.get_running_loop()
        key = (host, port)
        deadline = loop.time() + connect_timeout
        while True:
            idle = self._idle.get(key)
            now = loop.time()
            while idle:
                conn = idle.pop()
                if not conn.closed and now - conn.idle_since < self.idle_timeout:
                    return conn
                conn.abort()
            if not self.max_per_host or self.open.get(key, 0) < self.max_per_host:
                break
            await self._wait_slot(key, loop, deadline - now)
        self.open[key] = self.open.get(key, 0) + 1
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(lambda: Connection(loop, self), host, port),
                connect_timeout)
        except asyncio.TimeoutError:
            self._free(key)
            raise HttpError(f"connect to {host}:{port} timed out after "
                            f"{connect_timeout:g} s", sent=False, timeout=True) from None
        except OSError as exc:
            self._free(key)
            local = exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
            raise HttpError(f"connect to {host}:{port} failed: {exc!r}", sent=False,
                            local=local) from exc
        except BaseException:
            self._free(key)
            raise
        proto.key = key
        proto.counted = True
        return proto

    async def _wait_slot(self, key: tuple[str, int], loop: asyncio.AbstractEventLoop,
                         timeout: float) -> None:
        fut: asyncio.Future[None] = loop.create_future()
        waiters = self._slot_waiters.setdefault(key, collections.deque())
        waiters.append(fut)
        try:
            await asyncio.wait_for(fut, max(timeout, 0.0))
        except asyncio.TimeoutError:
            raise HttpError(f"all {self.max_per_host} connections to {key[0]}:{key[1]} "
                            "stayed busy", sent=False, local=True) from None
        finally:
            if fut in waiters:
                waiters.remove(fut)

    def closed(self, conn: Connection) -> None:
        """A connection of this pool closed: its slot is free."""
        if conn.counted:
            conn.counted = False
            self._free(conn.key)

    def _free(self, key: tuple[str, int]) -> None:
        left = self.open.get(key, 0) - 1
        if left > 0:
            self.open[key] = left
        else:
            self.open.pop(key, None)
        if self._slot_waiters.get(key):
            self._wake_slot(key)

    def _wake_slot(self, key: tuple[str, int]) -> None:
        waiters = self._slot_waiters[key]
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                break

    def release(self, host: str, port: int, conn: Connection) -> None:
        """Back to the pool if the response was read to the end, else aborted."""
        if not conn.reusable():
            conn.abort()
            return
        conn.busy = False
        now = conn.idle_since = conn.loop.time()
        self._idle.setdefault((host, port), []).append(conn)
        if self._slot_waiters.get((host, port)):
            self._wake_slot((host, port))
        if now - self._swept_at > self.idle_timeout:
            self._swept_at = now
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        for key, conns in list(self._idle.items()):
            keep = [c for c in conns if not c.closed and now - c.idle_since < self.idle_timeout]
            for c in conns:
                if c not in keep:
                    c.abort()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for conns in self._idle.values():
            for conn in conns:
                conn.abort()
        self._idle.clear()


def request_head(method: str, path: str, host: bytes, headers: bytes, length: int | None
                 ) -> bytes:
    """The request line and headers; ``headers`` is a prebuilt block of ``Name: value\\r\\n``."""
    head = b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method.encode(), path.encode(), host)
    if length is not None:
        head += b"Content-Length: %d\r\n" % length
    return head + headers + b"\r\n"


def header_block(items: Iterable[tuple[bytes, bytes]]) -> bytes:
    """``Name: value\\r\\n`` lines.

    A name or value holding CR or LF (which no HTTP parser lets in) is dropped rather than
    allowed to split the request.
    """
    return b"".join(b"%s: %s\r\n" % (k, v) for k, v in items
                    if b"\r" not in v and b"\n" not in v and b"\r" not in k and b"\n" not in k)
