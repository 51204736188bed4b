"""Pure-Python twin of the compiled batch simulator (the reference semantics).

``_fastcore/_fastcore.pyx`` implements exactly the same algorithm, operation for
operation, so that both give bit-identical results (tested in ``tests/test_sim_diff.py``).
Change one, change the other.

What is simulated: one vLLM (V1 engine) instance, step by step from *now*, with the new
request appended to its queue.

* Every step has a token budget (``max_num_batched_tokens``) and a sequence cap
  (``max_num_seqs``).  Running requests are served first, in admission order: a decode
  computes one token, an unfinished prefill (or a recompute after preemption) computes a
  chunk of what remains, as much as the budget allows.  Then waiting requests are admitted
  FCFS while budget, sequence slots and KV blocks remain; none are admitted in a step
  that preempted.
* KV cache: ``num_gpu_blocks`` blocks of ``block_size`` tokens.  A request holds
  ``ceil(computed_tokens / block_size)`` blocks.  A running request that cannot get the
  blocks for its next chunk preempts the most recently admitted running request (which
  may be itself): it frees its blocks, forgets its computed tokens and goes back to the
  front of the waiting queue (recompute).
* Prefix caching: on admission, ``cached`` prompt tokens count as already computed (at
  most ``prompt - 1``: vLLM always computes the last prompt token).  The engine holds a
  prefix block that several requests use once; the rows hold it once each, so the
  model's ``shared_blocks`` (0 unless set: the duplicates among the requests in flight,
  as the proxy's prefix-cache model counts them) start free beside the unused blocks.
* A request whose computed tokens reach ``prompt + generated`` samples one output token at
  the end of that step; it finishes when it reaches its target length (the predicted
  output length, or ``generated + past_prediction_tokens`` once it is at or past the
  prediction) and frees its blocks.  No target lets a request's KV outgrow the whole
  cache (``prompt + target - 1 <= num_gpu_blocks * block_size``): vLLM's context limit
  guarantees that, and without the cap such a request would preempt itself forever.
* Step time = ``speed * (fixed + per_prefill_token * prefill_tokens + per_decode_seq *
  decode_seqs + per_context_token * context_tokens)``, where a decode is a request with
  output computing only its last sampled token, every other computed token is a prefill
  token, and ``context_tokens`` sums ``computed + new`` over the scheduled requests.
* Expected future arrivals (optional): ``arrival_limit`` requests of ``arrival_prompt``
  tokens (``arrival_cached`` of them cached) and ``arrival_output`` output tokens, the
  k-th (from 0) arriving at ``(k + 0.5) * arrival_interval`` seconds.  An arrival joins
  the back of the waiting queue at the start of the first step that begins at or after its
  time, as a request reaching the engine between two steps does.  They stand for the load
  the instance will receive while the new request runs (rate and mean sizes of its recent
  arrivals: :mod:`blockproxy.cluster.arrivals`), which slows every step of it.
* A late new request (optional, ``new_at`` > 0): the new request itself arrives
  ``new_at`` seconds from now, joining the waiting queue as an arrival does (behind the
  expected arrivals due by then), and its times are counted from its arrival.  With the
  expected arrivals it asks what a request would see once that load has run for a while
  (capacity planning, :mod:`blockproxy.cluster.autoscale`).  While nothing is running or
  waiting, the clock jumps to the next arrival.
* Fast-forward: when every running request is decoding, all fit in the budget and no
  waiting request can be admitted, the steps up to the one before the next finish (or
  before the KV cache runs out, or up to the last one that starts before the next
  arrival, the late new request's included) are advanced in closed form.

Stepping (``advance``): with no new request, the instance's own requests are simulated for
the steps that start within ``duration`` seconds, and the state is written back, so a
model of a whole cluster (:mod:`blockproxy.router_training`) can step every instance
from one arrival to the next.  Written back per row: ``COL_GENERATED``; ``COL_STARTED``
(1: in the running set at the end, 0: waiting, preempted ones included); for a running
request with no output yet, ``COL_CACHED`` becomes its computed prompt tokens, so the next
call resumes its prefill where it stopped (as its KV blocks would).  ``first`` and
``done`` get each row's first-token and finish times from now (``inf``: not within this
call); a finished row must be taken out before the next call (put back, it would run on
past its length, as a request past its prediction does).  Returns ``(clock, steps)``:
the time the last simulated step ended (past ``duration`` when one straddles it), or
``duration`` when the instance ran out of work first.

State columns (rows of the ``int64`` array ``state`` of shape ``(5, capacity)``; entries
``0..n-1`` are the instance's active requests in dispatch order):
``COL_PROMPT``, ``COL_CACHED``, ``COL_GENERATED``, ``COL_PREDICTED``, ``COL_STARTED``
(non-zero: admitted by the engine, i.e. in the running set).

``predict(state, n, new_prompt, new_cached, new_output, bound=inf, arrival_interval=inf,
arrival_prompt=0, arrival_cached=0, arrival_output=0, arrival_limit=0, new_at=0,
delay_weight=0, score_bound=inf, decode_delay=1, score_ttft=False)`` returns
``(ttft, e2e, queue_delay, preemptions, peak_blocks, steps, delay)``:
seconds from the new request's arrival (now, or ``new_at``) until its first token, until
its last token, and until it is first scheduled; preemptions during the simulation; the
largest number of KV blocks in use; engine steps simulated; and the latency the new
request adds to the others, in seconds summed over them.  ``delay`` is first-order: each
step the new request takes part in is longer by its share of the step-time model (its
prefill tokens or its decode sequence, and its context), and that makes every other
request in flight then (running or waiting, expected arrivals included) finish that much
later.  The delay to an other request already past its first token counts
``decode_delay`` times (in [0, 1]): 1 sums the others' end-to-end delays, 0 counts only
the others still before their first token (their time to first token is what it delays;
a decode's is already fixed), and a value between charges a decode's delay at a
fraction of a first token's.  A
slot, a token budget or KV blocks the new request takes from a waiting one are not
counted.  A request that can never be
served (it does not fit in the KV cache), a simulation longer than ``max_iterations`` loop
iterations, or one that can no longer end within ``bound`` seconds from now (a caller
that only wants to know whether this instance beats the best one so far) gives ``inf`` for
the times not reached.  A run can end no sooner than its clock plus one step per token the
new request still has to produce, each at least the fixed step time plus one prefill
token's or one decode sequence's share (whichever is less), and before its first token
its prompt tokens still to compute (the uncached ones) at the per-token prefill time, in
steps of at most the token budget, each at least the fixed step time (shrunk by a part in
10**9 for rounding), so it stops once that passes ``bound``.  So does one where that plus
``delay_weight`` times the delay so far passes ``score_bound``: the delay only grows, so
that sum is a lower bound of the score ``e2e + delay_weight * delay`` the run would end
with (``block --delay-weight``).  With ``score_ttft`` the score is ``ttft +
delay_weight * delay`` (``block_ttft``), bounded below by the clock until the first token
and by ``ttft`` after it.
"""

from __future__ import annotations

import math
from typing import Any

COL_PROMPT = 0
COL_CACHED = 1
COL_GENERATED = 2
COL_PREDICTED = 3
COL_STARTED = 4
NUM_COLUMNS = 5

#: Largest token count accepted in any field (keeps C's 64-bit sums far from overflow).
MAX_TOKENS = 1 << 40
#: No request holds more tokens than this, so a larger KV cache never limits a target.
KV_TOKENS_CAP = 1 << 42
#: Most expected future arrivals one simulation accepts.
MAX_ARRIVALS = 1 << 16
INF = math.inf


def kv_capacity_tokens(num_gpu_blocks: int, block_size: int) -> int:
    """Tokens the KV cache holds, saturated at :data:`KV_TOKENS_CAP` (no C overflow)."""
    if num_gpu_blocks > KV_TOKENS_CAP // block_size:
        return KV_TOKENS_CAP
    return num_gpu_blocks * block_size


def _ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b


class InstanceModelPy:
    """Simulator of one instance: its engine limits and step-time model (pure Python)."""

    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, num_gpu_blocks: int,
                 block_size: int, fixed_s: float, per_prefill_token_s: float,
                 per_decode_seq_s: float, per_context_token_s: float = 0.0,
                 speed: float = 1.0, past_prediction_tokens: int = 16,
                 max_iterations: int = 100_000, fast_forward: bool = True) -> None:
        for name, value in (("max_num_seqs", max_num_seqs),
                            ("max_num_batched_tokens", max_num_batched_tokens),
                            ("num_gpu_blocks", num_gpu_blocks), ("block_size", block_size),
                            ("past_prediction_tokens", past_prediction_tokens),
                            ("max_iterations", max_iterations)):
            if value < 1 or value > MAX_TOKENS:
                raise ValueError(f"{name} must be in [1, 2**40], got {value}")
        for name, fvalue in (("fixed_s", fixed_s), ("per_prefill_token_s", per_prefill_token_s),
                             ("per_decode_seq_s", per_decode_seq_s),
                             ("per_context_token_s", per_context_token_s), ("speed", speed)):
            if not (fvalue >= 0.0 and math.isfinite(fvalue)):
                raise ValueError(f"{name} must be a finite non-negative number, got {fvalue}")
        self.max_num_seqs = int(max_num_seqs)
        self.max_num_batched_tokens = int(max_num_batched_tokens)
        self.num_gpu_blocks = int(num_gpu_blocks)
        self.block_size = int(block_size)
        self.fixed_s = float(fixed_s)
        self.per_prefill_token_s = float(per_prefill_token_s)
        self.per_decode_seq_s = float(per_decode_seq_s)
        self.per_context_token_s = float(per_context_token_s)
        self.speed = float(speed)
        self.past_prediction_tokens = int(past_prediction_tokens)
        self.max_iterations = int(max_iterations)
        self.fast_forward = bool(fast_forward)
        #: KV blocks the rows count once each that the engine holds once (prefix blocks
        #: several requests share): free at the start beside the unused ones
        self.shared_blocks = 0

    def predict(self, state: Any, n: int, new_prompt: int, new_cached: int,
                new_output: int, bound: float = INF, arrival_interval: float = INF,
                arrival_prompt: int = 0, arrival_cached: int = 0, arrival_output: int = 0,
                arrival_limit: int = 0, new_at: float = 0.0, delay_weight: float = 0.0,
                score_bound: float = INF, decode_delay: float = 1.0,
                score_ttft: bool = False
                ) -> tuple[float, float, float, int, int, int, float]:
        """Simulate the instance holding ``state[:, :n]`` plus one new request arriving
        ``new_at`` seconds from now (and up to ``arrival_limit`` expected arrivals, one
        every ``arrival_interval`` seconds), until it can no longer end within ``bound``
        (its clock plus the least time its remaining tokens take) or that (with
        ``score_ttft``, the clock or, once known, the time to first token) plus
        ``delay_weight`` times the delay so far passes ``score_bound``; the delay to an
        other request past its first token counts ``decode_delay`` times."""
        if n < 0 or n > state.shape[1] or state.shape[0] < NUM_COLUMNS:
            raise ValueError(f"n={n} does not fit a state of shape {state.shape}")
        cols = state[:NUM_COLUMNS, :n].tolist()
        prompt_col = cols[COL_PROMPT] + [new_prompt]
        cached_col = cols[COL_CACHED] + [new_cached]
        gen_col = cols[COL_GENERATED] + [0]
        pred_col = cols[COL_PREDICTED] + [new_output]
        started_col = cols[COL_STARTED] + [0]
        m = n + 1
        for col in (prompt_col, cached_col, gen_col, pred_col, started_col):
            for value in col:
                if value < 0 or value > MAX_TOKENS:
                    raise ValueError(f"state values must be in [0, 2**40], got {value}")
        interval = float(arrival_interval)
        if not interval > 0.0:
            raise ValueError(f"arrival_interval must be positive, got {arrival_interval}")
        for value in (arrival_prompt, arrival_cached, arrival_output):
            if value < 0 or value > MAX_TOKENS:
                raise ValueError(f"arrival sizes must be in [0, 2**40], got {value}")
        if arrival_limit < 0 or arrival_limit > MAX_ARRIVALS:
            raise ValueError(f"arrival_limit must be in [0, 2**16], got {arrival_limit}")
        limit = int(arrival_limit) if math.isfinite(interval) else 0
        new_at = float(new_at)
        if not (new_at >= 0.0 and math.isfinite(new_at)):
            raise ValueError(f"new_at must be a finite non-negative number, got {new_at}")
        weight = float(delay_weight)
        if not (weight >= 0.0 and math.isfinite(weight)):
            raise ValueError(f"delay_weight must be a finite non-negative number, "
                             f"got {delay_weight}")
        decode_delay = float(decode_delay)
        if not 0.0 <= decode_delay <= 1.0:
            raise ValueError(f"decode_delay must be in [0, 1], got {decode_delay}")
        return self._run(m, prompt_col, cached_col, gen_col, pred_col, started_col,
                         float(bound), interval, int(arrival_prompt), int(arrival_cached),
                         int(arrival_output), limit, new_at, weight=weight,
                         score_bound=float(score_bound), decode_delay=decode_delay,
                         score_ttft=bool(score_ttft))

    def advance(self, state: Any, n: int, duration: float, first: Any, done: Any
                ) -> tuple[float, int]:
        """Simulate the instance's ``state[:, :n]`` for the steps that start within
        ``duration`` seconds, write the state back, and each row's first-token and finish
        times into ``first`` and ``done`` (see the module docstring)."""
        if n < 0 or n > state.shape[1] or state.shape[0] < NUM_COLUMNS:
            raise ValueError(f"n={n} does not fit a state of shape {state.shape}")
        if len(first) < n or len(done) < n:
            raise ValueError(f"first and done need room for {n} rows")
        duration = float(duration)
        if not (duration >= 0.0 and math.isfinite(duration)):
            raise ValueError(f"duration must be a finite non-negative number, got {duration}")
        cols = state[:NUM_COLUMNS, :n].tolist()
        for col in cols:
            for value in col:
                if value < 0 or value > MAX_TOKENS:
                    raise ValueError(f"state values must be in [0, 2**40], got {value}")
        record: dict[str, Any] = {}
        gen = cols[COL_GENERATED]
        self._run(n, cols[COL_PROMPT], cols[COL_CACHED], gen, cols[COL_PREDICTED],
                  cols[COL_STARTED], INF, until=duration, record=record)
        running = set(record["running"])
        comp = record["comp"]
        for i in range(n):
            state[COL_GENERATED, i] = gen[i]
            state[COL_STARTED, i] = 1 if i in running else 0
            if i in running and gen[i] == 0:
                state[COL_CACHED, i] = comp[i]
            first[i] = record["first"][i]
            done[i] = record["done"][i]
        return record["clock"], record["steps"]

    def _run(self, m: int, prompt_col: list[int], cached_col: list[int], gen: list[int],
             pred_col: list[int], started_col: list[int], bound: float,
             a_interval: float = INF, a_prompt: int = 0, a_cached: int = 0,
             a_output: int = 0, a_limit: int = 0, new_at: float = 0.0,
             until: float = INF, record: dict[str, Any] | None = None,
             weight: float = 0.0, score_bound: float = INF, decode_delay: float = 1.0,
             score_ttft: bool = False
             ) -> tuple[float, float, float, int, int, int, float]:
        """The simulation.  With ``record`` (stepping, :meth:`advance`) there is no new
        request: the ``m`` rows are the instance's own, steps start only before
        ``until``, and the end state and per-row times go into ``record``."""
        bs = self.block_size
        budget_cap = self.max_num_batched_tokens
        past = self.past_prediction_tokens
        fixed = self.fixed_s
        c_prefill = self.per_prefill_token_s
        c_decode = self.per_decode_seq_s
        c_context = self.per_context_token_s
        speed = self.speed
        new = m - 1 if record is None else -1
        stepping = record is not None
        first_at = [INF] * m
        done_at = [INF] * m
        kv_tokens = kv_capacity_tokens(self.num_gpu_blocks, bs)

        prompt = [0] * m
        cached = [0] * m
        target = [0] * m
        comp = [0] * m
        blocks = [0] * m
        running: list[int] = []
        waiting: list[int] = []  # front is index 0
        used = 0
        for i in range(m):
            p = prompt_col[i] if prompt_col[i] > 1 else 1
            prompt[i] = p
            c = cached_col[i]
            cached[i] = c if c < p - 1 else p - 1
            pr = pred_col[i] if pred_col[i] > 1 else 1
            tg = pr if gen[i] < pr else gen[i] + past
            fit = kv_tokens - p + 1
            if tg > fit:
                tg = fit if fit > 1 else 1
            target[i] = tg
            if started_col[i] != 0:
                if gen[i] > 0:
                    comp[i] = p + gen[i] - 1
                else:
                    comp[i] = cached[i]
                blocks[i] = _ceil_div(comp[i], bs)
                used += blocks[i]
                running.append(i)
            elif i != new or new_at <= 0.0:
                waiting.append(i)
        # the others still before their first token: the new request's steps delay each of
        # them by the step's share, each other one by ``decode_delay`` times that
        pending = sum(1 for i in range(m) if i != new and gen[i] == 0)
        free = self.num_gpu_blocks - used
        shared = self.shared_blocks
        if shared > 0:  # prefix blocks the rows hold (or will hold) once each, held once
            free += shared if shared < MAX_TOKENS else MAX_TOKENS
        peak = used
        # Every expected arrival is the same request; clamped as the others are.
        a_p = a_prompt if a_prompt > 1 else 1
        a_c = a_cached if a_cached < a_p - 1 else a_p - 1
        a_tg = a_output if a_output > 1 else 1
        fit = kv_tokens - a_p + 1
        if a_tg > fit:
            a_tg = fit if fit > 1 else 1
        arrived = 0
        next_at = 0.5 * a_interval
        joined = new_at <= 0.0  # the new request is in the queue

        t = 0.0
        ttft = INF
        e2e = INF
        queue_delay = INF
        preemptions = 0
        steps = 0
        delay = 0.0
        iterations = 0
        sched_idx: list[int] = []
        sched_new: list[int] = []
        # a step with the new request in it takes at least this long
        min_step = speed * (fixed + (c_prefill if c_prefill < c_decode else c_decode))
        # a step that computes prompt tokens takes at least this long, plus this per token
        step_fixed = speed * fixed
        token_prefill = speed * c_prefill
        while iterations < self.max_iterations:
            # Stop once the run can no longer end within ``bound``, or its score within
            # ``score_bound``.  A lower bound of the clock when the new request ends: a
            # step for each token it has still to produce, and before its first token its
            # prompt tokens still to compute, at most a budget a step, each step at least
            # the fixed time plus the per-token time of those it computes; shrunk by a
            # part in 10**9 so that rounding never puts it past the end.
            if new < 0:
                end = t
            elif gen[new] > 0:
                end = (t + min_step * float(target[new] - gen[new])) * (1.0 - 1e-9)
            else:
                left = prompt[new] - (comp[new] if comp[new] > cached[new] else cached[new])
                end = (t + (step_fixed * float((left + budget_cap - 1) // budget_cap)
                            + token_prefill * float(left))
                       + min_step * float(target[new] - 1)) * (1.0 - 1e-9)
            if not (end <= bound and ((ttft if ttft != INF else t) if score_ttft else end)
                    + weight * delay <= score_bound):
                break
            iterations += 1
            # ---- expected arrivals due by now join the waiting queue ----------------------
            while arrived < a_limit and t >= next_at:
                waiting.append(len(prompt))
                prompt.append(a_p)
                cached.append(a_c)
                target.append(a_tg)
                gen.append(0)
                comp.append(0)
                blocks.append(0)
                pending += 1
                arrived += 1
                next_at = (float(arrived) + 0.5) * a_interval
            if not joined and t >= new_at:
                waiting.append(new)
                joined = True
            if t >= until:
                break
            # ---- fast-forward a decode-only stretch --------------------------------------
            n_run = len(running)
            if self.fast_forward and n_run > 0 and n_run <= budget_cap:
                all_decode = True
                k_finish = MAX_TOKENS
                ctx_sum = 0
                new_comp = -1
                for r in running:
                    if r == new:
                        new_comp = comp[r]
                    if gen[r] == 0 or comp[r] != prompt[r] + gen[r] - 1:
                        all_decode = False
                        break
                    left = target[r] - gen[r]
                    if left < k_finish:
                        k_finish = left
                    ctx_sum += comp[r]
                if all_decode and k_finish > 2:
                    j = k_finish - 1
                    if self._decode_blocks_needed(running, comp, blocks, j) > free:
                        lo = 0
                        hi = j
                        while lo < hi:  # largest j with need(j) <= free
                            mid = (lo + hi + 1) // 2
                            if self._decode_blocks_needed(running, comp, blocks, mid) <= free:
                                lo = mid
                            else:
                                hi = mid - 1
                        j = lo
                    stop_at = next_at if arrived < a_limit else INF
                    if not joined and new_at < stop_at:
                        stop_at = new_at
                    if until < stop_at:
                        stop_at = until
                    if j > 1 and stop_at < INF:
                        # Only the steps that start before the next arrival: the largest
                        # jj < j whose start (jj steps on) is before it, then jj + 1 steps.
                        a = fixed + c_decode * float(n_run) + c_context * float(ctx_sum)
                        lo = 0
                        hi = j - 1
                        while lo < hi:
                            mid = (lo + hi + 1) // 2
                            start = t + speed * (float(mid) * a + c_context * (
                                float(n_run) * float(mid * (mid + 1) // 2)))
                            if start < stop_at:
                                lo = mid
                            else:
                                hi = mid - 1
                        j = lo + 1
                    admissible = False
                    if waiting and n_run < self.max_num_seqs and budget_cap - n_run > 0:
                        h = waiting[0]
                        total_h = prompt[h] + gen[h]
                        comp_h = cached[h] if cached[h] < total_h - 1 else total_h - 1
                        new_h = total_h - comp_h
                        if new_h > budget_cap - n_run:
                            new_h = budget_cap - n_run
                        free_after_1 = free - self._decode_blocks_needed(running, comp, blocks, 1)
                        admissible = _ceil_div(comp_h + new_h, bs) <= free_after_1
                    if j > 1 and not admissible:
                        need = self._decode_blocks_needed(running, comp, blocks, j)
                        a = fixed + c_decode * float(n_run) + c_context * float(ctx_sum)
                        b = c_context * (float(n_run) * float(j * (j + 1) // 2))
                        t += speed * (float(j) * a + b)
                        if new_comp >= 0:
                            # the new request's share of the j steps delays every other
                            # request in flight by as much
                            delay += speed * (float(j) * (c_decode + c_context * float(new_comp))
                                              + c_context * float(j * (j + 1) // 2)) * (
                                float(pending) + decode_delay * float(
                                    n_run - 1 + len(waiting) - pending))
                        for r in running:
                            comp[r] += j
                            gen[r] += j
                            nb = _ceil_div(comp[r], bs)
                            if nb > blocks[r]:
                                blocks[r] = nb
                        free -= need
                        if self.num_gpu_blocks - free > peak:
                            peak = self.num_gpu_blocks - free
                        steps += j
                        continue
            # ---- one engine step ------------------------------------------------------------
            budget = budget_cap
            sched_idx.clear()
            sched_new.clear()
            preempted = False
            i = 0
            while i < len(running) and budget > 0:
                r = running[i]
                num_new = prompt[r] + gen[r] - comp[r]
                if num_new > budget:
                    num_new = budget
                need = _ceil_div(comp[r] + num_new, bs) - blocks[r]
                if need < 0:
                    need = 0
                self_preempted = False
                while need > free:
                    victim = running.pop()
                    free += blocks[victim]
                    blocks[victim] = 0
                    comp[victim] = 0
                    waiting.insert(0, victim)
                    preemptions += 1
                    preempted = True
                    if victim == r:
                        self_preempted = True
                        break
                if self_preempted:
                    break
                free -= need
                blocks[r] += need
                sched_idx.append(r)
                sched_new.append(num_new)
                budget -= num_new
                i += 1
            if not preempted:
                while waiting and budget > 0 and len(running) < self.max_num_seqs:
                    h = waiting[0]
                    total_h = prompt[h] + gen[h]
                    comp_h = cached[h] if cached[h] < total_h - 1 else total_h - 1
                    num_new = total_h - comp_h
                    if num_new > budget:
                        num_new = budget
                    need = _ceil_div(comp_h + num_new, bs)
                    if need > free:
                        break
                    waiting.pop(0)
                    running.append(h)
                    comp[h] = comp_h
                    blocks[h] = need
                    free -= need
                    sched_idx.append(h)
                    sched_new.append(num_new)
                    budget -= num_new
                    if h == new and queue_delay == INF:
                        queue_delay = t - new_at
            if self.num_gpu_blocks - free > peak:
                peak = self.num_gpu_blocks - free
            if not sched_idx:
                if preempted:
                    continue
                if stepping:
                    break  # out of work (or none can ever run): the clock stops here
                if not running and not waiting and (arrived < a_limit or not joined):
                    # idle until the next arrival (the new request's, if it is next)
                    t = next_at if arrived < a_limit else INF
                    if not joined and new_at < t:
                        t = new_at
                    continue
                break  # nothing can ever run: the new request never finishes
            prefill_tokens = 0
            decode_seqs = 0
            ctx = 0
            d_new = -1.0
            for k in range(len(sched_idx)):
                r = sched_idx[k]
                if gen[r] > 0 and comp[r] == prompt[r] + gen[r] - 1:
                    decode_seqs += 1
                    if r == new:
                        d_new = c_decode + c_context * float(comp[r] + sched_new[k])
                else:
                    prefill_tokens += sched_new[k]
                    if r == new:
                        d_new = (c_prefill * float(sched_new[k])
                                 + c_context * float(comp[r] + sched_new[k]))
                ctx += comp[r] + sched_new[k]
            t += speed * (fixed + c_prefill * float(prefill_tokens)
                          + c_decode * float(decode_seqs) + c_context * float(ctx))
            if d_new >= 0.0:
                delay += speed * d_new * (float(pending) + decode_delay * float(
                    len(running) - 1 + len(waiting) - pending))
            steps += 1
            finished_any = False
            for k in range(len(sched_idx)):
                r = sched_idx[k]
                comp[r] += sched_new[k]
                if comp[r] == prompt[r] + gen[r]:
                    gen[r] += 1
                    if gen[r] == 1 and r != new:
                        pending -= 1
                    if r == new and ttft == INF:
                        ttft = t - new_at
                    if stepping and gen[r] == 1:
                        first_at[r] = t
                    if gen[r] >= target[r]:
                        free += blocks[r]
                        blocks[r] = 0
                        finished_any = True
                        if r == new:
                            e2e = t - new_at
                        if stepping:
                            done_at[r] = t
            if e2e != INF:
                break
            if finished_any:
                running = [r for r in running if gen[r] < target[r]]
        if record is not None:
            record.update(running=running, comp=comp, first=first_at, done=done_at,
                          clock=t if t > until else until, steps=steps)
        return ttft, e2e, queue_delay, preemptions, peak, steps, delay

    def _decode_blocks_needed(self, running: list[int], comp: list[int], blocks: list[int],
                              j: int) -> int:
        """KV blocks the running decodes must allocate to advance ``j`` steps."""
        bs = self.block_size
        need = 0
        for r in running:
            extra = _ceil_div(comp[r] + j, bs) - blocks[r]
            if extra > 0:
                need += extra
        return need
