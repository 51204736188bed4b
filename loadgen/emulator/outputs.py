"""True output length and generated text of emulated requests.

The true length (tokens the "model" wants to say) comes from the load generator's
``x-loadgen-output-tokens`` header when present.  Otherwise it is drawn deterministically
from the prompt (a random generator seeded by a hash of its tokens) from a lognormal
distribution whose median depends on visible features, so a learned predictor has
something to find:

======================  ===================  ==================
prompt tokens           median (completions)  median (chat)
======================  ===================  ==================
< 128                   64                   96
128 - 511               128                  192
512 - 2047              192                  288
2048 - 8191             256                  384
>= 8192                 320                  480
======================  ===================  ==================

with sigma :data:`LENGTH_SIGMA` and clipped to [1, :data:`MAX_DRAWN_LENGTH`].

Generated tokens are words of :data:`loadgen.tokenizer.VOCABULARY`, each with a leading
space, chosen deterministically from the same prompt hash.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Hashable, Sequence

from loadgen.tokenizer import VOCABULARY

LENGTH_SIGMA = 0.8
MAX_DRAWN_LENGTH = 8192
CHAT_LENGTH_FACTOR = 1.5
_MEDIANS = ((128, 64), (512, 128), (2048, 192), (8192, 256))
_LAST_MEDIAN = 320
_STRIDE = 7919  # prime, coprime with len(VOCABULARY), so words cycle through all of it
_WORDS = tuple(" " + w for w in VOCABULARY)


def prompt_digest(tokens: Sequence[Hashable]) -> int:
    """A stable 64-bit hash of a prompt's tokens (the same in every process)."""
    data = "\x1f".join(map(str, tokens)).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def median_output_length(num_prompt_tokens: int, chat: bool) -> float:
    """Median of the drawn output length for a prompt of this size and endpoint."""
    median = _LAST_MEDIAN
    for bound, value in _MEDIANS:
        if num_prompt_tokens < bound:
            median = value
            break
    return median * (CHAT_LENGTH_FACTOR if chat else 1.0)


def drawn_output_length(digest: int, num_prompt_tokens: int, chat: bool) -> int:
    """True output length of a prompt without the header (deterministic in ``digest``)."""
    z = random.Random(digest).gauss(0.0, 1.0)
    value = median_output_length(num_prompt_tokens, chat) * math.exp(LENGTH_SIGMA * z)
    return max(1, min(MAX_DRAWN_LENGTH, round(value)))


def output_word(digest: int, index: int) -> str:
    """Text of generated token ``index`` (a vocabulary word with a leading space)."""
    return _WORDS[(digest + index * _STRIDE) % len(_WORDS)]


def output_text(digest: int, num_tokens: int) -> str:
    """The first ``num_tokens`` generated tokens, concatenated."""
    return "".join(output_word(digest, i) for i in range(num_tokens))
