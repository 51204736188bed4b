"""Benchmark metrics, defined exactly as vLLM's ``bench serve`` (``calculate_metrics``).

Over the successful requests only:

* TPOT per request = (latency - TTFT) / (output tokens - 1) when output tokens > 1;
  a one-token request has no TPOT (but counts as TPOT 0 for goodput, like vLLM);
* ITL = every gap between chunks of every request, pooled;
* ``mean``/``median``/``std`` (population, numpy's default) and ``pXX`` percentiles
  (numpy's linear interpolation) in ms; an empty list reports 0, as vLLM does;
* throughputs divide by the run's duration; input tokens count successful requests only;
* goodput: a request is good when every configured SLO (``ttft``, ``tpot``, ``e2el`` in
  ms) is met (value <= SLO); ``request_goodput`` = good requests / duration.  (A cut
  request, below, is good when only a TTFT SLO is set and its first token met it.)

Our own extra keys: ``goodput_ratio`` (good / all requests sent, failures count as not
good), and the run's settings added by the runner.  A run the runner stopped early (a
first-token probe, or an early abort; see :func:`loadgen.run.run_benchmark`) also has
``cut``: requests stopped before their end, counted neither completed nor failed; the TTFT
figures then include the cut requests that had their first token, every other figure
covers completed requests only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from loadgen.client import RequestRecord

METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_HEADERS = {"ttft": ("Time to First Token", "TTFT"),
                  "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
                  "itl": ("Inter-token Latency", "ITL"),
                  "e2el": ("End-to-end Latency", "E2EL")}
GOODPUT_METRICS = ("ttft", "tpot", "e2el")
#: keys whose values are in milliseconds / per second (for :func:`unscale`)
_THROUGHPUT_KEYS = ("request_throughput", "request_goodput", "output_throughput",
                    "total_token_throughput")


def percentile_key(metric: str, p: float) -> str:
    """vLLM's key for a percentile: ``p99_ttft_ms``, ``p99.9_itl_ms``."""
    word = str(int(p)) if int(p) == p else str(p)
    return f"p{word}_{metric}_ms"


def parse_percentiles(text: str) -> list[float]:
    """``"50,90,99"`` -> ``[50.0, 90.0, 99.0]`` (each in [0, 100])."""
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or any(not 0 <= v <= 100 for v in values):
        raise ValueError(f"percentiles must be numbers in [0, 100]: {text!r}")
    return values


def parse_goodput(items: Iterable[str]) -> dict[str, float]:
    """``["ttft:200", "tpot:50"]`` -> ``{"ttft": 200.0, "tpot": 50.0}`` (SLOs in ms)."""
    slos: dict[str, float] = {}
    for item in items:
        for part in item.split():
            name, sep, value = part.partition(":")
            if not sep or name not in GOODPUT_METRICS:
                raise ValueError(f"goodput SLO must be NAME:MS with NAME in "
                                 f"{', '.join(GOODPUT_METRICS)}: {part!r}")
            number = float(value)
            if number < 0:
                raise ValueError(f"goodput SLO must be non-negative: {part!r}")
            slos[name] = number
    return slos


def _summary(name: str, values_s: Sequence[float], percentiles: Sequence[float]) -> dict:
    # ``or 0`` as vLLM: an empty list summarises to zeros rather than NaN.
    data = np.asarray(values_s if len(values_s) else [0.0], dtype=float) * 1000.0
    out = {f"mean_{name}_ms": float(np.mean(data)),
           f"median_{name}_ms": float(np.median(data)),
           f"std_{name}_ms": float(np.std(data))}
    for p in percentiles:
        out[percentile_key(name, p)] = float(np.percentile(data, p))
    return out


def is_good(record: RequestRecord, slos: dict[str, float]) -> bool:
    """Whether a successful request meets every SLO (ms); a failed one never does.  A
    cut one (stopped after its first token) is judged when only a TTFT SLO is set."""
    if record.cut and record.ttft > 0 and set(slos) == {"ttft"}:
        return record.ttft * 1000.0 <= slos["ttft"]
    if not record.success:
        return False
    tpot = ((record.latency - record.ttft) / (record.output_tokens - 1)
            if record.output_tokens > 1 else 0.0)
    values = {"ttft": record.ttft, "tpot": tpot, "e2el": record.latency}
    return all(values[name] * 1000.0 <= slo for name, slo in slos.items())


def calculate_metrics(records: Sequence[RequestRecord], duration_s: float,
                      percentiles: Sequence[float] = (99,),
                      goodput: dict[str, float] | None = None) -> dict[str, Any]:
    """The metrics dict of one run, with vLLM's key names (see the module doc)."""
    ok = [r for r in records if r.success]
    cut = [r for r in records if r.cut]
    ttfts = [r.ttft for r in ok] + [r.ttft for r in cut if r.ttft > 0]
    e2els = [r.latency for r in ok]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [gap for r in ok for gap in r.itl]
    total_input = sum(r.prompt_tokens for r in ok)
    total_output = sum(r.output_tokens for r in ok)
    duration = duration_s if duration_s > 0 else math.nan
    metrics: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(records) - len(ok) - len(cut),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration,
    }
    if cut:
        metrics["cut"] = len(cut)
    if goodput:
        good = sum(1 for r in records if is_good(r, goodput))
        metrics["request_goodput"] = good / duration
        metrics["goodput_ratio"] = good / len(records) if records else 0.0
        metrics["goodput_slos_ms"] = dict(goodput)
    metrics["output_throughput"] = total_output / duration
    metrics["total_token_throughput"] = (total_input + total_output) / duration
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        metrics.update(_summary(name, values, percentiles))
    return metrics


def real_view(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics with time keys in real-GPU units (the ``unscaled`` block applied)."""
    return {**metrics, **metrics.get("unscaled", {})}


def unscale(metrics: dict[str, Any], time_scale: float) -> dict[str, Any]:
    """The time-valued metrics as real-GPU time for a run at ``time_scale``.

    An emulator at time scale ``s`` runs ``1/s`` times faster than the GPU it models,
    so durations and latencies divide by ``s`` and throughputs multiply by it.
    """
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key.endswith("_ms") or key == "duration":
            out[key] = value / time_scale
        elif key in _THROUGHPUT_KEYS:
            out[key] = value * time_scale
    return out


def per_request(records: Sequence[RequestRecord], itl_list: bool = True) -> list[dict]:
    """Per-request detail (times in ms)."""
    rows = []
    for r in records:
        row: dict[str, Any] = {
            "start_s": r.start_s, "success": r.success, "cut": r.cut, "error": r.error,
            "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens,
            "expected_output_tokens": r.expected_output_tokens,
            "ttft_ms": r.ttft * 1000.0, "e2el_ms": r.latency * 1000.0,
            "tpot_ms": ((r.latency - r.ttft) / (r.output_tokens - 1) * 1000.0
                        if r.success and r.output_tokens > 1 else None),
        }
        if itl_list:
            row["itl_ms"] = [gap * 1000.0 for gap in r.itl]
        else:
            row["mean_itl_ms"] = float(np.mean(r.itl)) * 1000.0 if r.itl else None
        rows.append(row)
    return rows


def format_summary(metrics: dict[str, Any], percentiles: Sequence[float] = (99,),
                   selected: Sequence[str] = METRICS) -> str:
    """A summary table laid out like ``vllm bench serve``'s."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label: str, value: Any, fmt: str = "") -> None:
        lines.append("{:<40} {:<10{fmt}}".format(label, value, fmt=fmt))

    row("Successful requests:", metrics["completed"])
    row("Failed requests:", metrics["failed"])
    if metrics.get("max_concurrency") is not None:
        row("Maximum request concurrency:", metrics["max_concurrency"])
    rate = metrics.get("request_rate")
    if isinstance(rate, (int, float)) and not math.isinf(rate):
        row("Request rate configured (RPS):", rate, ".2f")
    row("Benchmark duration (s):", metrics["duration"], ".2f")
    row("Total input tokens:", metrics["total_input_tokens"])
    row("Total generated tokens:", metrics["total_output_tokens"])
    row("Request throughput (req/s):", metrics["request_throughput"], ".2f")
    if "request_goodput" in metrics:
        row("Request goodput (req/s):", metrics["request_goodput"], ".2f")
        row("Goodput ratio:", metrics["goodput_ratio"], ".3f")
    row("Output token throughput (tok/s):", metrics["output_throughput"], ".2f")
    row("Total Token throughput (tok/s):", metrics["total_token_throughput"], ".2f")
    for name in selected:
        header, short = METRIC_HEADERS[name]
        lines.append("{s:{c}^{n}}".format(s=header, n=50, c="-"))
        row(f"Mean {short} (ms):", metrics[f"mean_{name}_ms"], ".2f")
        row(f"Median {short} (ms):", metrics[f"median_{name}_ms"], ".2f")
        for p in percentiles:
            word = str(int(p)) if int(p) == p else str(p)
            row(f"P{word} {short} (ms):", metrics[percentile_key(name, p)], ".2f")
    lines.append("=" * 50)
    return "\n".join(lines)
