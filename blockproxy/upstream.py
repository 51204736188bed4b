"""The upstream HTTP client: one pooled aiohttp session per proxy process.

Everything that talks to an instance goes through here.  Failures that happen before the
first byte of a response (refused, reset, timeout, a 5xx status) raise
:class:`UpstreamError` so the caller can retry elsewhere; failures while streaming raise
it from :meth:`UpstreamResponse.iter_chunks`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson

# Hop-by-hop headers (RFC 9110 7.6.1) and those the client session sets itself.
_DROP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                   "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length",
                   "accept-encoding"})


class UpstreamError(Exception):
    """An instance failed (connection or 5xx)."""


class UpstreamResponse:
    """An open response from an instance."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.content_type = resp.content_type

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise UpstreamError(f"reading the response failed: {exc!r}") from exc

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Bytes as they arrive, no buffering."""
        content = self._resp.content
        try:
            while True:
                data = await content.readany()
                if not data:
                    return
                yield data
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise UpstreamError(f"the stream broke: {exc!r}") from exc

    def close(self) -> None:
        """Drop the connection unless the response was read to the end (aborts on vLLM)."""
        if self._resp.content.at_eof():
            self._resp.release()
        else:
            self._resp.close()


class Upstream:
    """Pooled client for all instances."""

    def __init__(self, connect_timeout: float, read_timeout: float) -> None:
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout,
                                             sock_read=read_timeout)
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=60, enable_cleanup_closed=True)
        self.session = aiohttp.ClientSession(connector=connector, timeout=self.timeout,
                                             auto_decompress=False, skip_auto_headers=(
                                                 "User-Agent", "Accept-Encoding"))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    @staticmethod
    def forward_headers(headers: Mapping[str, str]) -> dict[str, str]:
        """The client's headers minus hop-by-hop ones."""
        return {k: v for k, v in headers.items() if k.lower() not in _DROP}

    async def open(self, url: str, body: bytes, headers: dict[str, str]) -> UpstreamResponse:
        """POST and wait for the response headers; 5xx and connection failures raise."""
        assert self.session is not None
        try:
            resp = await self.session.post(url, data=body, headers=headers)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise UpstreamError(f"{url}: {exc!r}") from exc
        if resp.status >= 500:
            resp.close()
            raise UpstreamError(f"{url}: HTTP {resp.status}")
        return UpstreamResponse(resp)

    async def passthrough(self, method: str, url: str, body: bytes,
                          headers: dict[str, str]) -> tuple[int, str, bytes]:
        """Forward any request unchanged; returns (status, content type, body)."""
        assert self.session is not None
        try:
            async with self.session.request(method, url, data=body or None,
                                            headers=headers) as resp:
                return resp.status, resp.content_type, await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise UpstreamError(f"{url}: {exc!r}") from exc

    async def healthy(self, base_url: str, timeout: float = 2.0) -> bool:
        """Whether ``/health`` answers 200."""
        assert self.session is not None
        try:
            async with self.session.get(base_url + "/health",
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def get_text(self, url: str, timeout: float = 2.0) -> str | None:
        """GET ``url`` as text (an instance's ``/metrics``), or None if it does not answer."""
        assert self.session is not None
        try:
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) \
                    as resp:
                if resp.status != 200:
                    return None
                return (await resp.read()).decode("utf-8", "replace")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return None

    async def models(self, base_url: str, timeout: float = 2.0) -> list[dict[str, Any]] | None:
        """The instance's ``/v1/models`` cards, or None if it does not answer."""
        assert self.session is not None
        try:
            async with self.session.get(base_url + "/v1/models",
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                if resp.status != 200:
                    return None
                data = orjson.loads(await resp.read())
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, orjson.JSONDecodeError):
            return None
        cards = data.get("data") if isinstance(data, dict) else None
        return [c for c in cards if isinstance(c, dict)] if isinstance(cards, list) else None
