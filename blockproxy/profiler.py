"""``blockproxy profile``: fit a step-time profile against a live vLLM instance.

    blockproxy profile --backend http://gpu-3:8000 --out profiles/my-gpu.json

What is measured, on an otherwise idle instance, with streamed ``/v1/completions`` whose
prompts are random token ids (no prefix-cache hits) and ``ignore_eos`` (known lengths):

* **Engine limits** read from vLLM itself: ``max_model_len`` from ``/v1/models``,
  ``block_size`` and ``num_gpu_blocks`` from the ``vllm:cache_config_info`` gauge of
  ``/metrics``, ``max_num_seqs`` by sending more concurrent streams than the instance can
  batch and watching ``vllm:num_requests_running`` level off (``--max-num-seqs`` skips
  that).  vLLM exposes no ``max_num_batched_tokens``: give ``--max-num-batched-tokens``
  (default 8192, vLLM's for online serving on a GPU); prefill probes stay below it.
* **Prefill**: the TTFT of single requests with prompts of 16 tokens up to the token
  budget: ``per_request + fixed + (per_prefill_token + per_context_token) x prompt``.
* **Decode**: the time per step, over the middle half of the output, of ``k`` streams
  decoding together, for ``k`` from 1 to ``max_num_seqs``, with short prompts and with
  long ones: ``fixed + per_decode_seq x k + per_context_token x context``.

All samples go into one least-squares fit of ``per_request_ms``, ``fixed_ms``,
``per_prefill_token_us``, ``per_decode_seq_us`` and ``per_context_token_us``, weighted by
``1 / y`` (every sample counts by its relative error), non-negative (a coefficient that
comes out negative is fixed at 0 and the rest refitted).  The report gives each phase's
median and worst relative residual and the fit's R²: a poor fit means the instance was
not idle, or its steps are not linear in these terms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from blockproxy.profile import FORMAT_VERSION, EngineLimits, Profile, StepTime, parse_profile

#: columns of the design matrix
TERMS = ("per_request", "fixed", "per_prefill_token", "per_decode_seq", "per_context_token")
#: token ids of the random prompts (valid in any vocabulary worth serving)
TOKEN_IDS = (10, 1000)


@dataclass
class Sample:
    """One measured time and the work it covers (the design matrix row)."""

    phase: str
    seconds: float
    overhead: float  # 1 for a TTFT (the per-request cost is in it), else 0
    prefill_tokens: float
    decode_seqs: float
    context_tokens: float

    def row(self) -> list[float]:
        return [self.overhead, 1.0, self.prefill_tokens, self.decode_seqs,
                self.context_tokens]


class Progress:
    """A one-line progress bar on stderr (a line per step when stderr is not a terminal)."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self.total, self.done, self.quiet = total, 0, quiet
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()

    def step(self, label: str) -> None:
        self.done += 1
        if self.quiet:
            return
        width = 30
        filled = int(width * self.done / self.total)
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"{time.monotonic() - self.started:5.1f}s {label}")
        if self.tty:
            sys.stderr.write("\r" + line[:110].ljust(110))
            if self.done == self.total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


class Instance:
    """The instance under test, over HTTP (aiohttp)."""

    def __init__(self, url: str, model: str | None, rng: random.Random,
                 timeout: float = 600.0) -> None:
        import aiohttp

        self.url = url.rstrip("/")
        self.model = model
        self.rng = rng
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=timeout))

    async def close(self) -> None:
        await self.session.close()

    async def get_json(self, path: str) -> Any:
        async with self.session.get(self.url + path) as resp:
            resp.raise_for_status()
            return await resp.json(content_type=None)

    async def get_text(self, path: str) -> str:
        async with self.session.get(self.url + path) as resp:
            resp.raise_for_status()
            return await resp.text()

    def prompt(self, tokens: int) -> list[int]:
        return [self.rng.randrange(*TOKEN_IDS) for _ in range(tokens)]

    async def stream(self, prompt_tokens: int, max_tokens: int
                     ) -> tuple[float, list[tuple[float, int]]]:
        """One streamed completion: its send time and (arrival, tokens so far) per event."""
        body = {"model": self.model, "prompt": self.prompt(prompt_tokens),
                "max_tokens": max_tokens, "ignore_eos": True,
                "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        stamps: list[tuple[float, int]] = []
        sent = time.perf_counter()
        async with self.session.post(self.url + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"{self.url}: HTTP {resp.status}: "
                                   f"{(await resp.text())[:300]}")
            tokens = 0
            buf = b""
            async for chunk in resp.content.iter_any():
                now = time.perf_counter()
                buf += chunk
                *events, buf = buf.split(b"\n\n")
                for event in events:
                    if not event.startswith(b"data: {"):
                        continue
                    data = json.loads(event[6:])
                    usage = data.get("usage") or {}
                    if data.get("choices"):
                        tokens = int(usage.get("completion_tokens") or tokens + 1)
                        stamps.append((now, tokens))
        return sent, stamps


def _prom_labels(text: str, name: str) -> dict[str, str]:
    """Labels of the first sample of ``name`` in a Prometheus text page."""
    for line in text.splitlines():
        if line.startswith(name + "{"):
            inner = line[len(name) + 1:line.rindex("}")]
            out = {}
            for part in inner.split('",'):
                key, _, value = part.partition('="')
                out[key.strip()] = value.rstrip('"')
            return out
    return {}


def _prom_value(text: str, name: str) -> float | None:
    total = None
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    return total


async def read_limits(inst: Instance, args: argparse.Namespace, notes: list[str]
                      ) -> tuple[dict[str, int], str]:
    """Engine limits from vLLM's own endpoints, the flags filling what it does not say."""
    models = await inst.get_json("/v1/models")
    cards = models.get("data") or []
    if not cards:
        raise RuntimeError(f"{inst.url}/v1/models lists no model")
    card = next((c for c in cards if c.get("id") == inst.model), cards[0])
    model = str(card.get("id"))
    limits: dict[str, int] = {}
    limits["max_model_len"] = int(args.max_model_len or card.get("max_model_len") or 0)
    if not limits["max_model_len"]:
        raise RuntimeError("/v1/models gives no max_model_len: pass --max-model-len")
    cache = _prom_labels(await inst.get_text("/metrics"), "vllm:cache_config_info")
    for key in ("block_size", "num_gpu_blocks"):
        given = getattr(args, key)
        value = given or (int(cache[key]) if cache.get(key, "None").isdigit() else 0)
        if not value:
            raise RuntimeError(f"/metrics has no vllm:cache_config_info {key}: pass "
                               f"--{key.replace('_', '-')}")
        limits[key] = value
    limits["max_num_batched_tokens"] = args.max_num_batched_tokens
    if not args.max_num_batched_tokens_given:
        notes.append(f"max_num_batched_tokens {args.max_num_batched_tokens} assumed (vLLM "
                     "does not expose it; pass --max-num-batched-tokens)")
    return limits, model


#: output tokens of each sequence-cap probe stream: long enough to outlast a few slow
#: ``/metrics`` scrapes (a fast engine finishes short streams between two of them); the
#: probe stops as soon as the cap is seen, so a fast engine does not pay for them
PROBE_TOKENS = 512


async def probe_max_num_seqs(inst: Instance, probe: int, notes: list[str],
                             max_model_len: int) -> int:
    """Send ``probe`` concurrent streams; the most running at once is the sequence cap.

    The probe ends once two scrapes in a row show requests waiting beside the same number
    running (the cap, seen twice), or when every stream is done; the rest are cancelled.
    """
    tokens = max(1, min(PROBE_TOKENS, max_model_len - 16))  # after an 8-token prompt
    tasks = [asyncio.create_task(inst.stream(8, tokens)) for _ in range(probe)]
    most, waited, seen_full = 0, False, 0
    try:
        while not all(t.done() for t in tasks):
            text = await inst.get_text("/metrics")
            running = int(_prom_value(text, "vllm:num_requests_running") or 0.0)
            waiting = _prom_value(text, "vllm:num_requests_waiting") or 0.0
            seen_full = seen_full + 1 if waiting > 0 and running == most else 0
            most = max(most, running)
            waited = waited or waiting > 0
            if seen_full >= 2:
                break
            await asyncio.sleep(0.02)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if most >= probe or not waited:
        notes.append(f"max_num_seqs is at least {most} ({probe} streams never queued): "
                     "pass --max-num-seqs, or a larger --probe-seqs")
    return max(most, 1)


def decode_step(sent: float, stamps: list[tuple[float, int]], prompt: int
                ) -> tuple[float, float] | None:
    """(seconds per step, mean context per sequence) over the middle half of a stream."""
    if len(stamps) < 8:
        return None
    total = stamps[-1][1]
    lo = next(s for s in stamps if s[1] >= total // 4)
    hi = next(s for s in reversed(stamps) if s[1] <= 3 * total // 4)
    if hi[1] - lo[1] < 4 or hi[0] <= lo[0]:
        return None
    return (hi[0] - lo[0]) / (hi[1] - lo[1]), prompt + (lo[1] + hi[1]) / 2


async def measure(inst: Instance, limits: dict[str, int], max_num_seqs: int,
                  args: argparse.Namespace, progress: Progress) -> list[Sample]:
    """The prefill and decode probes (see the module docstring)."""
    samples: list[Sample] = []
    budget = limits["max_num_batched_tokens"]
    longest = max(min(budget, limits["max_model_len"] - 2, args.max_prompt_tokens), 16)
    lengths = sorted({round(16 * (longest / 16) ** (i / 7)) for i in range(8)})
    levels = sorted({max(1, round(max_num_seqs ** (i / 5))) for i in range(6)})
    out = args.decode_tokens
    kv_tokens = limits["num_gpu_blocks"] * limits["block_size"]
    short = 16
    long_prompt = max(min(limits["max_model_len"] - out - 2, args.max_prompt_tokens,
                          int(0.5 * kv_tokens / max(levels)) - out), short)
    plans = [(k, short) for k in levels] + [(k, long_prompt) for k in levels[-3:]]
    progress.total = progress.done + len(lengths) + len(plans)
    for length in lengths:
        for _ in range(args.repeats):
            sent, stamps = await inst.stream(length, 1)
            if stamps:
                samples.append(Sample("prefill", stamps[0][0] - sent, 1.0, length, 0.0,
                                      length))
            await asyncio.sleep(0.01)
        progress.step(f"prefill {length} tokens")
    for k, prompt in plans:
        for _ in range(args.repeats):
            results = await asyncio.gather(*(inst.stream(prompt, out) for _ in range(k)))
            steps = [s for s in (decode_step(sent, st, prompt) for sent, st in results) if s]
            if steps:
                per_step = statistics.median(s[0] for s in steps)
                context = k * statistics.fmean(s[1] for s in steps)
                samples.append(Sample("decode", per_step, 0.0, 0.0, k, context))
        progress.step(f"decode {k} x {prompt}-token prompts")
    return samples


def fit(samples: list[Sample]) -> tuple[dict[str, float], dict[str, Any]]:
    """Non-negative weighted least squares of the step terms; (coefficients, report)."""
    x = np.array([s.row() for s in samples], dtype=float)
    y = np.array([s.seconds for s in samples], dtype=float)
    w = 1.0 / y
    active = [i for i in range(len(TERMS)) if x[:, i].any()]
    beta = np.zeros(len(TERMS))
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active] * w[:, None], y * w, rcond=None)
        if (sol >= 0).all():
            beta[:] = 0
            beta[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    predicted = x @ beta
    rel = (predicted - y) / y
    ss_res = float(((predicted - y) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum()) or 1.0
    phases: dict[str, Any] = {}
    for phase in sorted({s.phase for s in samples}):
        r = np.abs(rel[[s.phase == phase for s in samples]])
        phases[phase] = {"samples": int(r.size), "median_abs_rel_residual": float(np.median(r)),
                         "max_abs_rel_residual": float(r.max())}
    report = {"r2": 1.0 - ss_res / ss_tot, "phases": phases}
    return dict(zip(TERMS, (float(b) for b in beta))), report


async def profile_instance(args: argparse.Namespace) -> tuple[Profile, dict[str, Any]]:
    notes: list[str] = []
    inst = Instance(args.backend, args.model, random.Random(args.seed))
    try:
        limits, model = await read_limits(inst, args, notes)
        inst.model = model
        progress = Progress(total=1, quiet=args.quiet)  # measure() sets the total
        await inst.stream(16, 4)  # warm up (first requests compile or allocate)
        if args.max_num_seqs:
            max_num_seqs = args.max_num_seqs
        else:
            max_num_seqs = await probe_max_num_seqs(inst, args.probe_seqs, notes,
                                                     limits["max_model_len"])
            progress.step(f"max_num_seqs {max_num_seqs}")
        limits["max_num_seqs"] = max_num_seqs
        started = time.monotonic()
        samples = await measure(inst, limits, max_num_seqs, args, progress)
    finally:
        await inst.close()
    coef, report = fit(samples)
    report.update(notes=notes, measure_seconds=time.monotonic() - started,
                  coefficients={"fixed_ms": coef["fixed"] * 1e3,
                                "per_prefill_token_us": coef["per_prefill_token"] * 1e6,
                                "per_decode_seq_us": coef["per_decode_seq"] * 1e6,
                                "per_context_token_us": coef["per_context_token"] * 1e6,
                                "per_request_ms": coef["per_request"] * 1e3},
                  limits=limits)
    name = Path(args.out).stem if args.out else "fitted"
    profile = Profile(
        name=name, model=model, hardware=args.hardware, tensor_parallel_size=args.tp,
        step_time=StepTime(coef["fixed"], coef["per_prefill_token"], coef["per_decode_seq"],
                           coef["per_context_token"], coef["per_request"]),
        engine=EngineLimits(**limits),
        source=(f"fitted by blockproxy profile against {args.backend} on "
                f"{time.strftime('%Y-%m-%d')}: {len(samples)} samples, R^2 "
                f"{report['r2']:.4f}"))
    return profile, report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", required=True, metavar="URL",
                        help="the vLLM instance to profile (idle: nothing else sent to it)")
    parser.add_argument("--model", help="model to request (default: the first served)")
    parser.add_argument("--out", metavar="FILE.json", help="write the profile here")
    parser.add_argument("--hardware", default="", help="hardware description for the file")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size, recorded")
    parser.add_argument("--max-num-seqs", type=int, default=0,
                        help="the engine's sequence cap (default: probed)")
    parser.add_argument("--probe-seqs", type=int, default=256,
                        help="concurrent streams of the sequence-cap probe")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="the engine's token budget per step (vLLM does not expose it; "
                             "default 8192)")
    parser.add_argument("--num-gpu-blocks", type=int, default=0,
                        help="KV cache blocks (default: from /metrics)")
    parser.add_argument("--block-size", type=int, default=0,
                        help="tokens per KV block (default: from /metrics)")
    parser.add_argument("--max-model-len", type=int, default=0,
                        help="context limit (default: from /v1/models)")
    parser.add_argument("--max-prompt-tokens", type=int, default=4096,
                        help="longest prompt of the probes")
    parser.add_argument("--decode-tokens", type=int, default=64,
                        help="output tokens of each decode probe")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each probe")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    args.max_num_batched_tokens_given = args.max_num_batched_tokens is not None
    if args.max_num_batched_tokens is None:
        args.max_num_batched_tokens = 8192
    import aiohttp

    try:
        profile, report = asyncio.run(profile_instance(args))
    except (OSError, RuntimeError, ValueError, aiohttp.ClientError) as exc:
        print(f"blockproxy profile: {exc}", file=sys.stderr)
        return 1
    data = profile.to_json()
    data["fit"] = report
    parse_profile(data)  # what is written must load
    assert data["format_version"] == FORMAT_VERSION
    text = json.dumps(data, indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(json.dumps(report, indent=2))
    if not all(math.isfinite(v) for v in report["coefficients"].values()):
        return 1
    return 0
