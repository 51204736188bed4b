"""Profiles: the shipped files load, and a bad field is named in the error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blockproxy.profile import ProfileError, available_profiles, load_profile, save_profile


def test_shipped_profiles_load():
    names = available_profiles()
    assert {"llama-3.1-8b-h100-tp1", "llama-3.1-8b-a100-80gb-tp1",
            "llama-3.1-8b-h100-tp2"} <= set(names)
    h100 = load_profile("llama-3.1-8b-h100-tp1")
    assert h100.step_time.fixed_s == pytest.approx(5.75e-3)
    assert h100.step_time.per_prefill_token_s == pytest.approx(17.3e-6)
    assert h100.step_time.per_decode_seq_s == pytest.approx(6.0e-6)
    assert h100.engine.block_size == 16
    tp2 = load_profile("llama-3.1-8b-h100-tp2")
    assert tp2.tensor_parallel_size == 2
    assert tp2.step_time.per_decode_seq_s == pytest.approx(2.8e-6)


def test_round_trip_through_a_file(tmp_path: Path):
    original = load_profile("llama-3.1-8b-a100-80gb-tp1")
    path = tmp_path / "mine.json"
    save_profile(original, path)
    again = load_profile(path)
    for field in ("fixed_s", "per_prefill_token_s", "per_decode_seq_s", "per_context_token_s"):
        assert getattr(again.step_time, field) == pytest.approx(getattr(original.step_time, field))
    assert again.engine == original.engine


def _write(tmp_path: Path, mutate) -> Path:
    data = load_profile("llama-3.1-8b-h100-tp1").to_json()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["step_time"].__setitem__("fixed_ms", -1), "step_time.fixed_ms"),
    (lambda d: d["step_time"].pop("per_decode_seq_us"), "step_time.per_decode_seq_us"),
    (lambda d: d["step_time"].__setitem__("per_prefill_token_us", "fast"),
     "step_time.per_prefill_token_us"),
    (lambda d: d["engine"].__setitem__("block_size", 0), "engine.block_size"),
    (lambda d: d["engine"].__setitem__("num_gpu_blocks", 1.5), "engine.num_gpu_blocks"),
    (lambda d: d.__setitem__("engine", []), "engine"),
    (lambda d: d.__setitem__("format_version", 7), "format_version"),
])
def test_bad_field_is_named(tmp_path: Path, mutate, field: str):
    with pytest.raises(ProfileError, match=field.replace(".", r"\.")):
        load_profile(_write(tmp_path, mutate))


def test_unknown_name_lists_shipped_profiles():
    with pytest.raises(ProfileError, match=r"llama-3\.1-8b-h100-tp1"):
        load_profile("no-such-profile")


def test_invalid_json_names_the_line(tmp_path: Path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "name": "x",\n  oops\n}')
    with pytest.raises(ProfileError, match="line 3"):
        load_profile(path)
