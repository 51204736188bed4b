"""The description of one request that routing works from."""

from __future__ import annotations

from typing import NamedTuple

from blockproxy.routing.features import Features


class Job(NamedTuple):
    """What a policy knows about the request being routed (sizes in tokens).

    ``blocks`` are the prompt's prefix block hashes (:mod:`blockproxy.routing.prefix`;
    None when it has none) and ``block_tokens`` the prompt tokens each block stands for:
    an instance's cached tokens for this job are its leading cached blocks times that
    (:meth:`blockproxy.cluster.instance.Instance.cached_tokens`).
    ``output_tokens`` is the predicted median (the configured quantile) of its output
    length; ``output_high`` the tail quantile when the length model gives one.
    """

    prompt_tokens: int
    output_tokens: int
    blocks: list[int] | None = None
    block_tokens: float = 0.0
    #: the request's length features (what the length model learns from when it ends)
    features: Features | None = None
    #: a high quantile of its output length (the tail the SLO risk is priced at), or 0
    output_high: int = 0
    #: ``prompt_tokens`` is the engine's exact count (the model's tokenizer gave the ids)
    exact_prompt: bool = False
    #: the output length of its most likely length bucket (the bucket classifier's, for
    #: policies that route on buckets: ``intelligent_router``), capped as
    #: ``output_tokens`` is; 0 when not asked for or not yet learned
    bucket_tokens: int = 0
