"""The peer routers in ``loadgen compare``: sglang-router, vllm-router and nginx in front of
the same emulated cluster as blockproxy, with the truth file carrying the true lengths."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from loadgen import compare, peers
from loadgen.cluster import EmulatedCluster
from loadgen.peers import PEERS, PeerMissing, SglangRouter, parse_router
from loadgen.report import format_compare, plot_results
from loadgen.run import run_benchmark
from loadgen.workload import RequestSpec, synthetic

PROFILE = "llama-3.1-8b-h100-tp1"


def _installed(name: str) -> bool:
    try:
        PEERS[name].executable()
    except PeerMissing:
        return False
    return True


def test_router_specs() -> None:
    assert parse_router("block") == (None, "block")
    assert parse_router("block*") == (None, "block*")
    assert parse_router("sglang:round_robin") == (PEERS["sglang"], "round_robin")
    assert parse_router("sglang") == (PEERS["sglang"], "cache_aware")
    assert parse_router("nginx") == (PEERS["nginx"], "round_robin")
    with pytest.raises(ValueError, match="has no policy 'fastest'"):
        parse_router("vllm-router:fastest")
    with pytest.raises(ValueError, match="unknown router 'envoy'"):
        parse_router("envoy:round_robin")


def test_a_missing_peer_names_its_install_command(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    class Missing(SglangRouter):
        distribution = "sglang-router-not-installed-here"

    monkeypatch.setitem(peers.PEERS, "sglang", Missing(*[getattr(PEERS["sglang"], f) for f in (
        "name", "policies", "default_policy", "install")]))
    parser = argparse.ArgumentParser()
    compare.add_arguments(parser)
    args = parser.parse_args(["--policies", "round_robin,sglang:round_robin",
                              "--num-requests", "5"])
    assert compare.run(args) == 2
    assert "pip install 'blockproxy[peers]'" in capsys.readouterr().err


ROUTERS = ["round_robin", "sglang:round_robin", "vllm-router:round_robin", "nginx:least_conn"]
KWARGS: dict[str, Any] = {"use_trace_arrivals": True, "percentiles": [50, 99],
                          "max_tokens_policy": "cap"}


def _require(routers: list[str]) -> None:
    missing = [r for r in routers if (peer := parse_router(r)[0]) and not _installed(peer.name)]
    if missing:
        pytest.skip(f"not installed: {missing} ({peers.INSTALL_PEERS}; nginx: apt-get "
                    "install nginx)")


def _specs(count: int, gap_s: float) -> list[RequestSpec]:
    return [RequestSpec(s.prompt_tokens, s.output_tokens, i * gap_s)
            for i, s in enumerate(synthetic(count, 400, 120, 0.6, seed=3))]


@pytest.mark.peers
async def test_every_router_gives_the_same_output_tokens(tmp_path: Path) -> None:
    _require(ROUTERS)
    specs = _specs(60, 0.02)
    result = await compare.compare_seeds(ROUTERS, specs, [1], instances=2, profile=PROFILE,
                                         time_scale=2.0, log=lambda _: None, **KWARGS)
    entries = result["runs"][0]["policies"]
    expected = sum(s.output_tokens for s in specs)
    # Straight to one emulated instance: the truth file and no router at all.
    truth = tmp_path / "truth.json"
    async with EmulatedCluster(1, profile=PROFILE, time_scale=2.0, seed=1,
                               extra_args=["--truth", str(truth)]) as cluster:
        direct = await run_benchmark(cluster.urls[0], specs, seed=1, time_scale=2.0,
                                     truth=str(truth), **KWARGS)
    assert direct["total_output_tokens"] == expected
    for router in ROUTERS:
        metrics = entries[router]["metrics"]
        assert metrics["completed"] == len(specs) and metrics["failed"] == 0, router
        assert metrics["total_output_tokens"] == expected, router
        assert entries[router]["router"], router
    table = format_compare(result)
    assert all(router in table for router in ROUTERS)


@pytest.mark.peers
async def test_round_robin_through_blockproxy_and_sglang_has_the_same_tail() -> None:
    # Light load (the routers' own CPU does not slow the emulator sharing the machine) and
    # 300 requests, so that P99 is not one unlucky request.
    pair = ["round_robin", "sglang:round_robin"]
    _require(pair)
    result = await compare.compare_seeds(pair, _specs(300, 0.015), [1], instances=2,
                                         profile=PROFILE, time_scale=2.0,
                                         log=lambda _: None, **KWARGS)
    rr, sglang = (result["runs"][0]["policies"][p]["metrics"]["unscaled"]["p99_ttft_ms"]
                  for p in pair)
    assert abs(rr - sglang) <= 0.15 * max(rr, sglang), (rr, sglang)


@pytest.mark.peers
async def test_capacity_search_and_report_include_the_peers(tmp_path: Path) -> None:
    # Prefill-heavy requests, so runs are short; the SLO (real-GPU ms) sits between what a
    # lightly loaded pair of instances gives (P99 ~20 ms) and what a burst of all of them at
    # once gives (~100 ms), so each router's search passes the low rate and fails the high.
    routers = ["round_robin", "sglang:round_robin", "nginx:least_conn"]
    _require(routers)
    specs = [RequestSpec(400, 16, i * 0.05) for i in range(80)]
    cfg = {"lo": 1.0, "hi": 80.0, "iterations": 2, "slo_ttft_p99_ms": 60.0,
           "max_failed": 0, "probe": {"until": "first-token", "ttft_abort_ms": 60.0,
                                      "abort_percentile": 99.0}}
    result = await compare.compare_seeds(routers, specs, [1], instances=2, profile=PROFILE,
                                         time_scale=2.0, capacity=cfg, log=lambda _: None,
                                         **KWARGS)
    for router in routers:
        cap = result["runs"][0]["policies"][router]["capacity"]
        assert cap["knob"] == "rate_multiplier" and cap["runs"] == 2, (router, cap)
        assert cap["capacity"] == 1.0 and cap["lowest_fail"] == 80.0, (router, cap)
        assert result["summary"][router]["median"]["capacity"] == 1.0
    table = format_compare(result)
    assert "capacity" in table and all(router in table for router in routers)
    plot = plot_results([result], tmp_path / "cap.png")
    assert plot.stat().st_size > 10_000
