"""The emulator's documented word tokenizer, and prompt builders for the load generator.

Rule (what ``loadgen emulate`` counts as tokens):

* completions: one token per whitespace-separated word of the prompt
  (``str.split()``); a prompt given as a list of token ids counts one token per id;
* chat: every message costs :data:`CHAT_TOKENS_PER_MESSAGE` template tokens (start
  marker, role, end marker) plus the words of its text content, and the generation
  prompt adds :data:`CHAT_GENERATION_PROMPT_TOKENS` (start marker and ``assistant``);
  with ``continue_final_message`` (and no generation prompt) the last message has no end
  marker, so a partial assistant answer continues where it stopped.

Token *identity* matters too: the emulator's prefix cache hashes blocks of these tokens,
so two prompts that start with the same words share cached KV blocks.  The builders here
make prompts of an exact token count, and :func:`make_prompt_from_blocks` gives every
Mooncake ``hash_ids`` entry one fixed block of text, so requests that share hash ids
share a textual prefix and hit the emulator's prefix cache like they would hit vLLM's.

Generated text is made of words that start with a space and hold no whitespace, so text
fed back as a prompt (prompt + text so far) counts exactly one token per generated token.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
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


def chat_tokens(messages: Iterable[dict[str, Any]], generation_prompt: bool = True,
                continue_final: bool = False) -> list[Token]:
    """Tokens of a chat conversation, template tokens included (see the module rule).
    ``continue_final`` leaves the last message open (no end marker), as vLLM's
    ``continue_final_message`` does, so its text continues; ``generation_prompt`` is
    vLLM's ``add_generation_prompt``."""
    tokens: list[Token] = []
    for message in messages:
        tokens.append("<|start|>")
        tokens.append(str(message.get("role", "user")))
        tokens.extend(message_text(message.get("content")).split())
        tokens.append("<|end|>")
    if continue_final and tokens:
        tokens.pop()
    if generation_prompt:
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


# ---- the same rule as a tokenizer file ---------------------------------------------------
# The emulator's KV events (``loadgen emulate --kv-events-port``) carry token *ids*, as
# vLLM's do, and a router that matches them tokenizes prompts with the model's tokenizer.
# These give the word rule ids and write it as a Hugging Face ``tokenizer.json`` (a
# word-level model over the vocabulary, split on whitespace), so such a router can load
# the emulator's tokenizer like any model's.  Words outside the vocabulary are ``<unk>``.

#: ids 0..: the unknown word, the chat template's markers and roles, then the vocabulary
SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<|start|>", "<|end|>", "system", "user",
                                   "assistant", "tool")
UNK_ID = 0


def vocabulary_ids() -> dict[str, int]:
    """Word -> token id of the word tokenizer."""
    return {word: i for i, word in enumerate(SPECIAL_TOKENS + VOCABULARY)}


_IDS = vocabulary_ids()


def token_ids(tokens: Iterable[Token]) -> list[int]:
    """Ids of emulator tokens: words by the vocabulary (``<unk>`` outside it), token ids
    as they are."""
    ids = _IDS
    return [t if isinstance(t, int) else ids.get(t, UNK_ID) for t in tokens]


def tokenizer_json() -> str:
    """The word rule as the text of a ``tokenizer.json`` (``tokenizers`` library)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    tok = Tokenizer(WordLevel(vocabulary_ids(), unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return tok.to_str()


#: the chat rule (:func:`chat_tokens`) as a Jinja chat template, for ``tokenizer_config.json``
CHAT_TEMPLATE = (
    "{% for m in messages %}<|start|> {{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% elif m['content'] %}{% for p in m['content'] %}"
    "{% if p['type'] == 'text' %}{{ p['text'] }} {% endif %}{% endfor %}{% endif %}"
    " <|end|> {% endfor %}{% if add_generation_prompt %}<|start|> assistant{% endif %}")


def write_tokenizer(directory: str | Path) -> Path:
    """Write the word tokenizer as a model directory holds one (``tokenizer.json`` and a
    ``tokenizer_config.json`` with :data:`CHAT_TEMPLATE`); returns the directory."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(tokenizer_json())
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHAT_TEMPLATE, "unk_token": "<unk>",
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    return path
