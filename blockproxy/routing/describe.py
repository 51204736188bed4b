"""Describe a request for routing, and learn from how it ended.

:class:`Describer` turns a parsed request into a :class:`~blockproxy.routing.job.Job`:
prompt tokens estimated from its characters (:mod:`blockproxy.routing.tokens`), output
tokens predicted (:mod:`blockproxy.routing.lengths`, or the client's hint header) from its
features (:mod:`blockproxy.routing.features`), the prompt's prefix block hashes
(:mod:`blockproxy.routing.prefix`).  When the request completes, :meth:`Describer.learn`
feeds the true counts back.

The conversation a request continues is found through its prefix blocks: each finished
request leaves its prompt's last block hash with its output length (the last
:data:`TURNS` of them), and a new prompt that contains such a block continues that turn;
the previous turn's output length is then one of its length features.
"""

from __future__ import annotations

from collections import OrderedDict

from blockproxy.request import RequestInfo
from blockproxy.routing.features import Features
from blockproxy.routing.job import Job
from blockproxy.routing.lengths import LengthPredictor, parse_hint
from blockproxy.routing.prefix import BLOCK_BYTES, ID_BYTES, prompt_blocks, token_hashes
from blockproxy.routing.tokens import PromptTokenEstimator

#: finished turns remembered (prompt's last block hash -> output tokens)
TURNS = 65536
#: a prompt's last blocks searched for an earlier turn
TURN_SCAN = 256


class Describer:
    def __init__(self, predictor: LengthPredictor,
                 tokens: PromptTokenEstimator | None = None,
                 tail_quantile: float = 0.9, buckets: bool = False,
                 tail_every: int = 1) -> None:
        if not 0.0 < tail_quantile < 1.0:
            raise ValueError(f"tail_quantile must be in (0, 1), got {tail_quantile}")
        if tail_every < 0:
            raise ValueError(f"tail_every must be >= 0, got {tail_every}")
        self.predictor = predictor
        self.tokens = tokens or PromptTokenEstimator()
        self.tail_quantile = tail_quantile
        #: one job in this many gets ``output_high`` (0: none).  Its E2E at that length is
        #: one more simulation at dispatch, of a long answer with the expected arrivals
        #: (several times the decision's own); it feeds only the tail-coverage metric,
        #: which a sample estimates as well.
        self.tail_every = tail_every
        self._tail_count = 0
        #: also give each job its length bucket (the classifier head)
        self.buckets = buckets
        self._turns: OrderedDict[int, int] = OrderedDict()

    def previous_turn(self, hashes: list[int] | None) -> int | None:
        """Output tokens of the latest finished request whose prompt this one extends."""
        if not hashes or not self._turns:
            return None
        turns = self._turns
        for h in reversed(hashes[-TURN_SCAN:]):
            output = turns.get(h)
            if output is not None:
                return output
        return None

    def describe(self, info: RequestInfo, hint: str | None, max_model_len: int,
                 token_ids: list[int] | None = None, block_size: int = 0,
                 exact_count: bool = False, tenant: str | None = None) -> Job:
        """The job of ``info``: ``hint`` is the hint header's value (or None);
        ``max_model_len`` the smallest context limit among the candidates.  With the
        prompt's ``token_ids`` (from the model's tokenizer, or a token-id prompt) its
        blocks are the engine's, ``block_size`` tokens each (exact mode), and with
        ``exact_count`` the ids are the whole prompt, so they also give its length.
        ``tenant`` is the request's tenant (a length feature)."""
        exact = token_ids is not None and exact_count
        if token_ids is not None and exact:
            prompt_tokens = max(len(token_ids), 1)
        else:
            prompt_tokens = self.tokens.estimate(info.model, info.prompt_chars)
        hashes: list[int] | None = None
        per_block = 0.0
        if token_ids is not None and block_size > 0:
            hashes = token_hashes(token_ids, block_size) or None
            per_block = float(block_size)
        else:
            blocks = prompt_blocks(info)
            if blocks is not None:
                hashes = blocks.hashes
                per_block = (BLOCK_BYTES / ID_BYTES if blocks.token_ids
                             else BLOCK_BYTES * self.tokens.ratio(info.model))
        predictor = self.predictor
        features = predictor.model.hasher.features(info, prompt_tokens, tenant,
                                                   self.previous_turn(hashes))
        context_left = max(max_model_len - prompt_tokens, 1)
        parsed_hint = parse_hint(hint)
        output = predictor.predict(info.model, prompt_tokens, info.max_tokens, context_left,
                                   parsed_hint, features)
        high = 0
        if parsed_hint is None and self.tail_every and predictor.model.ready(info.model):
            self._tail_count += 1
            if self._tail_count >= self.tail_every:
                self._tail_count = 0
                high = predictor.predict(info.model, prompt_tokens, info.max_tokens,
                                         context_left, None, features, self.tail_quantile)
        bucket = 0
        if self.buckets and parsed_hint is None and predictor.model.ready(info.model):
            head = predictor.model.buckets
            bucket = max(min(head.tokens(head.predict(features)), context_left,
                             info.max_tokens or context_left), 1)
        elif self.buckets:
            bucket = output
        if hashes is None:
            return Job(prompt_tokens, output, None, 0.0, features, high, exact, bucket)
        return Job(prompt_tokens, output, hashes, per_block, features, high, exact, bucket)

    def learn(self, info: RequestInfo, estimated_prompt: int, predicted_output: int,
              prompt_tokens: int | None, output_tokens: int, finish: str | None,
              job: Job | None = None) -> None:
        """Fold in a completed request's true prompt (when reported) and output tokens;
        with its ``job``, the length model learns from its features and the turn is
        remembered for the conversation's next one."""
        if prompt_tokens is not None:
            self.tokens.observe(info.model, info.prompt_chars, prompt_tokens)
        features: Features | None = None
        if job is not None:
            features = job.features
            if job.blocks:
                turns = self._turns
                turns[job.blocks[-1]] = output_tokens
                turns.move_to_end(job.blocks[-1])
                if len(turns) > TURNS:
                    turns.popitem(last=False)
        self.predictor.observe(info.model, prompt_tokens or estimated_prompt, output_tokens,
                               info.max_tokens, finish, predicted=predicted_output,
                               features=features)
