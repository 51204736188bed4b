"""The emulator's documented word tokenizer, and prompt builders for the load generator.

Rule (what ``loadgen emulate`` counts as tokens):

* completions: one token per whitespace-separated word of the prompt
  (``str.split()``); a prompt given as a list of token ids counts one token per id;
* chat: every message costs :data:`CHAT_TOKENS_PER_MESSAGE` template tokens (start
  marker, role, end marker) plus the words of its text content, and the generation
  prompt adds :data:`CHAT_GENERATION_PROMPT_TOKENS` (start marker and ``assistant``).

Token *identity* matters too: the emulator's prefix cache hashes blocks of these tokens,
so two prompts that start with the same words share cached KV blocks.  The builders here
make prompts of an exact token count, and :func:`make_prompt_from_blocks` gives every
Mooncake ``hash_ids`` entry one fixed block of text, so requests that share hash ids
share a textual prefix and hit the emulator's prefix cache like they would hit vLLM's.

Generated text is made of words that start with a space and hold no whitespace, so text
fed back as a prompt (prompt + text so far) counts exactly one token per generated token.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

#: Template tokens per chat message: start marker, role, end marker.
CHAT_TOKENS_PER_MESSAGE = 3
#: Tokens of the chat generation prompt: start marker and ``assistant``.
CHAT_GENERATION_PROMPT_TOKENS = 2

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_SYLLABLES = [c + v for c in _CONSONANTS for v in _VOWELS]
#: The fixed vocabulary of prompt and output words: 4,900 two-syllable words ("bada"...).
VOCABULARY: tuple[str, ...] = tuple(a + b for a in _SYLLABLES for b in _SYLLABLES)

Token = str | int


def completion_tokens(prompt: str | Sequence[int]) -> list[Token]:
    """Tokens of a completions prompt: its words, or the token ids as given."""
    if isinstance(prompt, str):
        return prompt.split()  # type: ignore[return-value]
    return list(prompt)


def count_completion_tokens(prompt: str | Sequence[int]) -> int:
    """Number of tokens the emulator counts for a completions prompt."""
    if isinstance(prompt, str):
        return len(prompt.split())
    return len(prompt)


def message_text(content: Any) -> str:
    """Text of a chat message's ``content``: a string, ``None`` or a list of parts.

    Only ``{"type": "text", "text": ...}`` parts carry words; other parts count nothing.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content
                        if isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str))
    raise TypeError("message content must be a string, a list of parts or null")


def chat_tokens(messages: Iterable[dict[str, Any]]) -> list[Token]:
    """Tokens of a chat conversation, template tokens included (see the module rule)."""
    tokens: list[Token] = []
    for message in messages:
        tokens.append("<|start|>")
        tokens.append(str(message.get("role", "user")))
        tokens.extend(message_text(message.get("content")).split())
        tokens.append("<|end|>")
    tokens.append("<|start|>")
    tokens.append("assistant")
    return tokens


def count_chat_tokens(messages: Iterable[dict[str, Any]]) -> int:
    """Number of tokens the emulator counts for a chat request's ``messages``."""
    return len(chat_tokens(messages))


def _rng(seed: int | random.Random | None) -> random.Random:
    return seed if isinstance(seed, random.Random) else random.Random(seed)


def make_words(num_tokens: int, seed: int | str | random.Random | None = None) -> list[str]:
    """``num_tokens`` vocabulary words drawn from ``seed`` (deterministic for a given seed)."""
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    return rng.choices(VOCABULARY, k=num_tokens)


def make_prompt(num_tokens: int, seed: int | random.Random | None = None) -> str:
    """A completions prompt of exactly ``num_tokens`` tokens (random words from ``seed``)."""
    if num_tokens < 0:
        raise ValueError("num_tokens must be non-negative")
    return " ".join(make_words(num_tokens, _rng(seed)))


def block_words(hash_id: int, block_tokens: int) -> list[str]:
    """The fixed words of Mooncake block ``hash_id``: the same id always gives the same text."""
    return make_words(block_tokens, f"loadgen-block:{hash_id}:{block_tokens}")


def make_prompt_from_blocks(hash_ids: Sequence[int], block_tokens: int, total_tokens: int,
                            seed: int | None = None) -> str:
    """A prompt of exactly ``total_tokens`` tokens whose blocks are the texts of ``hash_ids``.

    Block ``k`` of the prompt is :func:`block_words` of ``hash_ids[k]`` (the last block is cut
    to fit).  When ``total_tokens`` is longer than all the blocks, the rest is filled with
    words drawn from ``seed`` and the hash ids, so it is unique to this request.
    """
    if block_tokens <= 0:
        raise ValueError("block_tokens must be positive")
    if total_tokens < 0:
        raise ValueError("total_tokens must be non-negative")
    words: list[str] = []
    for hash_id in hash_ids:
        if len(words) >= total_tokens:
            break
        words.extend(block_words(hash_id, block_tokens))
    if len(words) < total_tokens:
        tail_seed = f"loadgen-tail:{seed}:{','.join(map(str, hash_ids))}"
        words.extend(make_words(total_tokens - len(words), tail_seed))
    return " ".join(words[:total_tokens])
