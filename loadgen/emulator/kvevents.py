"""KV cache events of an emulated instance, published as vLLM publishes them.

vLLM (``--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq", ...}'``)
sends, on a ZeroMQ PUB socket, one multipart message per engine step that changed the
prefix cache: ``[topic, sequence number (8 bytes, big-endian), payload]``, the payload a
msgpack ``[timestamp, [event, ...]]`` (vLLM's ``KVEventBatch``).  An event is a map tagged
by ``type`` (vLLM 0.32's encoding; older versions sent the same fields as an array with the
tag first):

- ``BlockStored``: ``block_hashes``, ``parent_block_hash`` (the block before the first,
  or nil), ``token_ids`` (all the blocks' tokens), ``block_size``, ``lora_id``, ``medium``,
  ``lora_name``;
- ``BlockRemoved``: ``block_hashes``, ``medium``;
- ``AllBlocksCleared``.

The emulator's block hashes are its own (ints); its token ids are the word tokenizer's
(:func:`loadgen.tokenizer.token_ids`), the ids of the ``tokenizer.json`` that
``loadgen tokenizer`` writes.  Sending never blocks the engine: a subscriber that does not
keep up loses messages past ZeroMQ's high-water mark, and sees the gap in the sequence
numbers, as with vLLM.
"""

from __future__ import annotations

import time
from typing import Any

import msgpack
import zmq

from loadgen.tokenizer import token_ids

#: messages queued per subscriber before ZeroMQ drops (vLLM's default ``hwm``)
HIGH_WATER = 100_000


class KVEventPublisher:
    """A PUB socket bound to ``endpoint`` (``tcp://127.0.0.1:PORT``)."""

    def __init__(self, endpoint: str, block_size: int, topic: str = "") -> None:
        self.endpoint = endpoint
        self.block_size = block_size
        self._topic = topic.encode()
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, HIGH_WATER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(endpoint)
        self.seq = 0
        self.dropped = 0

    def encode(self, records: list[tuple[Any, ...]]) -> bytes:
        """The payload of one batch of :class:`loadgen.emulator.kvcache.KVCache` records."""
        bs = self.block_size
        events: list[dict[str, Any]] = []
        for rec in records:
            if rec[0] == "stored":
                _, hashes, parent, first, req = rec
                tokens = req.prompt[first * bs:(first + len(hashes)) * bs]
                events.append({"type": "BlockStored", "block_hashes": hashes,
                               "parent_block_hash": parent, "token_ids": token_ids(tokens),
                               "block_size": bs, "lora_id": None, "medium": "GPU",
                               "lora_name": None})
            elif rec[0] == "removed":
                events.append({"type": "BlockRemoved", "block_hashes": rec[1],
                               "medium": "GPU"})
            else:
                events.append({"type": "AllBlocksCleared"})
        return msgpack.packb([time.time(), events])

    def publish(self, records: list[tuple[Any, ...]]) -> None:
        """Send one batch (the records of one engine step)."""
        if not records:
            return
        payload = self.encode(records)
        try:
            self._sock.send_multipart([self._topic, self.seq.to_bytes(8, "big"), payload],
                                      flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
        self.seq += 1

    def close(self) -> None:
        self._sock.close(0)
