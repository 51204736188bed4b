"""Response-length predictor: how many tokens will this request generate?

The simulator needs every request's output length before it is known.  Two learners, both
fed by finished requests:

* :class:`LengthModel`, a distribution per request: an online log-linear regression over
  the request's hashed features (:mod:`blockproxy.routing.features`: endpoint, prompt
  length, ``max_tokens``, tenant, a bag of words, the conversation's previous turn) gives
  the median of ``log(1 + tokens)``; the recent residuals of its model give the spread, so
  any quantile is ``exp(mu + residual quantile) - 1``.  It can be trained offline
  (``blockproxy train-lengths``) and loaded at start, and goes on learning online.  It
  predicts once it has seen ``warmup`` requests of a model (at once when loaded).
* :class:`BucketHead`, the Intelligent Router's bucketed classifier (Jain et al.): which
  log2 bucket of output length a request falls in, from the same features (one feature
  pipeline, two heads), learned beside the regression from the same finished requests.
* The rings below, which need no features and answer from the first few requests:

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

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from blockproxy.routing.features import FeatureHasher, Features, log2_bucket

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
    if base == 2.0:
        return log2_bucket(tokens)
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


class _Residuals:
    """The last ``window`` residuals of a model's log-length regression, sorted on demand
    (as :class:`_Ring`: once ``count / 32`` new values have arrived)."""

    __slots__ = ("count", "pending", "pos", "sorted", "values")

    def __init__(self, window: int, values: np.ndarray | None = None,
                 snapshot: np.ndarray | None = None, pending: int = 1) -> None:
        self.values = np.zeros(window, dtype=np.float64)
        self.count = 0
        self.pos = 0
        self.pending = 0
        self.sorted = self.values[:0]
        if values is not None:  # a saved state: the values, the sorted snapshot in use
            for v in values[-window:]:
                self.push(float(v))
            if snapshot is not None:
                self.sorted = np.array(snapshot, dtype=np.float64)
        self.pending = pending

    def push(self, value: float) -> None:
        self.values[self.pos] = value
        self.pos = (self.pos + 1) % len(self.values)
        self.count = min(self.count + 1, len(self.values))
        self.pending += 1

    def quantile(self, q: float) -> float:
        if self.pending > 0 and self.pending * 32 >= self.count * (self.count >= 64):
            self.sorted = np.sort(self.values[:self.count])
            self.pending = 0
        n = len(self.sorted)
        if n == 0:
            return 0.0
        return float(self.sorted[min(n - 1, math.ceil(q * (n - 1)))])

    def ordered(self) -> np.ndarray:
        """The values oldest first."""
        if self.count < len(self.values):
            return self.values[:self.count].copy()
        return np.concatenate([self.values[self.pos:], self.values[:self.pos]])


#: the classifier head's classes: log2 buckets of output tokens, the last open-ended
NUM_BUCKETS = 14
#: slots of the classifier head's weight table (the features' slots, folded)
BUCKET_BITS = 14


class BucketHead:
    """Output-length bucket classifier: multinomial logistic regression (softmax over
    :data:`NUM_BUCKETS` log2 buckets: 0, 1, 2-3, 4-7, ..., 4096 and more) over a request's
    hashed features, learned online by AdaGrad on the cross-entropy.  The features'
    ``2**bits`` slots are folded into ``2**BUCKET_BITS`` rows (a table per class at the
    regression's size would be tens of MB).  Each bucket's representative length is the
    geometric mean of the lengths seen in it (its geometric midpoint before any)."""

    def __init__(self, bits: int = BUCKET_BITS, buckets: int = NUM_BUCKETS,
                 rate: float = 0.5) -> None:
        self.mask = (1 << bits) - 1
        self.rate = rate
        self.weights = np.zeros((1 << bits, buckets), dtype=np.float64)
        self.squares = np.ones((1 << bits, buckets), dtype=np.float64)
        #: per bucket: sum of log(1 + tokens) and count of the lengths seen in it
        self.log_sums = np.zeros(buckets, dtype=np.float64)
        self.counts = np.zeros(buckets, dtype=np.float64)

    @property
    def buckets(self) -> int:
        return int(self.weights.shape[1])

    def bucket_of(self, tokens: int) -> int:
        return min(log2_bucket(tokens) + (tokens >= 1), self.buckets - 1)

    def probabilities(self, x: Features) -> np.ndarray:
        logits = x.values @ self.weights[x.slots & self.mask]
        logits -= logits.max()
        e = np.exp(logits)
        return e / e.sum()  # type: ignore[no-any-return]

    def predict(self, x: Features) -> int:
        """The most likely bucket."""
        return int(np.argmax(x.values @ self.weights[x.slots & self.mask]))

    def tokens(self, bucket: int) -> int:
        """The representative length of ``bucket``."""
        if self.counts[bucket] > 0:
            return round(math.expm1(self.log_sums[bucket] / self.counts[bucket]))
        return 0 if bucket == 0 else round(2 ** (bucket - 0.5))

    def learn(self, x: Features, tokens: int) -> None:
        b = self.bucket_of(tokens)
        self.log_sums[b] += math.log1p(tokens)
        self.counts[b] += 1
        rows = x.slots & self.mask
        p = self.probabilities(x)
        p[b] -= 1.0
        grad = np.outer(x.values, p)
        squares = self.squares[rows] + grad * grad
        self.squares[rows] = squares
        # slots of one request folded together: the step applies one of them, as the
        # regression's colliding slots do (numpy's fancy-index assignment)
        self.weights[rows] -= self.rate * grad / np.sqrt(squares)


class LengthModel:
    """Online log-linear regression of output length over hashed features, with the
    residuals' empirical distribution for quantiles.

    ``mu(x) = base[model] + w . x`` predicts ``log(1 + tokens)``: ``base`` is the model's
    running mean log length (so a cold model starts at its average), ``w`` is learned by
    AdaGrad on the squared error, one sparse step per finished request.  A request cut by
    ``max_tokens`` (censored: its length is at least what it generated) teaches only when
    the prediction lies below that bound, and adds no residual.
    """

    def __init__(self, bits: int = 18, rate: float = 0.2, window: int = 1024,
                 warmup: int = 64) -> None:
        if rate <= 0 or window < 1 or warmup < 0:
            raise ValueError("rate must be > 0, window >= 1 and warmup >= 0")
        self.hasher = FeatureHasher(bits)
        self.rate = rate
        self.window = window
        self.warmup = warmup
        self.weights = np.zeros(self.hasher.size, dtype=np.float64)
        self.squares = np.ones(self.hasher.size, dtype=np.float64)
        self.base: dict[str, float] = {}
        self.seen: dict[str, int] = {}
        self.residuals: dict[str, _Residuals] = {}
        #: the second head on the same features: the length bucket, as a class
        self.buckets = BucketHead()
        #: whether :meth:`learn` trains the bucket head too (a proxy whose policy does
        #: not route on buckets spares its ~20 us per finished request)
        self.learn_buckets = True

    def ready(self, model: str) -> bool:
        return self.seen.get(model, 0) >= self.warmup

    def mu(self, model: str, x: Features) -> float:
        return self.base.get(model, 0.0) + float(self.weights[x.slots] @ x.values)

    def quantile(self, model: str, x: Features, q: float) -> float:
        """The ``q`` quantile of the request's output length, in tokens (>= 0)."""
        res = self.residuals.get(model)
        r = res.quantile(q) if res is not None else 0.0
        return max(math.expm1(self.mu(model, x) + r), 0.0)

    def learn(self, model: str, x: Features, tokens: int, censored: bool) -> None:
        z = math.log1p(max(tokens, 0))
        seen = self.seen.get(model, 0)
        if seen == 0:
            self.base[model] = z
        mu = self.mu(model, x)
        if censored and mu >= z:
            return
        if not censored and self.learn_buckets:
            self.buckets.learn(x, tokens)
            res = self.residuals.get(model)
            if res is None:
                res = self.residuals[model] = _Residuals(self.window)
            res.push(z - mu)
            # the base follows the mean log length (of uncensored requests)
            self.base[model] += (z - self.base[model]) / min(seen + 1, 1000)
        self.seen[model] = seen + 1
        grad = (mu - z) * x.values
        idx = x.slots
        squares = self.squares[idx] + grad * grad
        self.squares[idx] = squares
        self.weights[idx] -= self.rate * grad / np.sqrt(squares)

    def save(self, path: str | Path) -> None:
        """Weights, AdaGrad state, bases and residuals in one ``.npz`` file."""
        models = sorted(self.seen)
        meta = {"format": "blockproxy-length-model-1", "bits": self.hasher.bits,
                "rate": self.rate, "models": models,
                "base": [self.base.get(m, 0.0) for m in models],
                "seen": [self.seen[m] for m in models]}
        arrays: dict[str, Any] = {}
        for i, m in enumerate(models):
            res = self.residuals.get(m)
            if res is not None:
                arrays[f"residuals_{i}"] = res.ordered()
                arrays[f"sorted_{i}"] = res.sorted
                arrays[f"pending_{i}"] = np.array(res.pending)
        arrays.update(meta=np.array(json.dumps(meta)), weights=self.weights,
                      squares=self.squares, bucket_weights=self.buckets.weights,
                      bucket_squares=self.buckets.squares,
                      bucket_log_sums=self.buckets.log_sums,
                      bucket_counts=self.buckets.counts)
        with open(path, "wb") as f:  # np.savez would append ".npz" to another suffix
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path: str | Path, window: int = 1024, warmup: int = 64) -> LengthModel:
        """A model saved by :meth:`save`; a file that is not one is a ValueError."""
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                if meta.get("format") != "blockproxy-length-model-1":
                    raise ValueError("not a blockproxy length model")
                model = cls(int(meta["bits"]), float(meta["rate"]), window, warmup)
                weights, squares = data["weights"], data["squares"]
                if weights.shape != model.weights.shape or squares.shape != weights.shape:
                    raise ValueError("weights do not match the feature size")
                model.weights[:] = weights
                model.squares[:] = squares
                head = model.buckets
                if "bucket_weights" in data:  # files written before the head have none
                    for name, array in (("bucket_weights", head.weights),
                                        ("bucket_squares", head.squares),
                                        ("bucket_log_sums", head.log_sums),
                                        ("bucket_counts", head.counts)):
                        if data[name].shape != array.shape:
                            raise ValueError(f"{name} does not match the bucket head")
                        array[:] = data[name]
                for i, (name, base, seen) in enumerate(
                        zip(meta["models"], meta["base"], meta["seen"], strict=True)):
                    model.base[name] = float(base)
                    model.seen[name] = int(seen)
                    key = f"residuals_{i}"
                    if key in data:
                        model.residuals[name] = _Residuals(
                            window, data[key], data[f"sorted_{i}"],
                            int(data[f"pending_{i}"]))
        except (OSError, KeyError, TypeError, json.JSONDecodeError, ValueError) as exc:
            raise ValueError(f"cannot load length model {path}: {exc}") from None
        return model


#: requests both learners are scored on before the comparison decides which one answers
COMPARE_AFTER = 32
#: the comparison's memory (an exponential moving average over about this many requests)
COMPARE_WINDOW = 500


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
                 default_tokens: int = 256, bucket_base: float = 2.0,
                 model: LengthModel | None = None) -> None:
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
        #: the per-request distribution, used for requests described with features
        self.model = model if model is not None else LengthModel()
        # Rings are created by observe() only, so predict() for unknown models or prompt
        # lengths allocates nothing.
        self._by_bucket: dict[tuple[str, int], _Ring] = {}
        self._by_model: dict[str, _Ring] = {}
        self._global = _Ring(window)
        #: per model: decayed |log error| of the length model, of the rings, requests scored
        self._scores: dict[str, list[float]] = {}
        self._observations = 0
        self._censored = 0
        self._errors = 0
        self._abs_pct_error_sum = 0.0
        self._same_bucket = 0

    def uses_model(self, model: str) -> bool:
        """Whether the length model answers for ``model``: once it has warmed up, while
        its recent error is no worse than the rings' (where the features carry nothing the
        prompt length does not, the rings' plain quantile is as good and steadier)."""
        if not self.model.ready(model):
            return False
        score = self._scores.get(model)
        return score is None or score[2] < COMPARE_AFTER or score[0] <= score[1]

    def _compare(self, model: str, prompt_tokens: int, features: Features,
                 output_tokens: int) -> None:
        """Score both learners on a finished request, before either learns from it:
        decayed mean absolute error of log(1 + tokens)."""
        if not self.model.ready(model):
            return
        ring = self.learned(model, prompt_tokens)
        if ring is None:
            return
        score = self._scores.get(model)
        if score is None:
            score = self._scores[model] = [0.0, 0.0, 0]
        truth = math.log1p(output_tokens)
        mine = abs(math.log1p(self.model.quantile(model, features, self.quantile)) - truth)
        theirs = abs(math.log1p(ring) - truth)
        score[2] += 1
        rate = 1.0 / min(score[2], COMPARE_WINDOW)
        score[0] += (mine - score[0]) * rate
        score[1] += (theirs - score[1]) * rate

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
                context_left: int | None = None, hint: int | None = None,
                features: Features | None = None, quantile: float | None = None) -> int:
        """Predicted output tokens of a new request, between 1 and the caps.

        ``hint`` (a client's ``x-blockproxy-output-tokens``, if >= 1) replaces the learned
        value; with ``features`` and a :class:`LengthModel` that has warmed up, the value is
        that request's ``quantile`` (default: the predictor's); else the rings'.
        ``max_tokens`` and ``context_left`` (tokens the context limit leaves after the
        prompt) cap the result whichever way it was obtained.
        """
        if hint is not None and hint >= 1:
            tokens = hint
        elif features is not None and self.uses_model(model):
            q = self.quantile if quantile is None else quantile
            tokens = round(self.model.quantile(model, features, q))
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
                predicted: int | None = None, features: Features | None = None) -> None:
        """Record a finished request's true output length.

        Censored requests (cut by ``max_tokens``) are recorded at their length; see the
        class docstring.  With ``predicted``, the prediction's error is scored too
        (uncensored requests only); with ``features``, the :class:`LengthModel` learns.
        """
        if output_tokens < 0:
            raise ValueError(f"output_tokens must be >= 0, got {output_tokens}")
        censored = (finish_reason == "length" and max_tokens is not None
                    and output_tokens >= max_tokens)
        if features is not None:
            if not censored:
                self._compare(model, prompt_tokens, features, output_tokens)
            self.model.learn(model, features, output_tokens, censored)
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
            # requests the per-request length model has learned from, per model
            "length_model": {
                "seen": dict(self.model.seen), "warmup": self.model.warmup,
                # decayed mean |log(1 + predicted) - log(1 + true)|: model, rings
                "log_error": {m: {"length_model": s[0], "rings": s[1], "scored": s[2]}
                              for m, s in self._scores.items()},
                "answering": {m: "length_model" if self.uses_model(m) else "rings"
                              for m in self.model.seen}},
        }
