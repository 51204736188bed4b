"""Parsing OpenAI request bodies."""

from __future__ import annotations

from typing import Any

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


def test_compiled_and_twin_token_id_checks_agree() -> None:
    from blockproxy.request import all_ints_py
    try:
        from blockproxy._fastcore import all_ints as compiled
    except ImportError:
        pytest.skip("extension not built")
    cases: list[list[Any]] = [[], [1, 2, 3], [1, True], [False], [1, 2.0], [1, "2"],
                              [1 << 70, -5], [[1, 2]], [1, None], list(range(10_000))]
    for case in cases:
        assert compiled(case) is all_ints_py(case), case


def test_a_token_id_prompt_with_a_bool_or_a_float_is_refused() -> None:
    for prompt in ([1, 2, True], [1, 2.5], [[1, 2], [3, False]]):
        with pytest.raises(ApiError) as err:
            parse_request(COMPLETIONS, orjson.dumps({"model": "m", "prompt": prompt}))
        assert err.value.status == 400 and err.value.param == "prompt"
