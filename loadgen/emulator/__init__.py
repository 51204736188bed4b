"""Emulated vLLM backend: a GPU-free, vLLM-compatible server driven by a batching engine.

An independent implementation (it imports nothing from ``blockproxy`` or ``_fastcore``):
it is the ground truth the proxy's predictions are measured against.
"""
