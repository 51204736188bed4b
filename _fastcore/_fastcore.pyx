"""Compiled batch simulator: :class:`InstanceModelC`.

A port of :class:`blockproxy.simulator.reference.InstanceModelPy`, whose docstring holds the
semantics.  Both must give bit-identical results (``tests/test_sim_diff.py``), so every
floating-point expression here has the same operands, order and int-to-double conversions
as in the twin (the extension is compiled with ``-ffp-contract=off``: no fused
multiply-add).  Change one, change the other.

The simulation loop is a ``nogil`` C function (so Cython rejects any Python object in
it): it works on request records and index arrays in a scratch buffer that the model
keeps and grows as needed.  The GIL stays held during ``predict()``, so calls on one
model never overlap.
The waiting queue is ``waiting[head:tail]``: it loses its front (admission), gains a new
front (preemption) or a new back (an expected arrival).  It starts at ``head = `` the
initially running count and ``tail = m``; a preemption needs a request that was running
first, so ``head`` never goes below 0, and ``tail`` reaches at most ``m`` plus the
arrivals, the number of request records.  The running set is a plain array (admission order), popped from its end on
preemption and compacted in place when requests finish.
"""

from libc.stdint cimport int64_t
from _fastcore cimport Outcome, Req, Scratch
from libc.stdlib cimport free, malloc, realloc
from libc.math cimport INFINITY

import math

cdef extern from *:
    """
    #include <math.h>
    #include <stdint.h>

    /* float(j * (j + 1) // 2) exactly as Python computes it: the triangular number is
       formed exactly (it needs up to 81 bits for j < 2**41) and rounded once, to nearest
       with ties to even, as Python's int -> float conversion does. */
    static double bp_tri_as_double(int64_t j) {
        uint64_t a, b, a_lo, a_hi, b_lo, b_hi, p0, p1, p2, p3, mid, lo, hi, v;
        int bits, shift;
        if (j <= 3037000498LL)  /* j * (j + 1) < 2**63 */
            return (double)(j * (j + 1) / 2);
        if (j % 2 == 0) { a = (uint64_t)(j / 2); b = (uint64_t)j + 1; }
        else { a = (uint64_t)j; b = ((uint64_t)j + 1) / 2; }
        a_lo = a & 0xffffffffu; a_hi = a >> 32; b_lo = b & 0xffffffffu; b_hi = b >> 32;
        p0 = a_lo * b_lo; p1 = a_lo * b_hi; p2 = a_hi * b_lo; p3 = a_hi * b_hi;
        mid = (p0 >> 32) + (p1 & 0xffffffffu) + (p2 & 0xffffffffu);
        lo = (p0 & 0xffffffffu) | (mid << 32);
        hi = p3 + (p1 >> 32) + (p2 >> 32) + (mid >> 32);
        if (hi == 0 && (lo >> 63) == 0)
            return (double)(int64_t)lo;
        /* a, b < 2**63, so hi < 2**62: normalise to 63 bits, keep a sticky bit for the
           dropped ones (below the 53-bit rounding point), convert (signed, correctly
           rounded), scale back exactly. */
        bits = 0;
        while ((hi >> bits) != 0) bits++;
        shift = bits + 1;
        v = (hi << (64 - shift)) | (lo >> shift);
        if ((lo & ((((uint64_t)1) << shift) - 1)) != 0) v |= 1;
        return ldexp((double)(int64_t)v, shift);
    }
    """
    double bp_tri_as_double(int64_t j) noexcept nogil

cdef extern from *:
    """
    #define bp_prefetch(p) __builtin_prefetch((const void*)(p))
    """
    void bp_prefetch(const void* p) noexcept nogil

cdef int NUM_COLUMNS = 5
cdef int64_t MAX_TOKENS = (<int64_t>1) << 40
# No request holds more tokens than this, so a larger KV cache never limits a target.
cdef int64_t KV_TOKENS_CAP = (<int64_t>1) << 42
cdef int64_t MAX_ARRIVALS = (<int64_t>1) << 16


cdef inline int64_t ceil_div(int64_t a, int64_t b, int shift) noexcept nogil:
    # ceil(a / b) for a >= 0, b >= 1 (C's truncating division then matches Python's //);
    # shift >= 0 means b == 2**shift, the usual block size, and spares the division.
    if shift >= 0:
        return (a + b - 1) >> shift
    return (a + b - 1) // b


cdef inline double end_at_least(double t, const Req* req, int64_t new, double min_step,
                                double step_fixed, double token_prefill,
                                int64_t budget) noexcept nogil:
    """A lower bound of the clock when the new request ends: a step for each token it has
    still to produce, of at least ``min_step`` each, and before its first token its prompt
    tokens still to compute, at most ``budget`` a step, each step at least ``step_fixed``
    plus ``token_prefill`` per token; shrunk by a part in 10**9 so that rounding never
    puts it past the end (twin: ``end`` in ``_run``)."""
    cdef int64_t done, left
    if new < 0:
        return t
    if req[new].gen > 0:
        return (t + min_step * <double>(req[new].target - req[new].gen)) * (1.0 - 1e-9)
    done = req[new].comp if req[new].comp > req[new].cached else req[new].cached
    left = req[new].prompt - done
    return (t + (step_fixed * <double>((left + budget - 1) // budget)
                 + token_prefill * <double>left)
            + min_step * <double>(req[new].target - 1)) * (1.0 - 1e-9)


cdef inline bint is_decode(const Req* q) noexcept nogil:
    """Whether a scheduled request's step is a decode: it has computed every token but
    its last output (otherwise the step computes prompt or recomputed tokens)."""
    return q.gen > 0 and q.comp == q.prompt + q.gen - 1


cdef inline int power_of_two_shift(int64_t b) noexcept nogil:
    """log2(b) when b is a power of two, else -1."""
    cdef int shift = 0
    if b & (b - 1):
        return -1
    while (<int64_t>1 << shift) != b:
        shift += 1
    return shift


cdef inline int64_t decode_blocks_needed(const Req* req, const int64_t* running,
                                         Py_ssize_t n_run, int64_t bs, int bs_shift,
                                         int64_t j) noexcept nogil:
    """KV blocks the running decodes must allocate to advance ``j`` steps."""
    cdef int64_t need = 0
    cdef int64_t extra
    cdef Py_ssize_t k
    for k in range(n_run):
        extra = (ceil_div(req[running[k]].comp + j, bs, bs_shift)
                 - req[running[k]].blocks)
        if extra > 0:
            need += extra
    return need


cdef int64_t token_arg(object value) except? -2:
    """A new request's field as int64, or -1 (rejected later, in the twin's order)."""
    cdef int64_t x
    try:
        x = value
    except OverflowError:
        return -1
    if x < 0 or x > MAX_TOKENS:
        return -1
    return x


cdef Py_ssize_t rows_of(object n, Py_ssize_t columns, Py_ssize_t capacity,
                        object state) except -1:
    """``n`` as the count of a state's rows in use, or the twin's ValueError."""
    cdef Py_ssize_t nn
    try:
        nn = n
    except OverflowError:
        nn = -1
    if nn < 0 or nn > capacity or columns < NUM_COLUMNS:
        raise ValueError(f"n={n} does not fit a state of shape {state.shape}")
    return nn


cdef Py_ssize_t first_bad_value(const int64_t* row, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if row[i] < 0 or row[i] > MAX_TOKENS:
            return i
    return -1


cdef class InstanceModelC:
    """Simulator of one instance: its engine limits and step-time model (compiled).

    Same constructor, attributes and :meth:`predict` as
    :class:`blockproxy.simulator.reference.InstanceModelPy`; ``speed``, ``fast_forward`` and
    ``shared_blocks`` can be changed on a live model, the other attributes are read-only.
    """

    cdef readonly int64_t max_num_seqs
    cdef readonly int64_t max_num_batched_tokens
    cdef readonly int64_t num_gpu_blocks
    cdef readonly int64_t block_size
    cdef readonly double fixed_s
    cdef readonly double per_prefill_token_s
    cdef readonly double per_decode_seq_s
    cdef readonly double per_context_token_s
    cdef public double speed
    cdef readonly int64_t past_prediction_tokens
    cdef readonly int64_t max_iterations
    cdef public bint fast_forward
    cdef public int64_t shared_blocks

    cdef void* _buf           # scratch memory, grown as needed, freed in __dealloc__
    cdef Py_ssize_t _buf_cap  # requests the scratch memory has room for
    cdef Scratch _s           # the arrays carved out of _buf

    def __cinit__(self, *args, **kwargs):
        self._buf = NULL
        self._buf_cap = 0

    def __init__(self, max_num_seqs, max_num_batched_tokens, num_gpu_blocks,
                 block_size, fixed_s, per_prefill_token_s,
                 per_decode_seq_s, per_context_token_s=0.0,
                 speed=1.0, past_prediction_tokens=16,
                 max_iterations=100_000, fast_forward=True):
        for name, value in (("max_num_seqs", max_num_seqs),
                            ("max_num_batched_tokens", max_num_batched_tokens),
                            ("num_gpu_blocks", num_gpu_blocks), ("block_size", block_size),
                            ("past_prediction_tokens", past_prediction_tokens),
                            ("max_iterations", max_iterations)):
            if value < 1 or value > (1 << 40):
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
        self.shared_blocks = 0

    def __dealloc__(self):
        free(self._buf)

    def __reduce__(self):
        return (type(self), (self.max_num_seqs, self.max_num_batched_tokens,
                             self.num_gpu_blocks, self.block_size, self.fixed_s,
                             self.per_prefill_token_s, self.per_decode_seq_s,
                             self.per_context_token_s, self.speed,
                             self.past_prediction_tokens, self.max_iterations,
                             self.fast_forward))

    cdef int _reserve(self, Py_ssize_t m) except -1:
        """Make the scratch buffer hold at least ``m`` requests."""
        cdef Py_ssize_t cap, per
        cdef char* p
        if m <= self._buf_cap:
            return 0
        cap = m if m > 2 * self._buf_cap else 2 * self._buf_cap
        if cap < 64:
            cap = 64
        per = sizeof(Req) + 4 * sizeof(int64_t)
        if cap > (<Py_ssize_t>0x7fffffffffffffff) // per:
            raise MemoryError()
        p = <char*>realloc(self._buf, cap * per)
        if p == NULL:
            raise MemoryError()
        self._buf = p
        self._buf_cap = cap
        self._s.req = <Req*>p
        p += cap * sizeof(Req)
        self._s.running = <int64_t*>p
        self._s.waiting = self._s.running + cap
        self._s.sched_idx = self._s.waiting + cap
        self._s.sched_new = self._s.sched_idx + cap
        return 0

    def predict(self, state, n, new_prompt, new_cached, new_output, double bound=INFINITY,
                double arrival_interval=INFINITY, arrival_prompt=0, arrival_cached=0,
                arrival_output=0, arrival_limit=0, double new_at=0.0,
                double delay_weight=0.0, double score_bound=INFINITY,
                double decode_delay=1.0, bint score_ttft=False):
        """Simulate the instance holding ``state[:, :n]`` plus one new request arriving
        ``new_at`` seconds from now (and up to ``arrival_limit`` expected arrivals, one
        every ``arrival_interval`` seconds).

        The simulation stops once its clock plus the least time the new request's
        remaining tokens take (a step each, of at least the fixed step time plus one
        prefill token's or one decode sequence's share) passes ``bound`` seconds from now,
        or that plus ``delay_weight`` times the delay so far passes ``score_bound`` (times
        not reached are ``inf``); times are counted from the new request's arrival.  The
        delay to an other request already past its first token counts ``decode_delay``
        times (1: the end-to-end delay; 0: only the others' first tokens).  With
        ``score_ttft`` the bounded score is the time to first token (once known) plus the
        weighted delay.

        ``state`` is a C-contiguous ``int64`` array of shape ``(5, capacity)`` (read-only
        is fine; other integer arrays are converted).  Returns ``(ttft, e2e,
        queue_delay, preemptions, peak_blocks, steps, delay)``.
        """
        cdef const int64_t[:, ::1] view
        cdef Py_ssize_t nn, col, bad, cap
        cdef int64_t extra[5]
        cdef int64_t a_prompt, a_cached, a_output, a_limit
        cdef const int64_t* data
        cdef Outcome out
        try:
            view = state
        except (ValueError, TypeError, BufferError):
            dtype = getattr(state, "dtype", None)
            if dtype is None or getattr(dtype, "kind", "") not in ("i", "u", "b"):
                raise
            import numpy
            view = numpy.ascontiguousarray(state, dtype=numpy.int64)
        nn = rows_of(n, view.shape[0], view.shape[1], state)
        extra[0] = token_arg(new_prompt)
        extra[1] = token_arg(new_cached)
        extra[2] = 0
        extra[3] = token_arg(new_output)
        extra[4] = 0
        cap = view.shape[1]
        data = &view[0, 0] if cap > 0 else NULL
        for col in range(NUM_COLUMNS):
            bad = first_bad_value(data + col * cap, nn) if nn > 0 else -1
            if bad >= 0:
                raise ValueError(f"state values must be in [0, 2**40], got {data[col * cap + bad]}")
            if extra[col] < 0:
                value = (new_prompt, new_cached, 0, new_output, 0)[col]
                raise ValueError(f"state values must be in [0, 2**40], got {value}")
        if not arrival_interval > 0.0:
            raise ValueError(f"arrival_interval must be positive, got {arrival_interval}")
        a_prompt = token_arg(arrival_prompt)
        a_cached = token_arg(arrival_cached)
        a_output = token_arg(arrival_output)
        for value, checked in ((arrival_prompt, a_prompt), (arrival_cached, a_cached),
                               (arrival_output, a_output)):
            if checked < 0:
                raise ValueError(f"arrival sizes must be in [0, 2**40], got {value}")
        try:
            a_limit = arrival_limit
        except OverflowError:
            a_limit = -1
        if a_limit < 0 or a_limit > MAX_ARRIVALS:
            raise ValueError(f"arrival_limit must be in [0, 2**16], got {arrival_limit}")
        if arrival_interval == INFINITY:
            a_limit = 0
        if not (new_at >= 0.0 and new_at < INFINITY):
            raise ValueError(f"new_at must be a finite non-negative number, got {new_at}")
        if not (delay_weight >= 0.0 and delay_weight < INFINITY):
            raise ValueError(f"delay_weight must be a finite non-negative number, "
                             f"got {delay_weight}")
        if not (decode_delay >= 0.0 and decode_delay <= 1.0):
            raise ValueError(f"decode_delay must be in [0, 1], got {decode_delay}")
        self._reserve(nn + 1 + a_limit)
        out = self._run(data, cap, nn, extra[0], extra[1], extra[3], bound,
                        arrival_interval, a_prompt, a_cached, a_output, a_limit, new_at,
                        False, INFINITY, NULL, NULL, delay_weight, score_bound,
                        decode_delay, score_ttft)
        return (out.ttft, out.e2e, out.queue_delay, out.preemptions, out.peak, out.steps,
                out.delay)

    def advance(self, state, n, duration, first, done):
        """Simulate ``state[:, :n]`` (no new request) for the steps that start within
        ``duration`` seconds, write the state back, and each row's first-token and finish
        times into ``first`` and ``done``; returns ``(clock, steps)`` (semantics: the
        twin's docstring).  ``state`` must be a writable C-contiguous ``int64`` array,
        ``first`` and ``done`` writable ``float64`` arrays of at least ``n`` entries."""
        cdef int64_t[:, ::1] view = state
        cdef double[::1] first_v = first
        cdef double[::1] done_v = done
        cdef Py_ssize_t nn, col, bad, cap, i, k
        cdef int64_t r
        cdef double d
        cdef Outcome out
        cdef Req* req
        nn = rows_of(n, view.shape[0], view.shape[1], state)
        if first_v.shape[0] < nn or done_v.shape[0] < nn:
            raise ValueError(f"first and done need room for {n} rows")
        d = float(duration)
        if not (d >= 0.0 and d < INFINITY):
            raise ValueError(f"duration must be a finite non-negative number, got {d}")
        cap = view.shape[1]
        for col in range(NUM_COLUMNS):
            bad = first_bad_value(&view[0, 0] + col * cap, nn) if nn > 0 else -1
            if bad >= 0:
                raise ValueError(f"state values must be in [0, 2**40], got {view[col, bad]}")
        self._reserve(nn + 1)
        out = self._run(&view[0, 0] if cap > 0 else NULL, cap, nn, 0, 0, 0, INFINITY,
                        INFINITY, 0, 0, 0, 0, 0.0, True, d,
                        &first_v[0] if nn > 0 else NULL, &done_v[0] if nn > 0 else NULL,
                        0.0, INFINITY, 1.0, False)
        req = self._s.req
        for i in range(nn):
            view[2, i] = req[i].gen
            view[4, i] = 0
        for k in range(out.n_running):
            r = self._s.running[k]
            view[4, r] = 1
            if req[r].gen == 0:
                view[1, r] = req[r].comp
        return out.clock, out.steps

    cdef Outcome _run(self, const int64_t* state, Py_ssize_t stride, Py_ssize_t n,
                      int64_t new_prompt, int64_t new_cached,
                      int64_t new_output, double bound, double a_interval,
                      int64_t a_prompt, int64_t a_cached, int64_t a_output,
                      int64_t a_limit, double new_at, bint stepping, double until,
                      double* first, double* done, double weight,
                      double score_bound, double decode_delay,
                      bint score_ttft) noexcept nogil:
        # Stepping: no new request, steps start only before ``until``, and the rows'
        # first-token and finish times go into ``first`` and ``done`` (n entries each).
        cdef Req* req = self._s.req
        cdef int64_t* running = self._s.running
        cdef int64_t* waiting = self._s.waiting
        cdef int64_t* sched_idx = self._s.sched_idx
        cdef int64_t* sched_new = self._s.sched_new
        cdef int64_t bs = self.block_size
        cdef int bs_shift = power_of_two_shift(bs)
        cdef int64_t budget_cap = self.max_num_batched_tokens
        cdef int64_t max_num_seqs = self.max_num_seqs
        cdef int64_t num_gpu_blocks = self.num_gpu_blocks
        cdef int64_t past = self.past_prediction_tokens
        cdef int64_t max_iterations = self.max_iterations
        cdef bint fast_forward = self.fast_forward
        cdef double fixed = self.fixed_s
        cdef double c_prefill = self.per_prefill_token_s
        cdef double c_decode = self.per_decode_seq_s
        cdef double c_context = self.per_context_token_s
        cdef double speed = self.speed
        cdef Py_ssize_t m = n if stepping else n + 1
        cdef int64_t new = -1 if stepping else m - 1
        cdef Py_ssize_t n_running = 0, head, tail, n_waiting = 0, n_sched, i, k, w, n_run
        cdef Py_ssize_t n_req = m
        cdef int64_t a_p, a_c, a_tg, arrived = 0
        cdef double next_at, start, stop_at
        cdef bint joined = new_at <= 0.0  # the new request is in the queue
        cdef int64_t p, c, g, pr, r, h, victim, used = 0, free_blocks, peak
        cdef int64_t num_new, need, budget, total_h, comp_h, new_h, nb, left, k_finish
        cdef int64_t ctx_sum, j, lo, hi, mid, need_mid, free_after_1, head_need
        cdef int64_t prefill_tokens, decode_seqs, ctx, new_comp, new_sched
        cdef double delay = 0.0, d_new, min_step, step_fixed, token_prefill, end
        # the others still before their first token: the new request's steps delay each of
        # them by the step's share, each other one by ``decode_delay`` times that
        cdef int64_t pending = 0, others
        cdef int64_t preemptions = 0, steps = 0, iterations = 0, tg, fit
        cdef int64_t kv_tokens = KV_TOKENS_CAP
        if num_gpu_blocks <= KV_TOKENS_CAP // bs:
            kv_tokens = num_gpu_blocks * bs
        cdef bint all_decode, admissible, preempted, self_preempted, finished_any, joins
        cdef double t = 0.0, a, b
        cdef Outcome out
        out.ttft = INFINITY
        out.e2e = INFINITY
        out.queue_delay = INFINITY
        if stepping:
            for i in range(n):
                first[i] = INFINITY
                done[i] = INFINITY

        # ---- initial state: existing requests, then the new one ---------------------------
        # Waiting requests are collected in sched_idx, then moved to the tail of `waiting`.
        for i in range(m):
            if i < n:
                p = state[i]
                c = state[stride + i]
                g = state[2 * stride + i]
                pr = state[3 * stride + i]
                if g == 0:
                    pending += 1
            else:
                p = new_prompt
                c = new_cached
                g = 0
                pr = new_output
            if p <= 1:
                p = 1
            req[i].prompt = p
            req[i].cached = c if c < p - 1 else p - 1
            req[i].gen = g
            if pr <= 1:
                pr = 1
            tg = pr if g < pr else g + past
            fit = kv_tokens - p + 1
            if tg > fit:
                tg = fit if fit > 1 else 1
            req[i].target = tg
            req[i].comp = 0
            req[i].blocks = 0
            if i < n and state[4 * stride + i] != 0:
                if g > 0:
                    req[i].comp = p + g - 1
                else:
                    req[i].comp = req[i].cached
                req[i].blocks = ceil_div(req[i].comp, bs, bs_shift)
                used += req[i].blocks
                running[n_running] = i
                n_running += 1
            elif i != new or joined:
                sched_idx[n_waiting] = i
                n_waiting += 1
        tail = m if joined else m - 1  # a late new request joins at the tail later
        head = tail - n_waiting
        for k in range(n_waiting):
            waiting[head + k] = sched_idx[k]
        free_blocks = num_gpu_blocks - used
        if self.shared_blocks > 0:  # prefix blocks the rows hold once each, held once
            free_blocks += self.shared_blocks if self.shared_blocks < MAX_TOKENS else MAX_TOKENS
        peak = used
        # Every expected arrival is the same request; clamped as the others are.
        a_p = a_prompt if a_prompt > 1 else 1
        a_c = a_cached if a_cached < a_p - 1 else a_p - 1
        a_tg = a_output if a_output > 1 else 1
        fit = kv_tokens - a_p + 1
        if a_tg > fit:
            a_tg = fit if fit > 1 else 1
        next_at = 0.5 * a_interval

        # a step with the new request in it takes at least this long
        min_step = speed * (fixed + (c_prefill if c_prefill < c_decode else c_decode))
        # a step that computes prompt tokens takes at least this long, plus this per token
        step_fixed = speed * fixed
        token_prefill = speed * c_prefill
        while iterations < max_iterations:
            # stop once the run can no longer end within ``bound``, or its score within
            # ``score_bound``
            end = end_at_least(t, req, new, min_step, step_fixed, token_prefill, budget_cap)
            if not (end <= bound and ((out.ttft if out.ttft != INFINITY else t) if score_ttft
                                      else end) + weight * delay <= score_bound):
                break
            iterations += 1
            # ---- expected arrivals due by now join the waiting queue ----------------------
            while arrived < a_limit and t >= next_at:
                req[n_req].prompt = a_p
                req[n_req].cached = a_c
                req[n_req].target = a_tg
                req[n_req].gen = 0
                req[n_req].comp = 0
                req[n_req].blocks = 0
                pending += 1
                waiting[tail] = n_req
                tail += 1
                n_req += 1
                arrived += 1
                next_at = (<double>arrived + 0.5) * a_interval
            if not joined and t >= new_at:
                waiting[tail] = new
                tail += 1
                joined = True
            if t >= until:
                break
            # ---- fast-forward a decode-only stretch ----------------------------------------
            n_run = n_running
            # A stretch needs the head of the queue unable to join the next step: the KV
            # blocks it would take then (-1: it could not join for other reasons).
            head_need = -1
            if (fast_forward and n_run > 0 and head < tail and n_run < max_num_seqs
                    and budget_cap - n_run > 0):
                h = waiting[head]
                total_h = req[h].prompt + req[h].gen
                comp_h = req[h].cached if req[h].cached < total_h - 1 else total_h - 1
                new_h = total_h - comp_h
                if new_h > budget_cap - n_run:
                    new_h = budget_cap - n_run
                head_need = ceil_div(comp_h + new_h, bs, bs_shift)
            # It surely joins when it fits beside one more block for every running request
            # (what one decode step can take at most): the scan below is skipped, the step
            # is the same.
            joins = 0 <= head_need <= free_blocks - n_run
            if fast_forward and not joins and n_run > 0 and n_run <= budget_cap:
                all_decode = True
                k_finish = MAX_TOKENS
                ctx_sum = 0
                new_comp = -1
                for k in range(n_run):
                    r = running[k]
                    if r == new:
                        new_comp = req[r].comp
                    g = req[r].gen
                    if g == 0 or req[r].comp != req[r].prompt + g - 1:
                        all_decode = False
                        break
                    left = req[r].target - g
                    if left < k_finish:
                        k_finish = left
                    ctx_sum += req[r].comp
                if all_decode and k_finish > 2:
                    j = k_finish - 1
                    # The twin recomputes need(j) when it applies the stretch; the state has
                    # not changed by then, so the value found here is reused.
                    need = decode_blocks_needed(req, running, n_run, bs, bs_shift, j)
                    if need > free_blocks:
                        lo = 0
                        hi = j
                        while lo < hi:  # largest j with need(j) <= free
                            mid = (lo + hi + 1) // 2
                            need_mid = decode_blocks_needed(req, running, n_run, bs, bs_shift,
                                                            mid)
                            if need_mid <= free_blocks:
                                lo = mid
                                need = need_mid
                            else:
                                hi = mid - 1
                        j = lo  # if j stays 0, need is stale but unused: no stretch below
                    stop_at = next_at if arrived < a_limit else INFINITY
                    if not joined and new_at < stop_at:
                        stop_at = new_at
                    if until < stop_at:
                        stop_at = until
                    if j > 1 and stop_at < INFINITY:
                        # Only the steps that start before the next arrival: the largest
                        # jj < j whose start (jj steps on) is before it, then jj + 1 steps.
                        a = fixed + c_decode * <double>n_run + c_context * <double>ctx_sum
                        lo = 0
                        hi = j - 1
                        while lo < hi:
                            mid = (lo + hi + 1) // 2
                            start = t + speed * (<double>mid * a + c_context * (
                                <double>n_run * bp_tri_as_double(mid)))
                            if start < stop_at:
                                lo = mid
                            else:
                                hi = mid - 1
                        if lo + 1 < j:
                            j = lo + 1
                            need = decode_blocks_needed(req, running, n_run, bs, bs_shift, j)
                    admissible = False
                    # Admissibility only matters for a stretch (j > 1) and has no side effect.
                    if j > 1 and head_need >= 0:
                        free_after_1 = free_blocks - decode_blocks_needed(req, running, n_run,
                                                                          bs, bs_shift, 1)
                        admissible = head_need <= free_after_1
                    if j > 1 and not admissible:
                        a = fixed + c_decode * <double>n_run + c_context * <double>ctx_sum
                        b = c_context * (<double>n_run * bp_tri_as_double(j))
                        t += speed * (<double>j * a + b)
                        if new_comp >= 0:
                            # the new request's share of the j steps delays every other
                            # request in flight by as much
                            others = n_run - 1 + tail - head
                            delay += speed * (<double>j * (c_decode + c_context * <double>new_comp)
                                              + c_context * bp_tri_as_double(j)) * (
                                <double>pending + decode_delay * <double>(others - pending))
                        for k in range(n_run):
                            r = running[k]
                            req[r].comp += j
                            req[r].gen += j
                            nb = ceil_div(req[r].comp, bs, bs_shift)
                            if nb > req[r].blocks:
                                req[r].blocks = nb
                        free_blocks -= need
                        if num_gpu_blocks - free_blocks > peak:
                            peak = num_gpu_blocks - free_blocks
                        steps += j
                        continue
            # ---- one engine step -----------------------------------------------------------
            budget = budget_cap
            n_sched = 0
            preempted = False
            i = 0
            # the step's size, counted as requests are scheduled (a scheduled request is
            # never preempted later in the same step)
            prefill_tokens = 0
            decode_seqs = 0
            ctx = 0
            new_sched = -1  # tokens of the new request in the step (-1: not in it)
            while i < n_running and budget > 0:
                r = running[i]
                num_new = req[r].prompt + req[r].gen - req[r].comp
                if num_new > budget:
                    num_new = budget
                need = ceil_div(req[r].comp + num_new, bs, bs_shift) - req[r].blocks
                if need < 0:
                    need = 0
                self_preempted = False
                while need > free_blocks:
                    n_running -= 1
                    victim = running[n_running]
                    free_blocks += req[victim].blocks
                    req[victim].blocks = 0
                    req[victim].comp = 0
                    head -= 1
                    waiting[head] = victim
                    preemptions += 1
                    preempted = True
                    if victim == r:
                        self_preempted = True
                        break
                if self_preempted:
                    break
                free_blocks -= need
                req[r].blocks += need
                sched_idx[n_sched] = r
                sched_new[n_sched] = num_new
                if is_decode(&req[r]):
                    decode_seqs += 1
                else:
                    prefill_tokens += num_new
                ctx += req[r].comp + num_new
                if r == new:
                    new_sched = num_new
                n_sched += 1
                budget -= num_new
                i += 1
            if not preempted:
                while head < tail and budget > 0 and n_running < max_num_seqs:
                    h = waiting[head]
                    total_h = req[h].prompt + req[h].gen
                    comp_h = req[h].cached if req[h].cached < total_h - 1 else total_h - 1
                    num_new = total_h - comp_h
                    if num_new > budget:
                        num_new = budget
                    need = ceil_div(comp_h + num_new, bs, bs_shift)
                    if need > free_blocks:
                        break
                    head += 1
                    running[n_running] = h
                    n_running += 1
                    req[h].comp = comp_h
                    req[h].blocks = need
                    free_blocks -= need
                    sched_idx[n_sched] = h
                    sched_new[n_sched] = num_new
                    if is_decode(&req[h]):
                        decode_seqs += 1
                    else:
                        prefill_tokens += num_new
                    ctx += comp_h + num_new
                    if h == new:
                        new_sched = num_new
                    n_sched += 1
                    budget -= num_new
                    if h == new and out.queue_delay == INFINITY:
                        out.queue_delay = t - new_at
            if num_gpu_blocks - free_blocks > peak:
                peak = num_gpu_blocks - free_blocks
            if n_sched == 0:
                if preempted:
                    continue
                if stepping:
                    break  # out of work (or none can ever run): the clock stops here
                if n_running == 0 and head == tail and (arrived < a_limit or not joined):
                    # idle until the next arrival (the new request's, if it is next)
                    t = next_at if arrived < a_limit else INFINITY
                    if not joined and new_at < t:
                        t = new_at
                    continue
                break  # nothing can ever run: the new request never finishes
            d_new = -1.0
            if new_sched >= 0:  # the new request's share of the step
                if is_decode(&req[new]):
                    d_new = c_decode + c_context * <double>(req[new].comp + new_sched)
                else:
                    d_new = (c_prefill * <double>new_sched
                             + c_context * <double>(req[new].comp + new_sched))
            t += speed * (fixed + c_prefill * <double>prefill_tokens
                          + c_decode * <double>decode_seqs + c_context * <double>ctx)
            if d_new >= 0.0:
                others = n_running - 1 + tail - head
                delay += speed * d_new * (
                    <double>pending + decode_delay * <double>(others - pending))
            steps += 1
            finished_any = False
            for k in range(n_sched):
                r = sched_idx[k]
                req[r].comp += sched_new[k]
                if req[r].comp == req[r].prompt + req[r].gen:
                    req[r].gen += 1
                    if req[r].gen == 1 and r != new:
                        pending -= 1
                    if r == new and out.ttft == INFINITY:
                        out.ttft = t - new_at
                    if stepping and req[r].gen == 1:
                        first[r] = t
                    if req[r].gen >= req[r].target:
                        free_blocks += req[r].blocks
                        req[r].blocks = 0
                        finished_any = True
                        if r == new:
                            out.e2e = t - new_at
                        if stepping:
                            done[r] = t
            if out.e2e != INFINITY:
                break
            if finished_any:
                w = 0
                for k in range(n_running):
                    r = running[k]
                    if req[r].gen < req[r].target:
                        running[w] = r
                        w += 1
                n_running = w
        out.preemptions = preemptions
        out.peak = peak
        out.steps = steps
        out.delay = delay
        out.clock = t if t > until else until
        out.n_running = n_running
        return out


# ---- prefix block hashes (twin: blockproxy.routing.prefix.prefix_hashes_py) -----------------

from libc.stdint cimport uint64_t

cdef extern from *:
    """
    #include <string.h>
    /* 8 bytes read as a little-endian word, whatever the host's byte order */
    static inline uint64_t bp_load_le64(const unsigned char* p) {
        uint64_t w;
        memcpy(&w, p, 8);
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        w = __builtin_bswap64(w);
    #endif
        return w;
    }
    """
    uint64_t bp_load_le64(const unsigned char* p) noexcept nogil

cdef uint64_t _MIX = 0x9E3779B97F4A7C15ULL
cdef uint64_t _SEED = 0x243F6A8885A308D3ULL


cdef inline uint64_t _fmix(uint64_t x) noexcept nogil:
    x ^= x >> 33
    x *= 0xFF51AFD7ED558CCDULL
    x ^= x >> 33
    x *= 0xC4CEB9FE1A85EC53ULL
    x ^= x >> 33
    return x


def prefix_hashes(const unsigned char[::1] data, Py_ssize_t block, Py_ssize_t limit,
                  parent=None):
    """Chain hashes of the first ``limit`` full ``block``-byte blocks of ``data`` (63-bit
    ints): each one covers every byte before its block's end.  ``block`` is a multiple
    of 8; the words are read little-endian.  Each block's hash starts from the hash of the
    block before it (``parent`` before the first: a chain continued from there)."""
    if block <= 0 or block % 8:
        raise ValueError("block must be a positive multiple of 8")
    cdef Py_ssize_t n = data.shape[0] // block
    if n > limit:
        n = limit
    if n <= 0:
        return []
    cdef uint64_t h = _SEED if parent is None else <uint64_t>parent
    cdef Py_ssize_t b, i
    cdef Py_ssize_t words = block // 8
    cdef const unsigned char* p = &data[0]
    cdef list out = [None] * n
    cdef uint64_t* values = <uint64_t*>realloc(NULL, n * sizeof(uint64_t))
    if values == NULL:
        raise MemoryError()
    with nogil:
        for b in range(n):
            for i in range(words):
                h = (h ^ bp_load_le64(p)) * _MIX
                h ^= h >> 29
                p += 8
            h = _fmix(h) >> 1
            values[b] = h
    for b in range(n):
        out[b] = <int64_t>values[b]
    free(values)
    return out


# ---- prefix cache model (twin: blockproxy.cluster.prefix.PrefixCachePy) -------------------
#
# Nodes live in parallel arrays indexed by node number; a block hash maps to its node through
# an open-addressing table (linear probing, Fibonacci hashing, backward-shift deletion, so
# no tombstones).  Free nodes (cached, not referenced) are chained in LRU order, oldest at
# the head; referenced nodes are in no list.  Freed node numbers are reused from a stack.

from libc.stdint cimport int32_t, uint32_t

#: lookups ahead whose table slot is prefetched (a cache model is larger than the caches)
cdef Py_ssize_t PREFETCH = 8


cdef class PrefixCacheC:
    """Compiled :class:`blockproxy.cluster.prefix.PrefixCachePy`: same methods, same
    results, same eviction order."""

    cdef public Py_ssize_t capacity
    cdef public Py_ssize_t evictions
    cdef uint64_t* keys
    cdef int64_t* refs      # 0: in the free (LRU) list
    cdef int32_t* prev
    cdef int32_t* nxt
    cdef int32_t* spare     # stack of unused node numbers
    cdef Py_ssize_t n_spare, n_nodes, node_cap
    # Slots: 0 = empty, else the upper 32 bits of the key's mixed hash (the home slot and a
    # tag: a probe reads the node's key only when the tag matches) over node number + 1.
    cdef uint64_t* table
    cdef Py_ssize_t table_size, table_shift, count, n_free
    cdef int32_t head, tail

    def __cinit__(self, capacity_blocks):
        self.capacity = max(int(capacity_blocks), 1)
        self.evictions = 0
        self.head = self.tail = -1
        self._grow_nodes(64)
        self._rehash(128)

    def __dealloc__(self):
        free(self.keys); free(self.refs); free(self.prev); free(self.nxt); free(self.spare)
        free(self.table)

    cdef int _grow_nodes(self, Py_ssize_t cap) except -1:
        cdef void* p
        p = realloc(self.keys, cap * sizeof(uint64_t))
        if p == NULL: raise MemoryError()
        self.keys = <uint64_t*>p
        p = realloc(self.refs, cap * sizeof(int64_t))
        if p == NULL: raise MemoryError()
        self.refs = <int64_t*>p
        p = realloc(self.prev, cap * sizeof(int32_t))
        if p == NULL: raise MemoryError()
        self.prev = <int32_t*>p
        p = realloc(self.nxt, cap * sizeof(int32_t))
        if p == NULL: raise MemoryError()
        self.nxt = <int32_t*>p
        p = realloc(self.spare, cap * sizeof(int32_t))
        if p == NULL: raise MemoryError()
        self.spare = <int32_t*>p
        self.node_cap = cap
        return 0

    cdef int _rehash(self, Py_ssize_t size) except -1:
        # ``size`` is a power of two, at most 2**32; every slot in use is re-entered
        cdef uint64_t* old = self.table
        cdef Py_ssize_t old_size = self.table_size, i
        cdef uint64_t* t = <uint64_t*>realloc(NULL, size * sizeof(uint64_t))
        if t == NULL: raise MemoryError()
        for i in range(size):
            t[i] = 0
        self.table = t
        self.table_size = size
        self.table_shift = 64
        while (<Py_ssize_t>1 << (64 - self.table_shift)) < size:
            self.table_shift -= 1
        for i in range(old_size):
            if old[i]:
                self._put(old[i])
        free(old)
        return 0

    cdef inline uint64_t _slot_value(self, uint64_t key, int32_t node) noexcept nogil:
        return (((key * _MIX) >> 32) << 32) | <uint64_t>(node + 1)

    cdef inline void _put(self, uint64_t value) noexcept nogil:
        # enter a slot value at the first free slot from its home
        cdef Py_ssize_t mask = self.table_size - 1
        cdef Py_ssize_t i = <Py_ssize_t>(value >> self.table_shift)
        while self.table[i]:
            i = (i + 1) & mask
        self.table[i] = value

    cdef inline Py_ssize_t _slot(self, uint64_t key) noexcept nogil:
        # the table slot holding ``key``, or -1
        cdef Py_ssize_t mask = self.table_size - 1
        cdef uint64_t mixed = key * _MIX
        cdef Py_ssize_t i = <Py_ssize_t>(mixed >> self.table_shift)
        cdef uint64_t tag = mixed >> 32, v
        while True:
            v = self.table[i]
            if v == 0:
                return -1
            if (v >> 32) == tag and self.keys[<uint32_t>v - 1] == key:
                return i
            i = (i + 1) & mask

    cdef inline int32_t _find(self, uint64_t key) noexcept nogil:
        cdef Py_ssize_t s = self._slot(key)
        return -1 if s < 0 else <int32_t>(<uint32_t>self.table[s] - 1)

    cdef void _unslot(self, Py_ssize_t i) noexcept nogil:
        # backward-shift deletion of table slot i
        cdef Py_ssize_t mask = self.table_size - 1
        cdef Py_ssize_t j = i, home
        cdef uint64_t v
        self.table[i] = 0
        while True:
            j = (j + 1) & mask
            v = self.table[j]
            if v == 0:
                return
            home = <Py_ssize_t>(v >> self.table_shift)
            # move v back to the hole at i unless its home lies cyclically in (i, j]
            if (j > i and (home <= i or home > j)) or (j < i and (home <= i and home > j)):
                self.table[i] = v
                self.table[j] = 0
                i = j

    cdef int32_t _new_node(self, uint64_t key) except -2:
        cdef int32_t node
        if self.n_spare:
            self.n_spare -= 1
            node = self.spare[self.n_spare]
        else:
            if self.n_nodes == self.node_cap:
                self._grow_nodes(self.node_cap * 2)
            node = <int32_t>self.n_nodes
            self.n_nodes += 1
        self.keys[node] = key
        self.refs[node] = 0
        if (self.count + 1) * 2 > self.table_size:
            self._rehash(self.table_size * 2)
        self._put(self._slot_value(key, node))
        self.count += 1
        return node

    cdef void _drop_node(self, int32_t node) noexcept nogil:
        self._unslot(self._slot(self.keys[node]))
        self.spare[self.n_spare] = node
        self.n_spare += 1
        self.count -= 1

    cdef inline void _link_tail(self, int32_t node) noexcept nogil:
        self.prev[node] = self.tail
        self.nxt[node] = -1
        if self.tail >= 0:
            self.nxt[self.tail] = node
        else:
            self.head = node
        self.tail = node
        self.n_free += 1

    cdef inline void _unlink(self, int32_t node) noexcept nogil:
        cdef int32_t p = self.prev[node], n = self.nxt[node]
        if p >= 0:
            self.nxt[p] = n
        else:
            self.head = n
        if n >= 0:
            self.prev[n] = p
        else:
            self.tail = p
        self.n_free -= 1

    cdef void _evict(self) noexcept nogil:
        cdef Py_ssize_t excess = self.count - self.capacity
        cdef int32_t node, ahead = self.head
        cdef Py_ssize_t k
        # the oldest blocks go first: their keys and slots are loaded a few evictions ahead
        for k in range(PREFETCH if PREFETCH < excess else excess):
            if ahead < 0:
                break
            bp_prefetch(&self.keys[ahead])
            ahead = self.nxt[ahead]
        while excess > 0 and self.head >= 0:
            node = self.head
            if ahead >= 0:
                bp_prefetch(&self.keys[ahead])
                ahead = self.nxt[ahead]
            if self.nxt[node] >= 0:  # the next one's key is in by now: its slot
                self._prefetch_slot(self.keys[self.nxt[node]])
            self._unlink(node)
            self._drop_node(node)
            self.evictions += 1
            excess -= 1

    def __len__(self):
        return self.count

    def __contains__(self, h):
        return self._find(<uint64_t>h) >= 0

    def match(self, hashes):
        """How many leading blocks of ``hashes`` are cached."""
        cdef Py_ssize_t n = len(hashes), lo, hi, mid
        if n == 0 or self._find(<uint64_t>hashes[0]) < 0:
            return 0
        lo, hi = 1, n
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._find(<uint64_t>hashes[mid - 1]) >= 0:
                lo = mid
            else:
                hi = mid - 1
        return lo

    cdef uint64_t* _keys_of(self, object hashes, Py_ssize_t n) except NULL:
        # ``hashes`` as a C array (the caller frees it), each slot prefetch in order
        cdef uint64_t* keys = <uint64_t*>malloc((n if n > 0 else 1) * sizeof(uint64_t))
        cdef Py_ssize_t i
        if keys == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                keys[i] = <uint64_t>hashes[i]
        except BaseException:
            free(keys)
            raise
        return keys

    cdef inline void _prefetch_slot(self, uint64_t key) noexcept nogil:
        # load the table slot a later lookup of ``key`` starts at
        bp_prefetch(&self.table[<Py_ssize_t>((key * _MIX) >> self.table_shift)])

    def acquire(self, hashes):
        """A request dispatched here holds these blocks (cached from now on); returns those
        that were not cached before."""
        cdef list new = []
        cdef Py_ssize_t n = len(hashes), i
        cdef uint64_t* keys = self._keys_of(hashes, n)
        cdef int32_t node
        try:
            for i in range(n):
                if i + PREFETCH < n:
                    self._prefetch_slot(keys[i + PREFETCH])
                node = self._find(keys[i])
                if node < 0:
                    new.append(hashes[i])
                    node = self._new_node(keys[i])
                    self.refs[node] = 1
                elif self.refs[node] == 0:
                    self._unlink(node)
                    self.refs[node] = 1
                else:
                    self.refs[node] += 1
        finally:
            free(keys)
        self._evict()
        return new

    def insert(self, hashes):
        """Blocks another proxy's request cached here: most recently used, not held."""
        cdef Py_ssize_t i
        cdef uint64_t key
        cdef int32_t node
        for i in range(len(hashes) - 1, -1, -1):
            key = <uint64_t>hashes[i]
            node = self._find(key)
            if node < 0:
                node = self._new_node(key)
                self._link_tail(node)
            elif self.refs[node] == 0:
                self._unlink(node)
                self._link_tail(node)
        self._evict()

    def remove(self, hashes):
        """The engine evicted these blocks: forget those not held."""
        cdef int32_t node
        for h in hashes:
            node = self._find(<uint64_t>h)
            if node >= 0 and self.refs[node] == 0:
                self._unlink(node)
                self._drop_node(node)

    def release(self, hashes):
        """The request ended: its blocks join the free queue, the last block first."""
        cdef Py_ssize_t n = len(hashes), i
        cdef uint64_t* keys = self._keys_of(hashes, n)
        cdef int32_t node
        for i in range(n - 1, -1, -1):
            if i >= PREFETCH:
                self._prefetch_slot(keys[i - PREFETCH])
            node = self._find(keys[i])
            if node < 0 or self.refs[node] == 0:
                continue  # forgotten meanwhile (clear), or not held
            self.refs[node] -= 1
            if self.refs[node] == 0:
                self._link_tail(node)
        free(keys)
        self._evict()

    def clear(self):
        """The instance restarted (or left): its cache is empty."""
        cdef Py_ssize_t i
        for i in range(self.table_size):
            self.table[i] = 0
        self.n_nodes = self.n_spare = self.count = self.n_free = 0
        self.head = self.tail = -1

    def describe(self):
        return {"blocks": self.count, "in_use": self.count - self.n_free,
                "capacity": self.capacity, "evictions": self.evictions}

    def memory_bytes(self):
        """Bytes the model has allocated (nodes and table)."""
        return (self.node_cap * (sizeof(uint64_t) + sizeof(int64_t) + 3 * sizeof(int32_t))
                + self.table_size * sizeof(uint64_t))

    def snapshot(self):
        """(free blocks oldest first, {held block: references}): for the twin tests."""
        cdef list order = []
        cdef dict held = {}
        cdef int32_t node = self.head
        cdef Py_ssize_t i
        while node >= 0:
            order.append(<int64_t>self.keys[node])
            node = self.nxt[node]
        for i in range(self.table_size):
            if self.table[i]:
                node = <int32_t>(<uint32_t>self.table[i] - 1)
                if self.refs[node] > 0:
                    held[<int64_t>self.keys[node]] = self.refs[node]
        return order, held


# ---- request validation (twin: blockproxy.request.all_ints_py) -----------------------------

from cpython.long cimport PyLong_Check
from cpython.bool cimport PyBool_Check


def all_ints(list values):
    """Whether every item of ``values`` is an int and not a bool (token ids)."""
    cdef Py_ssize_t i, n = len(values)
    cdef object v
    for i in range(n):
        v = values[i]
        if not PyLong_Check(v) or PyBool_Check(v):
            return False
    return True


# ---- the baseline policies' load measures (twin: blockproxy.cluster.requests.table_loads_py) ---

def table_loads(state, n, int64_t block_size):
    """One pass over the first ``n`` columns of a request table (rows as the simulator's):
    ``(waiting, their prompt tokens, their cached tokens, their predicted output tokens,
    output tokens still expected (max(predicted - generated, 1), summed over all),
    running, KV blocks of the running, KV blocks of the waiting)``, a request's blocks
    being its prompt and generated tokens in ``block_size`` blocks (0: not counted)."""
    cdef const int64_t[:, ::1] view = state
    cdef Py_ssize_t nn = rows_of(n, view.shape[0], view.shape[1], state)
    cdef Py_ssize_t i, stride = view.shape[1]
    cdef int64_t waiting = 0, w_prompt = 0, w_cached = 0, w_predicted = 0, remaining = 0
    cdef int64_t used = 0, wanted = 0, left, blocks = 0
    cdef const int64_t* data
    if block_size < 0:
        raise ValueError(f"block_size must be >= 0, got {block_size}")
    if nn == 0:
        return (0, 0, 0, 0, 0, 0, 0, 0)
    data = &view[0, 0]
    with nogil:
        for i in range(nn):
            left = data[3 * stride + i] - data[2 * stride + i]
            remaining += left if left > 1 else 1
            if block_size > 0:
                blocks = (data[i] + data[2 * stride + i] + block_size - 1) // block_size
            if data[4 * stride + i] == 0:
                waiting += 1
                w_prompt += data[i]
                w_cached += data[stride + i]
                w_predicted += data[3 * stride + i]
                wanted += blocks
            else:
                used += blocks
    return (waiting, w_prompt, w_cached, w_predicted, remaining, nn - waiting, used, wanted)
