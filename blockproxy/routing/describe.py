"""Describe a request for routing, and learn from how it ended.

:class:`Describer` turns a parsed request into a :class:`~blockproxy.routing.job.Job`:
prompt tokens estimated from its characters (:mod:`blockproxy.routing.tokens`), output
tokens predicted (:mod:`blockproxy.routing.lengths`, or the client's hint header), the
prompt's prefix block hashes (:mod:`blockproxy.routing.prefix`).  When
the request completes, :meth:`Describer.learn` feeds the true counts back to both.
"""

from __future__ import annotations

from blockproxy.request import RequestInfo
from blockproxy.routing.job import Job
from blockproxy.routing.lengths import LengthPredictor, parse_hint
from blockproxy.routing.prefix import BLOCK_BYTES, ID_BYTES, prompt_blocks, token_hashes
from blockproxy.routing.tokens import PromptTokenEstimator


class Describer:
    def __init__(self, predictor: LengthPredictor,
                 tokens: PromptTokenEstimator | None = None) -> None:
        self.predictor = predictor
        self.tokens = tokens or PromptTokenEstimator()

    def describe(self, info: RequestInfo, hint: str | None, max_model_len: int,
                 token_ids: list[int] | None = None, block_size: int = 0,
                 exact_count: bool = False) -> Job:
        """The job of ``info``: ``hint`` is the hint header's value (or None);
        ``max_model_len`` the smallest context limit among the candidates.  With the
        prompt's ``token_ids`` (from the model's tokenizer, or a token-id prompt) its
        blocks are the engine's, ``block_size`` tokens each (exact mode), and with
        ``exact_count`` the ids are the whole prompt, so they also give its length."""
        if token_ids is not None and exact_count:
            prompt_tokens = max(len(token_ids), 1)
        else:
            prompt_tokens = self.tokens.estimate(info.model, info.prompt_chars)
        context_left = max(max_model_len - prompt_tokens, 1)
        output = self.predictor.predict(info.model, prompt_tokens, info.max_tokens,
                                        context_left, parse_hint(hint))
        if token_ids is not None and block_size > 0:
            hashes = token_hashes(token_ids, block_size)
            if not hashes:
                return Job(prompt_tokens, output)
            return Job(prompt_tokens, output, hashes, float(block_size))
        blocks = prompt_blocks(info)
        if blocks is None:
            return Job(prompt_tokens, output)
        per_block = (BLOCK_BYTES / ID_BYTES if blocks.token_ids
                     else BLOCK_BYTES * self.tokens.ratio(info.model))
        return Job(prompt_tokens, output, blocks.hashes, per_block)

    def learn(self, info: RequestInfo, estimated_prompt: int, predicted_output: int,
              prompt_tokens: int | None, output_tokens: int, finish: str | None) -> None:
        """Fold in a completed request's true prompt (when reported) and output tokens."""
        if prompt_tokens is not None:
            self.tokens.observe(info.model, info.prompt_chars, prompt_tokens)
        self.predictor.observe(info.model, prompt_tokens or estimated_prompt, output_tokens,
                               info.max_tokens, finish, predicted=predicted_output)
