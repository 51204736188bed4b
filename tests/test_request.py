"""Parsing OpenAI request bodies."""

from __future__ import annotations

import orjson
import pytest

from blockproxy.request import CHAT, COMPLETIONS, ApiError, parse_request


def test_completion_fields():
    info = parse_request(COMPLETIONS, orjson.dumps({
        "model": "m", "prompt": "abcd", "max_tokens": 7, "stream": True,
        "stream_options": {"include_usage": True}}))
    assert (info.model, info.prompt_chars, info.max_tokens, info.stream, info.include_usage) \
        == ("m", 4, 7, True, True)


def test_chat_uses_max_completion_tokens():
    info = parse_request(CHAT, orjson.dumps({
        "model": "m", "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 3}))
    assert info.max_tokens == 3 and info.prompt_chars > 2


@pytest.mark.parametrize("prompt", [["a", "bc"], [1, 2, 3], [[1, 2], [3]]])
def test_prompt_shapes(prompt):
    assert parse_request(COMPLETIONS, orjson.dumps({"model": "m", "prompt": prompt})) \
        .prompt_chars > 0


@pytest.mark.parametrize("body, param", [
    ({"model": "m", "prompt": [1, "a"]}, "prompt"),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"model": "", "prompt": "x"}, "model"),
    ({"model": "m", "prompt": "x", "stream_options": 3}, "stream_options"),
])
def test_errors_name_the_parameter(body, param):
    with pytest.raises(ApiError) as err:
        parse_request(COMPLETIONS, orjson.dumps(body))
    assert err.value.status == 400 and err.value.param == param
