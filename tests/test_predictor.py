"""Tests of blockproxy.predictor: learning, fallbacks, caps, hints and error tracking."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockproxy.routing import lengths as predictor_module
from blockproxy.routing.lengths import LengthPredictor, length_bucket, parse_hint


def feed(p: LengthPredictor, model: str, prompt: int, lengths: list[int]) -> None:
    for n in lengths:
        p.observe(model, prompt, n, max_tokens=None, finish_reason="stop")


def test_default_before_data() -> None:
    p = LengthPredictor(default_tokens=300)
    assert p.predict("m", 100, max_tokens=None) == 300
    assert p.learned("m", 100) is None
    feed(p, "m", 100, [5] * 7)  # one short of min_samples
    assert p.predict("m", 100, max_tokens=None) == 300


def test_learns_per_bucket() -> None:
    p = LengthPredictor(min_samples=4)
    feed(p, "m", 20, [10, 12, 11, 9])        # short prompts, short answers
    feed(p, "m", 3000, [800, 900, 850, 870])  # long prompts, long answers
    assert p.predict("m", 17, max_tokens=None) in (9, 10, 11, 12)
    assert p.predict("m", 2500, max_tokens=None) in (800, 850, 870, 900)


def test_quantile_is_higher_order_statistic() -> None:
    data = list(range(1, 11))
    median, p90 = LengthPredictor(quantile=0.5), LengthPredictor(quantile=0.9)
    for p in (median, p90):
        feed(p, "m", 64, data)
    # method="higher": index ceil(q * (n - 1)) of the sorted window.
    assert median.predict("m", 64, max_tokens=None) == 6
    assert p90.predict("m", 64, max_tokens=None) == 10
    assert p90.predict("m", 64, None) > median.predict("m", 64, None)


def test_falls_back_to_model_then_global() -> None:
    p = LengthPredictor(min_samples=8)
    feed(p, "m", 10, [10] * 8)
    # Another bucket of the same model: the model's ring.
    assert p.predict("m", 1000, max_tokens=None) == 10
    # A bucket with too few samples still uses the model's ring (now 8 x 10 and 3 x 1000).
    feed(p, "m", 1000, [1000] * 3)
    assert p.predict("m", 1000, max_tokens=None) == 10
    # Another model: the global ring.
    assert p.predict("other", 10, max_tokens=None) == 10
    # Once its bucket has enough samples, it wins.
    feed(p, "m", 1000, [1000] * 5)
    assert p.predict("m", 1000, max_tokens=None) == 1000
    assert p.predict("m", 10, max_tokens=None) == 10


def test_caps() -> None:
    p = LengthPredictor(default_tokens=500)
    assert p.predict("m", 10, max_tokens=100) == 100
    assert p.predict("m", 10, max_tokens=1000) == 500
    assert p.predict("m", 10, max_tokens=1000, context_left=42) == 42
    assert p.predict("m", 10, max_tokens=30, context_left=42) == 30
    assert p.predict("m", 10, max_tokens=0) == 1
    assert p.predict("m", 10, max_tokens=None, context_left=-5) == 1


def test_hint_overrides_and_is_capped() -> None:
    p = LengthPredictor(min_samples=1)
    feed(p, "m", 10, [50])
    assert p.predict("m", 10, max_tokens=None, hint=7) == 7
    assert p.predict("m", 10, max_tokens=None, hint=5000) == 5000
    assert p.predict("m", 10, max_tokens=300, hint=5000) == 300
    assert p.predict("m", 10, max_tokens=300, context_left=20, hint=5000) == 20
    # A hint below 1 is no hint.
    assert p.predict("m", 10, max_tokens=None, hint=0) == 50


def test_window_forgets_old_data() -> None:
    p = LengthPredictor(window=8, min_samples=8)
    feed(p, "m", 10, [10] * 8)
    assert p.predict("m", 10, max_tokens=None) == 10
    feed(p, "m", 10, [1000] * 8)
    assert p.predict("m", 10, max_tokens=None) == 1000
    assert p.stats()["model_samples"] == {"m": 8}
    assert p.stats()["observations"] == 16


def test_quantile_cached_until_new_observation(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = np.quantile

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(predictor_module.np, "quantile", counting)
    p = LengthPredictor(min_samples=2)
    feed(p, "m", 10, [4, 8])
    for _ in range(5):
        p.predict("m", 10, max_tokens=None)
    assert len(calls) == 1
    feed(p, "m", 10, [6])
    p.predict("m", 10, max_tokens=None)
    p.predict("m", 10, max_tokens=None)
    assert len(calls) == 2


def test_predict_does_not_allocate_rings_for_unknown_models() -> None:
    p = LengthPredictor()
    for i in range(100):
        p.predict(f"model-{i}", 10 + i, max_tokens=None)
    assert p.stats()["model_samples"] == {}


def test_censored_observations_recorded_but_not_scored() -> None:
    p = LengthPredictor(min_samples=1)
    p.observe("m", 10, 64, max_tokens=64, finish_reason="length", predicted=200)
    assert p.predict("m", 10, max_tokens=None) == 64
    stats = p.stats()
    assert (stats["observations"], stats["censored"], stats["scored"]) == (1, 1, 0)
    assert stats["mape"] is None and stats["bucket_accuracy"] is None
    # Stopped naturally, or 'length' below max_tokens (context limit): not censored.
    p.observe("m", 10, 64, max_tokens=64, finish_reason="stop", predicted=64)
    p.observe("m", 10, 30, max_tokens=64, finish_reason="length", predicted=30)
    assert (p.stats()["censored"], p.stats()["scored"]) == (1, 2)


def test_mape_and_bucket_accuracy_hand_computed() -> None:
    p = LengthPredictor()
    # (predicted, actual): |error| / actual and log2 buckets (pred vs actual)
    pairs = [(100, 100),   # 0.0, 6 vs 6: same
             (50, 100),    # 0.5, 5 vs 6
             (150, 100),   # 0.5, 7 vs 6
             (120, 100)]   # 0.2, 6 vs 6: same
    for predicted, actual in pairs:
        p.record_error(predicted, actual)
    assert p.mape == pytest.approx(0.3)
    assert p.bucket_accuracy == pytest.approx(0.5)
    assert p.stats()["scored"] == 4


def test_observe_with_prediction_scores_it() -> None:
    p = LengthPredictor()
    p.observe("m", 10, 100, max_tokens=None, finish_reason="stop", predicted=50)
    p.observe("m", 10, 0, max_tokens=None, finish_reason="stop", predicted=2)
    # The empty response divides by 1, not by 0.
    assert p.mape == pytest.approx((0.5 + 2.0) / 2)
    assert p.stats()["model_samples"] == {"m": 2}


def test_observe_rejects_negative_length() -> None:
    with pytest.raises(ValueError):
        LengthPredictor().observe("m", 10, -1, max_tokens=None, finish_reason="stop")


@pytest.mark.parametrize("kwargs", [
    {"quantile": 1.5}, {"quantile": -0.1}, {"window": 0}, {"min_samples": 0},
    {"default_tokens": 0}, {"window": 4, "min_samples": 5}, {"bucket_base": 1.0},
])
def test_bad_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        LengthPredictor(**kwargs)


@pytest.mark.parametrize("tokens, base, bucket", [
    (0, 2, 0), (1, 2, 0), (2, 2, 1), (3, 2, 1), (4, 2, 2), (1023, 2, 9), (1024, 2, 10),
    (999, 10, 2), (1000, 10, 3), (10**6, 10, 6), (2**40, 2, 40), (3**20, 3, 20),
])
def test_length_bucket(tokens: int, base: float, bucket: int) -> None:
    assert length_bucket(tokens, base) == bucket


@pytest.mark.parametrize("value, expected", [
    ("128", 128), (" 7 ", 7), ("1", 1),
    (None, None), ("", None), ("0", None), ("-3", None), ("+5", None), ("1.5", None),
    ("abc", None), ("1_000", None), ("\u0663", None), ("12345678901", None), ("1e3", None),
])
def test_parse_hint(value: str | None, expected: int | None) -> None:
    assert parse_hint(value) == expected


@given(lengths=st.lists(st.integers(0, 100_000), max_size=40),
       prompt=st.integers(0, 200_000),
       max_tokens=st.none() | st.integers(-5, 100_000),
       context_left=st.none() | st.integers(-5, 100_000),
       hint=st.none() | st.integers(-5, 100_000))
def test_prediction_always_within_caps(lengths: list[int], prompt: int, max_tokens: int | None,
                                       context_left: int | None, hint: int | None) -> None:
    p = LengthPredictor(window=16, min_samples=2)
    feed(p, "m", prompt, lengths)
    n = p.predict("m", prompt, max_tokens, context_left, hint)
    assert isinstance(n, int) and n >= 1
    for cap in (max_tokens, context_left):
        if cap is not None:
            assert n <= max(1, cap)
