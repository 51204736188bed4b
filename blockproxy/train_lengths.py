"""``blockproxy train-lengths``: train the output-length model offline from a request log.

The log is JSON Lines, one finished request per line, in the order they arrived::

    {"endpoint": "/v1/chat/completions", "body": {...the OpenAI request body...},
     "output_tokens": 212, "finish_reason": "stop", "prompt_tokens": 1830,
     "tenant": "team-a"}

``endpoint`` defaults to ``/v1/completions``; ``prompt_tokens`` (what the engine reported)
and ``tenant`` are optional.  Each request goes through the proxy's own description
(:class:`~blockproxy.routing.describe.Describer`: the same features, the same conversation
matching through prefix blocks) and is then learned, exactly as a running proxy learns from
a completion.  With ``--holdout F`` the last fraction F of the log is predicted before it is
learned and scored: mean absolute percentage error and log2-bucket accuracy of what the
proxy would have predicted (``served``: the length model or the rings, whichever has been
better on that model's recent requests), of the length model alone, of the
prompt-length rings alone and of the bucket classifier (``bucket_head``: its most likely
bucket's representative length; its bucket accuracy is its classification accuracy).
The report (JSON) goes to stdout; serve the model with ``blockproxy serve --length-model
FILE``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import orjson

from blockproxy.request import ApiError, parse_request
from blockproxy.routing.describe import Describer
from blockproxy.routing.features import tenant_of
from blockproxy.routing.lengths import LengthModel, LengthPredictor, length_bucket

ROUTES = ("/v1/completions", "/v1/chat/completions")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", required=True, help="request log (JSON Lines)")
    parser.add_argument("--out", required=True, help="model file to write (.npz)")
    parser.add_argument("--holdout", type=float, default=0.0,
                        help="score the last fraction of the log before learning it")
    parser.add_argument("--epochs", type=int, default=1,
                        help="passes over the training part (the holdout is seen once)")
    parser.add_argument("--bits", type=int, default=18, help="feature hash size (2**bits)")
    parser.add_argument("--max-model-len", type=int, default=1 << 20,
                        help="context limit the predictions are capped by")


class Score:
    """MAPE and log2-bucket accuracy of predictions against true lengths."""

    def __init__(self) -> None:
        self.n = 0
        self.abs_pct = 0.0
        self.same_bucket = 0

    def add(self, predicted: int, actual: int) -> None:
        self.n += 1
        self.abs_pct += abs(predicted - actual) / max(actual, 1)
        self.same_bucket += length_bucket(predicted) == length_bucket(actual)

    def report(self) -> dict[str, Any]:
        return {"requests": self.n,
                "mape": self.abs_pct / self.n if self.n else None,
                "bucket_accuracy": self.same_bucket / self.n if self.n else None}


def read_log(path: str) -> list[dict[str, Any]]:
    records = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
                if not isinstance(rec, dict) or not isinstance(rec.get("body"), dict):
                    raise ValueError("expected an object with a 'body' object")
                if rec.get("endpoint", ROUTES[0]) not in ROUTES:
                    raise ValueError(f"endpoint must be one of {', '.join(ROUTES)}")
                out = rec.get("output_tokens")
                if not isinstance(out, int) or out < 0:
                    raise ValueError("output_tokens must be an integer >= 0")
            except (orjson.JSONDecodeError, ValueError) as exc:
                raise ValueError(f"{path}:{number}: {exc}") from None
            records.append(rec)
    return records


def train(records: list[dict[str, Any]], model: LengthModel, holdout: float = 0.0,
          epochs: int = 1, max_model_len: int = 1 << 20) -> dict[str, Any]:
    """Learn ``records`` in order; the last ``holdout`` fraction is scored first."""
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    split = len(records) - math.floor(len(records) * holdout)
    scores = {"served": Score(), "length_model": Score(), "prompt_length_rings": Score(),
              "bucket_head": Score()}
    skipped = 0
    for epoch in range(epochs):
        # a fresh predictor each pass: its rings and conversation memory start empty, the
        # model's weights carry over
        describer = Describer(LengthPredictor(model=model))
        part = records[:split] if epoch < epochs - 1 else records
        for i, rec in enumerate(part):
            body = rec["body"]
            try:
                info = parse_request(rec.get("endpoint", ROUTES[0]), orjson.dumps(body))
            except ApiError:
                skipped += epoch == 0
                continue
            job = describer.describe(info, None, max_model_len,
                                     tenant=tenant_of(rec.get("tenant"), info))
            actual = rec["output_tokens"]
            finish = rec.get("finish_reason")
            censored = (finish == "length" and info.max_tokens is not None
                        and actual >= info.max_tokens)
            if i >= split and not censored:
                predictor = describer.predictor
                scores["served"].add(job.output_tokens, actual)
                if job.features is not None:
                    own = round(model.quantile(info.model, job.features, predictor.quantile))
                    if info.max_tokens is not None:
                        own = min(own, info.max_tokens)
                    scores["length_model"].add(max(own, 1), actual)
                    head = model.buckets
                    scores["bucket_head"].add(
                        max(head.tokens(head.predict(job.features)), 1), actual)
                ring = predictor.learned(info.model, job.prompt_tokens)
                ring_tokens = predictor.default_tokens if ring is None else ring
                if info.max_tokens is not None:
                    ring_tokens = min(ring_tokens, info.max_tokens)
                scores["prompt_length_rings"].add(max(ring_tokens, 1), actual)
            prompt = rec.get("prompt_tokens")
            describer.learn(info, job.prompt_tokens, job.output_tokens,
                            prompt if isinstance(prompt, int) else None, actual, finish, job)
    return {"requests": len(records), "trained_on": split, "skipped": skipped,
            "epochs": epochs, "models": dict(model.seen),
            "holdout": {k: v.report() for k, v in scores.items()} if split < len(records)
            else None}


def run(args: argparse.Namespace) -> int:
    try:
        records = read_log(args.requests)
        if not records:
            raise ValueError(f"{args.requests}: no requests")
        model = LengthModel(bits=args.bits, warmup=0)
        report = train(records, model, args.holdout, args.epochs, args.max_model_len)
        model.save(args.out)
    except (OSError, ValueError) as exc:
        print(f"blockproxy train-lengths: {exc}", file=sys.stderr)
        return 1
    report["out"] = str(Path(args.out))
    print(json.dumps(report, indent=2))
    return 0
