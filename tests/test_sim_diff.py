"""Differential tests: the compiled simulator against its pure-Python twin.

The twin (``blockproxy.simulator.reference``) is the reference semantics; ``InstanceModelC``
must give
bit-identical results on any input, including the edges where C and Python arithmetic
part ways (values up to 2**40, block boundaries, tiny KV caches, budget 1).  Also checked
on each implementation: fast-forward agrees with stepping one engine step at a time.
"""

from __future__ import annotations

import math
import os
import pickle
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from blockproxy import simulator
from blockproxy.simulator.reference import MAX_TOKENS, NUM_COLUMNS, InstanceModelPy

ATTRIBUTES = ("max_num_seqs", "max_num_batched_tokens", "num_gpu_blocks", "block_size",
              "fixed_s", "per_prefill_token_s", "per_decode_seq_s", "per_context_token_s",
              "speed", "past_prediction_tokens", "max_iterations", "fast_forward")
H100: dict[str, Any] = dict(max_num_seqs=256, max_num_batched_tokens=8192, num_gpu_blocks=26000,
            block_size=16, fixed_s=5.75e-3, per_prefill_token_s=17.3e-6,
            per_decode_seq_s=6.0e-6)


@pytest.fixture
def c_impl(request: pytest.FixtureRequest) -> type:
    """The compiled simulator; the test is skipped when it is not built or not wanted."""
    if simulator.InstanceModelC is None:
        pytest.skip("blockproxy._fastcore is not built (install without "
                    "BLOCKPROXY_NO_EXTENSIONS and with Cython): nothing to compare")
    if simulator.NO_EXTENSIONS or request.config.getoption("--no-c-extensions"):
        pytest.skip("compiled simulator disabled (BLOCKPROXY_NO_EXTENSIONS / "
                    "--no-c-extensions)")
    return simulator.InstanceModelC


def c_impl_or_skip() -> type:
    """For hypothesis tests, which cannot take function-scoped fixtures."""
    if simulator.InstanceModelC is None or simulator.NO_EXTENSIONS:
        pytest.skip("blockproxy._fastcore is not built or disabled: nothing to compare")
    return simulator.InstanceModelC


# ---- strategies ---------------------------------------------------------------------------

def tokens(block_size: int) -> st.SearchStrategy[int]:
    """Token counts with weight on 0/1 and on block boundaries."""
    return st.one_of(
        st.integers(0, 3),
        st.integers(1, 4).flatmap(
            lambda k: st.sampled_from([k * block_size - 1, k * block_size,
                                       k * block_size + 1])),
        st.integers(0, 400),
        st.integers(0, 3000),
    )


@st.composite
def configs(draw: st.DrawFn, max_iterations: int | None = None) -> dict:
    """Engine limits and step-time models, ordinary and degenerate."""
    return dict(
        max_num_seqs=draw(st.sampled_from([1, 2, 3, 8, 64, 256, MAX_TOKENS])),
        max_num_batched_tokens=draw(st.sampled_from([1, 2, 7, 16, 64, 512, 8192])),
        num_gpu_blocks=draw(st.sampled_from([1, 2, 3, 5, 17, 100, 1000, 26000])),
        block_size=draw(st.sampled_from([1, 2, 3, 16, 17])),
        fixed_s=draw(st.sampled_from([0.0, 1.0, 5.75e-3, 0.1])),
        per_prefill_token_s=draw(st.sampled_from([0.0, 17.3e-6, 0.01, 1 / 3])),
        per_decode_seq_s=draw(st.sampled_from([0.0, 6e-6, 0.1, 1 / 7])),
        per_context_token_s=draw(st.sampled_from([0.0, 0.0, 1e-8, 3.3e-7, 1 / 11])),
        speed=draw(st.sampled_from([1.0, 1.0, 0.5, 1.37, 0.0])),
        past_prediction_tokens=draw(st.sampled_from([1, 2, 16])),
        max_iterations=(max_iterations if max_iterations is not None
                        else draw(st.sampled_from([1, 2, 40, 600]))),
        fast_forward=draw(st.booleans()),
    )


TOKEN_KINDS = ("tiny", "boundary", "short", "long")


def numpy_tokens(rng: np.random.Generator, block_size: int, size: int) -> np.ndarray:
    """Vectorised :func:`tokens`, for states too large to draw field by field."""
    kind = rng.integers(0, len(TOKEN_KINDS), size)
    boundary = rng.integers(1, 5, size) * block_size + rng.integers(-1, 2, size)
    return np.select([kind == 0, kind == 1, kind == 2],
                     [rng.integers(0, 4, size), boundary, rng.integers(0, 401, size)],
                     rng.integers(0, 3001, size)).astype(np.int64)


@st.composite
def states(draw: st.DrawFn, block_size: int, max_n: int = 300,
           small: bool = False) -> tuple[np.ndarray, int, tuple[int, int, int]]:
    """A state array (with spare capacity), its n, and the new request's fields.

    Up to 12 requests are drawn field by field (so hypothesis can shrink them); larger
    states come from a seeded generator with the same kinds of values.
    """
    n = draw(st.one_of(st.integers(0, 12), st.integers(0, max_n)))
    if small:
        tok = st.one_of(st.integers(0, 3), st.integers(0, 60))
    else:
        tok = tokens(block_size)
    capacity = n + draw(st.integers(0, 3))
    arr = np.zeros((NUM_COLUMNS, capacity), dtype=np.int64)
    if n <= 12:
        for i in range(n):
            prompt = draw(tok)
            cached = draw(st.one_of(st.just(0), tok,
                                    st.integers(max(prompt - 2, 0), prompt + 2)))
            predicted = draw(tok)
            generated = draw(st.one_of(st.just(0), st.integers(0, max(predicted + 20, 1)),
                                       tok))
            started = draw(st.sampled_from([0, 1, 1, 7]))
            arr[:, i] = (prompt, cached, generated, predicted, started)
    else:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        if small:
            pick = lambda: rng.integers(0, 61, n)  # noqa: E731
        else:
            pick = lambda: numpy_tokens(rng, block_size, n)  # noqa: E731
        arr[0, :n] = pick()
        arr[1, :n] = np.where(rng.random(n) < 0.5, 0,
                              np.maximum(arr[0, :n] + rng.integers(-2, 3, n), 0))
        arr[3, :n] = pick()
        arr[2, :n] = np.where(rng.random(n) < 0.4, 0,
                              rng.integers(0, arr[3, :n] + 21))
        arr[4, :n] = rng.choice([0, 1, 1, 7], n)
    new = (draw(tok), draw(tok), draw(tok))
    return arr, n, new


def huge() -> st.SearchStrategy[int]:
    return st.sampled_from([0, 1, 2, 15, 16, 17, 1 << 20, MAX_TOKENS - 1, MAX_TOKENS,
                            (1 << 39) + 12345])


@st.composite
def huge_cases(draw: st.DrawFn) -> tuple[dict, np.ndarray, int, tuple[int, int, int]]:
    """Fields up to 2**40 with few loop iterations, so both stay fast."""
    cfg = dict(
        max_num_seqs=draw(st.sampled_from([1, 2, MAX_TOKENS])),
        max_num_batched_tokens=draw(st.sampled_from([1, 16, 8192, MAX_TOKENS])),
        num_gpu_blocks=draw(st.sampled_from([1, 3, 26000, MAX_TOKENS])),
        block_size=draw(st.sampled_from([1, 16, 1 << 20, MAX_TOKENS])),
        fixed_s=draw(st.sampled_from([0.0, 5.75e-3])),
        per_prefill_token_s=draw(st.sampled_from([0.0, 17.3e-6])),
        per_decode_seq_s=draw(st.sampled_from([0.0, 6e-6])),
        per_context_token_s=draw(st.sampled_from([0.0, 1e-9, 1.0])),
        speed=draw(st.sampled_from([1.0, 0.9])),
        past_prediction_tokens=draw(st.sampled_from([1, 16, MAX_TOKENS])),
        max_iterations=draw(st.integers(1, 30)),
        fast_forward=draw(st.booleans()),
    )
    n = draw(st.integers(0, 6))
    arr = np.zeros((NUM_COLUMNS, n), dtype=np.int64)
    for i in range(n):
        arr[:, i] = (draw(huge()), draw(huge()), draw(huge()), draw(huge()),
                     draw(st.sampled_from([0, 1, MAX_TOKENS])))
    return cfg, arr, n, (draw(huge()), draw(huge()), draw(huge()))


@st.composite
def arrivals(draw: st.DrawFn, block_size: int = 16, small: bool = False
             ) -> tuple[float, int, int, int, int]:
    """Expected future arrivals: (interval, prompt, cached, output, limit)."""
    tok = st.one_of(st.integers(0, 3), st.integers(0, 60)) if small else tokens(block_size)
    prompt = draw(tok)
    cached = draw(st.one_of(st.just(0), tok, st.integers(max(prompt - 2, 0), prompt + 2)))
    interval = draw(st.sampled_from([math.inf, 1e-6, 1e-3, 0.0137, 0.05, 0.3, 1.0, 2.5, 1e6]))
    return interval, prompt, cached, draw(tok), draw(st.sampled_from([0, 1, 2, 7, 64, 300]))


NO_ARRIVALS = (math.inf, 0, 0, 0, 0)


#: when the new request arrives (seconds from now): mostly now, sometimes late
NEW_AT = st.sampled_from([0.0, 0.0, 0.0, 1e-6, 0.01, 0.7, 3.0, 50.0])


#: (delay_weight, score_bound, decode_delay, score_ttft): none, or a bound on the clock (or
#: the first token) plus the weighted delay; the delay to a decode counted fully, not at
#: all, or at a share
SCORE_BOUNDS = st.tuples(
    st.sampled_from([(0.0, math.inf), (0.0, 1.0), (1.0, math.inf), (1.0, 0.5), (1.0, 5.0),
                     (1.0, 40.0), (0.3, 2.0), (4.0, 10.0)]),
    st.sampled_from([1.0, 0.0, 0.25, 0.7]), st.booleans()).map(lambda t: (*t[0], *t[1:]))


def run_both(c_cls: type, cfg: dict, arr: np.ndarray, n: int, new: tuple[int, int, int],
             bound: float = math.inf,
             arrive: tuple[float, int, int, int, int] = NO_ARRIVALS, new_at: float = 0.0,
             score: tuple[float, float, float, bool] = (0.0, math.inf, 1.0, False),
             shared: int = 0):
    prompt, cached, output = new
    interval, a_prompt, a_cached, a_output, limit = arrive
    c_model, py_model = c_cls(**cfg), InstanceModelPy(**cfg)
    c_model.shared_blocks = py_model.shared_blocks = shared
    c = c_model.predict(arr, n, prompt, cached, output, bound,
                        interval, a_prompt, a_cached, a_output, limit, new_at, *score)
    py = py_model.predict(arr, n, prompt, cached, output, bound,
                          interval, a_prompt, a_cached, a_output, limit, new_at, *score)
    return c, py


#: KV blocks the rows share (the engine holds once): none, a few, many, absurdly many
SHARED = st.sampled_from([0, 0, 1, 3, 40, 5000, 1 << 41])


# ---- compiled == twin ---------------------------------------------------------------------

@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_states_identical(data: st.DataObject) -> None:
    c_cls = c_impl_or_skip()
    cfg = data.draw(configs())
    arr, n, new = data.draw(states(cfg["block_size"]))
    bound = data.draw(st.sampled_from([math.inf, 0.0, 1e-3, 0.05, 1.0, 30.0]))
    c, py = run_both(c_cls, cfg, arr, n, new, bound, score=data.draw(SCORE_BOUNDS),
                     shared=data.draw(SHARED))
    assert c == py
    assert [type(x) for x in c] == [float, float, float, int, int, int, float]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_states_with_future_arrivals_identical(data: st.DataObject) -> None:
    c_cls = c_impl_or_skip()
    cfg = data.draw(configs())
    arr, n, new = data.draw(states(cfg["block_size"]))
    arrive = data.draw(arrivals(cfg["block_size"]))
    bound = data.draw(st.sampled_from([math.inf, 0.0, 0.05, 1.0, 30.0]))
    c, py = run_both(c_cls, cfg, arr, n, new, bound, arrive, data.draw(NEW_AT),
                     data.draw(SCORE_BOUNDS), data.draw(SHARED))
    assert c == py


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_score_bound_cuts_only_runs_that_would_end_past_it(data: st.DataObject) -> None:
    """The latency so far (the clock, or with ``score_ttft`` the first token once out)
    plus the weighted delay so far never exceeds the final score: a run is cut only where
    it would have ended past the bound, and one not cut is the full run."""
    cfg = data.draw(configs())
    arr, n, new = data.draw(states(cfg["block_size"]))
    arrive = data.draw(arrivals(cfg["block_size"]))
    weight, score_bound, decodes, on_ttft = data.draw(SCORE_BOUNDS)
    model = InstanceModelPy(**cfg)
    prompt, cached, output = new
    interval, a_prompt, a_cached, a_output, limit = arrive
    full = model.predict(arr, n, prompt, cached, output, math.inf, interval, a_prompt,
                         a_cached, a_output, limit, 0.0, weight, math.inf, decodes, on_ttft)
    cut = model.predict(arr, n, prompt, cached, output, math.inf, interval, a_prompt,
                        a_cached, a_output, limit, 0.0, weight, score_bound, decodes, on_ttft)
    if cut[1] < math.inf:
        assert cut == full
    elif full[1] < math.inf:
        assert full[0 if on_ttft else 1] + weight * full[6] > score_bound


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_bound_cuts_only_runs_that_would_end_past_it(data: st.DataObject) -> None:
    """The clock plus the least time the new request's remaining tokens take never exceeds
    its end: a run is cut only where it would have ended past the bound, and one not cut
    is the full run."""
    cfg = data.draw(configs())
    arr, n, new = data.draw(states(cfg["block_size"]))
    arrive = data.draw(arrivals(cfg["block_size"]))
    model = InstanceModelPy(**cfg)
    prompt, cached, output = new
    full = model.predict(arr, n, prompt, cached, output, math.inf, *arrive)
    if not math.isfinite(full[1]):
        return
    # bounds around the run's own end, where a cut is closest to being wrong
    for bound in (full[1], full[1] * (1 - 1e-12), full[1] * 0.9, full[1] * 0.5, 0.0):
        cut = model.predict(arr, n, prompt, cached, output, bound, *arrive)
        if cut[1] < math.inf:
            assert cut == full
        else:
            assert full[1] > bound, bound
        if bound == full[1]:
            assert cut == full


@settings(max_examples=300, deadline=None)
@given(case=huge_cases())
def test_values_up_to_2_pow_40_identical(case) -> None:
    c_cls = c_impl_or_skip()
    cfg, arr, n, new = case
    c, py = run_both(c_cls, cfg, arr, n, new)
    assert c == py


def long_stretch_case(j: int, per_context: float = 1.0) -> tuple[dict, np.ndarray]:
    """One running decode whose next ``j`` steps are fast-forwarded in one go.

    The stretch time holds ``float(j * (j + 1) // 2)``, which overflows 64 bits for large
    ``j``: the compiled simulator must round the exact triangular number like Python.
    """
    cfg = dict(max_num_seqs=1, max_num_batched_tokens=8192, num_gpu_blocks=MAX_TOKENS,
               block_size=MAX_TOKENS, fixed_s=0.0, per_prefill_token_s=0.0,
               per_decode_seq_s=0.0, per_context_token_s=per_context, max_iterations=20)
    arr = np.array([[1], [0], [1], [j + 2], [1]], dtype=np.int64)
    return cfg, arr


def rounding_ties(lo: int, count: int) -> list[int]:
    """``j >= lo`` whose triangular number lies exactly halfway between two doubles."""
    found: list[int] = []
    j = lo
    while len(found) < count:
        tri = j * (j + 1) // 2
        drop = tri.bit_length() - 53
        if drop > 0 and tri % (1 << drop) == 1 << (drop - 1):
            found.append(j)
        j += 1
    return found


@pytest.mark.parametrize("j", [2, 3, 1000, 3_037_000_498, 3_037_000_499, 4_294_967_296,
                               6_074_001_000, 1 << 33, (1 << 40) - 2, (1 << 40) - 3,
                               (1 << 39) + 7]
                         + rounding_ties(3_100_000_000, 2) + rounding_ties(5_000_000_000, 2)
                         + rounding_ties(6_100_000_000, 2))
def test_fast_forward_triangular_number_rounds_like_python(c_impl, j: int) -> None:
    cfg, arr = long_stretch_case(j)
    c, py = run_both(c_impl, cfg, arr, 1, (1, 0, 1))
    assert c == py
    assert py[5] >= j  # the stretch really was simulated


@settings(max_examples=60, deadline=None)
@given(j=st.integers(2, (1 << 40) - 2),
       per_context=st.sampled_from([1.0, 1e-9, 3.3e-7]))
def test_fast_forward_long_stretches_identical(j: int, per_context: float) -> None:
    c_cls = c_impl_or_skip()
    cfg, arr = long_stretch_case(j, per_context)
    c, py = run_both(c_cls, cfg, arr, 1, (1, 0, 1))
    assert c == py


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_many_requests_realistic_limits_identical(data: st.DataObject) -> None:
    c_cls = c_impl_or_skip()
    cfg = dict(H100, per_context_token_s=data.draw(st.sampled_from([0.0, 1e-8])),
               num_gpu_blocks=data.draw(st.sampled_from([26000, 4000, 600])),
               max_iterations=2000, fast_forward=data.draw(st.booleans()))
    arr, n, new = data.draw(states(16, max_n=300))
    c, py = run_both(c_cls, cfg, arr, n, new)
    assert c == py
    # The same with a realistic arrival process (about 5 to 50 requests per second).
    arrive = (data.draw(st.sampled_from([0.02, 0.05, 0.2])), data.draw(st.integers(1, 3000)),
              data.draw(st.integers(0, 500)), data.draw(st.integers(1, 600)), 256)
    c, py = run_both(c_cls, cfg, arr, n, new, math.inf, arrive)
    assert c == py


# ---- fast-forward == one step at a time (each implementation) ----------------------------

def close(a: float, b: float) -> bool:
    return a == b or math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


@pytest.mark.parametrize("impl", ["c", "py"])
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fast_forward_agrees_with_stepping(impl: str, data: st.DataObject) -> None:
    cls = c_impl_or_skip() if impl == "c" else InstanceModelPy
    # A request that outgrows the whole KV cache is preempted and recomputed forever (until
    # max_iterations): a modest cap keeps such draws cheap; they are discarded below.
    cfg = data.draw(configs(max_iterations=20_000))
    arr, n, new = data.draw(states(cfg["block_size"], max_n=16, small=True))
    ff = cls(**dict(cfg, fast_forward=True)).predict(arr, n, *new)
    stepwise = cls(**dict(cfg, fast_forward=False)).predict(arr, n, *new)
    # Each loop iteration simulates at least one step, or is a step that only preempted
    # and is followed by a step or the end: far below the cap, neither run was cut short.
    assume(2 * stepwise[5] + 2 < cfg["max_iterations"])
    assert ff[3:6] == stepwise[3:6]
    for x, y in zip(ff[:3] + ff[6:], stepwise[:3] + stepwise[6:]):
        assert close(x, y), (ff, stepwise)


@pytest.mark.parametrize("impl", ["c", "py"])
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fast_forward_agrees_with_stepping_with_arrivals(impl: str, data: st.DataObject
                                                         ) -> None:
    cls = c_impl_or_skip() if impl == "c" else InstanceModelPy
    cfg = data.draw(configs(max_iterations=20_000))
    arr, n, new = data.draw(states(cfg["block_size"], max_n=16, small=True))
    arrive = data.draw(arrivals(small=True))
    new_at = data.draw(NEW_AT)
    ff = cls(**dict(cfg, fast_forward=True)).predict(arr, n, *new, math.inf, *arrive, new_at)
    stepwise = cls(**dict(cfg, fast_forward=False)).predict(arr, n, *new, math.inf, *arrive,
                                                            new_at)
    assume(2 * stepwise[5] + 2 < cfg["max_iterations"])
    assert ff[3:6] == stepwise[3:6]
    for x, y in zip(ff[:3] + ff[6:], stepwise[:3] + stepwise[6:]):
        assert close(x, y), (ff, stepwise)


@example(prompt=4000, output=700)
@settings(max_examples=30, deadline=None)
@given(prompt=st.integers(0, 5000), output=st.integers(0, 800))
def test_fast_forward_agrees_with_stepping_busy_instance(sim_impl, prompt: int,
                                                         output: int) -> None:
    rng = np.random.default_rng(prompt * 1000 + output)
    n = 40
    arr = np.zeros((NUM_COLUMNS, n), dtype=np.int64)
    arr[0] = rng.integers(1, 3000, n)
    arr[3] = rng.integers(2, 600, n)
    arr[2] = rng.integers(0, arr[3])
    arr[4] = rng.random(n) < 0.85
    cfg = dict(H100, num_gpu_blocks=int(rng.choice([26000, 3000, 1200])), per_context_token_s=1e-8,
               max_iterations=1_000_000)
    ff = sim_impl(**cfg, fast_forward=True).predict(arr, n, prompt, 0, output)
    stepwise = sim_impl(**cfg, fast_forward=False).predict(arr, n, prompt, 0, output)
    assert ff[3:6] == stepwise[3:6]
    for x, y in zip(ff[:3] + ff[6:], stepwise[:3] + stepwise[6:]):
        assert close(x, y), (ff, stepwise)


# ---- interface parity ---------------------------------------------------------------------

def test_constructor_signature_and_attributes(c_impl) -> None:
    args = (8, 512, 1000, 16, 0.5, 1e-4, 2e-3)
    variants: tuple[dict[str, Any], ...] = (
        {}, dict(per_context_token_s=1e-7, speed=1.25, past_prediction_tokens=3,
                 max_iterations=77, fast_forward=False))
    for kwargs in variants:
        c, py = c_impl(*args, **kwargs), InstanceModelPy(*args, **kwargs)
        for name in ATTRIBUTES:
            assert getattr(c, name) == getattr(py, name), name
            assert type(getattr(c, name)) is type(getattr(py, name)), name
    c = c_impl(max_num_seqs=1, max_num_batched_tokens=2, num_gpu_blocks=3, block_size=4,
               fixed_s=0.0, per_prefill_token_s=0.0, per_decode_seq_s=0.0)
    assert (c.per_context_token_s, c.speed, c.past_prediction_tokens, c.max_iterations,
            c.fast_forward) == (0.0, 1.0, 16, 100_000, True)


def test_speed_and_fast_forward_are_settable(c_impl) -> None:
    cfg: dict[str, Any] = dict(H100, per_context_token_s=1e-8)
    arr = np.array([[500, 900], [0, 100], [30, 0], [200, 50], [1, 0]], dtype=np.int64)
    model = c_impl(**cfg)
    base = model.predict(arr, 2, 300, 0, 64)
    model.speed = 2.0
    assert model.speed == 2.0
    doubled = model.predict(arr, 2, 300, 0, 64)
    # scaling by 2 is exact
    assert doubled[:3] + doubled[6:] == tuple(2.0 * x for x in base[:3] + base[6:])
    assert doubled[3:6] == base[3:6]
    assert doubled == c_impl(**cfg, speed=2.0).predict(arr, 2, 300, 0, 64)
    model.speed = 0.8
    assert model.predict(arr, 2, 300, 0, 64) == InstanceModelPy(**cfg, speed=0.8).predict(
        arr, 2, 300, 0, 64)
    model.fast_forward = False
    assert model.fast_forward is False
    assert model.predict(arr, 2, 300, 0, 64) == InstanceModelPy(
        **cfg, speed=0.8, fast_forward=False).predict(arr, 2, 300, 0, 64)
    with pytest.raises(AttributeError):
        model.block_size = 32


def test_pickle_round_trip(c_impl) -> None:
    model = c_impl(**H100, speed=1.5, fast_forward=False)
    clone = pickle.loads(pickle.dumps(model))
    assert [getattr(clone, a) for a in ATTRIBUTES] == [getattr(model, a) for a in ATTRIBUTES]


BAD_CONSTRUCTOR_ARGS = [
    dict(max_num_seqs=0), dict(max_num_batched_tokens=-1), dict(num_gpu_blocks=MAX_TOKENS + 1),
    dict(block_size=0), dict(past_prediction_tokens=0), dict(max_iterations=0),
    dict(fixed_s=-1e-9), dict(per_prefill_token_s=math.inf), dict(per_decode_seq_s=math.nan),
    dict(per_context_token_s=-0.5), dict(speed=math.inf), dict(speed=-1.0),
]


@pytest.mark.parametrize("bad", BAD_CONSTRUCTOR_ARGS, ids=lambda d: "-".join(map(str, d.items())))
def test_constructor_errors_match(c_impl, bad: dict) -> None:
    with pytest.raises(ValueError) as py_err:
        InstanceModelPy(**dict(H100, **bad))
    with pytest.raises(ValueError) as c_err:
        c_impl(**dict(H100, **bad))
    assert str(c_err.value) == str(py_err.value)


def _predict_error_cases() -> list[tuple[str, np.ndarray, int, tuple[int, int, int]]]:
    ok = np.array([[10, 20], [0, 5], [1, 0], [5, 9], [1, 0]], dtype=np.int64)
    cases = [("n<0", ok, -1, (1, 0, 1)), ("n>capacity", ok, 3, (1, 0, 1)),
             ("4 rows", ok[:4].copy(), 1, (1, 0, 1)),
             ("new prompt<0", ok, 2, (-1, 0, 1)),
             ("new cached>2**40", ok, 2, (1, MAX_TOKENS + 1, 1)),
             ("new output huge", ok, 2, (1, 0, 1 << 70)),
             ("new prompt huge", ok, 0, (-(1 << 80), 0, 1))]
    for row in range(NUM_COLUMNS):
        for value in (-1, MAX_TOKENS + 1):
            arr = ok.copy()
            arr[row, 1] = value
            cases.append((f"row{row}={value}", arr, 2, (1, 0, 1)))
    arr = ok.copy()
    arr[4, 1] = -5
    cases.append(("first bad value wins", arr, 2, (-3, 0, 1)))
    return cases


@pytest.mark.parametrize("arrive", [
    (0.0, 1, 0, 1, 4), (-1.0, 1, 0, 1, 4), (math.nan, 1, 0, 1, 4), (0.1, -1, 0, 1, 4),
    (0.1, 1, MAX_TOKENS + 1, 1, 4), (0.1, 1, 0, 1 << 70, 4), (0.1, 1, 0, 1, -1),
    (0.1, 1, 0, 1, (1 << 16) + 1), (0.1, 1, 0, 1, 1 << 70)])
def test_arrival_errors_match(c_impl, arrive) -> None:
    _errors_match(c_impl, arrive, 0.0)


@pytest.mark.parametrize("new_at", [-1.0, math.inf, math.nan])
def test_new_at_errors_match(c_impl, new_at) -> None:
    _errors_match(c_impl, (0.1, 1, 0, 1, 4), new_at)


def _errors_match(c_impl, arrive: tuple[float, int, int, int, int], new_at: float) -> None:
    ok = np.array([[10], [0], [1], [5], [1]], dtype=np.int64)
    with pytest.raises(ValueError) as py_err:
        InstanceModelPy(**H100).predict(ok, 1, 5, 0, 5, math.inf, *arrive, new_at)
    with pytest.raises(ValueError) as c_err:
        c_impl(**H100).predict(ok, 1, 5, 0, 5, math.inf, *arrive, new_at)
    assert str(c_err.value) == str(py_err.value)


@pytest.mark.parametrize("name,arr,n,new", _predict_error_cases(),
                         ids=[c[0] for c in _predict_error_cases()])
def test_predict_errors_match(c_impl, name, arr, n, new) -> None:
    with pytest.raises(ValueError) as py_err:
        InstanceModelPy(**H100).predict(arr, n, *new)
    with pytest.raises(ValueError) as c_err:
        c_impl(**H100).predict(arr, n, *new)
    assert str(c_err.value) == str(py_err.value)


def test_values_beyond_n_are_ignored(c_impl) -> None:
    arr = np.array([[10, -7], [0, MAX_TOKENS + 5], [1, 0], [5, 9], [1, 0]], dtype=np.int64)
    assert c_impl(**H100).predict(arr, 1, 4, 0, 3) == InstanceModelPy(**H100).predict(
        arr, 1, 4, 0, 3)


def test_array_layouts(c_impl) -> None:
    rng = np.random.default_rng(7)
    base = np.zeros((NUM_COLUMNS + 1, 24), dtype=np.int64)  # an extra row is allowed
    base[0] = rng.integers(1, 2000, 24)
    base[3] = rng.integers(2, 300, 24)
    base[2] = rng.integers(0, base[3])
    base[4] = rng.random(24) < 0.7
    expected = InstanceModelPy(**H100).predict(base, 12, 700, 10, 100)
    model = c_impl(**H100)
    read_only = base.copy()
    read_only.setflags(write=False)
    assert model.predict(base, 12, 700, 10, 100) == expected
    assert model.predict(read_only, 12, 700, 10, 100) == expected
    assert model.predict(base.astype(np.int32), 12, 700, 10, 100) == expected
    wide = np.repeat(base, 2, axis=1)[:, ::2]  # not contiguous: converted
    assert model.predict(wide, 12, 700, 10, 100) == expected
    assert model.predict(base[:NUM_COLUMNS], 12, np.int64(700), np.int32(10), 100) == expected
    empty = np.zeros((NUM_COLUMNS, 0), dtype=np.int64)
    assert model.predict(empty, 0, 700, 10, 100) == InstanceModelPy(**H100).predict(
        empty, 0, 700, 10, 100)
    with pytest.raises((TypeError, ValueError)):
        model.predict(base.astype(np.float64), 12, 700, 10, 100)


def test_scratch_buffer_reuse_across_sizes(c_impl) -> None:
    """One model, states of growing and shrinking size: no stale scratch data leaks."""
    model = c_impl(**dict(H100, num_gpu_blocks=3000))
    twin = InstanceModelPy(**dict(H100, num_gpu_blocks=3000))
    rng = np.random.default_rng(11)
    for n in (3, 200, 1, 70, 0, 500, 5):
        arr = np.zeros((NUM_COLUMNS, n), dtype=np.int64)
        arr[0] = rng.integers(1, 3000, n)
        arr[3] = rng.integers(2, 500, n)
        arr[2] = rng.integers(0, arr[3]) if n else []
        arr[4] = rng.random(n) < 0.8
        assert model.predict(arr, n, 1000, 0, 50) == twin.predict(arr, n, 1000, 0, 50)


def test_no_extensions_env_respected() -> None:
    if os.environ.get("BLOCKPROXY_NO_EXTENSIONS", "") not in ("", "0"):
        assert simulator.IMPLEMENTATION == "py"
    elif simulator.InstanceModelC is not None:
        assert simulator.IMPLEMENTATION == "c"
