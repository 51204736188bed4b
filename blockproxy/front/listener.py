"""The listening socket and what it enforces before a request reaches a handler.

aiohttp parses HTTP and runs the handlers; every connection's protocol is wrapped here to
hold what nginx holds at its door: at most ``max_connections`` open client connections
(one more gets a 503 and is closed, so the proxy never runs out of file descriptors and
never blames a backend for it), and a request's headers complete within
``header_timeout`` of its first byte, or of the connection's opening (a client that
trickles its headers gets a 408 and is closed).  How long an idle keep-alive connection
is kept is aiohttp's ``keepalive_timeout``; the body and send timeouts are the handlers'
(:mod:`blockproxy.front.door`).
"""

from __future__ import annotations

import asyncio
import resource
import socket
from collections.abc import Callable

from prometheus_client import Counter, Gauge

#: descriptors kept free for everything that is not a client connection: upstream
#: connections are counted one per client connection on top of this
RESERVED_FDS = 256
#: a refused connection is half-closed after its 503 and kept up to LINGER_S so that the
#: request bytes it still sends do not turn into a reset that loses the 503; at most
#: MAX_LINGERING at once (they hold descriptors), beyond which refusal is a plain close
LINGER_S = 1.0
MAX_LINGERING = 64

_REJECT = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
           b"Connection: close\r\nRetry-After: 1\r\nContent-Length: %d\r\n\r\n%s")
_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s")


def _error(template: bytes, status: int, message: str, type_: str) -> bytes:
    body = (b'{"error":{"message":"%s","type":"%s","param":null,"code":%d}}'
            % (message.encode(), type_.encode(), status))
    return template % (len(body), body)


REJECT = _error(_REJECT, 503, "too many connections to this proxy",
                "ServiceUnavailableError")
HEADER_TIMEOUT = _error(_TIMEOUT, 408, "the request headers did not arrive in time",
                        "RequestTimeout")


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to the hard limit (as nginx's
    ``worker_rlimit_nofile`` does); returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def default_max_connections(fd_limit: int) -> int:
    """Client connections that fit in ``fd_limit`` descriptors: each may need an upstream
    connection too."""
    return max(min((fd_limit - RESERVED_FDS) // 2, 16384), 16)


class Listener:
    """Counts and guards the client connections of one listening socket."""

    def __init__(self, max_connections: int, header_timeout: float,
                 connections: Gauge, rejected: Counter, timeouts: Counter,
                 send_buffer: int = 0) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.send_buffer = send_buffer
        self.open = 0
        self.lingering = 0
        self.guards: dict[asyncio.BaseTransport, Guard] = {}
        self._gauge = connections
        self._rejected = rejected
        self._timeouts = timeouts

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], Guard]:
        """The protocol factory for ``loop.create_server``: aiohttp's, wrapped."""
        return lambda: Guard(inner(), self)

    def guard_of(self, transport: asyncio.BaseTransport | None) -> Guard | None:
        return self.guards.get(transport) if transport is not None else None  # type: ignore[arg-type]


class Guard(asyncio.Protocol):
    """One client connection: aiohttp's protocol inside, the limits around it."""

    __slots__ = ("busy", "inner", "listener", "rejected", "timer", "transport")

    def __init__(self, inner: asyncio.Protocol, listener: Listener) -> None:
        self.inner = inner
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.busy = False
        self.rejected = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        lis = self.listener
        tr: asyncio.Transport = transport  # type: ignore[assignment]
        if lis.open >= lis.max_connections:
            self.rejected = True
            lis._rejected.inc()
            tr.write(REJECT)
            if lis.lingering < MAX_LINGERING and tr.can_write_eof():
                lis.lingering += 1
                self.transport = tr
                tr.write_eof()
                self.timer = asyncio.get_running_loop().call_later(LINGER_S, tr.close)
            else:
                tr.close()
            return
        lis.open += 1
        lis._gauge.inc()
        lis.guards[tr] = self
        if lis.send_buffer:
            sock = tr.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, lis.send_buffer)
        self.transport = tr
        self.inner.connection_made(tr)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.rejected:
            return
        if not self.busy and self.timer is None:  # the first byte of a new request
            self._arm()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return None if self.rejected else self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.rejected:
            if self.transport is not None:  # it lingered
                self.listener.lingering -= 1
                self._disarm()
            return
        lis = self.listener
        lis.open -= 1
        lis._gauge.dec()
        if self.transport is not None:
            lis.guards.pop(self.transport, None)
        self._disarm()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if not self.rejected:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if not self.rejected:
            self.inner.resume_writing()

    # -- what the handlers' middleware tells it -----------------------------------------
    def request_started(self) -> None:
        """The headers are in: the request is the handler's now."""
        self.busy = True
        self._disarm()

    def request_ended(self) -> None:
        self.busy = False

    # -- the header timer ----------------------------------------------------------------
    def _arm(self) -> None:
        timeout = self.listener.header_timeout
        if timeout > 0 and self.transport is not None:
            self.timer = asyncio.get_running_loop().call_later(timeout, self._expired)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expired(self) -> None:
        self.timer = None
        tr = self.transport
        if self.busy or tr is None or tr.is_closing():
            return
        self.listener._timeouts.labels("header").inc()
        tr.write(HEADER_TIMEOUT)
        tr.close()
