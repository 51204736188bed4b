"""The batch simulator: compiled (``blockproxy._fastcore``) or its pure-Python twin.

Both implement the same semantics (documented in :mod:`blockproxy.simulator.reference`,
the twin).  The compiled
one is bound when it imports, unless ``BLOCKPROXY_NO_EXTENSIONS`` is set; a missing
extension falls back to the twin with one warning.  :data:`IMPLEMENTATION` says which one
is active (``"c"`` or ``"py"``).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, NamedTuple

from blockproxy.profile import EngineLimits, Profile
from blockproxy.simulator.reference import (
    COL_CACHED,
    COL_GENERATED,
    COL_PREDICTED,
    COL_PROMPT,
    COL_STARTED,
    MAX_TOKENS,
    NUM_COLUMNS,
    InstanceModelPy,
)

NO_EXTENSIONS = os.environ.get("BLOCKPROXY_NO_EXTENSIONS", "") not in ("", "0")

InstanceModelC: type | None
try:
    from blockproxy._fastcore import InstanceModelC as _compiled
    InstanceModelC = _compiled
except ImportError:  # not built (pure install or BLOCKPROXY_NO_EXTENSIONS at build time)
    InstanceModelC = None

if InstanceModelC is not None and not NO_EXTENSIONS:
    InstanceModel: type = InstanceModelC
    IMPLEMENTATION = "c"
else:
    if InstanceModelC is None and not NO_EXTENSIONS:
        warnings.warn("blockproxy._fastcore is not built; using the pure-Python simulator "
                      "(much slower). Reinstall with Cython available to build it.",
                      RuntimeWarning, stacklevel=2)
    InstanceModel = InstanceModelPy
    IMPLEMENTATION = "py"


class Prediction(NamedTuple):
    """What the simulator predicts for the new request (times in seconds from now).

    ``ttft``/``e2e``: until its first/last token; ``queue_delay``: until it is first
    scheduled; ``preemptions`` during the simulation; ``peak_blocks``: the most KV blocks in
    use; ``steps``: engine steps simulated; ``delay``: the latency it adds to the requests
    already there (and expected), summed over them (first-order: see the twin's
    docstring).  Times not reached (past ``bound``, or never servable) are ``inf``.
    """

    ttft: float
    e2e: float
    queue_delay: float
    preemptions: int
    peak_blocks: int
    steps: int
    delay: float


def model_from_profile(profile: Profile, limits: EngineLimits | None = None,
                       speed: float = 1.0, past_prediction_tokens: int = 16,
                       implementation: type | None = None) -> Any:
    """Build an instance model from a profile, optionally overriding its engine limits."""
    eng = limits or profile.engine
    st = profile.step_time
    cls = implementation or InstanceModel
    return cls(eng.max_num_seqs, eng.max_num_batched_tokens, eng.num_gpu_blocks,
               eng.block_size, st.fixed_s, st.per_prefill_token_s, st.per_decode_seq_s,
               st.per_context_token_s, speed, past_prediction_tokens)


__all__ = [
    "COL_CACHED",
    "COL_GENERATED",
    "COL_PREDICTED",
    "COL_PROMPT",
    "COL_STARTED",
    "IMPLEMENTATION",
    "MAX_TOKENS",
    "NUM_COLUMNS",
    "InstanceModel",
    "InstanceModelC",
    "InstanceModelPy",
    "Prediction",
    "model_from_profile",
]
