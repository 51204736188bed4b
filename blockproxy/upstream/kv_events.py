"""Subscribe to the instances' KV cache events (vLLM's ``--kv-events-config``, ZeroMQ).

vLLM publishes, per engine step that changed its prefix cache, a multipart message
``[topic, sequence (8 bytes, big-endian), payload]`` whose payload is msgpack
``[timestamp, [event, ...], data_parallel_rank?]``.  Events are ``BlockStored``,
``BlockRemoved`` and ``AllBlocksCleared``: maps tagged by ``type`` (vLLM 0.32), or arrays
with the tag first (earlier versions, fields in declaration order); both are read.  Events
of another medium than the GPU (CPU offloading tiers) and of LoRA adapters are skipped.

:class:`KVEventSubscriptions` keeps one SUB socket per instance whose backends entry has
``kv_events:`` (re-checked every second, so a hot reload adds and drops subscriptions) and
applies each event to the instance's :class:`~blockproxy.cluster.prefix.EngineBlocks`.  A
gap in the sequence numbers (a restart, or messages dropped past ZeroMQ's high-water mark)
is counted; the blocks whose events were lost are found again as the engine reuses them.
Like the upstream HTTP client, this module is one of the two that touch the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import msgpack
from prometheus_client import CollectorRegistry, Counter

from blockproxy.cluster.instance import Instance
from blockproxy.cluster.prefix import EngineBlocks
from blockproxy.cluster.view import ClusterView

log = logging.getLogger("blockproxy")

#: decoded size limit of one batch (a step stores at most a few thousand blocks)
MAX_PAYLOAD = 16 * 1024 * 1024

_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
                  "medium")
_REMOVED_FIELDS = ("block_hashes", "medium")


def _fields(event: Any) -> tuple[str, dict[str, Any]] | None:
    """(type, fields) of one event in either encoding; None if it is not one."""
    if isinstance(event, dict):
        tag = event.get("type")
        return (tag, event) if isinstance(tag, str) else None
    if isinstance(event, list) and event and isinstance(event[0], str):
        names = (_STORED_FIELDS if event[0] == "BlockStored" else
                 _REMOVED_FIELDS if event[0] == "BlockRemoved" else ())
        return event[0], dict(zip(names, event[1:]))
    return None


def apply_batch(blocks: EngineBlocks, payload: bytes) -> int:
    """Apply one message's events to ``blocks``; returns how many were applied.  Raises
    ValueError for a payload that is not a KV event batch."""
    try:
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=False,
                                max_bin_len=MAX_PAYLOAD, max_str_len=MAX_PAYLOAD)
    except Exception as exc:  # msgpack raises several types for bad input
        raise ValueError(f"undecodable KV event batch: {exc}") from None
    if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
        raise ValueError("a KV event batch is [timestamp, [events], ...]")
    applied = 0
    for event in batch[1]:
        got = _fields(event)
        if got is None:
            continue
        tag, f = got
        if f.get("medium") not in (None, "GPU") or f.get("lora_id") is not None \
                or f.get("lora_name") is not None:
            continue
        hashes = f.get("block_hashes")
        if tag == "BlockStored" and isinstance(hashes, list):
            ids, size = f.get("token_ids"), f.get("block_size")
            if isinstance(ids, list) and isinstance(size, int):
                blocks.stored(hashes, f.get("parent_block_hash"), ids, size)
                applied += 1
        elif tag == "BlockRemoved" and isinstance(hashes, list):
            blocks.removed(hashes)
            applied += 1
        elif tag == "AllBlocksCleared":
            blocks.cleared()
            applied += 1
    return applied


class KVEventSubscriptions:
    """One ZeroMQ subscription per instance that publishes KV events."""

    def __init__(self, view: ClusterView, registry: CollectorRegistry) -> None:
        self.view = view
        self._tasks: dict[str, tuple[Instance, str, asyncio.Task[None]]] = {}
        self._ctx: Any = None
        self.batches = Counter("blockproxy_kv_event_batches", "KV event batches applied",
                               ["instance"], registry=registry)
        self.gaps = Counter("blockproxy_kv_event_gaps",
                            "gaps in an instance's KV event sequence (lost batches)",
                            ["instance"], registry=registry)
        self.bad = Counter("blockproxy_kv_event_errors", "KV event messages not understood",
                           ["instance"], registry=registry)

    def sync(self) -> None:
        """Subscribe to every instance in the view with an endpoint; drop the rest."""
        wanted = {inst.name: inst for inst in self.view.instances.values()
                  if inst.spec.kv_events and inst.engine_blocks is not None}
        for name, (inst, endpoint, task) in list(self._tasks.items()):
            new = wanted.get(name)
            if new is not inst or new.spec.kv_events != endpoint or task.done():
                task.cancel()
                del self._tasks[name]
        for name, inst in wanted.items():
            if name not in self._tasks:
                endpoint = inst.spec.kv_events or ""
                task = asyncio.create_task(self._follow(inst, endpoint),
                                           name=f"kv-events-{name}")
                self._tasks[name] = (inst, endpoint, task)

    async def _follow(self, inst: Instance, endpoint: str) -> None:
        import zmq
        import zmq.asyncio

        if self._ctx is None:
            self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(endpoint)  # ZeroMQ reconnects by itself when the publisher restarts
        blocks = inst.engine_blocks
        assert blocks is not None
        expected: int | None = None
        log.info("following the KV events of %s at %s", inst.name, endpoint)
        try:
            while True:
                frames = await sock.recv_multipart()
                if len(frames) != 3 or len(frames[1]) != 8:
                    self.bad.labels(inst.name).inc()
                    continue
                seq = int.from_bytes(frames[1], "big")
                if expected is not None and seq != expected:
                    self.gaps.labels(inst.name).inc()
                    if seq < expected:  # the publisher restarted: its cache is empty
                        blocks.cleared()
                expected = seq + 1
                try:
                    apply_batch(blocks, frames[2])
                except ValueError:
                    self.bad.labels(inst.name).inc()
                    continue
                self.batches.labels(inst.name).inc()
        finally:
            sock.close(0)

    async def close(self) -> None:
        tasks = [task for _, _, task in self._tasks.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
