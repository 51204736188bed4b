"""scripts/replay_served.py: a served run's choices replayed on the cluster model."""

from __future__ import annotations

import datetime
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from blockproxy.profile import load_profile
from blockproxy.train_router import round_robin, run_episode
from tests.procs import ROOT

_spec = importlib.util.spec_from_file_location("replay_served",
                                               ROOT / "scripts" / "replay_served.py")
assert _spec is not None and _spec.loader is not None
replay_served = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(replay_served)

PROFILE = "llama-3.1-8b-h100-tp1"


def _stamp(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]


def test_a_served_assignment_replayed_costs_what_it_cost(tmp_path: Path):
    # "Served" here is the cluster model itself under round robin, written out as the
    # proxy's debug log at time scale 2 and out of order: the replay must find each
    # request's line and cost the same assignment the same.
    rng = np.random.default_rng(7)
    n = 150
    t = np.cumsum(rng.exponential(1 / 50, n))
    requests = [(float(x), int(p), int(o)) for x, p, o in zip(
        t, rng.integers(100, 2000, n), rng.integers(5, 300, n), strict=True)]
    path = tmp_path / "w.jsonl"
    path.write_text("".join(json.dumps({"arrival_s": a, "prompt_tokens": p,
                                        "output_tokens": o}) + "\n"
                            for a, p, o in requests))
    chosen: dict[int, int] = {}
    rr = round_robin()

    def choose(cluster, d):
        chosen[d.rid] = rr(cluster, d)
        return chosen[d.rid]
    finished = run_episode(load_profile(PROFILE), 3, requests, choose, 0.05, 0, 2.5)
    scale, base = 2.0, 1.8e9
    lines = [f"{_stamp(base + scale * (requests[rid][0] + e2e))} DEBUG blockproxy: done on "
             f"i{chosen[rid]}: prompt {requests[rid][1]}~{requests[rid][1] + 1}, output "
             f"{requests[rid][2]} (predicted 99), ttft {scale * ttft:.4f} (predicted nan), "
             f"e2e {scale * e2e:.4f} (predicted 0.5000)\n"
             for rid, ttft, e2e in finished]
    log = tmp_path / "proxy.log"
    log.write_text("2026-12-06 23:34:38,503 INFO blockproxy: listening\n" + "".join(lines))
    rows = replay_served.run(replay_served.argparse.Namespace(
        log=str(log), requests=str(path), time_scale=scale, profile=PROFILE,
        delay_weight=1.0, arrival_window=2.5))
    served, replayed = rows[0], rows[1]
    mean = 1000 * float(np.mean([e2e for _, _, e2e in finished]))
    assert served["mean_e2e_ms"] == pytest.approx(mean, abs=1)
    outputs = np.array([o for _, _, o in requests])
    assert served["length_error"] == pytest.approx(np.mean(np.abs(99 - outputs) / outputs),
                                                   abs=1e-3)
    assert replayed["mean_e2e_ms"] == pytest.approx(mean, abs=1)
    assert [r["router"].split(",")[-1].strip() for r in rows[2:]] == [
        "the served predictions", "the true lengths", "every length " + str(
            int(np.median([o for _, _, o in requests])))]
    assert 0.0 <= rows[2]["same_choice_as_served"] <= 1.0
    with pytest.raises(ValueError, match="no line in the log"):
        replay_served.match([(0.0, 7, 7)], replay_served.read_log(lines))
