"""The gossip datagram codec and the per-origin state machine (no sockets)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockproxy.gossip import codec
from blockproxy.gossip.codec import Rejected
from blockproxy.gossip.state import RemoteState

KEY = b"k" * 32
NOW = 1_700_000_000_000


def dg(seq=1, kind=codec.DELTA, payload=None, origin=7, inc=1, ts=NOW, key=KEY):
    if payload is None:
        payload = [seq, []]
    return codec.encode(key, origin, inc, seq, ts, kind, payload)


def decode(data):
    return codec.decode(KEY, data, NOW, 10_000)


class FakeView:
    def __init__(self):
        self.rows = {}

    def upsert_remote(self, origin, instance, rid, prompt, predicted, started, generated,
                      cached=0):
        self.rows[(origin, instance, rid)] = (prompt, predicted, started, generated)
        self.cached = {**getattr(self, "cached", {}), (origin, instance, rid): cached}

    def remove_remote(self, origin, instance, rid):
        del self.rows[(origin, instance, rid)]

    def add_blocks(self, instance, hashes):
        self.blocks = getattr(self, "blocks", []) + [(instance, hashes)]


def test_round_trip():
    ops = [[codec.DISPATCH, "i0", 1, 100, 50, 0, 0], [codec.PROGRESS, "i0", 1, 5, 1],
           [codec.DONE, "i1", 2], [codec.BLOCKS, "i0", [1, (1 << 63) - 1]]]
    out = decode(dg(payload=[3, ops]))
    assert (out.origin, out.incarnation, out.seq, out.kind) == (7, 1, 1, codec.DELTA)
    assert out.payload == [3, ops]


@pytest.mark.parametrize("data, reason", [
    (dg(key=b"x" * 32), "forged"),
    (dg()[:-1], "forged"),
    (dg()[:20], "malformed"),
    (b"", "malformed"),
    (dg() + b"\0" * 1200, "oversized"),
    (dg(ts=NOW - 11_000), "clock"),
    (dg(ts=NOW + 11_000), "clock"),
    (dg(payload=[1, [[codec.DISPATCH, "i0", 1, -5, 0, 0, 0]]]), "malformed"),
    (dg(payload=[1, [[9, "i0", 1]]]), "malformed"),
    (dg(payload=[1, [[codec.BLOCKS, "i0", []]]]), "malformed"),
    (dg(payload=[1, [[codec.BLOCKS, "i0", [-1]]]]), "malformed"),
    (dg(payload=[1, [[codec.BLOCKS, "i0", 5]]]), "malformed"),
    (dg(payload=[1, [[codec.BLOCKS, "i0", list(range(codec.MAX_BLOCKS_PER_OP + 1))]]]),
     "malformed"),
    (dg(kind=5), "malformed"),
    (dg(kind=codec.SNAPSHOT, payload=[1, 2, 2, 0, []]), "malformed"),
])
def test_rejects(data, reason):
    with pytest.raises(Rejected) as exc:
        decode(data)
    assert exc.value.reason == reason


def test_wrong_version_and_shape_signed():
    body = msgpack.packb([2, 7, 1, 1, NOW, 0, [1, []]])
    with pytest.raises(Rejected, match="version"):
        decode(body + codec.sign(KEY, body))
    body = msgpack.packb({"a": 1})
    with pytest.raises(Rejected, match="malformed"):
        decode(body + codec.sign(KEY, body))


def test_split_stays_under_limit():
    entries = [[f"instance-{i % 7}", i, 4000 + i, 300, i % 2, i] for i in range(500)]
    budget = codec.MAX_DATAGRAM - codec.header_size(2**64 - 1, 2**63, 2**40, NOW) - 40
    groups = list(codec.split(entries, budget))
    assert sum(len(g) for g in groups) == 500
    for i, g in enumerate(groups):
        data = dg(kind=codec.SNAPSHOT, payload=[1, i, len(groups), 0, g], origin=2**64 - 1,
                  inc=2**63, seq=2**40)
        assert len(data) <= codec.MAX_DATAGRAM
        decode(data)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=1400))
def test_fuzz_random_bytes(data):
    with pytest.raises(Rejected):
        decode(data)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 200), st.integers(0, 255), st.booleans())
def test_fuzz_mutated_datagrams(pos, byte, resign):
    """Any mutation of a valid datagram is rejected, or (re-signed) decodes to a valid shape."""
    ops = [[codec.DISPATCH, "i0", 1, 100, 50, 0, 0], [codec.PROGRESS, "i0", 1, 5, 1]]
    data = bytearray(dg(payload=[1, ops]))
    body_len = len(data) - codec.TAG_LEN
    pos %= body_len
    if data[pos] == byte:
        return
    data[pos] = byte
    if resign:
        body = bytes(data[:body_len])
        data = bytearray(body + codec.sign(KEY, body))
    state = RemoteState(FakeView(), expiry=2.0)
    try:
        out = decode(bytes(data))
    except Rejected:
        return
    assert resign
    try:
        state.apply(out, 0.0)  # a signed, well-shaped datagram may apply; it must not crash
    except Rejected:
        pass


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=5)
                    | st.floats(), lambda c: st.lists(c, max_size=8), max_leaves=30))
def test_fuzz_signed_garbage_structures(payload):
    for kind in (codec.DELTA, codec.SNAPSHOT, codec.BYE, 3):
        try:
            body = msgpack.packb([1, 7, 1, 1, NOW, kind, payload])
        except (OverflowError, ValueError):
            return
        try:
            out = decode(body + codec.sign(KEY, body))
        except Rejected:
            continue
        RemoteState(FakeView(), 2.0).apply(out, 0.0)


# ---- state ---------------------------------------------------------------------------------

def apply(state, seq, kind, payload, inc=1, now=0.0, origin=7):
    state.apply(decode(dg(seq=seq, kind=kind, payload=payload, inc=inc, origin=origin)), now)


def test_snapshot_then_deltas_in_order():
    view = FakeView()
    s = RemoteState(view, expiry=2.0)
    apply(s, 1, codec.DELTA, [0, [[codec.DISPATCH, "i0", 1, 10, 5, 0, 0]]])
    assert view.rows == {}  # no snapshot yet: deltas cannot be trusted
    apply(s, 2, codec.SNAPSHOT, [1, 0, 1, 0, [["i0", 1, 10, 5, 0, 0]]])
    assert view.rows == {(7, "i0", 1): (10, 5, 0, 0)}
    apply(s, 3, codec.DELTA, [1, [[codec.PROGRESS, "i0", 1, 3, 1],
                                  [codec.DISPATCH, "i1", 2, 20, 8, 0, 0]]])
    assert view.rows == {(7, "i0", 1): (10, 5, 1, 3), (7, "i1", 2): (20, 8, 0, 0)}
    apply(s, 4, codec.DELTA, [2, [[codec.DONE, "i0", 1]]])
    assert view.rows == {(7, "i1", 2): (20, 8, 0, 0)}


def test_gap_waits_for_snapshot():
    view = FakeView()
    s = RemoteState(view, expiry=2.0)
    apply(s, 1, codec.SNAPSHOT, [1, 0, 1, 0, []])
    apply(s, 2, codec.DELTA, [2, [[codec.DISPATCH, "i0", 1, 10, 5, 0, 0]]])  # dseq 1 lost
    assert view.rows == {} and s.origins[7].gaps == 1
    apply(s, 3, codec.DELTA, [3, [[codec.DISPATCH, "i0", 2, 10, 5, 0, 0]]])
    assert view.rows == {}
    apply(s, 4, codec.SNAPSHOT, [2, 1, 2, 3, [["i0", 2, 10, 5, 0, 0]]])
    assert view.rows == {}  # incomplete
    apply(s, 5, codec.SNAPSHOT, [2, 0, 2, 3, [["i0", 1, 10, 5, 1, 4]]])
    assert view.rows == {(7, "i0", 1): (10, 5, 1, 4), (7, "i0", 2): (10, 5, 0, 0)}
    apply(s, 6, codec.DELTA, [4, [[codec.DONE, "i0", 2]]])
    assert view.rows == {(7, "i0", 1): (10, 5, 1, 4)}


def test_replay_and_incarnations():
    view = FakeView()
    s = RemoteState(view, expiry=2.0)
    apply(s, 1, codec.SNAPSHOT, [1, 0, 1, 0, [["i0", 1, 10, 5, 0, 0]]])
    with pytest.raises(Rejected, match="replayed"):
        apply(s, 1, codec.SNAPSHOT, [1, 0, 1, 0, [["i0", 1, 10, 5, 0, 0]]])
    apply(s, 1, codec.SNAPSHOT, [1, 0, 1, 0, [["i0", 9, 1, 1, 0, 0]]], inc=2)
    assert view.rows == {(7, "i0", 9): (1, 1, 0, 0)}  # the old incarnation's entries went
    with pytest.raises(Rejected, match="stale"):
        apply(s, 2, codec.DELTA, [1, []], inc=1)


def test_expiry_and_bye():
    view = FakeView()
    s = RemoteState(view, expiry=2.0)
    apply(s, 1, codec.SNAPSHOT, [1, 0, 1, 0, [["i0", 1, 10, 5, 0, 0]]], now=0.0)
    apply(s, 1, codec.SNAPSHOT, [1, 0, 1, 0, [["i1", 1, 10, 5, 0, 0]]], now=1.0, origin=8)
    assert s.staleness(1.5) == 1.5
    assert s.expire(2.5) == [7]
    assert view.rows == {(8, "i1", 1): (10, 5, 0, 0)}
    apply(s, 2, codec.BYE, [], origin=8)
    assert view.rows == {} and s.origins == {}


def test_cached_prompt_tokens_travel_with_a_dispatch_and_a_snapshot():
    """Without them another proxy would simulate a request that reuses a cached prefix as
    a full prefill; ops of proxies that predate the field mean 0."""
    view = FakeView()
    s = RemoteState(view, expiry=2.0)
    apply(s, 1, codec.SNAPSHOT,
          [1, 0, 1, 0, [["i0", 1, 900, 5, 0, 0, 640], ["i0", 2, 9, 5, 0, 0]]])
    assert view.cached == {(7, "i0", 1): 640, (7, "i0", 2): 0}
    apply(s, 2, codec.DELTA, [1, [[codec.DISPATCH, "i1", 3, 700, 8, 0, 0, 512],
                                  [codec.PROGRESS, "i1", 3, 2, 1]]])
    assert view.cached[(7, "i1", 3)] == 512 and view.rows[(7, "i1", 3)] == (700, 8, 1, 2)
    data = codec.encode(KEY, 7, 1, 3, 1000, codec.DELTA,
                        [2, [[codec.DISPATCH, "i1", 4, 700, 8, 0, 0, 512]]])
    assert codec.decode(KEY, data, now_ms=1000, window_ms=5000).payload[1][0][7] == 512
    for bad in ([codec.DISPATCH, "i1", 4, 700, 8, 0, 0, -1],
                [codec.DISPATCH, "i1", 4, 700, 8, 0, 0, 5, 6]):
        with pytest.raises(codec.Rejected):
            codec.decode(KEY, codec.encode(KEY, 7, 1, 4, 1000, codec.DELTA, [3, [bad]]),
                         now_ms=1000, window_ms=5000)


def test_replays_are_refused_after_an_origin_expires_or_says_bye():
    """The replay window outlives the origin: captured datagrams re-sent after it expired
    (or left) are not ghost load, while the origin itself, when it speaks again with newer
    seqs, is taken back."""
    view = FakeView()
    s = RemoteState(view, expiry=2.0)
    apply(s, 1, codec.SNAPSHOT, [1, 0, 1, 0, [["i0", 1, 10, 5, 0, 0]]], now=0.0)
    apply(s, 2, codec.DELTA, [1, [[codec.DISPATCH, "i0", 2, 10, 5, 0, 0]]], now=0.0)
    assert s.expire(3.0) == [7] and view.rows == {}
    for seq in (1, 2):
        with pytest.raises(Rejected, match="replayed"):
            apply(s, seq, codec.SNAPSHOT, [1, 0, 1, 0, [["i0", 1, 10, 5, 0, 0]]], now=3.1)
    assert view.rows == {}
    apply(s, 3, codec.SNAPSHOT, [2, 0, 1, 1, [["i0", 3, 10, 5, 0, 0]]], now=3.2)
    assert view.rows == {(7, "i0", 3): (10, 5, 0, 0)}
    apply(s, 4, codec.BYE, [], now=3.3)
    with pytest.raises(Rejected, match="replayed"):
        apply(s, 3, codec.SNAPSHOT, [2, 0, 1, 1, [["i0", 3, 10, 5, 0, 0]]], now=3.4)
    with pytest.raises(Rejected, match="stale"):  # an older incarnation stays refused
        apply(s, 9, codec.SNAPSHOT, [1, 0, 1, 0, []], inc=0, now=3.5)
    assert view.rows == {}


def test_origins_and_entries_per_origin_are_capped(monkeypatch):
    from blockproxy.gossip import state

    monkeypatch.setattr(state, "MAX_ORIGINS", 3)
    monkeypatch.setattr(state, "MAX_ENTRIES", 2)
    view = FakeView()
    s = RemoteState(view, expiry=2.0)
    for origin in (7, 8, 9):
        apply(s, 1, codec.SNAPSHOT, [1, 0, 1, 0, []], origin=origin)
    with pytest.raises(Rejected, match="full"):
        apply(s, 1, codec.SNAPSHOT, [1, 0, 1, 0, []], origin=10)
    apply(s, 2, codec.DELTA, [1, [[codec.DISPATCH, "i0", r, 10, 5, 0, 0] for r in range(5)]])
    apply(s, 3, codec.SNAPSHOT, [2, 0, 1, 1, [["i1", r, 10, 5, 0, 0] for r in range(5)]],
          origin=8)
    assert len(s.origins[7].entries) == 2 and len(s.origins[8].entries) == 2
    assert len(view.rows) == 4
