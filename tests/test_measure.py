"""Metrics against hand-computed per-request records (vLLM ``bench serve`` definitions)."""

from __future__ import annotations

import pytest

from loadgen.client import RequestRecord
from loadgen.measure import (
    calculate_metrics,
    format_summary,
    parse_goodput,
    parse_percentiles,
    percentile_key,
    unscale,
)


def records() -> list[RequestRecord]:
    return [
        # TTFT 0.1 s, last chunk at 0.5 s, 5 tokens: TPOT = 0.4 / 4 = 0.1 s.
        RequestRecord(10, success=True, ttft=0.1, latency=0.5, itl=[0.1, 0.1, 0.1, 0.1],
                      output_tokens=5),
        # TTFT 0.3 s, 3 tokens: TPOT = (0.7 - 0.3) / 2 = 0.2 s.
        RequestRecord(20, success=True, ttft=0.3, latency=0.7, itl=[0.15, 0.25],
                      output_tokens=3),
        # One token: no TPOT, no ITL.
        RequestRecord(30, success=True, ttft=0.2, latency=0.2, output_tokens=1),
        RequestRecord(40, error="HTTP 500"),
    ]


def test_counts_and_throughputs() -> None:
    m = calculate_metrics(records(), duration_s=2.0)
    assert m["completed"] == 3 and m["failed"] == 1
    assert m["total_input_tokens"] == 60  # failed requests' prompts do not count
    assert m["total_output_tokens"] == 9
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(4.5)
    assert m["total_token_throughput"] == pytest.approx(34.5)
    assert "request_goodput" not in m


def test_latency_summaries() -> None:
    m = calculate_metrics(records(), duration_s=2.0, percentiles=(50, 90, 99))
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["std_ttft_ms"] == pytest.approx((20000 / 3) ** 0.5 * 1)  # population std
    assert m["p90_ttft_ms"] == pytest.approx(280.0)  # linear interpolation
    assert m["mean_tpot_ms"] == pytest.approx(150.0)  # the 1-token request is left out
    assert m["p99_tpot_ms"] == pytest.approx(199.0)
    assert m["mean_itl_ms"] == pytest.approx(800 / 6)  # pooled over requests
    assert m["median_itl_ms"] == pytest.approx(100.0)
    assert m["mean_e2el_ms"] == pytest.approx(1400 / 3)
    assert m["p50_e2el_ms"] == pytest.approx(500.0)
    for name in ("ttft", "tpot", "itl", "e2el"):
        for key in (f"mean_{name}_ms", f"median_{name}_ms", f"std_{name}_ms",
                    f"p99_{name}_ms"):
            assert key in m


def test_goodput_counts_requests_meeting_every_slo() -> None:
    m = calculate_metrics(records(), 2.0, goodput={"ttft": 250.0})
    assert m["request_goodput"] == pytest.approx(1.0)  # ttft 0.1 and 0.2 pass
    assert m["goodput_ratio"] == pytest.approx(0.5)  # of 4 sent
    m = calculate_metrics(records(), 2.0, goodput={"ttft": 250.0, "tpot": 150.0})
    # The one-token request has TPOT 0 for goodput, as in vLLM.
    assert m["request_goodput"] == pytest.approx(1.0)
    m = calculate_metrics(records(), 2.0, goodput={"e2el": 500.0})
    assert m["request_goodput"] == pytest.approx(1.0)


def test_a_cut_request_is_judged_on_its_first_token_alone() -> None:
    cut = [RequestRecord(1, cut=True, ttft=0.1), RequestRecord(2, cut=True, ttft=0.4),
           RequestRecord(3, cut=True)]  # stopped before its first token
    m = calculate_metrics(cut, 1.0, goodput={"ttft": 250.0})
    assert m["request_goodput"] == pytest.approx(1.0) and m["cut"] == 3
    # its end never came: with any other SLO it cannot be judged good
    m = calculate_metrics(cut, 1.0, goodput={"ttft": 250.0, "e2el": 10000.0})
    assert m["request_goodput"] == 0.0


def test_empty_run_reports_zeros() -> None:
    m = calculate_metrics([RequestRecord(5, error="x")], 1.0)
    assert m["completed"] == 0 and m["failed"] == 1
    assert m["mean_ttft_ms"] == 0.0 and m["p99_e2el_ms"] == 0.0


def test_parsers_and_keys() -> None:
    assert parse_percentiles("50,90,99") == [50.0, 90.0, 99.0]
    assert percentile_key("ttft", 99.0) == "p99_ttft_ms"
    assert percentile_key("itl", 99.9) == "p99.9_itl_ms"
    assert parse_goodput(["ttft:200", "tpot:50"]) == {"ttft": 200.0, "tpot": 50.0}
    assert parse_goodput(["ttft:200 e2el:900"]) == {"ttft": 200.0, "e2el": 900.0}
    for bad in (["itl:5"], ["ttft"], ["ttft:-1"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)
    with pytest.raises(ValueError):
        parse_percentiles("101")


def test_unscale_divides_times_and_multiplies_rates() -> None:
    m = calculate_metrics(records(), 2.0)
    real = unscale(m, 0.1)
    assert real["mean_ttft_ms"] == pytest.approx(2000.0)
    assert real["duration"] == pytest.approx(20.0)
    assert real["request_throughput"] == pytest.approx(0.15)
    assert "completed" not in real


def test_summary_table_looks_like_vllm() -> None:
    m = calculate_metrics(records(), 2.0, goodput={"ttft": 250.0})
    text = format_summary(m)
    assert text.splitlines()[0] == "{:=^50}".format(" Serving Benchmark Result ")
    assert "Successful requests:" in text and "P99 TTFT (ms):" in text
    assert "Request goodput (req/s):" in text
