"""What one instance's prefix cache probably holds, as the proxy can know it.

The model follows vLLM's block pool: a block a running request holds cannot be evicted;
when the request ends its blocks join the tail of the free queue, last block first, so the
blocks at the start of a prompt (the ones other prompts share) are evicted last; when the
cache is full, blocks are evicted from the head of the free queue (least recently used).
The proxy learns of the blocks it dispatches itself (and, through gossip, of other
proxies'): a request's blocks are held from dispatch, so the next decision, a microsecond
later, already sees them, and released when it ends.

Blocks are :mod:`blockproxy.routing.prefix` hash-chain blocks of ``BLOCK_BYTES`` bytes,
not the engine's token blocks; capacity is converted at :data:`TOKENS_PER_BLOCK` tokens
per block.  Lookups use the chain's prefix property (a block is cached only if those
before it are, as the eviction order keeps it almost always): a binary search for the
longest cached run of leading blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from blockproxy.compiled import pick
from blockproxy.routing.prefix import token_hashes

#: engine tokens one hashed block stands for when sizing the cache: ``BLOCK_BYTES`` of
#: :mod:`blockproxy.routing.prefix` at 4 bytes per token (a test keeps the two in step)
TOKENS_PER_BLOCK = 32


class PrefixCachePy:
    """Block hashes an instance holds: in use by requests (pinned) or free (LRU order).

    The pure-Python twin of ``blockproxy._fastcore.PrefixCacheC`` (same results, same
    eviction order: ``tests/test_prefix.py``); :data:`PrefixCache` is the compiled one
    when the extension is built."""

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = max(int(capacity_blocks), 1)
        # cached, unreferenced: oldest first.  An OrderedDict, not a dict: popping a plain
        # dict's first key again and again rescans the deleted slots before it (O(n) each).
        self._free: OrderedDict[int, None] = OrderedDict()
        self._used: dict[int, int] = {}  # cached, referenced by in-flight requests
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._free) + len(self._used)

    def __contains__(self, h: int) -> bool:
        return h in self._used or h in self._free

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` are cached."""
        used, free = self._used, self._free
        if not hashes or (hashes[0] not in used and hashes[0] not in free):
            return 0
        lo, hi = 1, len(hashes)  # hashes[:lo] cached; hashes[hi:] not known to be
        while lo < hi:
            mid = (lo + hi + 1) // 2
            h = hashes[mid - 1]
            if h in used or h in free:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def acquire(self, hashes: Sequence[int]) -> list[int]:
        """A request dispatched here holds these blocks (cached from now on); returns those
        that were not cached before."""
        used, free = self._used, self._free
        new = []
        for h in hashes:
            if h in free:
                del free[h]
                used[h] = 1
            else:
                count = used.get(h)
                if count is None:
                    new.append(h)
                    used[h] = 1
                else:
                    used[h] = count + 1
        self._evict()
        return new

    def insert(self, hashes: Sequence[int]) -> None:
        """Blocks another proxy's request cached here: most recently used, not held (the
        request that holds them is that proxy's to track)."""
        used, free = self._used, self._free
        for h in reversed(hashes):
            if h not in used:
                free[h] = None
                free.move_to_end(h)
        self._evict()

    def remove(self, hashes: Sequence[int]) -> None:
        """The engine evicted these blocks (its KV events say so): forget those not held
        (a held block is one a dispatched request will cache again when it runs)."""
        free = self._free
        for h in hashes:
            if h in free:
                del free[h]

    def release(self, hashes: Sequence[int]) -> None:
        """The request ended: its blocks join the free queue, the last block first."""
        used, free = self._used, self._free
        for h in reversed(hashes):
            count = used.get(h)
            if count is None:
                continue  # forgotten meanwhile (clear)
            if count > 1:
                used[h] = count - 1
            else:
                del used[h]
                free[h] = None
        self._evict()

    def _evict(self) -> None:
        free = self._free
        excess = len(free) + len(self._used) - self.capacity
        while excess > 0 and free:
            free.popitem(last=False)
            self.evictions += 1
            excess -= 1

    def clear(self) -> None:
        """The instance restarted (or left): its cache is empty."""
        self._free.clear()
        self._used.clear()

    def describe(self) -> dict[str, int]:
        return {"blocks": len(self), "in_use": len(self._used), "capacity": self.capacity,
                "evictions": self.evictions}

    def snapshot(self) -> tuple[list[int], dict[int, int]]:
        """(free blocks oldest first, {held block: references}): for the twin tests."""
        return list(self._free), dict(self._used)


PrefixCache: Any = pick("PrefixCacheC", PrefixCachePy)


def cache_for_kv(num_gpu_blocks: int, block_size: int) -> Any:
    """A cache model the size of an instance's KV cache."""
    return PrefixCache(num_gpu_blocks * block_size // TOKENS_PER_BLOCK)


class EngineBlocks:
    """An instance's cache model driven by the engine's own KV events (exact mode).

    vLLM reports each block it caches (``BlockStored``: its hash, its parent's, its token
    ids) and each it evicts (``BlockRemoved``).  Its hashes cannot be computed here (a
    per-process seed, a hash of Python objects), so each stored block is given the proxy's
    own hash of the same token ids, chained from its parent's
    (:func:`blockproxy.routing.prefix.token_hashes`, the hash the proxy computes for a
    prompt it tokenized), and the engine's hash is kept to translate removals.  A block
    whose parent is unknown (stored before the proxy subscribed, or its event was lost)
    cannot be placed in the chain and is skipped: lookups then find less, never more.
    """

    def __init__(self, cache: Any, max_blocks: int) -> None:
        self.cache = cache
        #: engine hash -> the proxy's hash of the same block
        self.own: dict[Any, int] = {}
        #: more engine blocks than this means removals were lost: start over
        self.max_blocks = max(max_blocks, 1)
        self.stored_blocks = self.removed_blocks = self.orphans = self.resets = 0

    def stored(self, hashes: Sequence[Any], parent: Any, token_ids: Sequence[int],
               block_size: int) -> None:
        if block_size <= 0 or block_size % 2 or len(token_ids) < block_size * len(hashes):
            self.orphans += len(hashes)  # not blocks this model can hash
            return
        own = self.own
        parent_own = None
        if parent is not None:
            parent_own = own.get(parent)
            if parent_own is None:
                self.orphans += len(hashes)
                return
        mine = token_hashes(token_ids, block_size, parent_own, limit=len(hashes))
        for engine_hash, h in zip(hashes, mine):
            own[engine_hash] = h
        self.stored_blocks += len(mine)
        self.cache.insert(mine)
        if len(own) > self.max_blocks:
            self.cleared()
            self.resets += 1

    def removed(self, hashes: Sequence[Any]) -> None:
        own = self.own
        gone = [h for h in (own.pop(e, None) for e in hashes) if h is not None]
        self.removed_blocks += len(gone)
        self.cache.remove(gone)

    def cleared(self) -> None:
        self.own.clear()
        self.cache.clear()

    def describe(self) -> dict[str, int]:
        return {"engine_blocks": len(self.own), "stored": self.stored_blocks,
                "removed": self.removed_blocks, "orphans": self.orphans,
                "resets": self.resets}
