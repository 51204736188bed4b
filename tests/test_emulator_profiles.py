"""The emulator's own profile reader, output-length rule, and its independence from the
proxy (it must import nothing from ``blockproxy`` or ``_fastcore``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadgen.emulator import outputs
from loadgen.emulator.profiles import find_profile, load_profile

REPO = Path(__file__).resolve().parent.parent


def test_load_by_name_and_path(tmp_path: Path) -> None:
    profile = load_profile("llama-3.1-8b-h100-tp1")
    assert profile.step_time.seconds(1000, 10, 0) == pytest.approx(5.75e-3 + 17.3e-3 + 60e-6)
    assert profile.engine.block_size == 16 and profile.engine.max_num_seqs == 256
    path = find_profile("llama-3.1-8b-a100-80gb-tp1")
    assert load_profile(str(path)).step_time.fixed_s == pytest.approx(16.4e-3)


def test_invalid_profile_names_the_field(tmp_path: Path) -> None:
    data = json.loads(find_profile("llama-3.1-8b-h100-tp1").read_text())
    data["step_time"]["fixed_ms"] = -1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"step_time\.fixed_ms"):
        load_profile(str(bad))
    with pytest.raises(FileNotFoundError):
        load_profile("no-such-profile")


def test_emulator_imports_nothing_from_the_proxy() -> None:
    code = ("import sys, loadgen.emulate, loadgen.emulator.server, loadgen.emulator.profiles as p;"
            "p.load_profile('llama-3.1-8b-h100-tp1');"
            "bad=[m for m in sys.modules if m.split('.')[0] in ('blockproxy','_fastcore')];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_drawn_length_is_deterministic_and_depends_on_prompt_length() -> None:
    digests = [outputs.prompt_digest([f"w{i}", "x"]) for i in range(400)]
    assert digests[0] == outputs.prompt_digest(["w0", "x"])
    short = sorted(outputs.drawn_output_length(d, 50, chat=False) for d in digests)
    long = sorted(outputs.drawn_output_length(d, 5000, chat=False) for d in digests)
    chat = sorted(outputs.drawn_output_length(d, 50, chat=True) for d in digests)
    assert 50 < short[200] < 80 and 200 < long[200] < 320 and chat[200] > short[200]
    assert all(1 <= n <= outputs.MAX_DRAWN_LENGTH for n in short + long)


def test_output_text_is_one_word_per_token() -> None:
    text = outputs.output_text(12345, 50)
    assert len(text.split()) == 50 and text.startswith(" ")
