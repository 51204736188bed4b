"""Continuation: one client stream made of several upstream generations.

When the instance streaming a request fails mid-stream (it dies, resets the connection or
stalls past the stall timeout), another instance *continues* the generation: the same
request with the text generated so far appended to its prompt (completions), or given as a
partial assistant message that the engine continues (chat: vLLM's
``continue_final_message: true, add_generation_prompt: false``), its ``max_tokens`` less
what was generated.  The continuation's events are rewritten so that the client sees one
stream: the first part's ``id``, ``created`` and ``model``, no second role event,
``finish_reason`` only at the real end, and usage with the original prompt tokens and every
generated token.

Pure functions and small state objects, no I/O:

* :func:`refusal` says why a request cannot be continued (None when it can);
* :class:`Transcript` keeps what was relayed (raw bytes, folded into text only past
  :data:`FOLD_BYTES` or when a continuation needs it, so relaying costs an append);
* :func:`continuation_body` builds the next request;
* :class:`Splice` rewrites the continuation's events into the client's stream.

What a continuation cannot reproduce exactly: the engine re-tokenises the text so far (a
token at the seam may split differently; token-id prompts are continued with the
tokenizer's ids of that text), penalties on repeated tokens now see the earlier output as
prompt, and a stop string cut by the seam is not matched.
"""

from __future__ import annotations

from typing import Any

import orjson

from blockproxy.request import CHAT, RequestInfo

#: relayed bytes a transcript keeps unparsed before folding them into text
FOLD_BYTES = 256 * 1024

_DATA = b"data: "
_DONE = b"[DONE]"
_SEP = b"\n\n"

#: request fields whose state a continuation cannot rebuild (guided decoding, tools)
_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
           "structured_outputs")


def refusal(info: RequestInfo, has_tokenizer: bool) -> str | None:
    """Why ``info`` cannot be continued on another instance, or None when it can."""
    body = info.body
    if not info.stream:
        return "a non-streaming request has no partial output to continue from"
    if info.sequences != 1:
        return "several sequences (n > 1 or a batch of prompts) share its stream"
    best_of = body.get("best_of")
    if isinstance(best_of, int) and best_of > 1:
        return "best_of > 1"
    if body.get("echo"):
        return "echo repeats the prompt, which a continuation changes"
    if body.get("suffix"):
        return "a suffix follows the generated text"
    if info.route != CHAT and body.get("logprobs") is not None:
        return "completions logprobs carry text offsets into one generation"
    if any(body.get(key) is not None for key in _GUIDED):
        return "guided decoding: its grammar state cannot be rebuilt"
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        return "a structured response_format: its grammar state cannot be rebuilt"
    if body.get("tools") and body.get("tool_choice") != "none":
        return "tool calls stream as partial arguments that cannot be resumed"
    if body.get("prompt_embeds") is not None:
        return "prompt embeddings"
    if info.route == CHAT:
        messages = body["messages"]
        if body.get("continue_final_message") and not isinstance(
                messages[-1].get("content"), str):
            return "the continued final message has no plain-text content"
    elif token_prompt(body.get("prompt")) is not None and not has_tokenizer:
        return "a token-id prompt continues in ids, which needs the model's tokenizer"
    return None


def _complete_events(rest: bytes, data: bytes) -> tuple[list[bytes], bytes]:
    """The complete SSE events of ``rest + data``, and what is left of an unended one."""
    events = (rest + data).split(_SEP)
    return events, events.pop()


def token_prompt(prompt: Any) -> list[int] | None:
    """The ids of a token-id prompt (flat, or a batch of one), else None."""
    if isinstance(prompt, list) and prompt:
        if isinstance(prompt[0], int):
            return prompt
        if len(prompt) == 1 and isinstance(prompt[0], list):
            return prompt[0]
    return None


class Transcript:
    """What the client has been sent of one stream (one sequence): its identity, the text
    and number of generated tokens, and the finish reason once one came (the fields hold
    what was folded: :meth:`fold` first)."""

    __slots__ = ("_pending", "_rest", "_size", "_texts", "chat", "created", "finish", "id",
                 "model", "object", "role", "tokens")

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self._pending: list[bytes] = []
        self._size = 0
        self._rest = b""
        self._texts: list[str] = []
        self.tokens = 0  # token events (a chat stream's role event is none)
        self.id: Any = None
        self.created: Any = None
        self.model: Any = None
        self.object: Any = None
        self.finish: str | None = None
        self.role = False  # a chat stream's role event was sent

    def add(self, data: bytes) -> None:
        """Record relayed bytes (any split of the SSE stream)."""
        self._pending.append(data)
        self._size += len(data)
        if self._size > FOLD_BYTES:
            self.fold()

    def fold(self) -> None:
        """Parse the complete events recorded so far."""
        if not self._pending:
            return
        events, self._rest = _complete_events(self._rest, b"".join(self._pending))
        self._pending.clear()
        self._size = 0
        for event in events:
            self._event(event)

    @property
    def text(self) -> str:
        self.fold()
        return "".join(self._texts)

    def _event(self, event: bytes) -> None:
        event = event.strip()
        if not event.startswith(_DATA):
            return
        obj = _load(event[len(_DATA):])
        if obj is None or "error" in obj:
            return
        if self.id is None:
            self.id, self.created = obj.get("id"), obj.get("created")
            self.model, self.object = obj.get("model"), obj.get("object")
        choices = obj.get("choices")
        if not choices or not isinstance(choices[0], dict):
            return
        choice = choices[0]
        reason = choice.get("finish_reason")
        if self.chat:
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if "role" in delta:
                self.role = True
                if not content and reason is None:
                    return  # the role event
        else:
            content = choice.get("text")
        self.tokens += 1
        if isinstance(content, str) and content:
            self._texts.append(content)
        if reason is not None:
            self.finish = reason


def _load(payload: bytes) -> dict[str, Any] | None:
    if payload == _DONE:
        return None
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _budget_keys(info: RequestInfo) -> tuple[str, ...]:
    """The body's output-budget fields (chat has two names for it)."""
    return ("max_completion_tokens", "max_tokens") if info.route == CHAT else ("max_tokens",)


def slice_body(info: RequestInfo, tokens: int) -> bytes:
    """``info``'s first slice: the same request with at most ``tokens`` of output."""
    body = dict(info.body)
    keys = [k for k in _budget_keys(info) if isinstance(body.get(k), int)] or ["max_tokens"]
    for key in keys:
        body[key] = tokens
    return orjson.dumps(body)


def continuation_body(info: RequestInfo, text: str, generated: int,
                      text_ids: list[int] | None = None, budget: int | None = None
                      ) -> bytes:
    """The request that continues ``info`` after ``generated`` tokens whose text is
    ``text`` (``text_ids``: that text's token ids, for a token-id prompt); ``budget``
    caps its output (the next slice).  It streams with usage (the splice needs the
    counts), whatever the client asked."""
    body = dict(info.body)
    if info.route == CHAT:
        messages = list(body["messages"])
        if body.get("continue_final_message"):
            last = dict(messages[-1])
            last["content"] = last["content"] + text
            messages[-1] = last
        else:
            messages.append({"role": "assistant", "content": text})
        body["messages"] = messages
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    else:
        prompt = body["prompt"]
        ids = token_prompt(prompt)
        if ids is not None:
            if text_ids is None:
                raise ValueError("a token-id prompt continues with the text's token ids")
            body["prompt"] = ids + text_ids
        elif isinstance(prompt, list):
            body["prompt"] = [prompt[0] + text]
        else:
            body["prompt"] = prompt + text
    keys = [k for k in _budget_keys(info) if isinstance(body.get(k), int)]
    for key in keys:
        body[key] = max(body[key] - generated, 1)
        if budget is not None:
            body[key] = min(body[key], budget)
    if budget is not None and not keys:
        body["max_tokens"] = budget
    min_tokens = body.get("min_tokens")
    if isinstance(min_tokens, int) and min_tokens > 0:
        body["min_tokens"] = max(min_tokens - generated, 0)
    body["stream"] = True
    options = dict(body.get("stream_options") or {})
    options["include_usage"] = True
    body["stream_options"] = options
    return orjson.dumps(body)


def finish_event(transcript: Transcript, reason: str) -> bytes:
    """A last token-less event carrying ``finish_reason`` (the budget ran out exactly at
    the seam, so no continuation is needed)."""
    transcript.fold()
    if transcript.chat:
        choice: dict[str, Any] = {"index": 0, "delta": {}, "logprobs": None,
                                  "finish_reason": reason}
    else:
        choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": reason,
                  "stop_reason": None}
    return _DATA + orjson.dumps({"id": transcript.id, "object": transcript.object,
                                 "created": transcript.created, "model": transcript.model,
                                 "choices": [choice]}) + _SEP


def usage_event(transcript: Transcript, prompt_tokens: int) -> bytes:
    """The final usage event of a stream that ended at the seam."""
    transcript.fold()
    completion = transcript.tokens
    return _DATA + orjson.dumps({
        "id": transcript.id, "object": transcript.object, "created": transcript.created,
        "model": transcript.model, "choices": [],
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion,
                  "completion_tokens": completion}}) + _SEP


class Splice:
    """Rewrites a continuation's SSE events into the client's stream.

    ``before``: tokens the client already had when the continuation was sent (its prompt
    holds their text, so usage moves them from prompt to completion); ``client_usage``:
    whether the client asked for the usage event (the continuation always gets one);
    ``prompt_tokens``: the original prompt's exact count when the proxy knows it (the
    model's tokenizer), else it is the continuation's prompt less ``before`` (exact where
    the engine re-tokenises the text so far into as many tokens as it generated)."""

    __slots__ = ("_ident", "_rest", "before", "chat", "client_usage", "prompt_tokens", "role",
                 "slice", "slice_end")

    def __init__(self, transcript: Transcript, before: int, client_usage: bool,
                 prompt_tokens: int | None = None, slice_: bool = False) -> None:
        transcript.fold()
        # a stream that broke before its first event takes the continuation's identity
        self._ident = None if transcript.id is None else {
            "id": transcript.id, "created": transcript.created, "model": transcript.model}
        self.chat = transcript.chat
        self.role = transcript.role
        self.before = before
        self.client_usage = client_usage
        self._rest = b""
        #: the original prompt's tokens (known, or once the continuation reported usage)
        self.prompt_tokens = prompt_tokens
        #: this part is a slice whose budget is less than the request's: its "length"
        #: finish is the slice's end, not the stream's (hidden, with its usage and [DONE])
        self.slice = slice_
        self.slice_end = False

    def rewrite(self, data: bytes) -> bytes:
        """The client's bytes for upstream ``data`` (complete events only; a split event
        waits for its end)."""
        events, self._rest = _complete_events(self._rest, data)
        out = []
        for event in events:
            got = self._event(event)
            if got:
                out.append(got)
        return b"".join(out)

    def _event(self, event: bytes) -> bytes | None:
        stripped = event.strip()
        if not stripped.startswith(_DATA):
            return None
        payload = stripped[len(_DATA):]
        if payload == _DONE:
            return None if self.slice_end else stripped + _SEP
        obj = _load(payload)
        if obj is None or "error" in obj:
            return stripped + _SEP  # an engine's error event reaches the client as it is
        usage = obj.get("usage")
        if isinstance(usage, dict):
            obj["usage"] = self._usage(usage)
        choices = obj.get("choices")
        if not choices:
            if not self.client_usage or self.slice_end:
                return None
        elif isinstance(choices[0], dict):
            choice = choices[0]
            if self.slice and choice.get("finish_reason") == "length":
                choice["finish_reason"] = None  # the slice ends, the stream goes on
                if "stop_reason" in choice:
                    choice["stop_reason"] = None
                self.slice_end = True
            if self.chat and self.role:
                delta = choice.get("delta") or {}
                if "role" in delta and not delta.get("content") and \
                        choice.get("finish_reason") is None:
                    return None  # the client had its role event from the first part
        if self._ident is not None:
            obj.update(self._ident)
        return _DATA + orjson.dumps(obj) + _SEP

    def _usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        if not isinstance(prompt, int) or not isinstance(completion, int):
            return usage
        if self.prompt_tokens is None:
            self.prompt_tokens = max(prompt - self.before, 0)
        prompt = self.prompt_tokens
        completion += self.before
        return {**usage, "prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}
