"""The :class:`Gossiper`: tells peers about this proxy's requests, applies theirs to the view.

Hot path cost: a local reserve or release appends to a list; streamed tokens cost nothing
here.  Every ``interval`` (a few ms) the batcher turns pending dispatches and completions,
plus the latest ``generated`` count of every local request that moved by at least
``progress_tokens`` (or started), into delta datagrams.  Every ``snapshot_interval`` the
full set of local requests goes out as a snapshot (anti-entropy, also the heartbeat).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from blockproxy.cluster import ClusterView, Entry
from blockproxy.gossip import codec
from blockproxy.gossip.codec import Rejected
from blockproxy.gossip.membership import Membership, parse_address, parse_seeds
from blockproxy.gossip.state import RemoteState
from blockproxy.gossip.transport import Address, Transport

log = logging.getLogger("blockproxy.gossip")

PROPAGATION_BUCKETS = (0.0002, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015,
                       0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0,
                       2.5)
_DELTA_OVERHEAD = 16  # [dseq, ops] around the ops
_SNAPSHOT_OVERHEAD = 40  # [snapshot_id, part, parts, dseq, entries] around the entries


def load_key(path: str) -> bytes | None:
    """The shared HMAC key from a file (surrounding whitespace stripped); None for no file."""
    if not path:
        return None
    key = Path(path).read_bytes().strip()
    if len(key) < 16:
        raise ValueError(f"gossip key file {path} holds {len(key)} bytes; use at least 16 "
                         "(e.g. head -c 32 /dev/urandom | base64)")
    return key


def parse_origin(text: str, rng: random.Random) -> int:
    """``--gossip-id``: an integer (``0x`` hex allowed) or any name (hashed); random if empty."""
    if not text:
        return rng.randrange(2, 1 << 64)
    try:
        value = int(text, 0)
    except ValueError:
        value = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    if not 2 <= value < 1 << 64:
        raise ValueError(f"--gossip-id must be in [2, 2**64), got {text!r}")
    return value


class GossipMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.peers = Gauge("blockproxy_gossip_peers", "Peers heard from recently", registry=r)
        self.origins = Gauge("blockproxy_gossip_origins", "Remote proxies whose entries are "
                             "in the view", registry=r)
        self.remote_entries = Gauge("blockproxy_gossip_remote_entries",
                                    "Other proxies' active requests in the view", registry=r)
        self.bytes = Counter("blockproxy_gossip_bytes", "Gossip bytes sent and received "
                             "(each peer copy counts)", ["direction"], registry=r)
        self.datagrams = Counter("blockproxy_gossip_datagrams", "Gossip datagrams sent and "
                                 "accepted", ["direction"], registry=r)
        self.dropped = Counter("blockproxy_gossip_dropped", "Gossip datagrams dropped, by "
                               "reason", ["reason"], registry=r)
        for reason in codec.REASONS:
            self.dropped.labels(reason)
        self.staleness = Gauge("blockproxy_gossip_view_staleness_seconds",
                               "Age of the oldest remote origin's last datagram", registry=r)
        self.propagation = Histogram("blockproxy_gossip_propagation_seconds",
                                     "Receive time minus the datagram's timestamp",
                                     buckets=PROPAGATION_BUCKETS, registry=r)
        self.gaps = Counter("blockproxy_gossip_gaps", "Lost deltas detected (the origin waits "
                            "for its next snapshot)", registry=r)


@dataclass(eq=False)
class _Tracked:
    entry: Entry
    announced: bool = False
    cancelled: bool = False
    sent_generated: int = 0
    sent_started: int = 0


class Gossiper:
    """One proxy's gossip node."""

    def __init__(self, view: ClusterView, registry: CollectorRegistry, *, bind: str,
                 seeds: str = "", key: bytes | None = None, origin: int | None = None,
                 interval: float = 0.005, snapshot_interval: float = 0.5,
                 expiry: float = 2.0, window: float = 10.0, loss: float = 0.0,
                 progress_tokens: int = 8, resolve_interval: float = 10.0,
                 rng: random.Random | None = None) -> None:
        self.view = view
        self.rng = rng or random.Random()
        self.bind = parse_address(bind)
        self.membership = Membership(parse_seeds(seeds), peer_timeout=expiry)
        if key is None:  # only with --gossip-insecure (the Proxy refuses otherwise)
            log.warning("GOSSIP RUNS WITHOUT A KEY (all-zero HMAC key): anyone who can reach "
                        "udp %s can inject load into the routing view; set --gossip-key-file",
                        bind)
        self.key = key or bytes(32)
        #: the address each live origin speaks from: datagrams of it from elsewhere are
        #: refused (a captured datagram re-sent by someone else)
        self.addresses: dict[int, Address] = {}
        self._local_ips: dict[str, bool] = {}
        self.origin = origin if origin is not None else parse_origin("", self.rng)
        self.incarnation = time.time_ns() // 1_000_000
        self.interval, self.snapshot_interval = interval, snapshot_interval
        self.window_ms = int(window * 1000)
        self.progress_tokens = max(progress_tokens, 1)
        self.resolve_interval = resolve_interval
        self.state = RemoteState(view, expiry)
        self.transport = Transport(self._received, loss=loss, rng=self.rng)
        self.metrics = GossipMetrics(registry)
        self.metrics.peers.set_function(self.membership.live)
        self.metrics.origins.set_function(lambda: len(self.state.origins))
        self.metrics.remote_entries.set_function(self.state.entry_count)
        self.metrics.staleness.set_function(lambda: self.state.staleness(time.monotonic()))
        self.seq = 0
        self.dseq = 0
        self.snapshot_id = 0
        self.next_rid = 0
        self.local: dict[int, _Tracked] = {}
        self.pending: list[tuple[int, Any]] = []
        budget = codec.MAX_DATAGRAM - codec.header_size(1 << 63, 1 << 63, 1 << 63, 1 << 63)
        self._delta_budget = budget - _DELTA_OVERHEAD
        self._snapshot_budget = budget - _SNAPSHOT_OVERHEAD
        view.set_listener(self)

    # ---- the view tells us of local requests --------------------------------------------------
    def reserved(self, entry: Entry) -> None:
        self.next_rid = (self.next_rid + 1) % codec.MAX_COUNT
        entry.rid = self.next_rid
        tracked = _Tracked(entry)
        self.local[entry.rid] = tracked
        self.pending.append((codec.DISPATCH, tracked))
        new = entry.new_blocks
        if new:
            step = codec.MAX_BLOCKS_PER_OP
            name = entry.instance.name
            for i in range(0, len(new), step):
                self.pending.append((codec.BLOCKS, [codec.BLOCKS, name, new[i:i + step]]))

    def released(self, entry: Entry) -> None:
        tracked = self.local.pop(entry.rid, None)
        if tracked is None:
            return
        if tracked.announced:
            self.pending.append((codec.DONE, [codec.DONE, entry.instance.name, entry.rid]))
        else:
            tracked.cancelled = True  # never told anyone: nothing to take back

    # ---- sending ------------------------------------------------------------------------------
    def flush(self) -> None:
        """Send pending dispatches/completions and progress as delta datagrams."""
        ops: list[list[Any]] = []
        for code, item in self.pending:
            if code == codec.DONE or code == codec.BLOCKS:
                ops.append(item)
            elif not item.cancelled:
                e = item.entry
                started = 1 if e.first_token_at else 0
                ops.append([codec.DISPATCH, e.instance.name, e.rid, e.prompt_tokens,
                            e.predicted_tokens, started, e.generated, e.cached_tokens])
                item.announced = True
                item.sent_generated, item.sent_started = e.generated, started
        self.pending.clear()
        step = self.progress_tokens
        for tracked in self.local.values():
            e = tracked.entry
            started = 1 if e.first_token_at else 0
            if tracked.announced and (started != tracked.sent_started
                                      or e.generated - tracked.sent_generated >= step):
                ops.append([codec.PROGRESS, e.instance.name, e.rid, e.generated, started])
                tracked.sent_generated, tracked.sent_started = e.generated, started
        if ops:
            for group in codec.split(ops, self._delta_budget):
                self.dseq += 1
                self._send(codec.DELTA, [self.dseq, group])

    def send_snapshot(self) -> None:
        """All local requests, as of the last delta, in as many datagrams as it takes."""
        self.flush()
        rows = []
        for tracked in self.local.values():
            e = tracked.entry
            rows.append([e.instance.name, e.rid, e.prompt_tokens, e.predicted_tokens,
                         1 if e.first_token_at else 0, e.generated, e.cached_tokens])
        groups = list(codec.split(rows, self._snapshot_budget))
        self.snapshot_id += 1
        for i, group in enumerate(groups):
            self._send(codec.SNAPSHOT, [self.snapshot_id, i, len(groups), self.dseq, group])

    def _send(self, kind: int, payload: Any) -> None:
        self.seq += 1
        data = codec.encode(self.key, self.origin, self.incarnation, self.seq,
                            time.time_ns() // 1_000_000, kind, payload)
        peers = self.membership.peers()
        sent = self.transport.send(data, peers)
        if sent:
            self.metrics.bytes.labels("out").inc(len(data) * sent)
            self.metrics.datagrams.labels("out").inc(sent)

    # ---- receiving ----------------------------------------------------------------------------
    def _received(self, data: bytes, addr: Address) -> None:
        now_ns = time.time_ns()
        m = self.metrics
        try:
            dg = codec.decode(self.key, data, now_ns // 1_000_000, self.window_ms)
            if dg.origin == self.origin:
                if dg.incarnation == self.incarnation and self._is_own(addr):
                    self.membership.own.add(addr)  # a seed that is this proxy
                    return
                # our id from elsewhere: a captured datagram of ours sent back, or a clash
                raise Rejected("replayed" if dg.incarnation == self.incarnation else "stale")
            bound = self.addresses.get(dg.origin)
            if bound is not None and bound != addr and dg.origin in self.state.origins:
                raise Rejected("address")
            gaps = self.state.origins[dg.origin].gaps if dg.origin in self.state.origins \
                else 0
            self.state.apply(dg, time.monotonic())
            if dg.origin in self.state.origins:
                self.addresses[dg.origin] = addr
            else:  # it said BYE
                self.addresses.pop(dg.origin, None)
        except Rejected as exc:
            m.dropped.labels(exc.reason).inc()
            return
        except Exception:  # never let a datagram take the proxy down
            log.exception("gossip datagram from %s could not be applied", addr)
            m.dropped.labels("malformed").inc()
            return
        org = self.state.origins.get(dg.origin)
        if org is not None and org.gaps > gaps:
            m.gaps.inc()
        self.membership.heard_from(addr, time.monotonic())
        m.bytes.labels("in").inc(len(data))
        m.datagrams.labels("in").inc()
        m.propagation.observe(max(now_ns / 1e9 - dg.timestamp_ms / 1000, 0.0))

    def _is_own(self, addr: Address) -> bool:
        """Whether ``addr`` is this proxy's socket: its port, on an address of this host
        (one it can bind to)."""
        own = self.transport.address
        if own is None or addr[1] != own[1]:
            return False
        local = self._local_ips.get(addr[0])
        if local is None:
            if len(self._local_ips) > 64:
                self._local_ips.clear()
            family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
            try:
                with socket.socket(family, socket.SOCK_DGRAM) as probe:
                    probe.bind((addr[0], 0))
                local = True
            except OSError:
                local = False
            self._local_ips[addr[0]] = local
        return local

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        addr = await self.transport.start(*self.bind)
        self.membership.own.add(addr)
        await self.membership.resolve()
        log.info("gossip on udp %s:%d as origin %016x incarnation %d, seeds %s", addr[0],
                 addr[1], self.origin, self.incarnation, self.membership.peers())

    async def run(self) -> None:
        """Batch, snapshot, expire and re-resolve until cancelled."""
        loop = asyncio.get_running_loop()
        next_snapshot = next_resolve = loop.time()
        while True:
            now = loop.time()
            if now >= next_snapshot:
                # Jitter keeps many proxies from snapshotting in lockstep.
                next_snapshot = now + self.snapshot_interval * self.rng.uniform(0.9, 1.1)
                self.send_snapshot()
                mono = time.monotonic()
                for origin in self.state.expire(mono):
                    self.addresses.pop(origin, None)
                    log.info("gossip origin %016x expired", origin)
                self.membership.expire(mono)
            else:
                self.flush()
            if now >= next_resolve:
                next_resolve = now + self.resolve_interval
                if self.membership.seeds:
                    await self.membership.resolve()
            await asyncio.sleep(self.interval)

    def stop(self) -> None:
        """Leave cleanly: last deltas, then BYE so peers drop our entries at once."""
        try:
            self.flush()
            self._send(codec.BYE, [])
        finally:
            self.transport.close()

    def info(self) -> dict[str, Any]:
        """For ``/debug/cluster``."""
        now = time.monotonic()
        return {
            "origin": f"{self.origin:016x}", "incarnation": self.incarnation,
            "address": list(self.transport.address or ()),
            "peers": [f"{h}:{p}" for h, p in self.membership.peers()],
            "local_requests": len(self.local),
            "origins": {f"{o.origin:016x}": {
                "incarnation": o.incarnation, "entries": len(o.entries),
                "silent_s": round(now - o.last_heard, 4), "gaps": o.gaps,
                "synced": o.next_dseq is not None} for o in self.state.origins.values()},
        }
