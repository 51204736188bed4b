"""Stepping the simulator (``advance``): compiled and twin identical, the same times as
``predict``, and the same whatever the steps it is cut into."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockproxy import simulator
from blockproxy.simulator.reference import NUM_COLUMNS, InstanceModelPy
from tests.test_sim_diff import H100, c_impl_or_skip, configs, states


def _impls() -> list[type]:
    impls: list[type] = [InstanceModelPy]
    if simulator.InstanceModelC is not None and not simulator.NO_EXTENSIONS:
        impls.append(simulator.InstanceModelC)
    return impls


def _advance(cls: type, cfg: dict, arr: np.ndarray, n: int, duration: float
             ) -> tuple[tuple[float, int], np.ndarray, np.ndarray, np.ndarray]:
    state = arr.copy()
    first = np.full(max(n, 1), -1.0)
    done = np.full(max(n, 1), -1.0)
    result = cls(**cfg).advance(state, n, duration, first, done)
    return result, state, first[:n], done[:n]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_steps_identical(data: st.DataObject) -> None:
    c_cls = c_impl_or_skip()
    cfg = data.draw(configs())
    arr, n, _ = data.draw(states(cfg["block_size"]))
    duration = data.draw(st.sampled_from([0.0, 1e-3, 0.05, 1.0, 30.0, 1e9]))
    c = _advance(c_cls, cfg, arr, n, duration)
    py = _advance(InstanceModelPy, cfg, arr, n, duration)
    assert c[0] == py[0] and [type(x) for x in c[0]] == [float, int]
    for a, b in zip(c[1:], py[1:], strict=True):
        assert np.array_equal(a, b)


def _h100_state(rng: np.random.Generator, n: int) -> np.ndarray:
    arr = np.zeros((NUM_COLUMNS, n + 1), dtype=np.int64)
    arr[0, :n] = rng.integers(50, 4000, n)
    arr[3, :n] = rng.integers(1, 600, n)
    return arr


@pytest.mark.parametrize("cls", _impls())
def test_a_row_finishes_when_predict_says_a_new_request_would(cls: type) -> None:
    rng = np.random.default_rng(3)
    arr = _h100_state(rng, 40)
    arr[4, :20] = 1  # half of them running, some of those decoding
    arr[2, :10] = rng.integers(1, 50, 10)
    ttft, e2e = cls(**H100).predict(arr, 40, 2500, 0, 300)[:2]
    arr[:, 40] = (2500, 0, 0, 300, 0)  # the same request as the last row
    (clock, steps), state, first, done = _advance(cls, H100, arr, 41, 1e6)
    assert first[40] == ttft and done[40] == e2e
    assert np.isfinite(done).all() and clock == 1e6 and steps > 0
    assert (state[2, :41] >= np.maximum(arr[3, :41], 1)).all()  # all done


@pytest.mark.parametrize("cls", _impls())
def test_advancing_in_pieces_gives_the_times_of_one_run(cls: type) -> None:
    """As a model of a cluster uses it: advance to the next arrival, take the finished
    requests out (a finished row put back would run on past its length), repeat."""
    rng = np.random.default_rng(5)
    n = 60
    arr = _h100_state(rng, n)
    _, _, first, done = _advance(cls, H100, arr, n, 1e6)
    model = cls(**H100)
    state = arr.copy()
    ids = np.arange(n)  # the original row of each row of ``state``
    clock = 0.0
    got_first = np.full(n, math.inf)
    got_done = np.full(n, math.inf)
    piece_first, piece_done = np.empty(n), np.empty(n)
    target = 0.0
    pieces = 0
    while len(ids):
        target += 0.037
        if target <= clock:
            continue
        k = len(ids)
        end, _ = model.advance(state, k, target - clock, piece_first, piece_done)
        pieces += 1
        for mine, piece in ((got_first, piece_first), (got_done, piece_done)):
            new = np.isfinite(piece[:k])
            mine[ids[new]] = clock + piece[:k][new]
        keep = ~np.isfinite(piece_done[:k])
        state[:, :keep.sum()] = state[:, :k][:, keep]
        ids = ids[keep]
        clock += end
    assert pieces > 20
    np.testing.assert_allclose(got_first, first, rtol=1e-9)
    np.testing.assert_allclose(got_done, done, rtol=1e-9)


@pytest.mark.parametrize("cls", _impls())
def test_an_idle_instance_stops_its_clock_at_the_duration(cls: type) -> None:
    arr = np.zeros((NUM_COLUMNS, 2), dtype=np.int64)
    assert cls(**H100).advance(arr, 0, 2.5, np.empty(1), np.empty(1)) == (2.5, 0)
    arr[:, 0] = (100, 0, 0, 3, 0)
    first, done = np.empty(1), np.empty(1)
    clock, steps = cls(**H100).advance(arr, 1, 2.5, first, done)
    assert clock == 2.5 and steps == 3 and 0 < first[0] < done[0] < 0.1
    # a step that starts before the duration ends after it: the clock says so; the
    # prefill it began is running, its computed tokens written back as cached
    arr[:, 0] = (20000, 0, 0, 3, 0)
    clock, steps = cls(**H100).advance(arr, 1, 1e-6, first, done)
    assert steps == 1 and clock > 0.1 and first[0] == math.inf
    assert arr[4, 0] == 1 and arr[1, 0] == 8192 and arr[2, 0] == 0


@pytest.mark.parametrize("cls", _impls())
def test_bad_arguments_are_refused(cls: type) -> None:
    arr = np.zeros((NUM_COLUMNS, 2), dtype=np.int64)
    model = cls(**H100)
    for n, duration, room in ((3, 1.0, 2), (-1, 1.0, 2), (2, -1.0, 2), (2, math.inf, 2),
                              (2, 1.0, 1)):
        with pytest.raises(ValueError):
            model.advance(arr, n, duration, np.empty(room), np.empty(room))
    arr[0, 0] = -5
    with pytest.raises(ValueError, match="state values"):
        model.advance(arr, 1, 1.0, np.empty(1), np.empty(1))
