"""scripts/ttft_windows.py: TTFT per window of real time from a compare result file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.procs import ROOT

_spec = importlib.util.spec_from_file_location("ttft_windows",
                                               ROOT / "scripts" / "ttft_windows.py")
assert _spec is not None and _spec.loader is not None
ttft_windows = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ttft_windows)


def test_windows_are_real_time_and_skip_failures():
    # time scale 2: wall start 0-3.9 s is real 0-1.95 s; wall TTFT 200 ms is real 100 ms.
    # Odd requests were cut after their first token (a first-token run): they count.
    rows = [{"start_s": 0.1 * i, "success": i % 2 == 0, "error": "", "ttft_ms": 20.0 * (i + 1)}
            for i in range(40)]
    rows.append({"start_s": 0.5, "success": False, "error": "HTTP 503", "ttft_ms": None})
    rows.append({"start_s": 0.6, "success": False, "error": "reset", "ttft_ms": 9e9})
    out = ttft_windows.windows(rows, time_scale=2.0, width=1.0)
    assert [(w["from_s"], w["n"]) for w in out] == [(0.0, 20), (1.0, 20)]
    # real TTFTs 10, 20, ..., 200 ms: P99 interpolated as loadgen.measure's (numpy's)
    assert out[0]["p99_ttft_ms"] == pytest.approx(198.1)
    assert out[1]["mean_ttft_ms"] == sum(20.0 * (i + 1) for i in range(20, 40)) / 20 / 2


def test_labels_name_hidden_profiles(tmp_path: Path, capsys):
    result = {"time_scale": 1.0, "config": {"hide_profiles": True},
              "runs": [{"seed": 3, "policies": {"block": {"metrics": {"per_request": [
                  {"start_s": 0.0, "success": True, "ttft_ms": 5.0}]}}}}]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))
    assert ttft_windows.main([str(path), "--window", "1", "--json", str(tmp_path / "o.json")]) == 0
    assert "block [hidden profiles] seed 3" in capsys.readouterr().out
    written = json.loads((tmp_path / "o.json").read_text())
    assert written["block [hidden profiles] seed 3"][0]["p99_ttft_ms"] == 5.0
