"""``blockproxy demo`` end to end, shortened (real emulator and proxy processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("workload,size", [("sessions", 4), ("azure", 12)])
def test_demo_prints_the_table_and_writes_the_plot(tmp_path: Path, workload: str,
                                                   size: int) -> None:
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "blockproxy", "demo", "--workload", workload,
         "--num-requests", str(size), "--instances", "2", "--policies", "block,round_robin",
         "--time-scale", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "p99 TTFT" in done.stdout and "round_robin" in done.stdout
    assert f"plot: {(out / 'demo.png').resolve()}" in done.stdout
    assert (out / "demo.png").stat().st_size > 10_000
    result = json.loads((out / "demo.json").read_text())
    counts = set()
    for policy in ("block", "round_robin"):
        metrics = result["runs"][0]["policies"][policy]["metrics"]
        assert metrics["failed"] == 0
        counts.add(metrics["completed"])
    assert len(counts) == 1 and counts.pop() >= size  # the same workload, all of it
    if workload == "sessions":
        assert "prefix hit" in done.stdout
