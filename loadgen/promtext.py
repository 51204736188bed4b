"""Prometheus text (``/metrics`` of vLLM, the emulator, blockproxy) as samples.

One reader for every place that scrapes: ``loadgen compare``, the emulator benchmark and
the tests.  Parsing is prometheus-client's own (``text_string_to_metric_families``).
"""

from __future__ import annotations

from typing import NamedTuple

from prometheus_client.parser import text_string_to_metric_families


class Sample(NamedTuple):
    name: str
    labels: dict[str, str]
    value: float


def samples(text: str) -> list[Sample]:
    """Every sample of the exposition, in order (histograms as their ``_bucket``, ``_sum``
    and ``_count`` samples, counters with their ``_total`` names)."""
    return [Sample(s.name, dict(s.labels), float(s.value))
            for family in text_string_to_metric_families(text) for s in family.samples]


def find(parsed: list[Sample] | str, name: str, **labels: str) -> float | None:
    """The first sample called ``name`` whose labels include ``labels``; None if none is."""
    for sample in samples(parsed) if isinstance(parsed, str) else parsed:
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    return None


def total(parsed: list[Sample] | str, name: str) -> float:
    """The sum of every sample called ``name`` (all label sets); 0 when there is none."""
    return sum(s.value for s in (samples(parsed) if isinstance(parsed, str) else parsed)
               if s.name == name)
