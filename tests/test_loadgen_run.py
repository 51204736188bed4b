"""``loadgen run``/``capacity`` end to end against a real ``loadgen emulate``, the client's
failure accounting against small in-process servers, and the capacity search logic."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from loadgen.capacity import find_capacity, scan_capacity, slo_check
from loadgen.run import run_benchmark
from loadgen.workload import RequestSpec, load_trace
from tests.procs import ROOT, Emulator, free_ports

N = 12


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    with Emulator(tmp_path_factory.mktemp("emu"), instances=1, time_scale=0.1) as emu:
        yield emu


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    path = tmp_path / "azure.csv"
    rows = [f"2023-11-16 18:15:{i // 2:02d}.{i % 2 * 5}000000,{40 + 37 * i},{3 + 5 * i}"
            for i in range(N)]
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    return path


def test_cli_run_against_emulator(emulator: Emulator, trace: Path, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "loadgen.cli", "run", "--target", emulator.urls[0],
         "--trace", str(trace), "--use-trace-timestamps", "--rate-multiplier", "2",
         "--time-scale", "0.1", "--max-tokens-policy", "true", "--goodput", "ttft:60000",
         "--metric-percentiles", "50,90,99", "--json", str(out), "--detail"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Serving Benchmark Result" in proc.stdout
    result = json.loads(out.read_text())
    assert result["completed"] == N and result["failed"] == 0
    for key in ("duration", "total_input_tokens", "total_output_tokens", "request_throughput",
                "request_goodput", "output_throughput", "total_token_throughput",
                "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p50_ttft_ms", "p90_tpot_ms",
                "p99_itl_ms", "p99_e2el_ms", "goodput_ratio", "unscaled", "seed",
                "num_prompts", "target", "burstiness", "max_concurrency", "request_rate"):
        assert key in result, key
    specs = load_trace(trace)
    assert result["total_input_tokens"] == sum(s.prompt_tokens for s in specs)
    # The emulator generated exactly the lengths of x-loadgen-output-tokens.
    assert [r["output_tokens"] for r in result["per_request"]] == \
        [s.output_tokens for s in specs]
    assert result["unscaled"]["mean_ttft_ms"] == pytest.approx(result["mean_ttft_ms"] * 10)


async def test_closed_loop_chat_and_cap_policy(emulator: Emulator) -> None:
    specs = [RequestSpec(30 + i, 4 + i, 0.0) for i in range(6)]
    m = await run_benchmark(emulator.urls[0], specs, endpoint="/v1/chat/completions",
                            max_concurrency=2, max_tokens_policy="cap", max_tokens_cap=6,
                            detail=True)
    assert m["completed"] == 6 and m["failed"] == 0 and m["max_concurrency"] == 2
    # Lengths above the cap stop at the cap, as max_tokens does on vLLM.
    assert [r["output_tokens"] for r in m["per_request"]] == [4, 5, 6, 6, 6, 6]
    assert [r["prompt_tokens"] for r in m["per_request"]] == [30, 31, 32, 33, 34, 35]


async def test_http_and_connection_errors_count_as_failed(emulator: Emulator) -> None:
    specs = [RequestSpec(10, 3, 0.0)] * 2
    m = await run_benchmark(emulator.urls[0], specs, model="no-such-model", detail=True)
    assert m["failed"] == 2 and m["completed"] == 0
    assert m["per_request"][0]["error"].startswith("HTTP 404")
    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    m = await run_benchmark(dead, specs, detail=True)
    assert m["failed"] == 2 and m["per_request"][0]["error"]


def _stream_app(body: bytes) -> web.Application:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(body)
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    return app


@pytest.fixture
async def serve() -> AsyncIterator:
    runners: list[web.AppRunner] = []

    async def start(body: bytes) -> str:
        runner = web.AppRunner(_stream_app(body))
        await runner.setup()
        port = free_ports(1)[0]
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


def _chunk(text: str) -> bytes:
    return b'data: {"choices":[{"index":0,"text":' + json.dumps(text).encode() + b'}]}\n\n'


async def test_truncated_stream_and_error_event_fail(serve) -> None:
    spec = [RequestSpec(5, 2, 0.0)]
    m = await run_benchmark(await serve(_chunk(" a") + _chunk(" b")), spec, detail=True)
    assert m["failed"] == 1 and "[DONE]" in m["per_request"][0]["error"]
    error = b'data: {"error":{"message":"backend died","code":502}}\n\n'
    m = await run_benchmark(await serve(_chunk(" a") + error), spec, detail=True)
    assert m["failed"] == 1 and "backend died" in m["per_request"][0]["error"]
    # Without a usage chunk the output length is the number of text chunks.
    ok = b": keep-alive\n\n" + _chunk(" a") + _chunk(" b") + _chunk(" c") + b"data: [DONE]\n\n"
    m = await run_benchmark(await serve(ok), spec, detail=True)
    assert m["completed"] == 1 and m["per_request"][0]["output_tokens"] == 3
    assert len(m["per_request"][0]["itl_ms"]) == 2


def _fake_run(capacity: float, calls: list[float]):
    async def run_once(value: float) -> dict:
        calls.append(value)
        return {"completed": 10, "failed": 0, "p99_ttft_ms": 100.0 * value / capacity}
    return run_once


async def test_find_capacity_bisects_within_budget() -> None:
    calls: list[float] = []
    result = await find_capacity(_fake_run(5.0, calls), 1.0, 32.0, 8,
                                 slo_check(p99_ttft_ms=100.0))
    assert len(calls) == 8 and calls[:2] == [1.0, 32.0]
    assert result["runs"] == 8
    assert result["capacity"] <= 5.0 < result["lowest_fail"]
    assert result["lowest_fail"] / result["capacity"] < 1.1
    assert [p["value"] for p in result["curve"]] == sorted(calls)


async def test_find_capacity_edges() -> None:
    calls: list[float] = []
    low = await find_capacity(_fake_run(0.5, calls), 1.0, 8.0, 5, slo_check(100.0))
    assert low["capacity"] is None and calls == [1.0]
    high = await find_capacity(_fake_run(50.0, []), 1.0, 8.0, 5, slo_check(100.0))
    assert high["capacity"] == 8.0 and high["runs"] == 2
    scan = await scan_capacity(_fake_run(3.0, []), [4, 1, 2, 3], slo_check(100.0))
    assert scan["capacity"] == 3 and scan["lowest_fail"] == 4


def test_slo_check_rules() -> None:
    check = slo_check(p99_ttft_ms=100.0, min_goodput_ratio=0.9)
    assert check({"completed": 5, "failed": 0, "p99_ttft_ms": 90.0, "goodput_ratio": 0.95})
    assert not check({"completed": 5, "failed": 0, "p99_ttft_ms": 90.0, "goodput_ratio": 0.5})
    assert not check({"completed": 5, "failed": 1, "p99_ttft_ms": 9.0, "goodput_ratio": 1.0})
    assert not check({"completed": 0, "failed": 0, "p99_ttft_ms": 0.0, "goodput_ratio": 1.0})


def test_cli_capacity_against_emulator(emulator: Emulator, trace: Path, tmp_path: Path) -> None:
    out = tmp_path / "capacity.json"
    proc = subprocess.run(
        [sys.executable, "-m", "loadgen.cli", "capacity", "--target", emulator.urls[0],
         "--trace", str(trace), "--use-trace-timestamps", "--time-scale", "0.1",
         "--slo-ttft-p99-ms", "600000", "--multipliers", "1,4", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "capacity (rate_multiplier): 4" in proc.stdout
    result = json.loads(out.read_text())
    assert [p["value"] for p in result["curve"]] == [1.0, 4.0]
    assert all(p["passed"] for p in result["curve"])


def _args(*argv: str):
    import argparse

    from loadgen.run import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--target", "http://127.0.0.1:1", *argv])


def test_workload_flags(trace: Path, tmp_path: Path) -> None:
    from loadgen.run import benchmark_kwargs, specs_from_args

    lengths = tmp_path / "lengths.csv"
    lengths.write_text("num_prefill_tokens,num_decode_tokens\n"
                       + "".join(f"{10 + i},{2 + i}\n" for i in range(500)))
    # No timestamps: --duration cuts the Poisson process (about rate x duration requests).
    specs = specs_from_args(_args("--trace", str(lengths), "--request-rate", "50",
                                  "--duration", "2", "--seed", "1"))
    assert 60 < len(specs) < 140 and specs[-1].arrival_s < 2.0
    with pytest.raises(ValueError):
        specs_from_args(_args("--trace", str(lengths), "--use-trace-timestamps"))
    assert len(specs_from_args(_args("--trace", str(trace), "--duration", "2"))) == 4
    assert len(specs_from_args(_args("--num-requests", "7"))) == 7
    kwargs = benchmark_kwargs(_args("--goodput", "ttft:5", "tpot:1",
                                    "--metric-percentiles", "90,99"))
    assert kwargs["goodput"] == {"ttft": 5.0, "tpot": 1.0}
    assert kwargs["percentiles"] == [90.0, 99.0] and kwargs["until"] == "done"
    assert benchmark_kwargs(_args("--until", "first-token"))["until"] == "first-token"


def _capacity_args(*argv: str):
    import argparse

    from loadgen.capacity import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--target", "http://127.0.0.1:1", *argv])


def test_capacity_probes_end_at_first_token_unless_goodput_needs_whole_requests() -> None:
    from loadgen.capacity import probe_kwargs

    assert probe_kwargs(_capacity_args("--slo-ttft-p99-ms", "1500", "--time-scale", "8")) == \
        {"until": "first-token", "ttft_abort_ms": 1500.0, "abort_percentile": 99.0}
    whole = probe_kwargs(_capacity_args("--goodput", "ttft:100", "--min-goodput-ratio", "0.9"))
    assert whole["until"] == "done"
    assert probe_kwargs(_capacity_args("--no-early-abort"))["ttft_abort_ms"] is None
    with pytest.raises(ValueError, match="whole requests"):
        probe_kwargs(_capacity_args("--probe-until", "first-token", "--goodput", "ttft:1",
                                    "--min-goodput-ratio", "0.5"))


def test_progress_bar_draws_to_its_stream() -> None:
    import io

    from loadgen.run import Progress

    out = io.StringIO()
    bar = Progress(2, stream=out, width=10)
    bar.update(True)
    bar.update(False)
    bar.close()
    assert "2/2 failed 1" in out.getvalue() and "[##########]" in out.getvalue()


async def test_run_through_blockproxy_with_hint(emulator: Emulator, tmp_path: Path) -> None:
    from tests.procs import Proxy, write_backends

    backends = write_backends(tmp_path / "backends.yaml", [{"url": emulator.urls[0]}])
    with Proxy(tmp_path, backends) as proxy:
        specs = [RequestSpec(20 + i, 2 + i, 0.01 * i) for i in range(5)]
        m = await run_benchmark(proxy.url, specs, use_trace_arrivals=True, time_scale=0.1,
                                hint=True, detail=True)
    assert m["completed"] == 5 and m["failed"] == 0
    assert [r["output_tokens"] for r in m["per_request"]] == [2, 3, 4, 5, 6]


# ------------------------------------------------------------------ capacity probes


def test_abort_threshold_is_sufficient_for_numpy_percentiles() -> None:
    import numpy as np

    from loadgen.run import abort_threshold
    previous = 0
    for n in range(1, 600):
        m = abort_threshold(n, 99.0)
        assert 1 <= m <= n, (n, m)
        # The abort argument needs this: fewer requests never need more values over.
        assert m >= previous, (n, m, previous)
        previous = m
        values = [0.0] * (n - m) + [2.0] * m
        assert np.percentile(values, 99) > 1.0, n
    assert abort_threshold(3000, 99.0) == 31 and abort_threshold(100, 50.0) == 51


async def test_first_token_probe_cuts_only_unfinished_streams(emulator: Emulator) -> None:
    # Two short answers finish; two long ones (thousands of steps) are cut at their first
    # token, and their TTFTs still count.
    specs = [RequestSpec(20, 2, 0.0), RequestSpec(20, 3000, 0.0), RequestSpec(24, 2, 0.0),
             RequestSpec(24, 3000, 0.0)]
    m = await run_benchmark(emulator.urls[0], specs, max_tokens_policy="true", detail=True,
                            until="first-token")
    rows = m["per_request"]
    assert m["until"] == "first-token" and "aborted" not in m
    assert (m["completed"], m["failed"], m["cut"]) == (2, 0, 2)
    assert [r["cut"] for r in rows] == [False, True, False, True]
    assert all(r["ttft_ms"] > 0 for r in rows)
    assert m["mean_ttft_ms"] == pytest.approx(sum(r["ttft_ms"] for r in rows) / 4)
    done = await run_benchmark(emulator.urls[0], specs[:1], max_tokens_policy="true")
    assert done["until"] == "done" and "cut" not in done and done["completed"] == 1


async def test_probe_aborts_once_the_ttft_bound_is_lost(emulator: Emulator) -> None:
    specs = [RequestSpec(200, 400, 0.02 * i) for i in range(12)]
    m = await run_benchmark(emulator.urls[0], specs, max_tokens_policy="true",
                            use_trace_arrivals=True, until="first-token",
                            ttft_abort_ms=0.001, detail=True)
    assert "aborted" in m and "p99 TTFT must exceed" in m["aborted"]
    assert m["cut"] >= 1 and m["failed"] == 0
    assert not slo_check(p99_ttft_ms=1e9)(m)  # an aborted probe never passes
    # A bound that holds: no abort, every first token measured.
    m = await run_benchmark(emulator.urls[0], specs, max_tokens_policy="true",
                            use_trace_arrivals=True, until="first-token",
                            ttft_abort_ms=600_000.0)
    assert "aborted" not in m and m["completed"] + m["cut"] == len(specs)
    assert slo_check(p99_ttft_ms=600_000.0)(m)


async def test_goodput_slos_are_real_gpu_ms_when_time_scaled(emulator: Emulator) -> None:
    # 300 tokens take >= 300 x 5.75 ms = 1.7 s of real-GPU time, 0.17 s of wall time at
    # time-scale 0.1: a 1 s E2E SLO holds in wall time but not in real-GPU time.
    specs = [RequestSpec(20, 300, 0.0)]
    m = await run_benchmark(emulator.urls[0], specs, max_tokens_policy="true",
                            time_scale=0.1, goodput={"e2el": 1000.0})
    assert m["completed"] == 1 and m["goodput_ratio"] == 0.0
    assert m["goodput_slos_ms"] == {"e2el": 1000.0}
    m = await run_benchmark(emulator.urls[0], specs, max_tokens_policy="true",
                            time_scale=0.1, goodput={"e2el": 10_000_000.0})
    assert m["goodput_ratio"] == 1.0


async def test_chat_role_chunk_starts_ttft_as_in_vllm_bench() -> None:
    # vLLM's bench times every event with choices, chat's role-only opening one included.
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n')
        await asyncio.sleep(0.3)
        for word in (" a", " b"):
            await resp.write(b'data: {"choices":[{"index":0,"delta":{"content":"'
                             + word.encode() + b'"}}]}\n\n')
        await resp.write(b'data: {"choices":[],"usage":{"completion_tokens":2}}\n\n'
                         b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_ports(1)[0]
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        m = await run_benchmark(f"http://127.0.0.1:{port}", [RequestSpec(5, 2, 0.0)],
                                endpoint="/v1/chat/completions", detail=True)
    finally:
        await runner.cleanup()
    (row,) = m["per_request"]
    assert m["completed"] == 1 and row["output_tokens"] == 2
    assert row["ttft_ms"] < 250 <= row["e2el_ms"]  # the role chunk, not the 0.3 s later text
    assert len(row["itl_ms"]) == 2 and row["itl_ms"][0] >= 250
