"""The cluster view: reservations keep dispatch order, progress reaches the table."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from blockproxy import simulator
from blockproxy.backends import BackendSpec
from blockproxy.cluster import ClusterView


def view_with(*names: str, **spec_fields: Any) -> ClusterView:
    view = ClusterView("llama-3.1-8b-h100-tp1")
    view.apply([BackendSpec(url=f"http://127.0.0.1:{9000 + i}", name=n, **spec_fields)
                for i, n in enumerate(names)])
    return view


def test_reserve_and_release_keep_dispatch_order():
    inst = view_with("a").instances["a"]
    entries = [inst.reserve(100 + i, 10, now=float(i)) for i in range(5)]
    inst.release(entries[1])
    inst.release(entries[1])  # twice is harmless
    assert inst.requests.n == 4
    assert list(inst.requests.table[simulator.COL_PROMPT, :4]) == [100, 102, 103, 104]
    assert [e.slot for e in inst.requests.entries] == [0, 1, 2, 3]
    inst.first_token(entries[3], now=9.0)
    inst.requests.add_tokens(entries[3], 4)
    assert inst.requests.table[simulator.COL_STARTED, entries[3].slot] == 1
    assert inst.requests.table[simulator.COL_GENERATED, entries[3].slot] == 5


def test_table_grows_past_its_capacity():
    inst = view_with("a").instances["a"]
    entries = [inst.reserve(i + 1, 1, 0.0) for i in range(200)]
    assert inst.requests.n == 200
    assert np.array_equal(inst.requests.table[simulator.COL_PROMPT, :200], np.arange(1, 201))
    for e in entries:
        inst.release(e)
    assert inst.requests.n == 0


def test_more_load_predicts_longer_latency():
    inst = view_with("a").instances["a"]
    empty = inst.predict(500, 0, 100)
    for _ in range(50):
        inst.reserve(2000, 300, 0.0)
    assert inst.predict(500, 0, 100)[1] > empty[1]


def test_apply_adds_removes_and_changes_in_place():
    view = view_with("a", "b")
    a = view.instances["a"]
    entry = a.reserve(10, 10, 0.0)
    added, removed, changed = view.apply([
        BackendSpec(url="http://127.0.0.1:9000", name="a", state="draining"),
        BackendSpec(url="http://127.0.0.1:9002", name="c")])
    assert (added, removed, changed) == (["c"], ["b"], ["a"])
    assert view.instances["a"] is a and a.state == "draining" and a.requests.n == 1
    assert [i.name for i in view.candidates("any")] == ["c"]
    a.release(entry)


def test_engine_overrides_from_the_backends_file():
    inst = view_with("a", max_num_seqs=4, num_gpu_blocks=100).instances["a"]
    assert inst.limits.max_num_seqs == 4 and inst.limits.num_gpu_blocks == 100
    assert inst.model.max_num_seqs == 4


def test_load_metrics_of_the_baselines():
    inst = view_with("a", num_gpu_blocks=1000).instances["a"]
    running = inst.reserve(160, 100, 0.0)
    inst.first_token(running, 0.0)
    inst.reserve(320, 50, 0.0)  # waiting
    # unprocessed: waiting prompt 320 + remaining outputs (99 + 50)
    assert inst.unprocessed_tokens() == 320 + 99 + 50
    # headroom: (1000 - 11 used - 20 wanted) / 1 running
    assert inst.llumnix_headroom() == 1000 - 11 - 20


def test_compiled_and_twin_load_measures_agree() -> None:
    from blockproxy.cluster.requests import table_loads_py
    try:
        from blockproxy._fastcore import table_loads as compiled
    except ImportError:
        pytest.skip("extension not built")
    rng = np.random.default_rng(7)
    for _ in range(500):
        capacity = int(rng.integers(0, 40))
        n = int(rng.integers(0, capacity + 1))
        state = np.zeros((simulator.NUM_COLUMNS, capacity), dtype=np.int64)
        if capacity:
            state[simulator.COL_PROMPT] = rng.integers(0, 9000, capacity)
            state[simulator.COL_CACHED] = rng.integers(0, 9000, capacity)
            state[simulator.COL_GENERATED] = rng.integers(0, 3000, capacity)
            state[simulator.COL_PREDICTED] = rng.integers(0, 3000, capacity)
            state[simulator.COL_STARTED] = rng.integers(0, 2, capacity)
        block_size = int(rng.choice([0, 1, 7, 16]))
        assert compiled(state, n, block_size) == table_loads_py(state, n, block_size)
    state = np.zeros((simulator.NUM_COLUMNS, 4), dtype=np.int64)
    for loads in (compiled, table_loads_py):
        with pytest.raises(ValueError):
            loads(state, 5, 16)
        with pytest.raises(ValueError):
            loads(state, 2, -1)
    # one request of each kind: (waiting, prompt, cached, predicted, still expected,
    # running, running blocks, waiting blocks)
    state[:, 0] = (160, 0, 1, 100, 1)  # running: 161 tokens in 11 blocks, 99 to go
    state[:, 1] = (320, 64, 0, 50, 0)  # waiting: 320 tokens in 20 blocks
    assert compiled(state, 2, 16) == (1, 320, 64, 50, 149, 1, 11, 20)


def test_unobserved_requests_progress_along_their_prediction():
    inst = view_with("a").instances["a"]
    entry = inst.reserve(100, 11, now=0.0)
    entry.observed = False
    entry.predicted_ttft, entry.predicted_e2e = 1.0, 2.0  # 10 decode steps of 0.1 s
    inst.requests.estimate_progress(0.5)
    assert inst.requests.table[simulator.COL_STARTED, 0] == 0
    inst.requests.estimate_progress(1.55)
    assert inst.requests.table[simulator.COL_STARTED, 0] == 1
    assert inst.requests.table[simulator.COL_GENERATED, 0] == 6
    streamed = inst.reserve(100, 11, now=0.0)
    streamed.predicted_ttft, streamed.predicted_e2e = 1.0, 2.0
    inst.requests.estimate_progress(1.9)
    table = inst.requests.table
    assert table[simulator.COL_GENERATED, 0] == 9 and table[simulator.COL_STARTED, 1] == 0


def test_calibration_uses_pure_decode_spans_despite_bunched_reads():
    # Steps take 3x the profile's decode step; the proxy reads chunks late and in bunches.
    inst = view_with("a").instances["a"]
    fixed, per_decode = inst.profile.step_time.fixed_s, inst.profile.step_time.per_decode_seq_s
    entry = inst.reserve(100, 10_000, now=0.0)
    inst.first_token(entry, now=0.0)
    step = 3.0 * (fixed + per_decode * 1)
    t, k = 0.0, 0
    while k < 2000:
        bunch = 1 + (k % 3)  # 1, 2 or 3 tokens per read
        k += bunch
        t = k * step + (0.4 * step if k % 2 else 0.0)  # read lag on every other read
        inst.streamed(entry, t, bunch)
    assert inst.calibration.samples > 50
    assert inst.model.speed == pytest.approx(3.0, rel=0.05)


def test_an_arrival_voids_the_calibration_span():
    inst = view_with("a").instances["a"]
    entry = inst.reserve(100, 10_000, now=0.0)
    inst.first_token(entry, now=0.0)
    inst.streamed(entry, 0.1, 8)
    other = inst.reserve(5000, 10, now=0.1)  # a prefill joins the batch mid-span
    inst.streamed(entry, 0.2, 8)
    inst.first_token(other, now=0.2)
    inst.streamed(entry, 0.3, 8)
    assert inst.calibration.samples == 0


def test_a_reload_that_cannot_be_built_changes_nothing(tmp_path) -> None:
    """A changed instance whose new profile does not exist: the whole list is refused
    before anything is applied, so the instance keeps serving, and the file reverted is a
    no-op rather than a lost instance."""
    from blockproxy.backends import BackendsWatcher
    from blockproxy.profile import ProfileError

    path = tmp_path / "b.yaml"
    path.write_text("backends:\n  - url: http://127.0.0.1:9001\n    name: a\n"
                    "  - url: http://127.0.0.1:9002\n    name: b\n")
    view = ClusterView("llama-3.1-8b-h100-tp1")
    def apply(specs: list[BackendSpec]) -> None:
        view.apply(specs)

    watcher = BackendsWatcher(path, apply)
    view.apply(watcher.current)
    before = dict(view.instances)
    path.write_text("backends:\n  - url: http://127.0.0.1:9001\n    name: a\n"
                    "  - url: http://127.0.0.1:9003\n    name: b\n    profile: no-such\n"
                    "  - url: http://127.0.0.1:9004\n    name: c\n")
    with pytest.raises(ProfileError):
        view.apply(__import__("blockproxy.backends").backends.parse_backends(
            path.read_text(), "yaml"))
    assert view.instances == before and not any(i.removed for i in before.values())
    assert not watcher.check_now()  # refused: the last good list stays in force
    assert [s.name for s in watcher.current] == ["a", "b"]
    assert view.instances == before
    path.write_text("backends:\n  - url: http://127.0.0.1:9001\n    name: a\n"
                    "  - url: http://127.0.0.1:9002\n    name: b\n")
    watcher.check_now()
    assert view.instances == before and all(i.accepts_new() for i in before.values())


def test_names_longer_than_gossip_carries_are_refused_at_load() -> None:
    from blockproxy.backends import BackendsError, parse_backends

    with pytest.raises(BackendsError, match="at most 200 bytes"):
        parse_backends("backends:\n  - url: http://127.0.0.1:9001\n    name: " + "n" * 201,
                       "yaml")
    with pytest.raises(BackendsError, match="at most 200 bytes"):
        parse_backends("http://" + "h" * 60 + "." + "h" * 60 + "." + "h" * 60 + "." + "h" * 60
                       + ":9001", "list")
