"""What the proxy reads from the bytes it relays: pure functions, no I/O.

vLLM streams one SSE event per engine step and token (``data: {json}\\n\\n``), then, with
``stream_options.include_usage``, a usage event whose ``choices`` is empty, then
``data: [DONE]``.  The proxy passes the bytes through unchanged; these functions count the
token events in a chunk and pull the usage and finish reason out of the last chunks (or a
unary response body) without parsing the JSON.
"""

from __future__ import annotations

import re
from typing import NamedTuple

EVENT = b"data: "
DONE_EVENT = b"data: [DONE]\n\n"
EVENT_END = b"\n\n"
DONE = b"[DONE]"
USAGE_MARK = b'"choices":[]'
#: chunks kept from the end of a stream: finish_reason, usage and [DONE] are among them
TAIL_CHUNKS = 3

_PROMPT_TOKENS = re.compile(rb'"prompt_tokens":\s*(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens":\s*(\d+)')
_FINISH = re.compile(rb'"finish_reason":\s*"(\w+)"')


class Usage(NamedTuple):
    """Token counts and finish reason a response reported (None where it did not)."""

    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None


def token_events(chunk: bytes) -> int:
    """SSE events in ``chunk`` that carry tokens: neither ``[DONE]`` nor the usage event."""
    count = chunk.count(EVENT)
    if count:
        if chunk.endswith(DONE_EVENT):
            count -= 1
        if USAGE_MARK in chunk:
            count -= 1
    return count


def parse_usage(data: bytes) -> Usage:
    """The last usage counts and finish reason in ``data`` (stream tail or unary body)."""
    finish = _FINISH.findall(data)
    return Usage(_last_int(_PROMPT_TOKENS, data), _last_int(_COMPLETION_TOKENS, data),
                 finish[-1].decode() if finish else None)


def stream_complete(tail: bytes) -> bool:
    """Whether a stream's last chunks hold its ``[DONE]`` (anything else is truncated)."""
    return DONE in tail


def _last_int(pattern: re.Pattern[bytes], data: bytes) -> int | None:
    found = pattern.findall(data)
    return int(found[-1]) if found else None
