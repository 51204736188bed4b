# C declarations of the compiled batch simulator (implementation in _fastcore.pyx).
#
# The semantics are those of the pure-Python twin, blockproxy/_sim_py.py
# (class InstanceModelPy); change one, change the other.
#
# The extension is built as ``blockproxy._fastcore`` from ``_fastcore/_fastcore.pyx``, so
# Cython does not pick this file up as the module's own .pxd (it would look for
# ``blockproxy._fastcore.pxd``); the .pyx cimports it by its file name instead.  It holds
# only C types, so the cimport needs nothing at run time.

from libc.stdint cimport int64_t


cdef struct Req:
    # Per-request simulation state; one record per active request plus the new one.
    int64_t prompt      # prompt tokens (at least 1)
    int64_t cached      # prefix-cached prompt tokens (at most prompt - 1)
    int64_t gen         # output tokens sampled so far
    int64_t target      # output length at which the request finishes
    int64_t comp        # tokens whose KV is computed
    int64_t blocks      # KV blocks held


cdef struct Scratch:
    # Arrays carved out of one allocation owned by an InstanceModelC (_buf_cap entries each).
    Req* req
    int64_t* running      # running set, admission order; count in n_running
    int64_t* waiting      # waiting queue in waiting[head:tail]; preemptions move head
                          # down (never below 0), expected arrivals move tail up
    int64_t* sched_idx    # requests scheduled in the current step
    int64_t* sched_new    # tokens each of them computes in that step


cdef struct Outcome:
    double ttft
    double e2e
    double queue_delay
    int64_t preemptions
    int64_t peak
    int64_t steps
    double delay          # what the new request adds to the others' latencies (seconds)
    double clock          # stepping: when the last simulated step ended (or the duration)
    int64_t n_running     # stepping: the running set's size at the end
