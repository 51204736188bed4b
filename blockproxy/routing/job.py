"""The description of one request that routing works from."""

from __future__ import annotations

from typing import NamedTuple


class Job(NamedTuple):
    """What a policy knows about the request being routed (sizes in tokens).

    ``blocks`` are the prompt's prefix block hashes (:mod:`blockproxy.routing.prefix`;
    None when it has none) and ``block_tokens`` the prompt tokens each block stands for:
    an instance's cached tokens for this job are its leading cached blocks times that
    (:meth:`blockproxy.cluster.instance.Instance.cached_tokens`).
    """

    prompt_tokens: int
    output_tokens: int
    blocks: list[int] | None = None
    block_tokens: float = 0.0
