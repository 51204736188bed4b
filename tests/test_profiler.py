"""``blockproxy profile`` against a real emulated instance whose speed it is not told.

The emulator runs a profile with every step term non-zero and a per-request overhead, at a
time scale and a speed factor the tool does not know; the fitted coefficients must come
out within 10% of what the emulator really does (profile x time scale x speed factor for
the step terms, overhead x time scale), and the engine limits exactly as configured.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from blockproxy.profile import load_profile
from loadgen.procs import command
from tests.procs import Emulator

TRUE = {"fixed_ms": 4.0, "per_prefill_token_us": 25.0, "per_decode_seq_us": 40.0,
        "per_context_token_us": 0.02, "per_request_ms": 20.0}
ENGINE = {"max_num_seqs": 32, "max_num_batched_tokens": 4096, "num_gpu_blocks": 8192,
          "block_size": 16, "max_model_len": 8192}
TIME_SCALE = 2.0
SPEED_FACTOR = 1.2  # hidden from the tool


@pytest.fixture
def emulated(tmp_path: Path):
    path = tmp_path / "truth-profile.json"
    path.write_text(json.dumps({"format_version": 1, "name": "truth-profile",
                                "step_time": TRUE, "engine": ENGINE}))
    emu = Emulator(tmp_path, instances=1, profile=str(path), time_scale=TIME_SCALE,
                   args=["--speed-factors", str(SPEED_FACTOR), "--noise-sigma", "0.02"])
    yield emu
    emu.stop()


def test_profile_recovers_every_coefficient_within_ten_percent(emulated: Emulator,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "fitted.json"
    proc = subprocess.run(
        [*command("blockproxy"), "profile", "--backend", emulated.urls[0], "--out", str(out),
         "--max-num-batched-tokens", "4096", "--repeats", "2", "--decode-tokens", "48",
         "--probe-seqs", "64"],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "decode" in proc.stderr  # the progress bar
    report = json.loads(proc.stdout)
    fitted = json.loads(out.read_text())
    profile = load_profile(out)  # a valid profile file
    assert fitted["engine"] == ENGINE
    assert profile.engine.max_num_seqs == ENGINE["max_num_seqs"]
    steps = TIME_SCALE * SPEED_FACTOR
    expected = {k: v * (TIME_SCALE if k == "per_request_ms" else steps)
                for k, v in TRUE.items()}
    got = fitted["step_time"]
    errors = {k: abs(got[k] - v) / v for k, v in expected.items()}
    assert all(e < 0.10 for e in errors.values()), (errors, got, expected, report)
    assert report["r2"] > 0.99
    assert fitted["fit"]["phases"]["decode"]["median_abs_rel_residual"] < 0.05


def test_profile_of_an_unreachable_backend_is_a_clear_error(tmp_path: Path) -> None:
    from tests.procs import free_ports

    port = free_ports(1)[0]
    proc = subprocess.run([*command("blockproxy"), "profile", "--backend",
                           f"http://127.0.0.1:{port}", "--quiet"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith("blockproxy profile: ")
    assert "Traceback" not in proc.stderr
