"""The documented word tokenizer and the prompt builders (``loadgen/tokenizer.py``)."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from loadgen import tokenizer as tk


def test_completion_tokens_are_words() -> None:
    assert tk.count_completion_tokens("  hello   big\nworld\t") == 3
    assert tk.count_completion_tokens([5, 6, 7]) == 3
    assert tk.completion_tokens("a b") == ["a", "b"]


def test_chat_rule() -> None:
    messages: list[dict[str, Any]] = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi there you"},
                                             {"type": "image_url", "image_url": {}}]}]
    expected = (2 + 3 + 2 * tk.CHAT_TOKENS_PER_MESSAGE + tk.CHAT_GENERATION_PROMPT_TOKENS)
    assert tk.count_chat_tokens(messages) == expected == 13
    assert tk.count_chat_tokens([{"role": "user", "content": None}]) == 5


@given(st.integers(min_value=0, max_value=3000), st.integers())
def test_make_prompt_exact_count(n: int, seed: int) -> None:
    prompt = tk.make_prompt(n, seed)
    assert tk.count_completion_tokens(prompt) == n
    assert prompt == tk.make_prompt(n, random.Random(seed))


@given(st.lists(st.integers(min_value=0, max_value=10**9), max_size=6),
       st.integers(min_value=0, max_value=4000))
def test_make_prompt_from_blocks_exact_count(hash_ids: list[int], total: int) -> None:
    prompt = tk.make_prompt_from_blocks(hash_ids, 512, total)
    assert tk.count_completion_tokens(prompt) == total


def test_shared_hash_ids_share_text() -> None:
    a = tk.make_prompt_from_blocks([1, 2, 3], 512, 1400).split()
    b = tk.make_prompt_from_blocks([1, 2, 9], 512, 1536).split()
    c = tk.make_prompt_from_blocks([7, 2, 3], 512, 1536).split()
    assert a[:1024] == b[:1024] and a[1024:1400] != b[1024:1400]
    assert a[:512] != c[:512] and a[512:1024] == c[512:1024]
    # Beyond the blocks, the rest is unique to the request (seeded by its hash ids).
    tail_a = tk.make_prompt_from_blocks([1], 16, 40, seed=1).split()[16:]
    tail_b = tk.make_prompt_from_blocks([1], 16, 40, seed=2).split()[16:]
    assert tail_a != tail_b


def test_generated_words_reparse_one_token_each() -> None:
    assert all(" " not in w and w.isalpha() for w in tk.VOCABULARY)
    assert len(set(tk.VOCABULARY)) == len(tk.VOCABULARY) == 4900
