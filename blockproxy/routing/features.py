"""Features of a request for predicting what it will generate: one pipeline, stable hashes.

A request becomes a sparse vector of hashed features (the "hashing trick"): each feature is
a name, hashed with CRC-32 into one of ``2**bits`` slots, with a value.  The hashes are the
same in every process (unlike Python's ``hash``), so a model trained offline loads into a
running proxy.  Every feature is crossed with the model name, since one model's lengths say
little about another's.

========================  =========================================================
feature                   value
========================  =========================================================
bias                      1
endpoint                  1 (completions or chat)
prompt length             1 on its log2 bucket, crossed with the endpoint
``max_tokens``            1 on its log2 bucket (or "none")
tenant                    1: the ``x-blockproxy-tenant`` header, else the body's ``user``
words                     1/sqrt(n) for each of the first :data:`MAX_WORDS` distinct
                          words (lower-cased, split at white space, punctuation kept) of
                          the prompt's head and tail (for chat: the system message and
                          the last message)
earlier turn              1 on the log2 bucket of the output of the conversation's
                          previous turn, when the prefix cache model identifies it
========================  =========================================================

Nothing here touches the network or learns; :mod:`blockproxy.routing.lengths` does.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, NamedTuple

import numpy as np

from blockproxy.request import RequestInfo

TENANT_HEADER = "x-blockproxy-tenant"
#: distinct words hashed per request
MAX_WORDS = 48
#: characters of the prompt's head and tail the words are taken from (the cost is per
#: character; with the hashing, about 30 us per request here)
HEAD_CHARS = 192
TAIL_CHARS = 320
CHAT = "/v1/chat/completions"


class Features(NamedTuple):
    """A sparse feature vector: slot indices and their values."""

    slots: np.ndarray  # int64
    values: np.ndarray  # float64


def log2_bucket(n: int) -> int:
    """``floor(log2(n))`` for n >= 1, exactly (``int.bit_length``); 0 for n < 1."""
    return max(int(n), 1).bit_length() - 1


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: the text ones
        return " ".join(p.get("text", "") for p in content
                        if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def prompt_words(info: RequestInfo) -> list[str]:
    """The words the length model sees: up to :data:`MAX_WORDS` distinct, in order."""
    if info.route == CHAT:
        messages = info.body.get("messages")
        if not isinstance(messages, list) or not messages:
            return []
        parts = [m for m in (messages[0], messages[-1]) if isinstance(m, dict)]
        if len(messages) == 1:
            parts = parts[:1]
        text = " ".join(_text(m.get("content"))[-TAIL_CHARS:] for m in parts)
    else:
        prompt = info.body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            return []  # token ids: no words
        text = prompt if len(prompt) <= HEAD_CHARS + TAIL_CHARS else \
            prompt[:HEAD_CHARS] + " " + prompt[-TAIL_CHARS:]
    return list(dict.fromkeys(text.lower().split()))[:MAX_WORDS]


class FeatureHasher:
    """Turns a request into :class:`Features` over ``2**bits`` slots."""

    def __init__(self, bits: int = 18) -> None:
        if not 8 <= bits <= 26:
            raise ValueError(f"bits must be in [8, 26], got {bits}")
        self.bits = bits
        self.size = 1 << bits
        self._mask = self.size - 1

    def features(self, info: RequestInfo, prompt_tokens: int, tenant: str | None = None,
                 previous_output: int | None = None) -> Features:
        seed = zlib.crc32(info.model.encode())
        endpoint = "chat" if info.route == CHAT else "completions"
        mask = self._mask
        crc = zlib.crc32
        slots = [crc(name.encode(), seed) & mask for name in (
            "bias", "endpoint=" + endpoint, f"prompt={endpoint}:{log2_bucket(prompt_tokens)}",
            "max_tokens=" + ("none" if info.max_tokens is None
                             else str(log2_bucket(info.max_tokens))))]
        if tenant:
            slots.append(crc(("tenant=" + tenant[:128]).encode(), seed) & mask)
        if previous_output is not None:
            slots.append(crc(f"previous={log2_bucket(previous_output)}".encode(), seed) & mask)
        values = [1.0] * len(slots)
        words = prompt_words(info)
        if words:
            word_seed = crc(b"word=", seed)
            slots += [crc(w.encode(), word_seed) & mask for w in words]
            values += [1.0 / math.sqrt(len(words))] * len(words)
        # Colliding slots (rare: ~70 of 2**18) stay separate entries: the prediction sums
        # them; a learning step applies one of them (numpy's fancy-index assignment).
        return Features(np.array(slots, dtype=np.int64), np.array(values))


def tenant_of(header: str | None, info: RequestInfo) -> str | None:
    """The tenant a request belongs to: the header, else the OpenAI body's ``user``."""
    if header:
        return header.strip() or None
    user = info.body.get("user")
    return user if isinstance(user, str) and user else None
