"""OpenAI/vLLM request validation, error bodies and response shapes (vLLM 0.32).

Everything here is pure: it turns request bodies into :class:`ParsedRequest` or raises
:class:`APIError`, and builds the exact bytes of vLLM's JSON bodies and SSE events.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson

from loadgen.tokenizer import Token, chat_tokens, completion_tokens


class APIError(Exception):
    """An error answered in vLLM's JSON shape."""

    def __init__(self, status: int, message: str, err_type: str = "BadRequestError",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param

    def body(self) -> bytes:
        """``{"error": {"message", "type", "param", "code"}}``."""
        return orjson.dumps({"error": {"message": self.message, "type": self.err_type,
                                       "param": self.param, "code": self.status}})


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "BadRequestError", param)


@dataclass
class ParsedRequest:
    """A validated completions or chat request."""

    chat: bool
    tokens: list[Token]
    max_tokens: int  # effective: the context limit minus the prompt when not given
    stream: bool
    include_usage: bool
    ignore_eos: bool


def decode_json(raw: bytes) -> dict[str, Any]:
    """Parse a request body; malformed JSON or a non-object is a 400."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"Invalid JSON in request body: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body


def _prompt_tokens(body: dict[str, Any]) -> list[Token]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return completion_tokens(prompt)
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            inner = prompt[0]
            if isinstance(inner, str) or all(
                    isinstance(t, int) and not isinstance(t, bool) for t in inner):
                return completion_tokens(inner)
        if len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
            raise bad_request("Batched prompts are not supported by the emulator; "
                              "send one prompt per request.", "prompt")
    if prompt is None:
        raise bad_request("Either prompt or prompt_embeds must be provided and non-empty.",
                          "prompt")
    raise bad_request("prompt must be a string, a list of strings or a list of token ids.",
                      "prompt")


def _chat_tokens(body: dict[str, Any]) -> list[Token]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of message objects.", "messages")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad_request("Each message must be an object with a string 'role'.",
                              "messages")
    continue_final = _bool(body, "continue_final_message")
    generation_prompt = body.get("add_generation_prompt", True)
    if not isinstance(generation_prompt, bool):
        raise bad_request(f"add_generation_prompt must be a boolean, got "
                          f"{generation_prompt!r}.", "add_generation_prompt")
    if continue_final and generation_prompt:
        raise bad_request("Cannot set both `continue_final_message` and "
                          "`add_generation_prompt` to True.")
    try:
        return chat_tokens(messages, generation_prompt, continue_final)
    except TypeError as exc:
        raise bad_request(str(exc), "messages") from None


def _optional_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise bad_request(f"{key} must be an integer, got {value!r}.", key)
    return value


def _bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"{key} must be a boolean, got {value!r}.", key)
    return value


def prompt_tokens(body: dict[str, Any], chat: bool) -> list[Token]:
    """The emulator's tokens of a completions (``chat=False``) or chat request's prompt."""
    return _chat_tokens(body) if chat else _prompt_tokens(body)


def parse_request(body: dict[str, Any], chat: bool, max_model_len: int) -> ParsedRequest:
    """Validate a completions (``chat=False``) or chat body like vLLM does."""
    tokens = prompt_tokens(body, chat)
    n = _optional_int(body, "n")
    if n is not None and n != 1:
        raise bad_request(f"n={n} is not supported by the emulator: only n=1.", "n")
    max_tokens = _optional_int(body, "max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = _optional_int(body, "max_tokens")
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise bad_request("stream_options must be an object.", "stream_options")
        if not stream:
            raise bad_request("Stream options can only be defined when `stream=True`.",
                              "stream_options")
        include_usage = bool(options.get("include_usage", False))
    num_prompt = len(tokens)
    if num_prompt >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"request has {num_prompt} input tokens. Please reduce the length of the input "
            f"messages.")
    if max_tokens is None:
        max_tokens = max_model_len - num_prompt
    elif num_prompt + max_tokens > max_model_len:
        raise bad_request(
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This "
            f"model's maximum context length is {max_model_len} tokens and your request has "
            f"{num_prompt} input tokens ({max_tokens} > {max_model_len} - {num_prompt}).")
    return ParsedRequest(chat=chat, tokens=tokens, max_tokens=max_tokens, stream=stream,
                         include_usage=include_usage, ignore_eos=_bool(body, "ignore_eos"))


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens}


class ChunkWriter:
    """Pre-encoded SSE events of one streamed response (one event per token)."""

    __slots__ = ("_common", "_final_tails", "_open_tail", "head")

    def __init__(self, request_id: str, created: int, model: str, chat: bool) -> None:
        self._common = {"id": request_id,
                        "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": created, "model": model}
        # Everything up to the token text is fixed for the whole response.
        head = orjson.dumps(self._common)[:-1] + b',"choices":[{"index":0,'
        self.head = b"data: " + head + (b'"delta":{"content":' if chat else b'"text":')
        close = b"}" if chat else b""
        self._open_tail = close + (
            b',"logprobs":null,"finish_reason":null}]}\n\n' if chat else
            b',"logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n')
        self._final_tails = {
            reason: close + b',"logprobs":null,"finish_reason":"' + reason.encode()
            + b'","stop_reason":null}]}\n\n' for reason in ("stop", "length")}

    def token(self, text: str, finish_reason: str | None = None) -> bytes:
        """The event of one generated token; the last one carries ``finish_reason``."""
        tail = self._open_tail if finish_reason is None else self._final_tails[finish_reason]
        return self.head + orjson.dumps(text) + tail

    def role(self) -> bytes:
        """Chat's first event: ``delta: {"role": "assistant", "content": ""}``."""
        return self._event({"choices": [{"index": 0,
                                         "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]})

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The final ``choices: []`` event with ``usage``."""
        return self._event({"choices": [], "usage": usage(prompt_tokens, completion_tokens)})

    def _event(self, fields: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps({**self._common, **fields}) + b"\n\n"


DONE = b"data: [DONE]\n\n"


def completion_body(request_id: str, created: int, model: str, text: str,
                    finish_reason: str, prompt_tokens: int, completion_tokens: int) -> bytes:
    """vLLM's non-streaming ``text_completion`` body."""
    return orjson.dumps({
        "id": request_id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None,
                     "finish_reason": finish_reason, "stop_reason": None,
                     "prompt_logprobs": None}],
        "usage": {**usage(prompt_tokens, completion_tokens), "prompt_tokens_details": None},
        "kv_transfer_params": None,
    })


def chat_body(request_id: str, created: int, model: str, text: str, finish_reason: str,
              prompt_tokens: int, completion_tokens: int) -> bytes:
    """vLLM's non-streaming ``chat.completion`` body."""
    return orjson.dumps({
        "id": request_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0,
                     "message": {"role": "assistant", "reasoning_content": None,
                                 "content": text, "tool_calls": []},
                     "logprobs": None, "finish_reason": finish_reason, "stop_reason": None}],
        "usage": {**usage(prompt_tokens, completion_tokens), "prompt_tokens_details": None},
        "prompt_logprobs": None, "kv_transfer_params": None,
    })


def models_body(model: str, created: int, max_model_len: int) -> bytes:
    """vLLM's ``GET /v1/models`` body."""
    return orjson.dumps({"object": "list", "data": [{
        "id": model, "object": "model", "created": created, "owned_by": "vllm",
        "root": model, "parent": None, "max_model_len": max_model_len,
        "permission": [{"id": f"modelperm-{model}", "object": "model_permission",
                        "created": created, "allow_create_engine": False,
                        "allow_sampling": True, "allow_logprobs": True,
                        "allow_search_indices": False, "allow_view": True,
                        "allow_fine_tuning": False, "organization": "*", "group": None,
                        "is_blocking": False}]}]})
