"""A request's prompt as a chain of block hashes, the unit of prefix caching.

vLLM caches a prompt's KV in blocks of ``block_size`` tokens, each registered under a hash
that covers every token before its end; a later prompt reuses the longest run of leading
blocks whose hashes it shares.  The proxy has no tokenizer, so it does the same on the
bytes of the prompt as the engine would see it: the completions prompt, or a chat
request's messages rendered in order (role, then content, each message closed by a
separator), so that a conversation's next turn starts with the bytes of the previous
turn.  Token-id prompts are hashed as their ids (4 bytes each), so a block is exactly
:data:`BLOCK_BYTES` / 4 tokens.

:func:`prefix_hashes` is compiled (``blockproxy._fastcore``); :func:`prefix_hashes_py` is
its pure-Python twin, result for result (``tests/test_prefix.py``), used when the extension
is not built or ``BLOCKPROXY_NO_EXTENSIONS`` is set.  The hashes are stable across
processes and machines, so proxies can share them.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from blockproxy.compiled import pick
from blockproxy.request import CHAT, RequestInfo, all_ints

#: bytes per hashed block: about 32 tokens of English text, 32 token ids
BLOCK_BYTES = 128
#: at most this many blocks are hashed per prompt (512 KiB): bounded work for any input
MAX_BLOCKS = 4096
#: bytes per token id in a hashed token-id prompt
ID_BYTES = 4
#: bytes of a prompt that are ever hashed: the rest is not even encoded
MAX_BYTES = MAX_BLOCKS * BLOCK_BYTES
#: token ids of a prompt that are ever hashed
MAX_IDS = MAX_BYTES // ID_BYTES

_MASK = (1 << 64) - 1
_MIX = 0x9E3779B97F4A7C15
_SEED = 0x243F6A8885A308D3


def _fmix(x: int) -> int:
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & _MASK
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & _MASK
    return x ^ (x >> 33)


def prefix_hashes_py(data: bytes, block: int, limit: int, parent: int | None = None
                     ) -> list[int]:
    """The twin of ``blockproxy._fastcore.prefix_hashes``: chain hashes of the first
    ``limit`` full ``block``-byte blocks of ``data``, as 63-bit ints, each block's hash
    started from the one before it (``parent`` before the first)."""
    if block <= 0 or block % 8:
        raise ValueError("block must be a positive multiple of 8")
    n = min(len(data) // block, limit)
    words = struct.Struct(f"<{block // 8}Q")
    h = _SEED if parent is None else parent & _MASK
    out = []
    for b in range(n):
        for w in words.unpack_from(data, b * block):
            h = ((h ^ w) * _MIX) & _MASK
            h ^= h >> 29
        h = _fmix(h) >> 1
        out.append(h)
    return out


prefix_hashes: Callable[..., list[int]] = pick("prefix_hashes", prefix_hashes_py)


class PromptBlocks(NamedTuple):
    """A prompt's block hashes, and how many bytes of it each block stands for."""

    hashes: list[int]
    #: True when the prompt was token ids (a block is exactly BLOCK_BYTES / 4 tokens)
    token_ids: bool


def _content_bytes(content: Any) -> bytes:
    if isinstance(content, str):
        return content[:MAX_BYTES].encode("utf-8", "surrogatepass")
    if isinstance(content, list):  # content parts: their text, in order
        return b"".join(_content_bytes(p.get("text", "")) if isinstance(p, dict) else b""
                        for p in content[:MAX_BYTES])
    return b""


def prompt_bytes(info: RequestInfo) -> tuple[bytes, bool] | None:
    """The bytes a request's prefix is hashed over (the first :data:`MAX_BYTES` at least,
    when there are that many), and whether they are token ids; None for what has no single
    prefix (a batch of prompts)."""
    body = info.body
    if info.route == CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list):
            return None
        parts = []
        size = 0
        for m in messages:
            if size >= MAX_BYTES:
                break
            if isinstance(m, dict):
                role = m.get("role")
                part = ((role if isinstance(role, str) else "").encode() + b"\x1e"
                        + _content_bytes(m.get("content")) + b"\x1f")
                parts.append(part)
                size += len(part)
        return b"".join(parts), False
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt[:MAX_BYTES].encode("utf-8", "surrogatepass"), False
    if isinstance(prompt, list) and prompt and all_ints(prompt):
        head = prompt[:MAX_BYTES // ID_BYTES]
        try:
            ids = array("i", head)
        except OverflowError:  # an id out of int32 range (the engine will refuse it)
            ids = array("i", (t if -(1 << 31) <= t < 1 << 31 else 0 for t in head))
        return ids.tobytes(), True
    return None


def prompt_blocks(info: RequestInfo) -> PromptBlocks | None:
    """The block hashes of ``info``'s prompt (None when it has none to share)."""
    got = prompt_bytes(info)
    if got is None:
        return None
    data, ids = got
    hashes = prefix_hashes(data, BLOCK_BYTES, MAX_BLOCKS)
    return PromptBlocks(hashes, ids) if hashes else None


def token_hashes(ids: Sequence[int], block_size: int, parent: int | None = None,
                 limit: int = MAX_BLOCKS) -> list[int]:
    """Chain hashes of the full ``block_size``-token blocks of token ids ``ids`` (the
    engine's own blocks, when ``ids`` come from the model's tokenizer), continued from
    ``parent``'s hash.  Ids are hashed as 4-byte ints, as token-id prompts are."""
    try:
        data = array("i", ids).tobytes()
    except OverflowError:
        data = array("i", (t if -(1 << 31) <= t < 1 << 31 else 0 for t in ids)).tobytes()
    return prefix_hashes(data, block_size * ID_BYTES, limit, parent)
