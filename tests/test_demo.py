"""``blockproxy demo`` end to end, shortened (real emulator and proxy processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_demo_prints_the_table_and_writes_the_plot(tmp_path: Path):
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "blockproxy", "demo", "--num-requests", "12", "--instances", "2",
         "--policies", "block,round_robin", "--time-scale", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "p99 TTFT" in done.stdout and "round_robin" in done.stdout
    assert f"plot: {(out / 'demo.png').resolve()}" in done.stdout
    assert (out / "demo.png").stat().st_size > 10_000
    result = json.loads((out / "demo.json").read_text())
    for policy in ("block", "round_robin"):
        metrics = result["runs"][0]["policies"][policy]["metrics"]
        assert metrics["completed"] == 12 and metrics["failed"] == 0
