"""The requests active on one instance, as the columnar table the simulator reads.

:class:`RequestTable` keeps one column per active request of an instance (rows as in
:mod:`blockproxy.simulator`) in dispatch order, so the simulator reads it with no
per-request Python objects, and one :class:`Entry` per column for the proxy's own
bookkeeping.  It is synchronous and deterministic: a request is reserved at dispatch (so
the next decision, a microsecond later, already sees it), progresses while it streams, and
is released when it ends, whatever the policy.

Requests of other proxies (learned by gossip) and phantom requests (load seen in an
instance's ``/metrics`` that no proxy accounts for) live in the same table, as entries
whose ``origin`` is not :data:`LOCAL`, appended when learned; the simulator sees them at
no cost.  The load measures of the baseline policies (unprocessed tokens, Llumnix's KV
headroom) are computed here, from the same table.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from blockproxy import simulator
from blockproxy.cluster.arrivals import ArrivalProcess
from blockproxy.compiled import pick

if TYPE_CHECKING:
    from blockproxy.cluster.instance import Instance

#: ``Entry.origin`` of this proxy's own requests and of phantom (unexplained) load
LOCAL = 0
PHANTOM = 1


@dataclass(eq=False)
class Entry:
    """One in-flight request on one instance."""

    instance: Instance
    slot: int
    prompt_tokens: int
    predicted_tokens: int
    dispatched_at: float
    predicted_ttft: float = math.nan
    predicted_e2e: float = math.nan
    predicted_queue_delay: float = math.nan
    #: predicted e2e with the output length at its high quantile (nan: none predicted)
    predicted_e2e_high: float = math.nan
    #: the instance's per-request overhead included in those predictions
    overhead_s: float = 0.0
    first_token_at: float = 0.0
    generated: int = 0
    #: calibration span: start time, tokens since, and the instance's arrival count then
    span_start_at: float = 0.0
    span_tokens: int = 0
    span_epoch: int = -1
    released: bool = False
    #: False for non-streaming requests: their progress is estimated, not observed.
    observed: bool = True
    #: LOCAL, PHANTOM or the gossip origin id of the proxy that owns the request
    origin: int = LOCAL
    #: the owner's request id (gossip key with ``origin``)
    rid: int = 0
    #: prefix block hashes held in the instance's cache model while in flight
    blocks: list[int] | None = None
    #: those of ``blocks`` the cache model did not hold before this request (gossiped)
    new_blocks: list[int] | None = None
    #: prompt tokens predicted to be in the instance's prefix cache at dispatch
    cached_tokens: int = 0
    #: seconds the request was held for admission before its dispatch
    held_s: float = 0.0
    #: its model's TTFT objective, seconds (0: none): its first token is counted against it
    slo_ttft: float = 0.0


class RequestListener(Protocol):
    """Told of this proxy's own reserves and releases (the gossiper)."""

    def reserved(self, entry: Entry) -> None: ...

    def released(self, entry: Entry) -> None: ...


def table_loads_py(state: np.ndarray, n: int, block_size: int) -> tuple[int, ...]:
    """One pass over the first ``n`` columns of a request table: ``(waiting, their
    prompt tokens, their cached tokens, their predicted output tokens, output tokens still
    expected (max(predicted - generated, 1), summed over all), running, KV blocks of the
    running, KV blocks of the waiting)``, a request's blocks being its prompt and generated
    tokens in ``block_size`` blocks (0: not counted).  The twin of
    ``blockproxy._fastcore.table_loads``: the load measures of the baseline policies,
    without a dozen NumPy calls per instance and decision."""
    if block_size < 0:
        raise ValueError(f"block_size must be >= 0, got {block_size}")
    if not 0 <= n <= state.shape[1] or state.shape[0] < simulator.NUM_COLUMNS:
        raise ValueError(f"n={n} does not fit a state of shape {state.shape}")
    t = state[:, :n]
    waiting = t[simulator.COL_STARTED] == 0
    count = int(waiting.sum())
    remaining = int(np.maximum(t[simulator.COL_PREDICTED] - t[simulator.COL_GENERATED],
                               1).sum())
    used = wanted = 0
    if block_size > 0:
        blocks = (t[simulator.COL_PROMPT] + t[simulator.COL_GENERATED] + block_size - 1
                  ) // block_size
        used, wanted = int(blocks[~waiting].sum()), int(blocks[waiting].sum())
    return (count, int(t[simulator.COL_PROMPT][waiting].sum()),
            int(t[simulator.COL_CACHED][waiting].sum()),
            int(t[simulator.COL_PREDICTED][waiting].sum()), remaining, n - count, used, wanted)


table_loads: Callable[[np.ndarray, int, int], tuple[int, ...]] = pick("table_loads",
                                                                       table_loads_py)


class RequestTable:
    """The active requests of one instance: the simulator's table and their entries."""

    def __init__(self, owner: Instance, capacity: int = 64, arrival_window: float = 30.0,
                 arrival_limit: int = 256) -> None:
        self.owner = owner
        #: the recent arrivals here (own and gossiped), for the simulator's future load
        self.recent = ArrivalProcess(arrival_window, arrival_limit)
        self.table = np.zeros((simulator.NUM_COLUMNS, capacity), dtype=np.int64)
        self.n = 0
        self.entries: list[Entry] = []
        #: requests dispatched here that have not produced their first token yet
        self.unstarted = 0
        #: requests ever added here: a change means a prefill may have joined the batch
        self.arrivals = 0
        #: remote and phantom entries by (origin, rid)
        self.remote: dict[tuple[int, int], Entry] = {}
        #: prompt tokens of other proxies' requests here that they predicted cached
        self.remote_cached = 0
        self.listener: RequestListener | None = None

    # ---- the proxy's own requests -------------------------------------------------------------
    def reserve(self, prompt_tokens: int, predicted_tokens: int, now: float,
                cached_tokens: int = 0, blocks: list[int] | None = None,
                new_blocks: list[int] | None = None) -> Entry:
        """Record a request dispatched here (it is waiting until its first token), of
        whose prompt ``cached_tokens`` are probably in the prefix cache; ``blocks`` are its
        prefix blocks (``new_blocks`` those not cached before), held while it runs."""
        entry = self._append(prompt_tokens, predicted_tokens, now, cached_tokens)
        self.recent.record(now, prompt_tokens, cached_tokens, predicted_tokens)
        entry.blocks, entry.new_blocks = blocks, new_blocks
        entry.cached_tokens = cached_tokens
        if self.listener is not None:
            self.listener.reserved(entry)
        return entry

    def _append(self, prompt_tokens: int, predicted_tokens: int, now: float,
                cached_tokens: int = 0) -> Entry:
        if self.n == self.table.shape[1]:
            grown = np.zeros((simulator.NUM_COLUMNS, 2 * self.n), dtype=np.int64)
            grown[:, :self.n] = self.table
            self.table = grown
        slot = self.n
        col = self.table[:, slot]
        col[simulator.COL_PROMPT] = prompt_tokens
        col[simulator.COL_CACHED] = cached_tokens
        col[simulator.COL_GENERATED] = 0
        col[simulator.COL_PREDICTED] = predicted_tokens
        col[simulator.COL_STARTED] = 0
        self.n += 1
        self.unstarted += 1
        self.arrivals += 1
        entry = Entry(self.owner, slot, prompt_tokens, predicted_tokens, now)
        self.entries.append(entry)
        return entry

    def first_token(self, entry: Entry, now: float) -> None:
        """The request produced its first token: it is running."""
        entry.first_token_at = now
        entry.generated = 1
        self.unstarted -= 1
        self.table[simulator.COL_STARTED, entry.slot] = 1
        self.table[simulator.COL_GENERATED, entry.slot] = 1

    def add_tokens(self, entry: Entry, tokens: int) -> None:
        """The request produced ``tokens`` more output tokens."""
        entry.generated += tokens
        self.table[simulator.COL_GENERATED, entry.slot] = entry.generated

    def release(self, entry: Entry) -> None:
        """The request ended (finished, failed or cancelled): drop it, keeping the order."""
        if entry.released:
            return
        entry.released = True
        if entry.origin != LOCAL:
            self.remote.pop((entry.origin, entry.rid), None)
            if entry.cached_tokens and entry.origin != PHANTOM:
                self.remote_cached -= entry.cached_tokens
                self.owner.update_shared()
        elif self.listener is not None:
            self.listener.released(entry)
        if not entry.first_token_at:
            self.unstarted -= 1
        i = entry.slot
        n = self.n
        if i < n - 1:
            self.table[:, i:n - 1] = self.table[:, i + 1:n]
        del self.entries[i]
        for later in self.entries[i:]:
            later.slot -= 1
        self.n = n - 1

    # ---- other proxies' requests and phantom load ---------------------------------------------
    def upsert_remote(self, origin: int, rid: int, prompt_tokens: int, predicted_tokens: int,
                      started: int, generated: int, now: float, cached_tokens: int = 0
                      ) -> Entry:
        """Add or update another proxy's (or a phantom) request, appended when new;
        ``cached_tokens``: its prompt tokens the origin expects the prefix cache to serve."""
        entry = self.remote.get((origin, rid))
        if entry is None:
            cached_tokens = max(min(cached_tokens, prompt_tokens - 1), 0)
            entry = self._append(prompt_tokens, predicted_tokens, now, cached_tokens)
            entry.cached_tokens = cached_tokens
            entry.origin, entry.rid = origin, rid
            self.remote[(origin, rid)] = entry
            if origin != PHANTOM:
                self.recent.record(now, prompt_tokens, cached_tokens, predicted_tokens)
                if cached_tokens:
                    self.remote_cached += cached_tokens
                    self.owner.update_shared()
        elif entry.prompt_tokens != prompt_tokens or entry.predicted_tokens != predicted_tokens:
            entry.prompt_tokens, entry.predicted_tokens = prompt_tokens, predicted_tokens
            self.table[simulator.COL_PROMPT, entry.slot] = prompt_tokens
            self.table[simulator.COL_PREDICTED, entry.slot] = predicted_tokens
        if started and not entry.first_token_at:
            entry.first_token_at = now
            self.unstarted -= 1
            self.table[simulator.COL_STARTED, entry.slot] = 1
        entry.generated = generated
        self.table[simulator.COL_GENERATED, entry.slot] = generated
        return entry

    def remove_remote(self, origin: int, rid: int) -> None:
        """Another proxy's (or a phantom) request ended."""
        entry = self.remote.get((origin, rid))
        if entry is not None:
            self.release(entry)

    def by_origin(self) -> dict[int, int]:
        """Active entries per origin (LOCAL, PHANTOM or a gossip origin id)."""
        out: dict[int, int] = {}
        for entry in self.entries:
            out[entry.origin] = out.get(entry.origin, 0) + 1
        return out

    def of_origin(self, origin: int) -> list[Entry]:
        """The entries of one origin, in dispatch order."""
        return [e for e in self.entries if e.origin == origin]

    def estimate_progress(self, now: float) -> None:
        """Advance unobserved (non-streaming) requests along their own prediction.

        Nothing comes back from a non-streaming request until it ends; without this the
        simulator would think it is still waiting to start long after it began decoding.
        """
        for entry in self.entries:
            if entry.observed or not math.isfinite(entry.predicted_ttft):
                continue
            elapsed = now - entry.dispatched_at
            if elapsed < entry.predicted_ttft:
                continue
            if not entry.first_token_at:
                self.owner.first_token(entry, entry.dispatched_at + entry.predicted_ttft)
            decode_time = entry.predicted_e2e - entry.predicted_ttft
            if entry.predicted_tokens > 1 and decode_time > 0:
                per_token = decode_time / (entry.predicted_tokens - 1)
                tokens = 1 + int((elapsed - entry.predicted_ttft) / per_token)
                if tokens > entry.generated:
                    self.add_tokens(entry, tokens - entry.generated)

    # ---- load measures ------------------------------------------------------------------------
    def waiting(self) -> int:
        """Requests not yet running (no first token seen)."""
        return int((self.table[simulator.COL_STARTED, :self.n] == 0).sum())

    def waiting_sizes(self) -> tuple[int, int, int, int]:
        """The requests not yet running: (count, and their prompt, cached and predicted
        output tokens summed)."""
        count, prompt, cached, predicted = table_loads(self.table, self.n, 0)[:4]
        return count, prompt, cached, predicted

    def sizes(self, exclude_origin: int | None = None) -> tuple[int, int, int]:
        """(prompt tokens, predicted output tokens, count) summed over the entries."""
        cols = [e.slot for e in self.entries if e.origin != exclude_origin]
        if not cols:
            return 0, 0, 0
        t = self.table
        return (int(t[simulator.COL_PROMPT, cols].sum()),
                int(t[simulator.COL_PREDICTED, cols].sum()), len(cols))

    def unprocessed_tokens(self) -> int:
        """Prompt tokens not yet computed plus output tokens still expected."""
        loads = table_loads(self.table, self.n, 0)
        return loads[1] + loads[4]

    def pending_prefill_tokens(self) -> int:
        """Prompt tokens still to compute: requests without a first token, less what of
        their prompts was cached."""
        loads = table_loads(self.table, self.n, 0)
        return loads[1] - loads[2]

    def kv_headroom(self, num_gpu_blocks: int, block_size: int) -> float:
        """Llumnix's load metric: (free blocks - blocks wanted by waiting) / running."""
        loads = table_loads(self.table, self.n, block_size)
        return (num_gpu_blocks - loads[6] - loads[7]) / max(loads[5], 1)
