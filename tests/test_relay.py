"""The relay's pure functions: token events per chunk, usage and finish reason."""

from __future__ import annotations

from blockproxy.front.relay import Usage, parse_usage, stream_complete, token_events

CHUNK = b'data: {"id":"c","choices":[{"index":0,"text":" a","finish_reason":null}]}\n\n'
FINAL = b'data: {"id":"c","choices":[{"index":0,"text":" z","finish_reason":"length"}]}\n\n'
USAGE = (b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":12,"total_tokens":15,'
         b'"completion_tokens":3}}\n\n')
DONE = b"data: [DONE]\n\n"


def test_token_events_count_tokens_only() -> None:
    assert token_events(CHUNK) == 1
    assert token_events(CHUNK + CHUNK) == 2
    assert token_events(b"") == 0
    assert token_events(DONE) == 0
    assert token_events(USAGE) == 0
    assert token_events(FINAL + USAGE + DONE) == 1
    assert token_events(CHUNK + DONE) == 1


def test_usage_from_a_stream_tail_and_a_unary_body() -> None:
    assert parse_usage(CHUNK + FINAL + USAGE + DONE) == Usage(12, 3, "length")
    assert parse_usage(CHUNK) == Usage(None, None, None)
    unary = (b'{"id":"c","choices":[{"index":0,"text":"hi","finish_reason":"stop"}],'
             b'"usage":{"prompt_tokens": 7,"completion_tokens": 2,"total_tokens":9}}')
    assert parse_usage(unary) == Usage(7, 2, "stop")


def test_stream_complete_needs_done() -> None:
    assert stream_complete(FINAL + DONE)
    assert not stream_complete(FINAL + USAGE)
