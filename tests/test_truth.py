"""The truth file: true output lengths the emulator finds by prompt, whatever router
stands in between (it needs no header)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import orjson

from loadgen import truth as truth_module
from loadgen.truth import Truth, request_digest, write_truth
from loadgen.workload import RequestSpec, build_request
from tests.emulator_helpers import run_emulator


def test_digest_ignores_json_layout_and_tells_endpoints_apart() -> None:
    body = {"model": "tiny", "prompt": "the cat sat", "max_tokens": 5}
    reordered = orjson.loads(json.dumps({"max_tokens": 5, "prompt": "the  cat sat",
                                         "model": "tiny"}))
    assert request_digest("/v1/completions", body) == \
        request_digest("/v1/completions", reordered)
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "the cat sat"}]}
    assert request_digest("/v1/chat/completions", chat) != \
        request_digest("/v1/completions", body)


def test_lookup_in_order_and_reload(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(truth_module, "RELOAD_INTERVAL_S", 0.0)
    file = tmp_path / "truth.json"
    truth = Truth(file)  # not written yet: empty, and no error
    a = ("/v1/completions", {"prompt": "a b c"})
    b = ("/v1/completions", {"prompt": "d e"})
    assert truth.lookup(request_digest(*a)) is None
    assert write_truth(file, [(*a, 7), (*a, 9), (*b, 3)]) == 3
    assert truth.lookup(request_digest(*a)) == 7  # re-read on the miss
    assert truth.lookup(request_digest(*a)) == 9
    assert truth.lookup(request_digest(*a)) == 9  # the last one again
    assert truth.lookup(request_digest(*b)) == 3
    c = ("/v1/completions", {"prompt": "f g h i"})
    write_truth(file, [(*c, 11)])  # a new workload: read when one of its prompts misses
    assert truth.lookup(request_digest(*c)) == 11
    assert truth.lookup(request_digest(*a)) is None


def test_the_emulator_takes_lengths_from_the_truth_file(tmp_path: Path) -> None:
    specs = [RequestSpec(40, n, 0.0) for n in (5, 17, 30)]
    requests = [build_request(s, seed=f"1:{i}", max_tokens_policy="cap")
                for i, s in enumerate(specs)]
    file = tmp_path / "truth.json"
    write_truth(file, [(path, body, s.output_tokens)
                       for (path, body, _), s in zip(requests, specs)])
    with run_emulator("--stall-prob", "0", "--time-scale", "0.05", "--truth", str(file)) as emu:
        for (path, body, _), spec in zip(requests, specs):
            body = {**body, "stream": False}
            body.pop("stream_options")
            req = urllib.request.Request(emu.url() + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=20) as resp:  # no length header
                out = json.loads(resp.read())
            assert out["usage"]["completion_tokens"] == spec.output_tokens
            assert out["choices"][0]["finish_reason"] == "stop"
