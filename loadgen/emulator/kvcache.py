"""Paged KV cache with prefix caching, in the manner of vLLM V1's block pool.

Blocks hold ``block_size`` tokens.  A full block of prompt tokens is registered under its
chain hash (hash of the previous block's hash and the block's tokens), so a later request
with the same prefix can reuse it.  Freed blocks keep their hash and go to the tail of
the free queue; allocation takes blocks from the head, so cached blocks are evicted in
least-recently-used order and only when free blocks are needed.

With an event list (``KVCache(..., events=[])``) the cache records what vLLM's KV events
report (``--kv-events-config``): ``("stored", hashes, parent_hash, first_block_index,
request)`` for each run of blocks a request registers, ``("removed", hashes)`` for the
cached blocks an allocation evicts; the engine publishes them after each step
(:mod:`loadgen.emulator.kvevents`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, Protocol


class BlockOwner(Protocol):
    """What the cache needs from a request."""

    blocks: list[int]
    num_hashed_blocks: int
    num_prompt_tokens: int

    @property
    def block_hashes(self) -> Sequence[Hashable]: ...


def prompt_block_hashes(tokens: Sequence[Hashable], block_size: int) -> list[Hashable]:
    """Chain hashes of the full blocks of ``tokens`` (a partial last block has none)."""
    hashes: list[Hashable] = []
    previous: Hashable = None
    for start in range(0, len(tokens) - block_size + 1, block_size):
        previous = hash((previous, tuple(tokens[start:start + block_size])))
        hashes.append(previous)
    return hashes


class KVCache:
    """Block allocator of one instance: reference counts, free queue, hash -> block map."""

    def __init__(self, num_blocks: int, block_size: int,
                 events: list[tuple[Any, ...]] | None = None) -> None:
        self.events = events
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._refs = [0] * num_blocks
        self._hash_of: list[Hashable | None] = [None] * num_blocks
        self._cached: dict[Hashable, int] = {}
        # An insertion-ordered dict is an O(1) LRU queue with O(1) removal from the middle
        # (a cached block that gets reused leaves the free queue).
        self._free: dict[int, None] = dict.fromkeys(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        """Blocks not referenced by any request (cached ones included, as vLLM counts)."""
        return len(self._free)

    def usage(self) -> float:
        """Fraction of blocks in use, as vLLM's ``kv_cache_usage_perc`` (0..1)."""
        return 1.0 - len(self._free) / self.num_blocks

    def lookup(self, block_hashes: Sequence[Hashable], max_blocks: int) -> list[int]:
        """Blocks of the longest cached prefix of ``block_hashes``, at most ``max_blocks``."""
        hits: list[int] = []
        cached = self._cached
        for block_hash in block_hashes[:max_blocks]:
            block = cached.get(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate(self, req: BlockOwner, num_tokens: int,
                 cached_blocks: Sequence[int] = ()) -> bool:
        """Give ``req`` enough blocks for ``num_tokens`` tokens; False (no change) if short.

        ``cached_blocks`` are prefix-cache hits to attach first (admission only).
        """
        bs = self.block_size
        needed = -(-num_tokens // bs) - len(req.blocks) - len(cached_blocks)
        free = self._free
        refs = self._refs
        if cached_blocks:
            reusable_free = sum(1 for b in cached_blocks if refs[b] == 0)
        else:
            reusable_free = 0
        if needed > len(free) - reusable_free:
            return False
        blocks = req.blocks
        for block in cached_blocks:
            if refs[block] == 0:
                del free[block]
            refs[block] += 1
            blocks.append(block)
        if cached_blocks:
            req.num_hashed_blocks = len(blocks)
        removed = []
        for _ in range(needed):
            block = next(iter(free))
            del free[block]
            old_hash = self._hash_of[block]
            if old_hash is not None:  # evict the least recently used cached block
                if self._cached.get(old_hash) == block:
                    del self._cached[old_hash]
                    removed.append(old_hash)
                self._hash_of[block] = None
            refs[block] = 1
            blocks.append(block)
        if removed and self.events is not None:
            self.events.append(("removed", removed))
        self._register_full_blocks(req, num_tokens)
        return True

    def _register_full_blocks(self, req: BlockOwner, num_tokens: int) -> None:
        full = min(num_tokens, req.num_prompt_tokens) // self.block_size
        if full <= req.num_hashed_blocks:
            return
        cached = self._cached
        events = self.events
        run: list[Hashable] = []  # consecutive newly stored blocks, for one event
        start = 0
        for i in range(req.num_hashed_blocks, full):
            block_hash = req.block_hashes[i]
            if block_hash not in cached:
                block = req.blocks[i]
                cached[block_hash] = block
                self._hash_of[block] = block_hash
                if events is not None:
                    if not run:
                        start = i
                    run.append(block_hash)
            elif run and events is not None:
                events.append(self._stored(req, run, start))
                run = []
        if run and events is not None:
            events.append(self._stored(req, run, start))
        req.num_hashed_blocks = full

    @staticmethod
    def _stored(req: BlockOwner, run: list[Hashable], start: int) -> tuple[Any, ...]:
        return ("stored", run, req.block_hashes[start - 1] if start else None, start, req)

    def free(self, req: BlockOwner) -> None:
        """Release ``req``'s blocks; they stay cached until evicted."""
        refs = self._refs
        free = self._free
        # Reverse order, as vLLM: the tail of a sequence is evicted before its head.
        for block in reversed(req.blocks):
            refs[block] -= 1
            if refs[block] == 0:
                free[block] = None
        req.blocks = []
        req.num_hashed_blocks = 0
