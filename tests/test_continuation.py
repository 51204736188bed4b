"""Continuation's pure parts: what may be continued, the transcript of a relayed stream,
the continuing request, and the splice of its events into the client's stream."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from blockproxy.front import continuation as cont
from blockproxy.request import CHAT, COMPLETIONS, RequestInfo, parse_request


def info(route: str, **body: Any) -> RequestInfo:
    body.setdefault("model", "m")
    body.setdefault("stream", True)
    if route == CHAT:
        body.setdefault("messages", [{"role": "user", "content": "hello there"}])
    else:
        body.setdefault("prompt", "one two three")
    return parse_request(route, orjson.dumps(body))


def event(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def completion_event(rid: str, text: str, reason: str | None = None,
                     created: int = 100, model: str = "m") -> bytes:
    return event({"id": rid, "object": "text_completion", "created": created, "model": model,
                  "choices": [{"index": 0, "text": text, "logprobs": None,
                               "finish_reason": reason, "stop_reason": None}]})


def chat_event(rid: str, delta: dict[str, Any], reason: str | None = None,
               created: int = 100) -> bytes:
    return event({"id": rid, "object": "chat.completion.chunk", "created": created,
                  "model": "m", "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                             "finish_reason": reason}]})


def usage_event(rid: str, prompt: int, completion: int) -> bytes:
    return event({"id": rid, "object": "text_completion", "created": 200, "model": "m",
                  "choices": [], "usage": {"prompt_tokens": prompt,
                                           "total_tokens": prompt + completion,
                                           "completion_tokens": completion}})


DONE = b"data: [DONE]\n\n"


def events_of(data: bytes) -> list[Any]:
    out = []
    for part in data.split(b"\n\n"):
        if part:
            assert part.startswith(b"data: ")
            payload = part[len(b"data: "):]
            out.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return out


# ---- what can be continued ----------------------------------------------------------------

def test_plain_streams_can_be_continued() -> None:
    assert cont.refusal(info(COMPLETIONS), False) is None
    assert cont.refusal(info(CHAT, max_tokens=50, temperature=0.7, seed=3), False) is None
    assert cont.refusal(info(CHAT, logprobs=True, top_logprobs=2), False) is None
    assert cont.refusal(info(CHAT, tools=[{"type": "function"}], tool_choice="none"),
                        False) is None


@pytest.mark.parametrize("route,body,why", [
    (COMPLETIONS, {"stream": False}, "non-streaming"),
    (COMPLETIONS, {"n": 2}, "several sequences"),
    (COMPLETIONS, {"prompt": ["a b", "c d"]}, "several sequences"),
    (COMPLETIONS, {"best_of": 3}, "best_of"),
    (COMPLETIONS, {"echo": True}, "echo"),
    (COMPLETIONS, {"suffix": "end"}, "suffix"),
    (COMPLETIONS, {"logprobs": 1}, "logprobs"),
    (COMPLETIONS, {"guided_regex": "a+"}, "guided decoding"),
    (CHAT, {"guided_json": {"type": "object"}}, "guided decoding"),
    (CHAT, {"response_format": {"type": "json_object"}}, "response_format"),
    (CHAT, {"tools": [{"type": "function"}]}, "tool calls"),
    (COMPLETIONS, {"prompt": [1, 2, 3]}, "tokenizer"),
    (CHAT, {"continue_final_message": True, "add_generation_prompt": False,
            "messages": [{"role": "user", "content": "q"},
                         {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]},
     "plain-text"),
])
def test_what_cannot_be_continued_says_why(route: str, body: dict[str, Any],
                                           why: str) -> None:
    reason = cont.refusal(info(route, **body), False)
    assert reason is not None and why in reason


def test_token_id_prompts_continue_with_a_tokenizer() -> None:
    assert cont.refusal(info(COMPLETIONS, prompt=[1, 2, 3]), True) is None


# ---- the transcript -----------------------------------------------------------------------

def test_transcript_reads_text_tokens_and_identity_from_any_split() -> None:
    data = (completion_event("cmpl-1", " alpha") + completion_event("cmpl-1", " beta")
            + completion_event("cmpl-1", ""))
    for cut in range(len(data) + 1):
        t = cont.Transcript(chat=False)
        t.add(data[:cut])
        t.add(data[cut:])
        assert (t.text, t.tokens, t.id, t.created, t.finish) == \
            (" alpha beta", 3, "cmpl-1", 100, None)


def test_transcript_folds_past_its_byte_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cont, "FOLD_BYTES", 300)
    t = cont.Transcript(chat=False)
    for i in range(50):
        t.add(completion_event("c", f" w{i}"))
        assert t._size <= 300 + 200  # folded, not kept
    assert t.tokens == 50 and t.text == "".join(f" w{i}" for i in range(50))


def test_chat_transcript_skips_the_role_event_and_sees_the_finish() -> None:
    t = cont.Transcript(chat=True)
    t.add(chat_event("chatcmpl-1", {"role": "assistant", "content": ""}))
    t.add(chat_event("chatcmpl-1", {"content": " hi"}))
    t.add(chat_event("chatcmpl-1", {"content": " you"}, "stop"))
    assert (t.text, t.tokens, t.role, t.finish) == (" hi you", 2, True, "stop")


# ---- the continuing request ---------------------------------------------------------------

def test_completions_continuation_appends_the_text_and_shrinks_the_budget() -> None:
    body = orjson.loads(cont.continuation_body(
        info(COMPLETIONS, max_tokens=100, min_tokens=10, seed=7, temperature=0.5),
        " a b c", 3))
    assert body["prompt"] == "one two three a b c"
    assert (body["max_tokens"], body["min_tokens"], body["seed"], body["temperature"]) == \
        (97, 7, 7, 0.5)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_token_id_prompts_continue_in_ids() -> None:
    body = orjson.loads(cont.continuation_body(info(COMPLETIONS, prompt=[5, 6], max_tokens=9),
                                               " x y", 2, [11, 12]))
    assert body["prompt"] == [5, 6, 11, 12] and body["max_tokens"] == 7
    with pytest.raises(ValueError):
        cont.continuation_body(info(COMPLETIONS, prompt=[5, 6]), " x", 1)


def test_chat_continuation_continues_a_partial_assistant_message() -> None:
    req = info(CHAT, max_completion_tokens=40, stream_options={"include_usage": False})
    body = orjson.loads(cont.continuation_body(req, " so far", 2))
    assert body["messages"] == [{"role": "user", "content": "hello there"},
                                {"role": "assistant", "content": " so far"}]
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["max_completion_tokens"] == 38
    assert body["stream_options"] == {"include_usage": True}
    assert req.body["messages"] == [{"role": "user", "content": "hello there"}]  # untouched
    again = info(CHAT, **{k: v for k, v in body.items() if k != "stream_options"})
    body = orjson.loads(cont.continuation_body(again, " more", 1))
    assert body["messages"][-1] == {"role": "assistant", "content": " so far more"}
    assert len(body["messages"]) == 2 and body["max_completion_tokens"] == 37


# ---- the splice ---------------------------------------------------------------------------

def spliced(transcript: cont.Transcript, before: int, client_usage: bool,
            upstream: bytes, split: int) -> bytes:
    splice = cont.Splice(transcript, before, client_usage)
    out = b"".join(splice.rewrite(upstream[i:i + split])
                   for i in range(0, len(upstream), split))
    return out


@pytest.mark.parametrize("split", [1, 7, 10_000])
@pytest.mark.parametrize("client_usage", [True, False])
def test_splice_makes_one_completions_stream(split: int, client_usage: bool) -> None:
    t = cont.Transcript(chat=False)
    t.add(completion_event("cmpl-first", " a") + completion_event("cmpl-first", " b"))
    upstream = (completion_event("cmpl-second", " c", created=555, model="other")
                + completion_event("cmpl-second", " d", "length", created=555)
                + usage_event("cmpl-second", 5, 2) + DONE)
    got = events_of(spliced(t, 2, client_usage, upstream, split))
    assert got[-1] == "[DONE]"
    tokens = [e for e in got[:-1] if e["choices"]]
    assert [e["choices"][0]["text"] for e in tokens] == [" c", " d"]
    assert {(e["id"], e["created"], e["model"]) for e in got[:-1]} == {("cmpl-first", 100, "m")}
    assert [e["choices"][0]["finish_reason"] for e in tokens] == [None, "length"]
    usage = [e["usage"] for e in got[:-1] if not e["choices"]]
    if client_usage:  # the original prompt (5 - 2) and every generated token (2 + 2)
        assert usage == [{"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}]
    else:
        assert usage == []


def test_splice_drops_the_second_role_event_of_a_chat() -> None:
    t = cont.Transcript(chat=True)
    t.add(chat_event("chatcmpl-1", {"role": "assistant", "content": ""})
          + chat_event("chatcmpl-1", {"content": " hi"}))
    upstream = (chat_event("chatcmpl-2", {"role": "assistant", "content": ""}, created=9)
                + chat_event("chatcmpl-2", {"content": " there"}, "stop", created=9) + DONE)
    got = events_of(cont.Splice(t, 1, False).rewrite(upstream))
    assert [e["choices"][0]["delta"] for e in got[:-1]] == [{"content": " there"}]
    assert got[0]["id"] == "chatcmpl-1" and got[0]["created"] == 100


def test_a_stream_broken_before_its_first_event_takes_the_continuations_identity() -> None:
    t = cont.Transcript(chat=True)  # headers came, then nothing
    upstream = chat_event("chatcmpl-2", {"role": "assistant", "content": ""}, created=9) + DONE
    got = events_of(cont.Splice(t, 0, False).rewrite(upstream))
    assert got[0]["id"] == "chatcmpl-2" and got[0]["choices"][0]["delta"]["role"] == "assistant"


def test_splice_passes_engine_errors_through() -> None:
    t = cont.Transcript(chat=False)
    t.add(completion_event("c", " a"))
    err = b'data: {"error": {"message": "boom", "code": 500}}\n\n'
    assert cont.Splice(t, 1, True).rewrite(err) == err


def test_a_stream_that_ends_at_the_seam_gets_its_finish_and_usage() -> None:
    t = cont.Transcript(chat=False)
    t.add(completion_event("c", " a") + completion_event("c", " b"))
    got = events_of(cont.finish_event(t, "length") + cont.usage_event(t, 7))
    assert got[0]["choices"][0] == {"index": 0, "text": "", "logprobs": None,
                                    "finish_reason": "length", "stop_reason": None}
    assert got[1]["usage"] == {"prompt_tokens": 7, "total_tokens": 9, "completion_tokens": 2}
    assert {e["id"] for e in got} == {"c"}


def test_a_known_prompt_count_wins_over_the_continuations_arithmetic() -> None:
    """With the model's tokenizer the proxy knows the original prompt's count; the engine's
    re-tokenised seam (here 3 tokens for 2 generated) does not leak into the usage."""
    t = cont.Transcript(chat=False)
    t.add(completion_event("c", " ab") + completion_event("c", "c"))
    upstream = completion_event("d", " e", "stop") + usage_event("d", 8, 1) + DONE
    got = events_of(cont.Splice(t, 2, True, prompt_tokens=5).rewrite(upstream))
    assert got[1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


# ---- slices (SCLS) ------------------------------------------------------------------------

def test_a_slice_asks_for_its_budget_only() -> None:
    assert orjson.loads(cont.slice_body(info(COMPLETIONS, max_tokens=900), 256))[
        "max_tokens"] == 256
    assert orjson.loads(cont.slice_body(info(COMPLETIONS), 256))["max_tokens"] == 256
    body = orjson.loads(cont.slice_body(info(CHAT, max_completion_tokens=900), 64))
    assert body["max_completion_tokens"] == 64 and "max_tokens" not in body
    nxt = orjson.loads(cont.continuation_body(info(COMPLETIONS, max_tokens=900), " a", 256,
                                              budget=256))
    assert nxt["max_tokens"] == 256
    last = orjson.loads(cont.continuation_body(info(COMPLETIONS, max_tokens=300), " a", 256,
                                               budget=256))
    assert last["max_tokens"] == 44
    open_ended = orjson.loads(cont.continuation_body(info(COMPLETIONS), " a", 256, budget=64))
    assert open_ended["max_tokens"] == 64


@pytest.mark.parametrize("split", [1, 10_000])
def test_a_slice_end_is_hidden_from_the_client(split: int) -> None:
    t = cont.Transcript(chat=False)
    first = (completion_event("c1", " a") + completion_event("c1", " b", "length")
             + usage_event("c1", 7, 2) + DONE)
    splice = cont.Splice(t, 0, True, slice_=True)
    out = b"".join(splice.rewrite(first[i:i + split]) for i in range(0, len(first), split))
    got = events_of(out)
    assert [e["choices"][0]["finish_reason"] for e in got] == [None, None]
    assert [e["choices"][0]["stop_reason"] for e in got] == [None, None]
    assert splice.slice_end and splice.prompt_tokens == 7
    t.add(out)
    last = cont.Splice(t, 2, True, splice.prompt_tokens)
    got = events_of(last.rewrite(completion_event("c2", " c", "stop") + usage_event("c2", 9, 1)
                                 + DONE))
    assert got[0]["id"] == "c1" and got[0]["choices"][0]["finish_reason"] == "stop"
    assert got[1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert got[2] == "[DONE]" and not last.slice_end


def test_a_slice_that_stops_by_itself_ends_the_stream() -> None:
    t = cont.Transcript(chat=True)
    splice = cont.Splice(t, 0, False, slice_=True)
    got = events_of(splice.rewrite(
        chat_event("c", {"role": "assistant", "content": ""})
        + chat_event("c", {"content": " ok"}, "stop") + usage_event("c", 5, 1) + DONE))
    assert [e if e == "[DONE]" else e["choices"][0]["finish_reason"] for e in got] == \
        [None, "stop", "[DONE]"]
    assert not splice.slice_end
