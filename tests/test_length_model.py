"""The per-request output-length distribution: features, the online model, its file, the
conversation's previous turn, ``blockproxy train-lengths`` and a proxy that loads it."""

from __future__ import annotations

import asyncio
import json
import math
import random
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from blockproxy.backends import BackendSpec
from blockproxy.config import ProxyConfig
from blockproxy.front.app import Proxy
from blockproxy.request import parse_request
from blockproxy.routing.describe import Describer
from blockproxy.routing.features import FeatureHasher, prompt_words, tenant_of
from blockproxy.routing.lengths import LengthModel, LengthPredictor
from blockproxy.train_lengths import train

Client = TestClient[web.Request, web.Application]
TASKS = {"summarise": 0.25, "translate": 1.0, "explain": 3.0, "story": 8.0}


def completion(prompt: str, max_tokens: int | None = None) -> Any:
    body: dict[str, Any] = {"model": "m", "prompt": prompt}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return parse_request("/v1/completions", orjson.dumps(body))


def chat(*contents: str) -> Any:
    roles = ["user", "assistant"]
    messages = [{"role": roles[i % 2], "content": c} for i, c in enumerate(contents)]
    return parse_request("/v1/chat/completions",
                         orjson.dumps({"model": "m", "messages": messages}))


def task_log(n: int, seed: int) -> list[dict[str, Any]]:
    """Requests whose true length depends on a task word (and noise): something to learn
    that the prompt length alone does not show."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        task = rng.choice(list(TASKS))
        filler = " ".join(rng.choice(["the", "a", "text", "below", "data"])
                          for _ in range(rng.randint(20, 200)))
        tokens = max(1, round(40 * TASKS[task] * math.exp(0.3 * rng.gauss(0, 1))))
        out.append({"body": {"model": "m", "prompt": f"{task} {filler}"},
                    "output_tokens": tokens, "finish_reason": "stop"})
    return out


# ---- features ------------------------------------------------------------------------------

def test_features_are_the_same_in_another_process() -> None:
    info = completion("Explain the plan, step by step " * 30, max_tokens=100)
    here = FeatureHasher().features(info, 400, "team-a", 37)
    code = ("import sys, orjson; from blockproxy.request import parse_request; "
            "from blockproxy.routing.features import FeatureHasher; "
            "info = parse_request('/v1/completions', orjson.dumps({'model': 'm', 'prompt': "
            "'Explain the plan, step by step ' * 30, 'max_tokens': 100})); "
            "x = FeatureHasher().features(info, 400, 'team-a', 37); "
            "print(orjson.dumps([x.slots.tolist(), x.values.tolist()]).decode())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "123"})
    slots, values = json.loads(out.stdout)
    assert slots == here.slots.tolist() and values == here.values.tolist()


def test_features_tell_requests_apart() -> None:
    h = FeatureHasher()
    base = set(h.features(completion("story about cats"), 10).slots.tolist())
    assert set(h.features(completion("story about cats", 64), 10).slots.tolist()) != base
    assert set(h.features(completion("story about cats"), 10, "t1").slots.tolist()) > base
    assert set(h.features(completion("story about cats"), 10, None, 8).slots.tolist()) > base
    assert set(h.features(chat("story about cats"), 10).slots.tolist()) != base
    ids = parse_request("/v1/completions", b'{"model": "m", "prompt": [1, 2, 3]}')
    assert prompt_words(ids) == []
    assert prompt_words(chat("System rules", "old question", "the NEW one")) == \
        ["system", "rules", "the", "new", "one"]
    assert len(prompt_words(completion(" ".join(map(str, range(500)))))) == 48


def test_tenant_is_the_header_else_the_user_field() -> None:
    info = parse_request("/v1/completions", b'{"model": "m", "prompt": "x", "user": "u7"}')
    assert tenant_of("team-a", info) == "team-a"
    assert tenant_of(None, info) == "u7"
    assert tenant_of(None, completion("x")) is None


# ---- the model -----------------------------------------------------------------------------

def test_model_learns_what_prompt_length_cannot_show() -> None:
    records = task_log(3000, seed=1)
    report = train(records, LengthModel(warmup=0), holdout=0.25)
    model_score = report["holdout"]["length_model"]
    rings = report["holdout"]["prompt_length_rings"]
    # the noise (sigma 0.3) alone leaves a MAPE near 0.24; the task word is the signal
    assert model_score["mape"] < 0.35 < rings["mape"]
    assert model_score["bucket_accuracy"] > rings["bucket_accuracy"]
    # the classifier head on the same features: the task word tells the bucket
    head = report["holdout"]["bucket_head"]
    assert head["bucket_accuracy"] > rings["bucket_accuracy"] + 0.1, report["holdout"]
    # what the proxy serves: the better of the two on recent requests, here the model
    assert report["holdout"]["served"] == model_score


def test_the_rings_answer_where_features_carry_nothing() -> None:
    """Lengths that depend on nothing visible: the model's words only fit noise, and the
    predictor keeps answering from the rings once it has compared the two."""
    rng = random.Random(8)
    p = LengthPredictor(model=LengthModel(warmup=16))
    for _ in range(1500):
        words = " ".join(str(rng.randrange(10_000)) for _ in range(30))
        x = p.model.hasher.features(completion(words), 40)
        length = max(1, round(100 * math.exp(0.8 * rng.gauss(0, 1))))
        p.observe("m", 40, length, None, "stop", features=x)
    assert p.stats()["length_model"]["answering"] == {"m": "rings"}


def test_quantiles_are_ordered_and_cover() -> None:
    model = LengthModel(warmup=0)
    hasher = model.hasher
    records = task_log(2000, seed=2)
    for rec in records:
        info = completion(rec["body"]["prompt"])
        model.learn("m", hasher.features(info, 50), rec["output_tokens"], False)
    test = task_log(1000, seed=3)
    below = 0
    for rec in test:
        x = hasher.features(completion(rec["body"]["prompt"]), 50)
        q50, q90 = model.quantile("m", x, 0.5), model.quantile("m", x, 0.9)
        assert q90 > q50
        below += rec["output_tokens"] <= q90
    assert 0.8 < below / len(test) < 0.97


def test_censored_requests_only_push_up() -> None:
    model = LengthModel(warmup=0)
    x = model.hasher.features(completion("write"), 5)
    for _ in range(200):
        model.learn("m", x, 100, censored=False)
    before = model.quantile("m", x, 0.5)
    for _ in range(50):  # cut at 10 tokens: says only "at least 10", already predicted
        model.learn("m", x, 10, censored=True)
    assert model.quantile("m", x, 0.5) == before
    for _ in range(50):  # cut at 400: the prediction must rise
        model.learn("m", x, 400, censored=True)
    assert model.quantile("m", x, 0.5) > before


def test_saved_model_loads_with_identical_predictions(tmp_path: Path) -> None:
    model = LengthModel(warmup=0)
    train(task_log(500, seed=4), model)
    path = tmp_path / "lengths.npz"
    model.save(path)
    loaded = LengthModel.load(path, warmup=64)
    assert loaded.ready("m") and not loaded.ready("other")
    for rec in task_log(50, seed=5):
        x = model.hasher.features(completion(rec["body"]["prompt"]), 50)
        for q in (0.1, 0.5, 0.9):
            assert loaded.quantile("m", x, q) == model.quantile("m", x, q)
        assert loaded.buckets.predict(x) == model.buckets.predict(x)
        assert (loaded.buckets.probabilities(x) == model.buckets.probabilities(x)).all()
    np.save(tmp_path / "other.npy", np.zeros(3))
    for bad in (tmp_path / "other.npy", tmp_path / "missing.npz"):
        with pytest.raises(ValueError, match="cannot load length model"):
            LengthModel.load(bad)


def test_predictor_uses_the_model_after_warmup_only() -> None:
    p = LengthPredictor(min_samples=1, model=LengthModel(warmup=20))
    short, long = completion("summarise it"), completion("story time")
    xs, xl = (p.model.hasher.features(i, 3) for i in (short, long))
    for _ in range(9):  # 18 of the 20 it waits for
        p.observe("m", 3, 10, None, "stop", features=xs)
        p.observe("m", 3, 1000, None, "stop", features=xl)
    # not warmed up: the prompt-length ring (both share one bucket) answers for both
    assert p.predict("m", 3, None, features=xs) == p.predict("m", 3, None, features=xl)
    for _ in range(40):
        p.observe("m", 3, 10, None, "stop", features=xs)
        p.observe("m", 3, 1000, None, "stop", features=xl)
    assert p.predict("m", 3, None, features=xs) < 40 < 400 < p.predict("m", 3, None,
                                                                        features=xl)
    assert p.predict("m", 3, 50, features=xl) == 50  # caps still apply


def test_the_describer_gives_the_length_bucket_to_policies_that_route_on_it() -> None:
    p = LengthPredictor(model=LengthModel(warmup=20))
    plain, buckets = Describer(p), Describer(p, buckets=True)
    short, long = completion("summarise it"), completion("story time")
    # before the model is ready, the bucket is the prediction itself
    assert buckets.describe(short, None, 8192).bucket_tokens == \
        buckets.describe(short, None, 8192).output_tokens
    for _ in range(200):
        for info, tokens in ((short, 10), (long, 1000)):
            job = plain.describe(info, None, 8192)
            plain.learn(info, job.prompt_tokens, job.output_tokens, None, tokens, "stop", job)
    assert plain.describe(long, None, 8192).bucket_tokens == 0  # not asked for
    assert buckets.describe(short, None, 8192).bucket_tokens == 10
    assert buckets.describe(long, None, 8192).bucket_tokens == 1000
    capped = completion("story time", max_tokens=64)
    assert buckets.describe(capped, None, 8192).bucket_tokens <= 64
    assert buckets.describe(long, "7", 8192).bucket_tokens == 7  # a hint wins


# ---- conversations -------------------------------------------------------------------------

def test_the_previous_turn_is_found_through_prefix_blocks() -> None:
    d = Describer(LengthPredictor())
    first = chat("Tell me about the history of the city of Rome, in detail " * 6)
    job = d.describe(first, None, 8192)
    assert d.previous_turn(job.blocks) is None
    d.learn(first, job.prompt_tokens, job.output_tokens, None, 321, "stop", job)
    answer = "Rome was founded ... " * 20
    second = chat("Tell me about the history of the city of Rome, in detail " * 6, answer,
                  "And Milan?")
    job2 = d.describe(second, None, 8192)
    assert d.previous_turn(job2.blocks) == 321
    plain = d.predictor.model.hasher.features(second, job2.prompt_tokens)
    assert job2.features is not None
    assert len(job2.features.slots) == len(plain.slots) + 1  # the previous-turn feature
    other = chat("A different conversation entirely, nothing shared " * 6)
    assert d.previous_turn(d.describe(other, None, 8192).blocks) is None


# ---- the command and the proxy -------------------------------------------------------------

def test_train_lengths_command(tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    log.write_bytes(b"\n".join(orjson.dumps(r) for r in task_log(1200, seed=6)))
    out = tmp_path / "model.npz"
    proc = subprocess.run([sys.executable, "-m", "blockproxy", "train-lengths",
                           "--requests", str(log), "--out", str(out), "--holdout", "0.2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["trained_on"] == 960 and report["models"] == {"m": 1200}
    assert report["holdout"]["length_model"]["mape"] < report["holdout"][
        "prompt_length_rings"]["mape"]
    assert LengthModel.load(out).ready("m")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": {"model": "m", "prompt": "x"}, "output_tokens": -1}\n')
    proc = subprocess.run([sys.executable, "-m", "blockproxy", "train-lengths",
                           "--requests", str(bad), "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "bad.jsonl:1: output_tokens must be an integer >= 0" in proc.stderr


async def test_a_loaded_model_predicts_from_the_first_request(
        tmp_path: Path, instance_url: str,
        aiohttp_client: Callable[..., Awaitable[Client]]) -> None:
    model = LengthModel(warmup=0)
    records = task_log(800, seed=7)
    for rec in records:
        rec["body"]["model"] = "tiny"
    train(records, model)
    path = tmp_path / "lengths.npz"
    model.save(path)
    config = ProxyConfig(backends="(in process)", scrape_interval=0.0,
                         length_model=str(path), length_tail_every=1)
    proxy = Proxy(config, [BackendSpec(url=instance_url, name="i0", models=("tiny",))])
    client = await aiohttp_client(proxy.make_app())
    predicted = {}
    for task in ("summarise", "story"):
        info = completion(f"{task} the text below")
        info.model = "tiny"
        job = proxy.generate.describer.describe(info, None, 8192)
        predicted[task] = (job.output_tokens, job.output_high)
    assert predicted["summarise"][0] * 8 < predicted["story"][0]
    assert all(high > median for median, high in predicted.values())
    body = {"model": "tiny", "prompt": "story the text below", "max_tokens": 2000,
            "stream": True}
    resp = await client.post("/v1/completions", json=body)
    assert resp.status == 200
    await resp.text()
    await asyncio.sleep(0)
    metrics = await (await client.get("/metrics")).text()
    tail = [line for line in metrics.splitlines()
            if line.startswith("blockproxy_prediction_tail_total{")]
    assert sum(float(line.split()[-1]) for line in tail) == 1
    assert proxy.predictor.stats()["length_model"]["seen"]["tiny"] == 801
    # block does not route on buckets: the head learns nothing online (its ~20 us per
    # finished request spared); intelligent_router's proxy trains it
    assert proxy.predictor.model.learn_buckets is False
    assert model.buckets.counts.sum() == 800
    assert proxy.predictor.model.buckets.counts.sum() == 800
    ir = Proxy(ProxyConfig(backends="(in process)", scrape_interval=0.0,
                           policy="intelligent_router", length_model=str(path)),
               [BackendSpec(url=instance_url, name="i0", models=("tiny",))])
    assert ir.predictor.model.learn_buckets is True
    assert ir.generate.describer.buckets and not proxy.generate.describer.buckets


def test_the_tail_is_predicted_for_one_job_in_tail_every() -> None:
    model = LengthModel(warmup=0)
    train(task_log(400, seed=8), model)
    predictor = LengthPredictor(model=model)
    for every, sampled in ((1, [True] * 6), (3, [False, False, True] * 2), (0, [False] * 6)):
        describer = Describer(predictor, tail_every=every)
        jobs = [describer.describe(completion("story the text below"), None, 8192)
                for _ in range(6)]
        assert [job.output_high > job.output_tokens for job in jobs] == sampled, every
        # a hint is the length: no tail, and it does not count
        hinted = describer.describe(completion("story the text below"), "50", 8192)
        assert hinted.output_high == 0
        jobs = [describer.describe(completion("story the text below"), None, 8192)
                for _ in range(3)]
        assert [job.output_high > job.output_tokens for job in jobs] == sampled[:3], every
    with pytest.raises(ValueError):
        Describer(predictor, tail_every=-1)


def test_a_bad_model_file_stops_the_proxy(tmp_path: Path) -> None:
    bad = tmp_path / "x.npz"
    bad.write_text("not a model")
    config = ProxyConfig(backends="(in process)", scrape_interval=0.0, length_model=str(bad))
    with pytest.raises(ValueError, match="cannot load length model"):
        Proxy(config, [BackendSpec(url="http://127.0.0.1:1", name="i0", models=("tiny",))])
