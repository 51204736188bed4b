"""Online response-length predictor: how many tokens will this request generate?

The simulator needs every request's output length before it is known.  This first
predictor learns from finished requests only:

* Observations are kept per ``(model, prompt-length bucket)``, per model, and globally, each
  in a ring of the last ``window`` lengths.  The bucket of a prompt is
  ``floor(log_base(prompt_tokens))`` (``bucket_base`` 2: 1, 2-3, 4-7, 8-15, ... tokens).
* A prediction is a quantile of the finest ring holding at least ``min_samples``
  observations, else ``default_tokens``.  The quantile is :func:`numpy.quantile` with
  ``method="higher"``: always an observed length, never an interpolation, so it is
  deterministic and an integer.
* A client hint (header ``x-blockproxy-output-tokens``, parsed by :func:`parse_hint`)
  overrides the learned value.
* Every prediction, hint included, is capped by ``max_tokens`` and by the context left
  (context limit minus prompt tokens), and is at least 1.

Its error against true lengths (MAPE and log2-bucket accuracy) is tracked for export.
Everything here is synchronous and cheap: :meth:`LengthPredictor.predict` is O(1) unless a
ring has changed since its quantile was last computed.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

HINT_HEADER = "x-blockproxy-output-tokens"

# Digits only: int() would also take '+5', ' 5_0 ', and non-ASCII digits.  Ten digits bound
# the work and anything larger is capped by max_tokens anyway.
_HINT_RE = re.compile(r"[0-9]{1,10}")


def parse_hint(value: str | None) -> int | None:
    """Parse an ``x-blockproxy-output-tokens`` header value: a positive integer, else None.

    Bad hints are not errors: the caller ignores them and predicts as usual.
    """
    if value is None:
        return None
    value = value.strip()
    if not _HINT_RE.fullmatch(value):
        return None
    tokens = int(value)
    return tokens if tokens >= 1 else None


def length_bucket(tokens: int, base: float = 2.0) -> int:
    """``floor(log_base(tokens))`` computed exactly for integers; tokens below 1 count as 1."""
    tokens = max(1, int(tokens))
    bucket = int(math.log(tokens, base))
    # math.log is inexact at powers of the base (log(1000, 10) = 2.9999...), so fix it up.
    while base ** (bucket + 1) <= tokens:
        bucket += 1
    while bucket > 0 and base ** bucket > tokens:
        bucket -= 1
    return bucket


class _Ring:
    """The last ``window`` observed lengths, with a cached quantile.

    The quantile is recomputed once ``count / 32`` new values have arrived (every value
    while there are fewer than 64): one more sample moves the quantile of hundreds by at
    most one rank, and a request path that ran ``np.quantile`` on every completion spent
    more time there than in routing.
    """

    __slots__ = ("cached", "count", "pending", "pos", "values")

    def __init__(self, window: int) -> None:
        self.values = np.zeros(window, dtype=np.int64)
        self.count = 0
        self.pos = 0
        self.pending = 1  # values pushed since the cached quantile was computed
        self.cached = 0

    @property
    def dirty(self) -> bool:
        return self.pending > 0 and self.pending * 32 >= self.count * (self.count >= 64)

    def push(self, tokens: int) -> None:
        self.values[self.pos] = tokens
        self.pos = (self.pos + 1) % len(self.values)
        self.count = min(self.count + 1, len(self.values))
        self.pending += 1

    def quantile(self, q: float) -> int:
        if self.dirty:
            self.cached = int(np.quantile(self.values[:self.count], q, method="higher"))
            self.pending = 0
        return self.cached


class LengthPredictor:
    """Predicts output tokens per request from the lengths of finished requests.

    Censored observations: a request stopped by ``max_tokens`` (``finish_reason ==
    "length"`` and ``output_tokens >= max_tokens``) would have run longer; its true length
    is unknown but at least ``output_tokens``.  It is recorded at that lower bound.  Dropping
    it instead would keep only the requests that happened to stop early and bias every
    prediction low; recording the bound leaves a quantile exact whenever the quantile lies
    below all censored values in the ring (their true lengths are above it either way), and
    otherwise errs low only by as much as the caps cut off.  Censored requests are not
    scored in the error statistics, since their true length is unknown.
    """

    def __init__(self, quantile: float = 0.5, window: int = 512, min_samples: int = 8,
                 default_tokens: int = 256, bucket_base: float = 2.0) -> None:
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {quantile}")
        if window < 1 or min_samples < 1 or default_tokens < 1:
            raise ValueError("window, min_samples and default_tokens must be >= 1")
        if min_samples > window:
            raise ValueError(f"min_samples ({min_samples}) cannot exceed window ({window})")
        if bucket_base <= 1.0:
            raise ValueError(f"bucket_base must be > 1, got {bucket_base}")
        self.quantile = quantile
        self.window = window
        self.min_samples = min_samples
        self.default_tokens = default_tokens
        self.bucket_base = bucket_base
        # Rings are created by observe() only, so predict() for unknown models or prompt
        # lengths allocates nothing.
        self._by_bucket: dict[tuple[str, int], _Ring] = {}
        self._by_model: dict[str, _Ring] = {}
        self._global = _Ring(window)
        self._observations = 0
        self._censored = 0
        self._errors = 0
        self._abs_pct_error_sum = 0.0
        self._same_bucket = 0

    def bucket(self, prompt_tokens: int) -> int:
        """The prompt-length bucket of ``prompt_tokens``."""
        return length_bucket(prompt_tokens, self.bucket_base)

    def learned(self, model: str, prompt_tokens: int) -> int | None:
        """The learned quantile for this model and prompt length, or None before data."""
        ring = self._by_bucket.get((model, self.bucket(prompt_tokens)))
        if ring is None or ring.count < self.min_samples:
            ring = self._by_model.get(model)
            if ring is None or ring.count < self.min_samples:
                ring = self._global
                if ring.count < self.min_samples:
                    return None
        return ring.quantile(self.quantile)

    def predict(self, model: str, prompt_tokens: int, max_tokens: int | None,
                context_left: int | None = None, hint: int | None = None) -> int:
        """Predicted output tokens of a new request, between 1 and the caps.

        ``hint`` (a client's ``x-blockproxy-output-tokens``, if >= 1) replaces the learned
        value; ``max_tokens`` and ``context_left`` (tokens the context limit leaves after
        the prompt) cap the result whichever way it was obtained.
        """
        if hint is not None and hint >= 1:
            tokens = hint
        else:
            learned = self.learned(model, prompt_tokens)
            tokens = self.default_tokens if learned is None else learned
        if max_tokens is not None:
            tokens = min(tokens, max_tokens)
        if context_left is not None:
            tokens = min(tokens, context_left)
        return max(1, tokens)

    def observe(self, model: str, prompt_tokens: int, output_tokens: int,
                max_tokens: int | None, finish_reason: str | None,
                predicted: int | None = None) -> None:
        """Record a finished request's true output length.

        Censored requests (cut by ``max_tokens``) are recorded at their length; see the
        class docstring.  With ``predicted``, the prediction's error is scored too
        (uncensored requests only).
        """
        if output_tokens < 0:
            raise ValueError(f"output_tokens must be >= 0, got {output_tokens}")
        censored = (finish_reason == "length" and max_tokens is not None
                    and output_tokens >= max_tokens)
        key = (model, self.bucket(prompt_tokens))
        ring = self._by_bucket.get(key)
        if ring is None:
            ring = self._by_bucket[key] = _Ring(self.window)
        ring.push(output_tokens)
        model_ring = self._by_model.get(model)
        if model_ring is None:
            model_ring = self._by_model[model] = _Ring(self.window)
        model_ring.push(output_tokens)
        self._global.push(output_tokens)
        self._observations += 1
        if censored:
            self._censored += 1
        elif predicted is not None:
            self.record_error(predicted, output_tokens)

    def record_error(self, predicted: int, actual: int) -> None:
        """Score one prediction against the true length.

        The percentage error divides by ``max(actual, 1)`` so an empty response counts
        instead of dividing by zero; buckets are log2 buckets of lengths.
        """
        self._errors += 1
        self._abs_pct_error_sum += abs(predicted - actual) / max(actual, 1)
        if length_bucket(predicted) == length_bucket(actual):
            self._same_bucket += 1

    @property
    def mape(self) -> float | None:
        """Mean absolute percentage error of scored predictions (0.25 = 25%), or None."""
        return self._abs_pct_error_sum / self._errors if self._errors else None

    @property
    def bucket_accuracy(self) -> float | None:
        """Fraction of scored predictions in the true length's log2 bucket, or None."""
        return self._same_bucket / self._errors if self._errors else None

    def stats(self) -> dict[str, Any]:
        """Counters and error figures for metrics and the debug endpoint."""
        return {
            "observations": self._observations,
            "censored": self._censored,
            "scored": self._errors,
            "mape": self.mape,
            "bucket_accuracy": self.bucket_accuracy,
            "quantile": self.quantile,
            # Samples currently in each model's window (at most ``window``).
            "model_samples": {m: r.count for m, r in self._by_model.items()},
        }
