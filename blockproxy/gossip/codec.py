"""The gossip datagram: versioned msgpack, signed with HMAC-SHA256.

Wire format (one UDP datagram, at most :data:`MAX_DATAGRAM` bytes)::

    msgpack([version, origin, incarnation, seq, timestamp_ms, kind, payload]) || tag

``tag`` is the 32-byte HMAC-SHA256 of the msgpack bytes under the shared key.  Payloads:

- ``DELTA``: ``[dseq, ops]``; ``dseq`` numbers delta datagrams (gap detection) and each
  op is ``[DISPATCH, instance, rid, prompt, predicted, started, generated, cached]``
  (``cached``: prompt tokens the origin expects the instance's prefix cache to serve;
  absent, from proxies that predate it, means 0),
  ``[PROGRESS, instance, rid, generated, started]``, ``[DONE, instance, rid]`` or
  ``[BLOCKS, instance, [hash, ...]]``: prefix blocks newly cached on the instance by a
  request this origin dispatched (only blocks the origin did not know there, at most
  :data:`MAX_BLOCKS_PER_OP` per op).  A delta with no ops is a heartbeat.
- ``SNAPSHOT``: ``[snapshot_id, part, parts, dseq, entries]``: part ``part`` of ``parts``
  of the origin's full state as of delta ``dseq``; an entry is
  ``[instance, rid, prompt, predicted, started, generated, cached]`` (``cached`` may be
  absent).
- ``BYE``: ``[]``: the origin leaves (clean shutdown); its entries go at once.

:func:`decode` checks size, tag, shape and timestamp and raises :class:`Rejected` with a
reason (a metric label); nothing else escapes it.  Replay and incarnation checks need
per-origin memory and live in :mod:`blockproxy.gossip.state`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import msgpack

from blockproxy.backends import MAX_NAME_BYTES

VERSION = 1
MAX_DATAGRAM = 1200
TAG_LEN = 32
DELTA, SNAPSHOT, BYE = 0, 1, 2
DISPATCH, PROGRESS, DONE, BLOCKS = 0, 1, 2, 3
#: prefix block hashes per BLOCKS op (9 msgpack bytes each: one op stays under a datagram)
MAX_BLOCKS_PER_OP = 100
#: ints on the wire that become table cells must fit comfortably in int64
MAX_COUNT = 1 << 31
MAX_ID = (1 << 64) - 1
MAX_NAME = MAX_NAME_BYTES  # the backends file refuses longer names

#: drop reasons, the label values of ``blockproxy_gossip_dropped_total``
REASONS = ("oversized", "malformed", "forged", "version", "clock", "replayed", "stale",
           "address", "full")


class Rejected(Exception):
    """A datagram that must not be applied; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Datagram(NamedTuple):
    origin: int
    incarnation: int
    seq: int
    timestamp_ms: int
    kind: int
    payload: Any


def sign(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()


def encode(key: bytes, origin: int, incarnation: int, seq: int, timestamp_ms: int,
           kind: int, payload: Any) -> bytes:
    """One signed datagram (the caller keeps it under :data:`MAX_DATAGRAM`)."""
    body = msgpack.packb([VERSION, origin, incarnation, seq, timestamp_ms, kind, payload])
    return body + sign(key, body)


def header_size(origin: int, incarnation: int, seq: int, timestamp_ms: int) -> int:
    """Bytes of a datagram with an empty payload slot, tag included (an upper bound)."""
    return len(msgpack.packb([VERSION, origin, incarnation, seq, timestamp_ms, 0, None])) \
        + TAG_LEN


def split(items: Sequence[Any], budget: int) -> Iterator[list[Any]]:
    """Group items (ops or entries) so each group's msgpack array fits in ``budget`` bytes."""
    group: list[Any] = []
    used = 5  # array header
    for item in items:
        size = len(msgpack.packb(item))
        if group and used + size > budget:
            yield group
            group, used = [], 5
        group.append(item)
        used += size
    yield group


def decode(key: bytes, data: bytes, now_ms: int, window_ms: int) -> Datagram:
    """Verify and parse one datagram, or raise :class:`Rejected`."""
    if len(data) > MAX_DATAGRAM:
        raise Rejected("oversized")
    if len(data) < TAG_LEN + 8:
        raise Rejected("malformed")
    body, tag = data[:-TAG_LEN], data[-TAG_LEN:]
    if not hmac.compare_digest(sign(key, body), tag):
        raise Rejected("forged")
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True,
                              max_str_len=MAX_NAME,
                              max_bin_len=0, max_array_len=MAX_DATAGRAM,
                              max_map_len=0, max_ext_len=0)
    except Exception:  # msgpack raises a zoo of types on bad input; all mean malformed
        raise Rejected("malformed") from None
    if not isinstance(msg, list) or len(msg) != 7:
        raise Rejected("malformed")
    version, origin, incarnation, seq, ts, kind, payload = msg
    if version != VERSION or type(version) is not int:
        raise Rejected("version")
    if not (_uint(origin, MAX_ID) and _uint(incarnation, MAX_ID) and _uint(seq, MAX_ID)
            and _uint(ts, MAX_ID)):
        raise Rejected("malformed")
    if kind == DELTA:
        ok = _valid_delta(payload)
    elif kind == SNAPSHOT:
        ok = _valid_snapshot(payload)
    elif kind == BYE:
        ok = payload == []
    else:
        ok = False
    if not ok:
        raise Rejected("malformed")
    if abs(ts - now_ms) > window_ms:
        raise Rejected("clock")
    return Datagram(origin, incarnation, seq, ts, kind, payload)


def _uint(value: object, limit: int) -> bool:
    return type(value) is int and 0 <= value <= limit  # type: ignore[operator]


def _name(value: object) -> bool:
    return type(value) is str and 0 < len(value) <= MAX_NAME  # type: ignore[arg-type]


def _counts(values: Sequence[object]) -> bool:
    return all(_uint(v, MAX_COUNT) for v in values)


def _valid_delta(payload: object) -> bool:
    if not isinstance(payload, list) or len(payload) != 2:
        return False
    dseq, ops = payload
    if not _uint(dseq, MAX_ID) or not isinstance(ops, list):
        return False
    for op in ops:
        if not isinstance(op, list) or not op:
            return False
        code = op[0]
        if code == DISPATCH:
            ok = len(op) in (7, 8) and _name(op[1]) and _counts(op[2:])
        elif code == PROGRESS:
            ok = len(op) == 5 and _name(op[1]) and _counts(op[2:])
        elif code == DONE:
            ok = len(op) == 3 and _name(op[1]) and _uint(op[2], MAX_COUNT)
        elif code == BLOCKS:
            ok = (len(op) == 3 and _name(op[1]) and isinstance(op[2], list)
                  and 0 < len(op[2]) <= MAX_BLOCKS_PER_OP
                  and all(_uint(h, MAX_ID) for h in op[2]))
        else:
            ok = False
        if not ok or type(code) is not int:
            return False
    return True


def _valid_snapshot(payload: object) -> bool:
    if not isinstance(payload, list) or len(payload) != 5:
        return False
    snap_id, part, parts, dseq, entries = payload
    if not (_uint(snap_id, MAX_ID) and _uint(part, MAX_COUNT) and _uint(parts, MAX_COUNT)
            and _uint(dseq, MAX_ID) and part < parts and isinstance(entries, list)):
        return False
    return all(isinstance(e, list) and len(e) in (6, 7) and _name(e[0]) and _counts(e[1:])
               for e in entries)
