"""Trace readers, slicing, clipping, arrival processes and request building."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import orjson
import pytest

from loadgen import workload
from loadgen.tokenizer import count_chat_tokens, count_completion_tokens
from loadgen.workload import (
    HINT_HEADER,
    OUTPUT_TOKENS_HEADER,
    RequestSpec,
    arrival_gaps,
    assign_arrivals,
    build_request,
    detect_format,
    load_trace,
    send_times,
    synthetic,
)


@pytest.fixture
def azure_csv(tmp_path: Path) -> Path:
    path = tmp_path / "azure.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    "2023-11-16 18:15:46.6805900,374,44\n"
                    "2023-11-16 18:15:50.9951690,396,109\n"
                    "2023-11-16 18:15:51.0000000,5000,0\n"
                    "2023-11-16 18:16:00.1805900,20,7\n")
    return path


@pytest.fixture
def mooncake_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "trace.jsonl"
    rows = [{"timestamp": 1000, "input_length": 1100, "output_length": 6,
             "hash_ids": [0, 1, 2]},
            {"timestamp": 1500, "input_length": 700, "output_length": 4, "hash_ids": [0, 3]},
            {"timestamp": 4000, "input_length": 30, "output_length": 2, "hash_ids": [9]}]
    path.write_bytes(b"\n".join(orjson.dumps(r) for r in rows) + b"\n")
    return path


@pytest.fixture
def lengths_csv(tmp_path: Path) -> Path:
    path = tmp_path / "lengths.csv"
    path.write_text("num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n"
                    "74,918,992,0.08\n290,905,1195,0.32\n10,5,15,2.0\n")
    return path


def test_detect_format(azure_csv: Path, mooncake_jsonl: Path, lengths_csv: Path) -> None:
    assert detect_format(azure_csv) == "azure"
    assert detect_format(mooncake_jsonl) == "mooncake"
    assert detect_format(lengths_csv) == "lengths"


def test_azure_reader_parses_datetimes(azure_csv: Path) -> None:
    specs = load_trace(azure_csv)
    assert [s.prompt_tokens for s in specs] == [374, 396, 5000, 20]
    # A zero-length answer becomes one token: every request generates something.
    assert [s.output_tokens for s in specs] == [44, 109, 1, 7]
    assert specs[0].arrival_s == 0.0
    assert specs[1].arrival_s == pytest.approx(4.314579, abs=1e-5)
    assert specs[3].arrival_s == pytest.approx(13.5)


def test_azure_slicing_rebases_on_first_request(azure_csv: Path) -> None:
    specs = load_trace(azure_csv, start=4.0, duration=5.0)
    assert [s.prompt_tokens for s in specs] == [396, 5000]
    assert specs[0].arrival_s == 0.0
    assert specs[1].arrival_s == pytest.approx(0.004831, abs=1e-5)
    assert len(load_trace(azure_csv, num_requests=2)) == 2


def test_clipping_to_context(azure_csv: Path) -> None:
    specs = load_trace(azure_csv, clip_context=400)
    assert all(s.prompt_tokens + s.output_tokens <= 400 for s in specs)
    assert specs[0] == RequestSpec(374, 26, 0.0)
    assert specs[2].prompt_tokens == 399 and specs[2].output_tokens == 1


def test_mooncake_reader(mooncake_jsonl: Path) -> None:
    specs = load_trace(mooncake_jsonl)
    assert specs[0] == RequestSpec(1100, 6, 0.0, (0, 1, 2))
    assert specs[1].arrival_s == pytest.approx(0.5)
    assert specs[2].hash_ids == (9,)
    clipped = load_trace(mooncake_jsonl, clip_context=600)
    assert clipped[0].prompt_tokens == 599
    assert clipped[0].hash_ids == (0, 1)  # blocks past the clipped prompt are dropped
    assert [s.output_tokens for s in load_trace(mooncake_jsonl, start=0.5)] == [4, 2]


def test_lengths_reader_and_row_offset(lengths_csv: Path) -> None:
    specs = load_trace(lengths_csv)
    assert [(s.prompt_tokens, s.output_tokens) for s in specs] == [(74, 918), (290, 905),
                                                                    (10, 5)]
    assert all(s.arrival_s == 0 for s in specs)
    assert [s.prompt_tokens for s in load_trace(lengths_csv, start=1, num_requests=1)] == [290]


def test_length_only_traces_mix_in_turn(lengths_csv: Path, tmp_path: Path,
                                        azure_csv: Path) -> None:
    long = tmp_path / "long.csv"
    long.write_text("num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n"
                    "3772,54,3826,69.8\n2015,156,2171,12.9\n")
    specs = load_trace(f"{lengths_csv}+{long}")
    assert [(s.prompt_tokens, s.output_tokens) for s in specs] == [
        (74, 918), (3772, 54), (290, 905), (2015, 156)]  # ends with the shorter trace
    assert [s.prompt_tokens for s in load_trace(f"{lengths_csv}+{long}", start=1,
                                                num_requests=1)] == [290]
    with pytest.raises(ValueError, match="only length-only traces mix"):
        load_trace(f"{lengths_csv}+{azure_csv}")


def test_trace_names_fall_back_to_bundled_slice(tmp_path: Path) -> None:
    assert workload.resolve_trace("azure-conv", search_path=[tmp_path]).name == \
        "azure_conv_slice.csv"
    with pytest.raises(FileNotFoundError):
        workload.resolve_trace("mooncake", search_path=[tmp_path])
    specs = load_trace(workload.resolve_trace("azure-conv", search_path=[tmp_path]),
                       num_requests=5)
    assert len(specs) == 5 and specs[0].arrival_s == 0.0


def test_gamma_gaps_have_mean_one_over_rate() -> None:
    for burstiness in (0.5, 1.0, 4.0):
        gaps = arrival_gaps(50_000, rate=8.0, burstiness=burstiness, seed=1)
        assert gaps.mean() == pytest.approx(1 / 8.0, rel=0.03)
        # Gamma(b, 1/(r b)) has coefficient of variation 1/sqrt(b).
        assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_arrivals_are_seeded_and_inf_rate_sends_at_once() -> None:
    specs = [RequestSpec(10, 10, 0.0)] * 20
    a = assign_arrivals(specs, 5.0, 1.0, seed=3)
    assert a == assign_arrivals(specs, 5.0, 1.0, seed=3)
    assert a != assign_arrivals(specs, 5.0, 1.0, seed=4)
    assert a[0].arrival_s == 0.0 and np.all(np.diff([s.arrival_s for s in a]) >= 0)
    assert all(s.arrival_s == 0 for s in assign_arrivals(specs, math.inf))


def test_send_times_scale_with_time_scale_over_rate_multiplier() -> None:
    specs = [RequestSpec(1, 1, t) for t in (0.0, 1.0, 3.0)]
    assert send_times(specs, time_scale=0.1, rate_multiplier=2.0) == \
        pytest.approx([0.0, 0.05, 0.15])


def test_synthetic_is_seeded() -> None:
    a = synthetic(200, prompt_mean=300, output_mean=50, seed=7)
    assert a == synthetic(200, prompt_mean=300, output_mean=50, seed=7)
    assert np.mean([s.prompt_tokens for s in a]) == pytest.approx(300, rel=0.15)
    fixed = synthetic(3, prompt_mean=12, output_mean=4, spread=0.0, rate=2.0)
    assert [(s.prompt_tokens, s.output_tokens) for s in fixed] == [(12, 4)] * 3
    assert fixed[2].arrival_s > fixed[1].arrival_s > 0


@pytest.mark.parametrize("tokens", [1, 7, 513, 2000])
def test_prompts_have_exact_token_counts(tokens: int) -> None:
    spec = RequestSpec(tokens, 9, 0.0)
    _, body, headers = build_request(spec, seed="0:1")
    assert count_completion_tokens(body["prompt"]) == tokens
    assert headers == {OUTPUT_TOKENS_HEADER: "9"}
    _, chat, _ = build_request(RequestSpec(tokens + 5, 9, 0.0),
                               endpoint="/v1/chat/completions", seed="0:1")
    assert count_chat_tokens(chat["messages"]) == tokens + 5


def test_shared_hash_ids_share_prefix_text() -> None:
    a = build_request(RequestSpec(1100, 5, 0.0, (0, 1, 2)), seed="0:0")[1]["prompt"].split()
    b = build_request(RequestSpec(700, 5, 0.0, (0, 3)), seed="0:1")[1]["prompt"].split()
    assert len(a) == 1100 and len(b) == 700
    assert a[:512] == b[:512] and a[512:700] != b[512:700]
    # Without hash ids distinct requests get distinct prompts.
    c = build_request(RequestSpec(50, 5, 0.0), seed="0:0")[1]["prompt"]
    d = build_request(RequestSpec(50, 5, 0.0), seed="0:1")[1]["prompt"]
    assert c != d


def test_max_tokens_policies_and_hint() -> None:
    spec = RequestSpec(100, 40, 0.0)
    assert build_request(spec, max_tokens_policy="true")[1]["max_tokens"] == 40
    assert build_request(spec)[1]["max_tokens"] == 2048
    assert build_request(spec, max_tokens_policy="cap", fixed_cap=64)[1]["max_tokens"] == 64
    assert build_request(spec, max_tokens_policy="slack", slack=1.25)[1]["max_tokens"] == 50
    assert build_request(spec, context_limit=1000)[1]["max_tokens"] == 900
    path, body, headers = build_request(spec, hint=True)
    assert path == "/v1/completions"
    assert headers[HINT_HEADER] == headers[OUTPUT_TOKENS_HEADER] == "40"
    assert body["stream"] is True and body["ignore_eos"] is False
    assert body["stream_options"] == {"include_usage": True}
    with pytest.raises(ValueError):
        build_request(spec, max_tokens_policy="bogus")


def test_sessions_share_system_prompts_and_grow_their_history() -> None:
    from loadgen.workload import MOONCAKE_BLOCK_TOKENS, sessions

    specs = sessions(60, turns_mean=4, system_prompts=3, system_tokens=1000,
                     user_tokens_mean=200, output_mean=150, seed=7)
    assert specs == sessions(60, turns_mean=4, system_prompts=3, system_tokens=1000,
                             user_tokens_mean=200, output_mean=150, seed=7)
    assert [s.arrival_s for s in specs] == sorted(s.arrival_s for s in specs)
    sys_blocks = 2  # 1000 tokens round up to two 512-token blocks
    systems = {s.hash_ids[:sys_blocks] for s in specs}
    assert len(systems) == 3
    for s in specs:
        # the blocks cover the prompt exactly: the last one may be cut, none is spare
        blocks = len(s.hash_ids)
        assert (blocks - 1) * MOONCAKE_BLOCK_TOKENS < s.prompt_tokens <= \
            blocks * MOONCAKE_BLOCK_TOKENS
    # a session's later turn starts with all of an earlier turn's blocks
    by_session: dict[int, list] = {}
    for s in specs:
        if len(s.hash_ids) > sys_blocks:
            by_session.setdefault(s.hash_ids[sys_blocks], []).append(s)
    multi = [turns for turns in by_session.values() if len(turns) > 1]
    assert multi
    for turns in multi:
        for a, b in zip(turns, turns[1:]):
            assert b.arrival_s > a.arrival_s
            assert b.hash_ids[:len(a.hash_ids)] == a.hash_ids
            assert b.prompt_tokens > a.prompt_tokens + a.output_tokens
    capped = sessions(60, seed=7, max_context=3000)
    assert all(s.prompt_tokens + s.output_tokens <= 3000 for s in capped)


def test_sessions_from_the_command_line() -> None:
    import argparse

    from loadgen.run import add_arguments, specs_from_args, timestamped

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--target", "http://x", "--format", "sessions", "--sessions",
                              "10", "--num-requests", "12", "--system-tokens", "512"])
    specs = specs_from_args(args)
    assert timestamped(args) and len(specs) == 12 and specs[0].arrival_s == 0.0


def test_prefix_reuse_counts_tokens_of_blocks_seen_before() -> None:
    from loadgen.workload import RequestSpec, prefix_reuse

    specs = [RequestSpec(1024, 1, 0.0, (1, 2)), RequestSpec(700, 1, 1.0, (1, 3)),
             RequestSpec(100, 1, 2.0, (1,))]
    # 1024 + 700 + 100 tokens; reused: block 1 of the second (512) and of the third (100)
    assert prefix_reuse(specs) == (512 + 100) / (1024 + 700 + 100)
    assert prefix_reuse([RequestSpec(10, 1, 0.0)]) is None


# ---- rate schedules (on/off loads with ramps) ---------------------------------------------

def test_a_rate_schedule_is_parsed_and_checked() -> None:
    assert workload.parse_schedule("0:10,5:10,6:40") == [(0.0, 10.0), (5.0, 10.0), (6.0, 40.0)]
    assert workload.parse_schedule("2:10,4:0") == [(0.0, 10.0), (2.0, 10.0), (4.0, 0.0)]
    for bad in ("", "10", "0:10,0:20", "0:-1,5:3", "0:0,5:0", "0:x,5:3", "0:inf,5:1"):
        with pytest.raises(ValueError):
            workload.parse_schedule(bad)


def test_schedule_arrivals_follow_the_rate_and_stop_at_the_end() -> None:
    points = workload.parse_schedule("0:100,20:100,21:400,41:400,42:0")
    times = workload.schedule_times(points, seed=3)
    assert times == sorted(times) and times[-1] <= 42.0
    low = sum(1 for t in times if t < 20)
    high = sum(1 for t in times if 21 <= t < 41)
    assert low == pytest.approx(2000, rel=0.08)
    assert high == pytest.approx(8000, rel=0.05)
    ramp = [t for t in times if 20 <= t < 21]  # the ramp: 250 expected, denser at its end
    assert len(ramp) == pytest.approx(250, rel=0.25)
    assert sum(1 for t in ramp if t >= 20.5) > sum(1 for t in ramp if t < 20.5)
    assert workload.schedule_times(points, seed=3) == times  # seeded
    assert len(workload.schedule_times(points, seed=3, limit=10)) == 10
    specs = workload.assign_schedule(workload.synthetic(5), points)
    assert [s.arrival_s for s in specs] == workload.schedule_times(points, seed=0)[:5]
