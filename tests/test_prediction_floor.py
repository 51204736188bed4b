"""scripts/prediction_floor.py: the E2E error of the arrival forecast, on the cluster model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from tests.procs import ROOT

_spec = importlib.util.spec_from_file_location("prediction_floor",
                                               ROOT / "scripts" / "prediction_floor.py")
assert _spec is not None and _spec.loader is not None
prediction_floor = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prediction_floor)


def test_the_true_rate_predicts_what_the_cluster_does(tmp_path: Path):
    # A steady Poisson load on two instances: the requests already there explain only
    # part of a request's latency (the later arrivals slow its steps), the recent rate
    # most of the rest, and the rate that really came nearly all of it.
    rng = np.random.default_rng(3)
    t = np.cumsum(rng.exponential(1 / 40, 300))
    path = tmp_path / "w.jsonl"
    path.write_text("".join(
        json.dumps({"arrival_s": float(x), "prompt_tokens": int(p), "output_tokens": int(o)})
        + "\n" for x, p, o in zip(t, rng.integers(200, 2000, 300),
                                  rng.integers(50, 400, 300), strict=True)))
    out = prediction_floor.measure(prediction_floor.parse_args(
        ["--requests", str(path), "--instances", "2", "--arrival-window", "2"]))
    err = out["mean_absolute_relative_error"]
    assert 100 < out["requests"] < 270  # the first 10% and those outliving the load left out
    assert err["none"]["e2e_signed"] < -0.1  # no arrivals: too optimistic
    assert err["true_rate"]["e2e"] < err["recent"]["e2e"] < err["none"]["e2e"]
    assert err["true_rate"]["e2e"] < 0.06
    assert set(err) == {"none", "recent", "cluster_recent", "true_rate", "cluster_true_rate"}
    with_tail = prediction_floor.measure(prediction_floor.parse_args(
        ["--requests", str(path), "--instances", "2", "--arrival-window", "2", "--tail"]))
    assert with_tail["requests"] == 270
