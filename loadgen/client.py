"""Async OpenAI streaming client that records each request's timings like vLLM's bench.

Per request (as ``vllm/benchmarks``' OpenAI request functions do):

* TTFT: time of the first event with a non-empty ``choices`` list, minus the send time
  (chat's role-only opening chunk counts, as in vLLM; vLLM sends it with the first token);
* ITL: the gaps between successive such events after the first;
* latency (E2EL): time of the last such event minus the send time;
* output tokens: ``usage.completion_tokens`` of the final usage chunk when present, else
  the number of text-carrying chunks (one token per chunk).

Stricter than vLLM, a request also fails when the stream ends without ``data: [DONE]``
(a silent truncation) or carries an error event; an HTTP error, a connection error or a
timeout fails it too, and the error message is kept.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson


@dataclass
class RequestRecord:
    """What one request measured; times in wall-clock seconds."""

    prompt_tokens: int
    expected_output_tokens: int = 0
    success: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    #: send time, seconds since the start of the run
    start_s: float = 0.0
    error: str = ""
    #: sent (its send time is ``start_s``) / the stream has ended, one way or another
    sent: bool = False
    ended: bool = False
    #: stopped by the runner before its end (a first-token probe or an early abort)
    cut: bool = False


def _choice_text(choice: dict[str, Any]) -> str | None:
    """Generated text of a stream event's first choice, or None when it carries none."""
    if "text" in choice:
        return choice.get("text") or ""
    content = (choice.get("delta") or {}).get("content")
    return content or None


def _error_message(data: dict[str, Any]) -> str:
    err = data.get("error")
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err)


async def send_request(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                       headers: dict[str, str], record: RequestRecord,
                       run_start: float = 0.0) -> RequestRecord:
    """POST ``body`` to ``url`` as a stream and fill ``record`` (returned for convenience)."""
    payload = orjson.dumps(body)
    req_headers = {"Content-Type": "application/json", **headers}
    st = time.perf_counter()
    record.start_s = st - run_start
    record.sent = True
    try:
        return await _stream(session, url, payload, req_headers, record, st)
    finally:
        record.ended = True


async def _stream(session: aiohttp.ClientSession, url: str, payload: bytes,
                  req_headers: dict[str, str], record: RequestRecord,
                  st: float) -> RequestRecord:
    last = st
    got_text = done = False
    chunks = 0
    usage_tokens: int | None = None
    try:
        async with session.post(url, data=payload, headers=req_headers) as resp:
            if resp.status != 200:
                text = (await resp.text())[:500]
                record.error = f"HTTP {resp.status} {resp.reason}: {text}"
                return record
            async for raw in resp.content:
                line = raw.strip()
                # Blank lines separate events; ':' lines are SSE comments (keep-alives).
                if not line or line.startswith(b":"):
                    continue
                if line.startswith(b"data:"):
                    line = line[5:].strip()
                if line == b"[DONE]":
                    done = True
                    break
                data = orjson.loads(line)
                if "error" in data:
                    record.error = "error event: " + _error_message(data)
                    return record
                choices = data.get("choices")
                if choices:
                    now = time.perf_counter()
                    if not got_text:
                        got_text = True
                        record.ttft = now - st
                    else:
                        record.itl.append(now - last)
                    last = now
                    if _choice_text(choices[0]) is not None:
                        chunks += 1
                usage = data.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    usage_tokens = int(usage["completion_tokens"])
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
        return record
    if not done:
        record.error = "stream ended without [DONE]"
    elif not got_text:
        record.error = "no output chunk received (cannot measure TTFT)"
    else:
        record.success = True
        record.latency = last - st
        record.output_tokens = usage_tokens if usage_tokens is not None else chunks
    return record
