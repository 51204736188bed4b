"""loadgen: trace replay, vLLM-compatible emulated backends and reports for blockproxy.

The emulated backend is an independent implementation: nothing in ``loadgen`` imports
``blockproxy`` or its compiled simulator.
"""

__version__ = "0.1.0"
