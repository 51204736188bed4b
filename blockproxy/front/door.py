"""What every request passes through on its way to a handler, and the client-side timeouts.

One middleware: it tells the connection's :class:`~blockproxy.front.listener.Guard` that
the headers are in (their timer stops), gives the request an id (the client's
``X-Request-Id`` if it sent a sane one, else a new one; forwarded to the instance,
returned in the response, written to the access log) and, with ``--api-key``, checks
``Authorization: Bearer <key>`` in constant time (as vLLM does; ``/health``, ``/ready``
and ``/metrics`` stay open for probes and scrapers).  A response-prepare hook sets the id
header and, while the proxy is leaving, ``Connection: close``.

The body and send timeouts are applied by the handlers through :func:`read_body` and
:func:`write`, which cost nothing while the client keeps up.
"""

from __future__ import annotations

import asyncio
import hmac
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from blockproxy.front.listener import Listener
from blockproxy.metrics import Metrics
from blockproxy.request import ApiError

REQUEST_ID = "X-Request-Id"
#: where the middleware keeps the request's id
ID_KEY = web.RequestKey("request_id", str)
#: paths answered without an API key: probes and the metrics scraper
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def request_id(sent: str | None) -> str:
    """The client's id if it is short and plain, else a new one."""
    if sent and len(sent) <= 128 and _ID_CHARS.issuperset(sent):
        return sent
    return uuid.uuid4().hex


def _unauthorized() -> web.Response:
    err = ApiError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                   "AuthenticationError")
    return web.Response(status=401, body=err.body(), content_type="application/json",
                        headers={"WWW-Authenticate": "Bearer"})


def make_middleware(listener: Listener | None, api_keys: tuple[str, ...], metrics: Metrics
                    ) -> Middleware:
    keys = tuple(b"Bearer " + k.encode() for k in api_keys)

    @web.middleware
    async def door(request: web.Request, handler: Handler) -> web.StreamResponse:
        guard = listener.guard_of(request.transport) if listener is not None else None
        if guard is not None:
            guard.request_started()
        try:
            request[ID_KEY] = request_id(request.headers.get(REQUEST_ID))
            if keys and request.path not in OPEN_PATHS:
                sent = request.headers.get("Authorization", "").encode("utf-8", "replace")
                # compare with every key, so the time taken says nothing about which
                if not sum(hmac.compare_digest(sent, k) for k in keys):
                    metrics.unauthorized.inc()
                    return _unauthorized()
            response = await handler(request)
            if response.status == 408 and not request.content.is_eof():
                # a body too slow to arrive: answer now and close, rather than let aiohttp
                # linger reading the rest of it
                await response.prepare(request)
                await response.write_eof()
                if request.transport is not None:
                    request.transport.close()
            return response
        finally:
            if guard is not None:
                guard.request_ended()
    return door


def make_prepare_hook(leaving: Callable[[], bool]
                      ) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        rid = request.get(ID_KEY)
        if rid is not None:
            response.headers[REQUEST_ID] = rid
        # (not while a body is still arriving: aiohttp closes at once, without reading
        # the rest, and the client would see a reset instead of the response)
        if leaving() and request.content.is_eof():
            response.force_close()
            response.headers["Connection"] = "close"  # (the headers are already built)
    return on_prepare


async def read_body(request: web.Request, timeout: float, metrics: Metrics) -> bytes:
    """The request body, which must arrive within ``timeout`` seconds (408 otherwise).
    A body that came with the headers is read without a timer."""
    if timeout <= 0 or request.content.is_eof():
        return await request.read()
    try:
        return await asyncio.wait_for(request.read(), timeout)
    except asyncio.TimeoutError:
        metrics.client_timeouts.labels("body").inc()
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s",
                       "RequestTimeout") from None


class SendTimeout(Exception):
    """The client read nothing of the response for the send timeout."""


async def write(request: web.Request, response: web.StreamResponse, data: bytes,
                timeout: float) -> None:
    """``response.write(data)``; when the client has unread data buffered, the write may
    wait for it to read, and then at most ``timeout`` seconds (nginx's ``send_timeout``)."""
    transport = request.transport
    if timeout <= 0 or transport is None or \
            (len(data) < 32768 and not transport.get_write_buffer_size()):
        await response.write(data)
        return
    try:
        await asyncio.wait_for(response.write(data), timeout)
    except asyncio.TimeoutError:
        raise SendTimeout(f"the client read nothing for {timeout:g} s") from None
