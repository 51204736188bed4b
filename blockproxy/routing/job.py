"""The description of one request that routing works from."""

from __future__ import annotations

from typing import NamedTuple


class Job(NamedTuple):
    """What a policy knows about the request being routed (sizes in tokens)."""

    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
