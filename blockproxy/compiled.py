"""The compiled helpers of ``blockproxy._fastcore`` or their pure-Python twins.

Each compiled function or class has a twin with the same results (tested against each
other); :func:`pick` binds the compiled one unless the extension is not built or
``BLOCKPROXY_NO_EXTENSIONS`` is set.  (The simulator's own switch, which also warns when
the extension is missing, is :mod:`blockproxy.simulator`.)
"""

from __future__ import annotations

import os
from typing import TypeVar

T = TypeVar("T")

NO_EXTENSIONS = os.environ.get("BLOCKPROXY_NO_EXTENSIONS", "") not in ("", "0")


def pick(name: str, twin: T) -> T:
    """``blockproxy._fastcore.<name>`` when available, else ``twin``."""
    if NO_EXTENSIONS:
        return twin
    try:
        from blockproxy import _fastcore
    except ImportError:  # not built: the simulator switch has already warned
        return twin
    compiled: T = getattr(_fastcore, name, twin)
    return compiled
