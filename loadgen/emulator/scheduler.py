"""The continuous-batching scheduler of one emulated instance (vLLM V1 semantics).

Synchronous and clock-free, so it can be tested step by step.  Each step:

1. running requests first, in admission order: a decode takes one token, an unfinished
   prefill (or a recompute after preemption) takes a chunk of its remaining tokens up to
   the remaining token budget.  A request that cannot get KV blocks preempts the most
   recently admitted running request (possibly itself), which frees its blocks and goes
   to the front of the waiting queue, to be recomputed (prompt + output so far);
2. then, unless this step preempted, waiting requests FCFS while budget, sequence slots
   and KV blocks remain; the longest cached prefix of full prompt blocks counts as
   already computed (never the whole prompt: the last token is always computed).

When a request's computed tokens reach prompt + output it samples one token at the end
of the step.  The engine (``engine.py``) times the steps and wakes the HTTP handlers.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Hashable, Sequence

from loadgen.emulator.kvcache import KVCache, prompt_block_hashes
from loadgen.emulator.profiles import EngineLimits

WAITING, RUNNING, FINISHED = 0, 1, 2


class EngineRequest:
    """One request's state inside the engine, and its channel to the HTTP handler."""

    __slots__ = (
        "aborted",
        "arrival_time",
        "block_hashes",
        "blocks",
        "finish_reason_if_done",
        "first_token_time",
        "last_token_time",
        "num_cached_tokens",
        "num_computed",
        "num_hashed_blocks",
        "num_output",
        "num_preemptions",
        "num_prompt_tokens",
        "output_len",
        "prompt",
        "request_id",
        "state",
        "waiter",
    )

    def __init__(self, request_id: str, prompt_tokens: Sequence[Hashable], output_len: int,
                 finish_reason: str, block_size: int, arrival_time: float = 0.0) -> None:
        self.request_id = request_id
        self.num_prompt_tokens = len(prompt_tokens)
        self.prompt = prompt_tokens  # the KV events' token ids of stored blocks
        self.block_hashes = prompt_block_hashes(prompt_tokens, block_size)
        #: tokens to generate before finishing, and the reason reported then
        self.output_len = output_len
        self.finish_reason_if_done = finish_reason
        self.num_computed = 0
        self.num_output = 0
        self.blocks: list[int] = []
        self.num_hashed_blocks = 0
        self.state = WAITING
        self.aborted = False
        self.arrival_time = arrival_time
        self.first_token_time = 0.0
        self.last_token_time = 0.0
        self.num_cached_tokens = 0
        self.num_preemptions = 0
        #: future the HTTP handler awaits; the engine resolves it when tokens arrive
        self.waiter: asyncio.Future[None] | None = None

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens so far: what must be computed before sampling."""
        return self.num_prompt_tokens + self.num_output

    @property
    def finished(self) -> bool:
        return self.state == FINISHED

    def wake(self) -> None:
        """Resolve the handler's waiter, if any (called after the engine changed state)."""
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)


class StepPlan:
    """What one step computes: (request, tokens) pairs and the step-time features."""

    __slots__ = (
        "context_tokens",
        "decode_seqs",
        "num_preempted",
        "prefill_tokens",
        "scheduled",
    )

    def __init__(self) -> None:
        self.scheduled: list[tuple[EngineRequest, int]] = []
        self.prefill_tokens = 0
        self.decode_seqs = 0
        self.context_tokens = 0
        self.num_preempted = 0


class Scheduler:
    """Waiting queue, running batch and KV cache of one instance."""

    def __init__(self, limits: EngineLimits) -> None:
        self.limits = limits
        self.kv = KVCache(limits.num_gpu_blocks, limits.block_size)
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        self._aborted: list[EngineRequest] = []
        # Counters read by /metrics.
        self.num_preemptions = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.num_aborted = 0

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self._aborted)

    def add(self, req: EngineRequest) -> None:
        """Queue a new request (FCFS)."""
        self.waiting.append(req)

    def abort(self, req: EngineRequest) -> None:
        """Mark ``req`` aborted; it leaves the batch or queue at the next step boundary."""
        if req.state != FINISHED and not req.aborted:
            req.aborted = True
            self._aborted.append(req)

    def _drop_aborted(self) -> None:
        for req in self._aborted:
            if req.state == RUNNING:
                self.running.remove(req)
                self.kv.free(req)
            elif req.state == WAITING:
                try:
                    self.waiting.remove(req)
                except ValueError:
                    pass
                self.kv.free(req)
            req.state = FINISHED
            self.num_aborted += 1
            req.wake()
        self._aborted.clear()

    def _preempt_last(self) -> EngineRequest:
        victim = self.running.pop()
        self.kv.free(victim)
        victim.num_computed = 0
        victim.state = WAITING
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)
        return victim

    def schedule(self) -> StepPlan:
        """Choose the next step's batch (mutates queues and KV cache)."""
        if self._aborted:
            self._drop_aborted()
        plan = StepPlan()
        scheduled = plan.scheduled
        budget = self.limits.max_num_batched_tokens
        kv = self.kv
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            num_new = min(req.num_tokens - req.num_computed, budget)
            if kv.allocate(req, req.num_computed + num_new):
                scheduled.append((req, num_new))
                budget -= num_new
                i += 1
                continue
            preempted_self = False
            while True:
                victim = self._preempt_last()
                plan.num_preempted += 1
                if victim is req:
                    preempted_self = True
                    break
                if kv.allocate(req, req.num_computed + num_new):
                    break
            if preempted_self:
                break
            scheduled.append((req, num_new))
            budget -= num_new
            i += 1
        if not plan.num_preempted:
            self._admit_waiting(plan, budget)
        for req, num_new in scheduled:
            if num_new == 1 and req.num_output and req.num_computed == req.num_tokens - 1:
                plan.decode_seqs += 1
            else:
                plan.prefill_tokens += num_new
            plan.context_tokens += req.num_computed + num_new
        return plan

    def _admit_waiting(self, plan: StepPlan, budget: int) -> None:
        waiting = self.waiting
        running = self.running
        kv = self.kv
        bs = self.limits.block_size
        max_seqs = self.limits.max_num_seqs
        while waiting and budget > 0 and len(running) < max_seqs:
            req = waiting[0]
            num_tokens = req.num_tokens
            cached = kv.lookup(req.block_hashes, (num_tokens - 1) // bs)
            num_cached = len(cached) * bs
            num_new = min(num_tokens - num_cached, budget)
            if not kv.allocate(req, num_cached + num_new, cached):
                break
            waiting.popleft()
            req.num_computed = num_cached
            req.state = RUNNING
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_cached
            self.prefix_queries += num_tokens
            self.prefix_hits += num_cached
            running.append(req)
            plan.scheduled.append((req, num_new))
            budget -= num_new

    def complete(self, plan: StepPlan, now: float) -> list[EngineRequest]:
        """Apply a finished step: advance computed tokens, sample, finish requests.

        Returns the requests that sampled a token (their handlers must be woken).
        """
        sampled: list[EngineRequest] = []
        any_finished = False
        for req, num_new in plan.scheduled:
            if req.aborted:  # it leaves the batch at the next step boundary
                continue
            req.num_computed += num_new
            if req.num_computed < req.num_tokens:
                continue
            req.num_output += 1
            if req.num_output == 1:
                req.first_token_time = now
                self.prompt_tokens += req.num_prompt_tokens
            self.generation_tokens += 1
            sampled.append(req)
            if req.num_output >= req.output_len:
                req.state = FINISHED
                self.kv.free(req)
                any_finished = True
        if any_finished:
            self.running = [r for r in self.running if r.state == RUNNING]
        return sampled
