"""What this proxy knows of the other proxies' requests, one :class:`Origin` per proxy.

Synchronous and deterministic (times are passed in), so it is tested without sockets.
Each origin's entries are mirrored into the cluster view through a :class:`Sink`.

Rules (DESIGN.md section 3):
- a datagram whose ``seq`` was already seen from this origin and incarnation is a replay;
- an older incarnation is stale; a newer one replaces the origin (its entries go);
- deltas apply in ``dseq`` order; a gap stops delta application until the next complete
  snapshot, which replaces all the origin's entries (prefix-block ops, idempotent and in
  no snapshot, apply whatever their order);
- an origin silent for ``expiry`` seconds is dropped with its entries, but its incarnation
  and highest seq are remembered (for ``remember`` seconds, longer than the codec's clock
  window), so its captured datagrams replayed later are still refused;
- at most :data:`MAX_ORIGINS` origins and :data:`MAX_ENTRIES` entries per origin are kept
  (a new origin beyond the cap is refused, entries beyond it ignored).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from blockproxy.gossip import codec
from blockproxy.gossip.codec import Datagram, Rejected

#: how far back seqs are remembered for replay detection
REPLAY_WINDOW = 4096
#: other proxies at most (a deployment has a handful)
MAX_ORIGINS = 256
#: active requests per other proxy at most
MAX_ENTRIES = 16384

Key = tuple[str, int]  # (instance name, request id)
Row = list[int]  # [prompt, predicted, started, generated, cached]


class Sink(Protocol):
    """Where remote entries go (the cluster view)."""

    def upsert_remote(self, origin: int, instance: str, rid: int, prompt: int,
                      predicted: int, started: int, generated: int, cached: int = 0
                      ) -> None: ...

    def remove_remote(self, origin: int, instance: str, rid: int) -> None: ...

    def add_blocks(self, instance: str, hashes: list[int]) -> None: ...


@dataclass
class _Snapshot:
    snap_id: int
    parts: int
    dseq: int
    received: dict[int, list[list[object]]] = field(default_factory=dict)


@dataclass
class Origin:
    """One remote proxy (one incarnation of it)."""

    origin: int
    incarnation: int
    last_heard: float
    max_seq: int = -1
    seen: set[int] = field(default_factory=set)
    #: next delta expected; None until the first snapshot (or after a gap)
    next_dseq: int | None = None
    entries: dict[Key, Row] = field(default_factory=dict)
    snapshot: _Snapshot | None = None
    gaps: int = 0

    def check_replay(self, seq: int) -> None:
        if seq in self.seen or seq <= self.max_seq - REPLAY_WINDOW:
            raise Rejected("replayed")
        self.seen.add(seq)
        if seq > self.max_seq:
            self.max_seq = seq
            if len(self.seen) > 2 * REPLAY_WINDOW:
                floor = seq - REPLAY_WINDOW
                self.seen = {s for s in self.seen if s > floor}


class RemoteState:
    """All remote origins; apply verified datagrams, expire the silent."""

    def __init__(self, sink: Sink, expiry: float, remember: float = 60.0) -> None:
        self.sink = sink
        self.expiry = expiry
        self.remember = remember
        self.origins: dict[int, Origin] = {}
        #: origins that expired or left: (incarnation, highest seq, when)
        self.gone: dict[int, tuple[int, int, float]] = {}

    def apply(self, dg: Datagram, now: float) -> None:
        """Apply one verified datagram (raises :class:`Rejected` for replays, stale ones
        and a new origin beyond the cap)."""
        org = self.origins.get(dg.origin)
        if org is not None and dg.incarnation < org.incarnation:
            raise Rejected("stale")
        if org is None or dg.incarnation > org.incarnation:
            max_seq = -1
            if org is None:
                gone = self.gone.get(dg.origin)
                if gone is not None:
                    incarnation, max_seq, _ = gone
                    if dg.incarnation < incarnation:
                        raise Rejected("stale")
                    if dg.incarnation > incarnation:
                        max_seq = -1
                    elif dg.seq <= max_seq:
                        raise Rejected("replayed")
                if len(self.origins) >= MAX_ORIGINS:
                    raise Rejected("full")
                self.gone.pop(dg.origin, None)
            else:
                self._drop(org)  # a restarted proxy replaces its old self
            org = self.origins[dg.origin] = Origin(dg.origin, dg.incarnation, now,
                                                   max_seq=max_seq)
        org.check_replay(dg.seq)
        org.last_heard = now
        if dg.kind == codec.DELTA:
            self._delta(org, dg.payload)
        elif dg.kind == codec.SNAPSHOT:
            self._snapshot_part(org, dg.payload)
        elif dg.kind == codec.BYE:
            self._forget(org, now)

    def expire(self, now: float) -> list[int]:
        """Drop origins silent for longer than ``expiry``; returns their ids."""
        gone = [o for o in self.origins.values() if now - o.last_heard > self.expiry]
        for org in gone:
            self._forget(org, now)
        for origin in [o for o, (_, _, t) in self.gone.items() if now - t > self.remember]:
            del self.gone[origin]
        return [o.origin for o in gone]

    def _forget(self, org: Origin, now: float) -> None:
        """Drop an origin's entries; remember how far its seqs went."""
        self._drop(org)
        del self.origins[org.origin]
        if len(self.gone) >= 4 * MAX_ORIGINS:
            del self.gone[min(self.gone, key=lambda o: self.gone[o][2])]
        self.gone[org.origin] = (org.incarnation, org.max_seq, now)

    def staleness(self, now: float) -> float:
        """Age of the oldest origin's last datagram (0 with no origins)."""
        return max((now - o.last_heard for o in self.origins.values()), default=0.0)

    def entry_count(self) -> int:
        return sum(len(o.entries) for o in self.origins.values())

    # ---- deltas and snapshots -----------------------------------------------------------------
    def _delta(self, org: Origin, payload: list[object]) -> None:
        dseq, ops = payload
        assert isinstance(dseq, int) and isinstance(ops, list)
        if org.next_dseq is None or dseq != org.next_dseq:
            if org.next_dseq is not None and dseq > org.next_dseq:
                org.gaps += 1
                org.next_dseq = None  # lost deltas: wait for the next full snapshot
            # Out of order (waiting for a snapshot, already covered by one, or after a
            # gap): entries wait for the snapshot, but prefix blocks, which no snapshot
            # carries and whose insertion is idempotent, apply now.
            for op in ops:
                if isinstance(op, list) and op[0] == codec.BLOCKS:
                    self._op(org, op)
            return
        org.next_dseq = dseq + 1
        for op in ops:
            self._op(org, op)

    def _op(self, org: Origin, op: list[object]) -> None:
        code, instance, rid = op[0], op[1], op[2]
        if code == codec.BLOCKS:
            assert isinstance(instance, str) and isinstance(rid, list)
            self.sink.add_blocks(instance, rid)
            return
        assert isinstance(instance, str) and isinstance(rid, int)
        key = (instance, rid)
        if code == codec.DISPATCH:
            prompt, predicted, started, generated = op[3:7]  # type: ignore[misc]
            cached = op[7] if len(op) > 7 else 0
            self._set(org, key, [prompt, predicted, started, generated, cached])  # type: ignore[list-item]
        elif code == codec.PROGRESS:
            row = org.entries.get(key)
            if row is not None:
                generated, started = op[3], op[4]
                self._set(org, key, [row[0], row[1], started, generated, row[4]])  # type: ignore[list-item]
        elif code == codec.DONE and org.entries.pop(key, None) is not None:
            self.sink.remove_remote(org.origin, instance, rid)

    def _set(self, org: Origin, key: Key, row: Row) -> None:
        if key not in org.entries and len(org.entries) >= MAX_ENTRIES:
            return
        org.entries[key] = row
        self.sink.upsert_remote(org.origin, key[0], key[1], *row)

    def _snapshot_part(self, org: Origin, payload: list[object]) -> None:
        snap_id, part, parts, dseq, entries = payload
        assert isinstance(snap_id, int) and isinstance(part, int) and isinstance(parts, int)
        assert isinstance(dseq, int) and isinstance(entries, list)
        snap = org.snapshot
        if snap is None or snap.snap_id != snap_id:
            if snap is not None and snap_id < snap.snap_id:
                return  # a late part of an older snapshot
            snap = org.snapshot = _Snapshot(snap_id, parts, dseq)
        if parts != snap.parts or dseq != snap.dseq:
            return
        snap.received[part] = entries
        if len(snap.received) < snap.parts:
            return
        org.snapshot = None
        if org.next_dseq is not None and dseq + 1 < org.next_dseq:
            return  # deltas newer than this snapshot were applied already
        self._replace(org, [e for p in snap.received.values() for e in p])
        org.next_dseq = dseq + 1

    def _replace(self, org: Origin, entries: list[list[object]]) -> None:
        fresh: dict[Key, Row] = {}
        for e in entries[:MAX_ENTRIES]:
            fresh[(e[0], e[1])] = [*e[2:7], *([0] if len(e) < 7 else [])]  # type: ignore[index,arg-type,misc,list-item]
        for key in [k for k in org.entries if k not in fresh]:
            del org.entries[key]
            self.sink.remove_remote(org.origin, *key)
        for key, row in fresh.items():
            if org.entries.get(key) != row:
                self._set(org, key, row)

    def _drop(self, org: Origin) -> None:
        for key in list(org.entries):
            self.sink.remove_remote(org.origin, *key)
        org.entries.clear()
