"""Parse and validate an OpenAI completions / chat-completions body into a :class:`RequestInfo`.

Bad input raises :class:`ApiError`, which the server turns into OpenAI-shaped error JSON
(``{"error": {"message", "type", "param", "code"}}``) with the right status.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from blockproxy.compiled import pick

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


class ApiError(Exception):
    """A client-visible error: status code and OpenAI error fields."""

    def __init__(self, status: int, message: str, type_: str = "BadRequestError",
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        #: response headers the error carries (``Retry-After`` of a 429)
        self.headers = headers

    def body(self) -> bytes:
        return orjson.dumps({"error": {"message": self.message, "type": self.type,
                                       "param": self.param, "code": self.status}})


@dataclass
class RequestInfo:
    """What routing needs to know about one request."""

    route: str
    model: str
    stream: bool
    prompt_chars: int
    max_tokens: int | None
    include_usage: bool
    body: dict[str, Any]
    raw: bytes
    #: sequences the engine generates for it (``n`` choices of each of a batch of
    #: completions prompts): their stream events interleave, one token each
    sequences: int = 1


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "BadRequestError", param)


def all_ints_py(values: list[Any]) -> bool:
    """Whether every item of ``values`` is an int and not a bool (token ids).  The twin
    of ``blockproxy._fastcore.all_ints``, which does the same without a Python-level loop
    (a prompt of a million ids is checked in about a millisecond, not a hundred)."""
    return all(isinstance(p, int) and not isinstance(p, bool) for p in values)


all_ints: Callable[[list[Any]], bool] = pick("all_ints", all_ints_py)


def _text_length(prompt: Any) -> int:
    """Characters of a completions prompt (str, list of str, token ids, list of those)."""
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return sum(len(p) for p in prompt)
        if all_ints(prompt):
            return 4 * len(prompt)  # token ids: about four characters each
        if all(isinstance(p, list) and p and all_ints(p) for p in prompt):
            return 4 * sum(len(p) for p in prompt)
    raise _bad("'prompt' must be a string, a list of strings or a list of token ids",
               "prompt")


def _messages_length(messages: Any) -> int:
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages")
    total = 0
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise _bad(f"messages[{i}] must be an object with a string 'role'", "messages")
        content = msg.get("content")
        if isinstance(content, str):
            total += len(content) + 8  # the chat template's per-message tokens
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += len(part["text"])
            total += 8
        elif content is None:
            total += 8
        else:
            raise _bad(f"messages[{i}].content must be a string or a list of parts",
                       "messages")
    return total


def _optional_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(f"'{key}' must be a positive integer, got {value!r}", key)
    return value


def parse_request(route: str, raw: bytes) -> RequestInfo:
    """Validate the body of a completions or chat request."""
    if not raw:
        raise _bad("the request body is empty; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _bad(f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = body.get("model")
    if model is None:
        raise _bad("'model' is required", "model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' must be a non-empty string", "model")
    batch = 1
    if route == CHAT:
        chars = _messages_length(body.get("messages"))
        max_tokens = _optional_int(body, "max_completion_tokens") or \
            _optional_int(body, "max_tokens")
    else:
        if "prompt" not in body:
            raise _bad("'prompt' is required", "prompt")
        chars = _text_length(body["prompt"])
        max_tokens = _optional_int(body, "max_tokens")
        prompt = body["prompt"]
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            batch = len(prompt)  # a batch of prompts (strings or token-id lists)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    include_usage = bool(options and options.get("include_usage"))
    sequences = batch * (_optional_int(body, "n") or 1)
    return RequestInfo(route=route, model=model, stream=stream, prompt_chars=chars,
                       max_tokens=max_tokens, include_usage=include_usage, body=body,
                       raw=raw, sequences=sequences)
