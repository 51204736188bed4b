"""loadgen report: tables and PNGs from saved compare and run results (no processes)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from loadgen import report
from loadgen.cli import main


def _metrics(p99_ttft: float, seed: int, scale: float = 2.0) -> dict:
    rng = random.Random(seed)
    rows = [{"success": True, "error": "", "ttft_ms": rng.uniform(10, p99_ttft) * scale,
             "e2el_ms": rng.uniform(100, 2000) * scale, "tpot_ms": 5.0 * scale}
            for _ in range(50)]
    wall: dict[str, Any] = {"completed": 50, "failed": 0, "mean_ttft_ms": p99_ttft / 3 * scale,
            "median_ttft_ms": p99_ttft / 4 * scale, "p99_ttft_ms": p99_ttft * scale,
            "p99_e2el_ms": 2000.0 * scale, "mean_tpot_ms": 5.0 * scale,
            "request_throughput": 10.0 / scale, "output_throughput": 1000.0 / scale,
            "time_scale": scale, "per_request": rows}
    unscaled = {k: v / scale for k, v in wall.items() if k.endswith("_ms")}
    unscaled.update(request_throughput=10.0, output_throughput=1000.0)
    return {**wall, "unscaled": unscaled}


def _capacity(best: float) -> dict:
    curve = [{"value": v, "passed": v <= best, "p99_ttft_ms": 500.0 * v / best}
             for v in (1.0, best, best * 2)]
    return {"capacity": best, "curve": curve, "knob": "rate_multiplier",
            "slo_ttft_p99_ms": 600.0}


@pytest.fixture
def compare_json(tmp_path: Path) -> Path:
    """A two-seed compare result shaped as ``loadgen compare --json`` writes it."""
    runs = []
    for seed in (1, 2):
        policies = {}
        for policy, p99, cap in (("block", 100.0, 8.0), ("round_robin", 200.0, 4.0)):
            policies[policy] = {
                "policy": policy, "hint": False, "metrics": _metrics(p99 * seed, seed),
                "proxy": {"prediction_error": {"ttft": 0.2, "e2e": 0.3, "output_length": 1.5},
                          "decisions": {"i0": 25, "i1": 25}},
                "capacity": _capacity(cap)}
        runs.append({"seed": seed, "policies": policies})
    result = {"kind": report.COMPARE_KIND, "policies": ["block", "round_robin"],
              "seeds": [1, 2], "time_scale": 2.0, "runs": runs, "summary": report.summarize(runs)}
    path = tmp_path / "cmp.json"
    path.write_text(json.dumps(result))
    return path


def test_table_rows_ratios_and_real_gpu_units(compare_json: Path, capsys):
    assert main(["report", str(compare_json), "--table"]) == 0
    out = capsys.readouterr().out
    assert "real-GPU times in ms (wall-clock / time-scale 2)" in out
    assert out.count("seed 1 -") == 1 and "median across seeds [1, 2]" in out
    median = out.split("median across seeds")[1].splitlines()
    block = next(line for line in median if line.startswith("block"))
    # unscaled: median p99 TTFT of block = (100 + 200) / 2 = 150; vs rr (200 + 400) / 2.
    assert " 150 " in block and "0.50x" in block
    assert block.split()[-6:] == ["8", "0.20", "0.30", "1.50", "0.50x", "1.00x"]


def test_plot_written_with_capacity_panel(compare_json: Path, tmp_path: Path):
    png = tmp_path / "out.png"
    assert main(["report", str(compare_json), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_run_results_table_and_cdf(tmp_path: Path, capsys):
    paths = []
    for name, p99 in (("fast", 50.0), ("slow", 90.0)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(_metrics(p99, 3, scale=1.0) | {"unscaled": {}}))
        paths.append(str(path))
    png = tmp_path / "runs.png"
    assert main(["report", *paths, "--table", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "loadgen run results - times in ms" in out
    assert [line.split()[0] for line in out.splitlines()[2:]] == ["fast", "slow"]
    assert png.exists()


def test_unknown_file_is_an_error(tmp_path: Path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["report", str(bad)]) == 2


def test_format_table_leaves_out_empty_columns():
    text = report.format_table([("a", {"completed": 3, "failed": 0, "capacity": None})], "t")
    assert "capacity" not in text and "vs rr" not in text and "done" in text


def _split(compare_json: Path, tmp_path: Path) -> list[Path]:
    """The two-seed result as two files run in pieces: seed 1, then seed 2 with its
    round_robin run stopped at the last first token."""
    data = json.loads(compare_json.read_text())
    paths = []
    for run in data["runs"]:
        if run["seed"] == 2:
            run["policies"]["round_robin"]["metrics"].update(until="first-token", cut=7)
        piece = {**data, "runs": [run], "seeds": [run["seed"]],
                 "summary": report.summarize([run])}
        paths.append(tmp_path / f"seed{run['seed']}.json")
        paths[-1].write_text(json.dumps(piece))
    return paths


def test_merge_joins_pieces_by_seed(compare_json: Path, tmp_path: Path, capsys):
    paths = _split(compare_json, tmp_path)
    out = tmp_path / "merged.json"
    assert main(["report", "--merge", *map(str, paths), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "median across seeds [1, 2]" in text
    merged = json.loads(out.read_text())
    assert merged["seeds"] == [1, 2] and merged["policies"] == ["block", "round_robin"]
    rr = merged["summary"]["round_robin"]
    # p99 TTFT from both seeds; E2E only from the whole run of seed 1 (unscaled 2000).
    assert rr["median"]["p99_ttft_ms"] == pytest.approx(300.0)
    assert rr["per_seed"]["2"]["p99_e2el_ms"] is None and rr["per_seed"]["2"]["cut"] == 7
    assert rr["median"]["p99_e2el_ms"] == pytest.approx(2000.0)
    # The same (seed, policy) twice, or two time scales, cannot be merged.
    assert main(["report", "--merge", str(paths[0]), str(paths[0])]) == 2
    assert "seed 1 of block is in both" in capsys.readouterr().err
    other = json.loads(paths[1].read_text())
    other["time_scale"] = 4.0
    paths[1].write_text(json.dumps(other))
    assert main(["report", "--merge", *map(str, paths)]) == 2
    assert "different time scales" in capsys.readouterr().err


def test_first_token_runs_plot_ttft_of_cut_requests(compare_json: Path):
    data = json.loads(compare_json.read_text())
    entry = data["runs"][0]["policies"]["block"]
    rows = entry["metrics"]["per_request"]
    rows[0].update(success=False, cut=True)
    series = {"time_scale": 2.0, "entries": [entry]}
    assert len(report._values(series, "ttft_ms")) == 50  # the cut one's TTFT counts
    assert len(report._values(series, "e2el_ms")) == 49
    entry["metrics"]["until"] = "first-token"
    assert report._values(series, "e2el_ms") == []  # no whole-request figures


def test_plot_of_first_token_runs_only_says_so(compare_json: Path, tmp_path: Path):
    import warnings

    data = json.loads(compare_json.read_text())
    for run in data["runs"]:
        for entry in run["policies"].values():
            entry["metrics"]["until"] = "first-token"
            del entry["capacity"]
    path = tmp_path / "ft.json"
    path.write_text(json.dumps(data))
    png = tmp_path / "ft.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an empty E2E panel must not draw an empty legend
        assert main(["report", str(path), "--plot", str(png)]) == 0
    assert png.stat().st_size > 10_000
