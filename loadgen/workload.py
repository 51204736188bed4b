"""Workloads: trace readers, arrival processes and the HTTP requests built from them.

A workload is a list of :class:`RequestSpec` (prompt tokens, true output tokens, arrival
time in trace seconds, optional Mooncake prefix blocks).  Sources:

* Azure LLM inference trace CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``);
* Mooncake JSONL (``timestamp`` in ms, ``input_length``, ``output_length``, ``hash_ids``);
* length-only CSV (``num_prefill_tokens,num_decode_tokens,...``), whose arrivals come from
  :func:`assign_arrivals`;
* :func:`synthetic` lengths;
* :func:`sessions`: synthetic multi-turn chats over shared system prompts (prefix reuse).

Arrivals follow vLLM's ``bench serve``: for rate ``r`` and burstiness ``b`` the gaps are
``Gamma(shape=b, scale=1/(r*b))`` (mean ``1/r``; ``b=1`` is Poisson, ``b<1`` burstier).

:func:`build_request` turns a spec into a streaming OpenAI request whose prompt is exactly
``prompt_tokens`` tokens for the emulator's tokenizer (:mod:`loadgen.tokenizer`).  What
each ``max_tokens`` policy tells the server (and so the proxy):

* ``cap`` (default, realistic): ``max_tokens`` is a fixed cap (2048), as a client that does
  not know the answer's length would send; the proxy learns nothing about the length.
* ``true`` (optimistic): ``max_tokens`` equals the true length, which no real client knows;
  a proxy reading ``max_tokens`` gets the exact length for free.
* ``slack``: ``max_tokens`` = ceil(true length x slack), a rough upper bound.

The true length always goes in ``x-loadgen-output-tokens`` (read only by the emulator);
``hint=True`` also sends it as ``x-blockproxy-output-tokens``, the proxy's hint header
(the oracle "Block*" mode).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from loadgen.headers import HINT_HEADER, OUTPUT_TOKENS_HEADER
from loadgen.tokenizer import (
    CHAT_GENERATION_PROMPT_TOKENS,
    CHAT_TOKENS_PER_MESSAGE,
    make_prompt,
    make_prompt_from_blocks,
)

FORMATS = ("auto", "azure", "mooncake", "lengths", "synthetic", "sessions")
MAX_TOKENS_POLICIES = ("true", "cap", "slack")
#: Tokens per Mooncake ``hash_ids`` block.
MOONCAKE_BLOCK_TOKENS = 512
DEFAULT_MAX_TOKENS_CAP = 2048

_PACKAGE_DATA = Path(__file__).resolve().parent / "data"
#: Directories searched for trace files given by name (``os.pathsep``-separated).
TRACE_PATH_ENV = "LOADGEN_TRACE_PATH"
#: trace name -> (file name looked up on the search path, bundled slice in loadgen/data or None)
TRACE_NAMES: dict[str, tuple[str, str | None]] = {
    "azure-conv": ("azure_llm_2023_conv.csv", "azure_conv_slice.csv"),
    "mooncake": ("mooncake_synthetic_trace.jsonl", None),
    "sharegpt": ("sharegpt_8k_filtered_stats_llama2_tokenizer.csv", None),
    "arxiv": ("arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv", None),
}


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload: lengths in tokens, arrival in trace seconds."""

    prompt_tokens: int
    output_tokens: int
    arrival_s: float
    hash_ids: tuple[int, ...] = ()


# --------------------------------------------------------------------------- traces


def trace_search_path(value: str | None = None) -> list[Path]:
    """Directories searched for named traces: ``value`` (``DIR[:DIR...]``, the
    ``--trace-path`` flag) or else the :data:`TRACE_PATH_ENV` variable; empty when neither."""
    text = value if value is not None else os.environ.get(TRACE_PATH_ENV, "")
    return [Path(part) for part in text.split(os.pathsep) if part]


def resolve_trace(name_or_path: str | Path,
                  search_path: Sequence[Path] | str | None = None) -> Path:
    """A trace file from a path, or a name of :data:`TRACE_NAMES`.

    A name is looked up in each directory of ``search_path`` (default: the
    :data:`TRACE_PATH_ENV` variable), then in the bundled slice when there is one.
    """
    path = Path(name_or_path)
    if path.exists():
        return path
    name = str(name_or_path)
    if name in TRACE_NAMES:
        file_name, bundled = TRACE_NAMES[name]
        dirs = (search_path if isinstance(search_path, Sequence)
                and not isinstance(search_path, str) else trace_search_path(search_path))
        candidates = [Path(d) / file_name for d in dirs]
        if bundled:
            candidates.append(_PACKAGE_DATA / bundled)
        for candidate in candidates:
            if candidate.exists():
                return candidate
        raise FileNotFoundError(f"trace {name!r} not found (looked at "
                                f"{', '.join(map(str, candidates))})")
    raise FileNotFoundError(f"no trace file {name!r} (names: {', '.join(TRACE_NAMES)})")


def detect_format(path: Path) -> str:
    """``azure``, ``mooncake`` or ``lengths`` from the extension and the first line."""
    with open(path, encoding="utf-8") as f:
        first = f.readline().strip()
    if path.suffix in (".jsonl", ".json") or first.startswith("{"):
        return "mooncake"
    columns = {c.strip() for c in first.split(",")}
    if "TIMESTAMP" in columns and "ContextTokens" in columns:
        return "azure"
    if "num_prefill_tokens" in columns and "num_decode_tokens" in columns:
        return "lengths"
    raise ValueError(f"cannot tell the format of {path} from its header {first[:80]!r}")


def _parse_azure_time(text: str) -> float:
    """Seconds since the epoch (naive) of ``2023-11-16 18:15:46.6805900``.

    The trace has 7 fractional digits, more than ``datetime`` parses, so the fraction is
    read separately.
    """
    whole, _, frac = text.strip().partition(".")
    base = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S")
    seconds = (base - datetime(1970, 1, 1)).total_seconds()
    return seconds + (float("0." + frac) if frac else 0.0)


def read_azure(path: Path) -> list[RequestSpec]:
    """Azure LLM trace rows, arrivals in seconds since the first row."""
    rows: list[tuple[float, int, int]] = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            rows.append((_parse_azure_time(row["TIMESTAMP"]), int(row["ContextTokens"]),
                         int(row["GeneratedTokens"])))
    if not rows:
        return []
    t0 = min(t for t, _, _ in rows)
    return [RequestSpec(p, o, t - t0) for t, p, o in rows]


def read_mooncake(path: Path) -> list[RequestSpec]:
    """Mooncake JSONL records, arrivals in seconds since the first record."""
    specs: list[RequestSpec] = []
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            rec = orjson.loads(line)
            specs.append(RequestSpec(int(rec["input_length"]), int(rec["output_length"]),
                                     float(rec.get("timestamp", 0)) / 1000.0,
                                     tuple(int(h) for h in rec.get("hash_ids", ()))))
    if specs:
        t0 = min(s.arrival_s for s in specs)
        specs = [dataclasses.replace(s, arrival_s=s.arrival_s - t0) for s in specs]
    return specs


def read_lengths(path: Path) -> list[RequestSpec]:
    """Length-only CSV rows; every arrival is 0 until :func:`assign_arrivals`."""
    with open(path, newline="", encoding="utf-8") as f:
        return [RequestSpec(int(float(row["num_prefill_tokens"])),
                            int(float(row["num_decode_tokens"])), 0.0)
                for row in csv.DictReader(f)]


_READERS = {"azure": read_azure, "mooncake": read_mooncake, "lengths": read_lengths}


def slice_specs(specs: Sequence[RequestSpec], start: float = 0.0,
                duration: float | None = None,
                num_requests: int | None = None) -> list[RequestSpec]:
    """Requests arriving in ``[start, start + duration)``, at most ``num_requests``.

    Arrivals are re-based on the first request of the slice, so a replay starts at once.
    """
    end = math.inf if duration is None else start + duration
    chosen = [s for s in sorted(specs, key=lambda s: s.arrival_s) if start <= s.arrival_s < end]
    if num_requests is not None:
        chosen = chosen[:num_requests]
    if not chosen:
        return []
    t0 = chosen[0].arrival_s
    return [dataclasses.replace(s, arrival_s=s.arrival_s - t0) for s in chosen]


def clip_lengths(spec: RequestSpec, context: int) -> RequestSpec:
    """``spec`` fitted into a context of ``context`` tokens (prompt + output).

    The prompt keeps at least one token of room for the output; every length is at
    least 1, and Mooncake blocks beyond the clipped prompt are dropped.
    """
    if context < 2:
        raise ValueError("the context limit must be at least 2 tokens")
    prompt = max(1, min(spec.prompt_tokens, context - 1))
    output = max(1, min(spec.output_tokens, context - prompt))
    hash_ids = spec.hash_ids[:math.ceil(prompt / MOONCAKE_BLOCK_TOKENS)]
    return RequestSpec(prompt, output, spec.arrival_s, hash_ids)


def load_trace(path: str | Path, fmt: str = "auto", start: float = 0.0,
               duration: float | None = None, num_requests: int | None = None,
               clip_context: int | None = None,
               search_path: Sequence[Path] | str | None = None) -> list[RequestSpec]:
    """Read a trace file (or a trace name, see :func:`resolve_trace`) into specs.

    For timestamped formats ``start`` and ``duration`` are trace seconds from the first
    request of the file; for ``lengths`` files (no timestamps) ``start`` is a row offset
    and ``duration`` is left to :func:`slice_specs` after :func:`assign_arrivals`.
    Zero lengths in a trace become 1 (a request has at least one token each way).
    """
    parts = str(path).split("+")
    if len(parts) > 1 and not Path(path).exists():
        return mix_traces(parts, fmt, start, num_requests, clip_context, search_path)
    file = resolve_trace(path, search_path)
    if fmt == "auto":
        fmt = detect_format(file)
    if fmt not in _READERS:
        raise ValueError(f"unknown trace format {fmt!r} (one of {', '.join(_READERS)})")
    specs = _READERS[fmt](file)
    if fmt == "lengths":
        specs = specs[int(start):]
        if num_requests is not None:
            specs = specs[:num_requests]
    else:
        specs = slice_specs(specs, start, duration, num_requests)
    specs = [dataclasses.replace(s, prompt_tokens=max(1, s.prompt_tokens),
                                 output_tokens=max(1, s.output_tokens)) for s in specs]
    if clip_context is not None:
        specs = [clip_lengths(s, clip_context) for s in specs]
    return specs


def mix_traces(names: Sequence[str], fmt: str = "auto", start: float = 0.0,
               num_requests: int | None = None, clip_context: int | None = None,
               search_path: Sequence[Path] | str | None = None) -> list[RequestSpec]:
    """Length-only traces taken in turn, one request of each (``--trace
    sharegpt+arxiv``: short prompts with long answers beside long prompts with short
    ones, the mix the Intelligent Router targets); ``start`` is a row offset into each,
    and the mix ends with its shortest trace (or at ``num_requests``)."""
    each = [load_trace(name, fmt, start, None, None, clip_context, search_path)
            for name in names]
    for name, specs in zip(names, each, strict=True):
        if any(s.arrival_s for s in specs):
            raise ValueError(f"trace {name!r} has timestamps: only length-only traces "
                             "mix (arrivals come from --request-rate)")
    mixed = [spec for row in zip(*each, strict=False) for spec in row]
    return mixed[:num_requests] if num_requests is not None else mixed


# --------------------------------------------------------------------------- arrivals


def arrival_gaps(count: int, rate: float, burstiness: float = 1.0,
                 seed: int | None = 0) -> np.ndarray:
    """``count`` inter-arrival gaps in seconds, as vLLM's ``bench serve`` draws them.

    ``Gamma(shape=burstiness, scale=1/(rate*burstiness))``; an infinite rate gives zeros
    (everything is sent at once).
    """
    if not rate > 0:
        raise ValueError("the request rate must be positive")
    if not burstiness > 0:
        raise ValueError("burstiness must be positive")
    if math.isinf(rate):
        return np.zeros(count)
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=count)


def arrival_times(count: int, rate: float, burstiness: float = 1.0,
                  seed: int | None = 0) -> list[float]:
    """Arrival times of ``count`` requests; like vLLM the first one is sent at 0."""
    if count == 0:
        return []
    gaps = arrival_gaps(count - 1, rate, burstiness, seed)
    return [0.0, *np.cumsum(gaps).tolist()]


def assign_arrivals(specs: Sequence[RequestSpec], rate: float, burstiness: float = 1.0,
                    seed: int | None = 0) -> list[RequestSpec]:
    """``specs`` in order with synthetic Poisson/gamma arrival times (see module doc)."""
    times = arrival_times(len(specs), rate, burstiness, seed)
    return [dataclasses.replace(s, arrival_s=t) for s, t in zip(specs, times)]


def parse_schedule(text: str) -> list[tuple[float, float]]:
    """``"T:R,T:R,..."`` (seconds from the start, requests per second; times increasing,
    rates non-negative) -> the points of a piecewise-linear arrival rate."""
    points: list[tuple[float, float]] = []
    for part in text.split(","):
        t, sep, r = part.strip().partition(":")
        try:
            point = (float(t), float(r))
        except ValueError:
            point = (math.nan, math.nan)
        if not sep or not all(math.isfinite(x) and x >= 0 for x in point):
            raise ValueError(f"a rate schedule is T:R,T:R,... (seconds:requests per second, "
                             f"non-negative), got {part!r}")
        if points and point[0] <= points[-1][0]:
            raise ValueError(f"rate schedule times must increase, got {text!r}")
        points.append(point)
    if points[0][0] != 0.0:
        points.insert(0, (0.0, points[0][1]))
    if len(points) < 2 or not any(r > 0 for _, r in points):
        raise ValueError(f"a rate schedule needs two points and a positive rate: {text!r}")
    return points


def schedule_times(points: Sequence[tuple[float, float]], seed: int | None = 0,
                   limit: int | None = None) -> list[float]:
    """Arrival times of a Poisson process whose rate follows ``points`` linearly between
    them, up to the last point's time (or ``limit`` arrivals): unit-rate exponential gaps
    mapped through the inverse of the cumulative rate."""
    rng = np.random.default_rng(seed)
    times: list[float] = []
    target = rng.exponential()  # cumulative rate at the next arrival
    done = 0.0  # cumulative rate up to the start of the segment
    for (t0, r0), (t1, r1) in zip(points, points[1:]):
        span = t1 - t0
        slope = (r1 - r0) / span
        area = (r0 + r1) / 2 * span
        while target <= done + area and (limit is None or len(times) < limit):
            need = target - done  # solve r0 x + slope x^2 / 2 = need for x in [0, span]
            if abs(slope) < 1e-12:
                x = need / r0
            else:
                x = (-r0 + math.sqrt(max(r0 * r0 + 2 * slope * need, 0.0))) / slope
            times.append(t0 + min(max(x, 0.0), span))
            target += rng.exponential()
        done += area
    return times


def assign_schedule(specs: Sequence[RequestSpec], points: Sequence[tuple[float, float]],
                    seed: int | None = 0) -> list[RequestSpec]:
    """``specs`` in order with arrival times drawn from the rate schedule ``points``; as
    many as the schedule brings (fewer specs: the schedule is cut there)."""
    times = schedule_times(points, seed, len(specs))
    return [dataclasses.replace(s, arrival_s=t) for s, t in zip(specs, times)]


def synthetic(num_requests: int, prompt_mean: int = 512, output_mean: int = 128,
              spread: float = 0.5, rate: float = math.inf, burstiness: float = 1.0,
              seed: int | None = 0, max_prompt: int | None = None,
              max_output: int | None = None) -> list[RequestSpec]:
    """Synthetic requests with lognormal lengths (mean ``*_mean``, sigma ``spread``).

    ``spread=0`` gives fixed lengths.  Arrivals follow ``rate``/``burstiness``.
    """
    rng = np.random.default_rng(seed)

    def lengths(mean: int, cap: int | None) -> list[int]:
        if spread <= 0:
            values = np.full(num_requests, float(mean))
        else:
            # A lognormal with mean ``mean``: mu = ln(mean) - sigma^2 / 2.
            values = rng.lognormal(math.log(mean) - spread ** 2 / 2, spread, num_requests)
        out = np.maximum(1, np.rint(values)).astype(int)
        if cap is not None:
            out = np.minimum(out, cap)
        return out.tolist()

    prompts, outputs = lengths(prompt_mean, max_prompt), lengths(output_mean, max_output)
    specs = [RequestSpec(p, o, 0.0) for p, o in zip(prompts, outputs)]
    return assign_arrivals(specs, rate, burstiness, seed)


def send_times(specs: Sequence[RequestSpec], time_scale: float = 1.0,
               rate_multiplier: float = 1.0) -> list[float]:
    """Wall-clock send offsets of specs: ``arrival_s * time_scale / rate_multiplier``.

    ``time_scale`` is the emulator's (0.1 = everything ten times faster): an emulator at
    time scale ``s`` runs its steps ``1/s`` times faster, so arrivals must come ``1/s``
    times faster too for the load (arrival rate x service time) to stay the same.
    ``rate_multiplier`` 2 replays the trace twice as fast (twice the load).
    """
    if not time_scale > 0 or not rate_multiplier > 0:
        raise ValueError("time_scale and rate_multiplier must be positive")
    factor = time_scale / rate_multiplier
    return [s.arrival_s * factor for s in specs]


# --------------------------------------------------------------------------- requests


def max_tokens_for(spec: RequestSpec, policy: str = "cap", slack: float = 1.2,
                   fixed_cap: int = DEFAULT_MAX_TOKENS_CAP,
                   context_limit: int | None = None) -> int:
    """``max_tokens`` of a request under a policy (see the module doc).

    With a ``context_limit`` the value never exceeds the room left after the prompt,
    which vLLM would otherwise reject.
    """
    if policy == "true":
        value = spec.output_tokens
    elif policy == "cap":
        value = fixed_cap
    elif policy == "slack":
        value = math.ceil(spec.output_tokens * slack)
    else:
        raise ValueError(f"unknown max_tokens policy {policy!r} "
                         f"(one of {', '.join(MAX_TOKENS_POLICIES)})")
    if context_limit is not None:
        value = min(value, context_limit - spec.prompt_tokens)
    return max(1, value)


def sessions(num_sessions: int = 100, turns_mean: float = 4.0, system_prompts: int = 8,
             system_tokens: int = 2048, user_tokens_mean: int = 256,
             output_mean: int = 256, spread: float = 0.5, session_rate: float = 1.0,
             think_time_s: float = 20.0, seed: int | None = 0,
             max_context: int | None = None) -> list[RequestSpec]:
    """Multi-turn chat sessions that share system prompts: a prefix-caching workload.

    Sessions start as a Poisson process of ``session_rate`` per second; each has a
    geometric number of turns (mean ``turns_mean``) and one of ``system_prompts`` system
    prompts of ``system_tokens`` tokens (rounded up to whole 512-token blocks), chosen
    uniformly.  Turn ``k``'s prompt is the system prompt, every earlier turn's user
    message and answer, and its own user message (lognormal lengths, means
    ``user_tokens_mean`` and ``output_mean``, sigma ``spread``); it arrives an exponential
    think time (mean ``think_time_s``) after the previous turn.  A session ends early when
    its next prompt would pass ``max_context`` tokens with its answer.

    Prompts are Mooncake-style blocks (:data:`MOONCAKE_BLOCK_TOKENS` tokens per hash id):
    the system prompt's blocks are shared by every session using it, a session's history
    blocks by its later turns (a turn's cut last block is a prefix of the next turn's
    full one), so a router that sends a session's turns where its history is cached saves
    the whole history's prefill.  Sorted by arrival.
    """
    rng = np.random.default_rng(seed)
    block = MOONCAKE_BLOCK_TOKENS
    sys_blocks = max(1, math.ceil(system_tokens / block))

    def draw(mean: float) -> int:
        if spread <= 0:
            return max(1, round(mean))
        return max(1, round(float(rng.lognormal(math.log(mean) - spread ** 2 / 2, spread))))

    specs: list[RequestSpec] = []
    next_id = system_prompts * sys_blocks
    start = 0.0
    for _ in range(num_sessions):
        start += float(rng.exponential(1.0 / session_rate))
        system = int(rng.integers(system_prompts))
        sys_ids = tuple(range(system * sys_blocks, (system + 1) * sys_blocks))
        turns = int(rng.geometric(1.0 / max(turns_mean, 1.0)))
        history = 0  # tokens after the system prompt
        own: list[int] = []  # this session's block ids
        at = start
        for _ in range(turns):
            user, output = draw(user_tokens_mean), draw(output_mean)
            prompt = sys_blocks * block + history + user
            if max_context is not None and prompt + output > max_context:
                break
            while len(own) * block < history + user:
                own.append(next_id)
                next_id += 1
            specs.append(RequestSpec(prompt, output, at, sys_ids + tuple(own)))
            history += user + output
            at += float(rng.exponential(think_time_s))
    specs.sort(key=lambda r: r.arrival_s)
    return specs


def prompt_text(spec: RequestSpec, num_tokens: int, seed: int | str | None) -> str:
    """A text of exactly ``num_tokens`` emulator tokens for ``spec``.

    Mooncake blocks give shared text (prefix-cache hits); without them the words come
    from ``seed``, so distinct seeds give distinct prompts.
    """
    if spec.hash_ids:
        return make_prompt_from_blocks(spec.hash_ids, MOONCAKE_BLOCK_TOKENS, num_tokens,
                                       seed=seed)  # type: ignore[arg-type]
    return make_prompt(num_tokens, random.Random(f"loadgen-prompt:{seed}"))


def build_request(spec: RequestSpec, model: str = "tiny", endpoint: str = "/v1/completions",
                  max_tokens_policy: str = "cap", slack: float = 1.2,
                  fixed_cap: int = DEFAULT_MAX_TOKENS_CAP, hint: bool = False,
                  seed: int | str | None = None,
                  context_limit: int | None = None) -> tuple[str, dict[str, Any], dict[str, str]]:
    """``(path, json body, headers)`` of a streaming request for ``spec``.

    The prompt counts exactly ``spec.prompt_tokens`` emulator tokens: on the chat
    endpoint the one user message's template tokens are part of that count.  ``seed``
    should differ between requests (the runner passes ``"<run seed>:<index>"``).
    """
    if endpoint.rstrip("/").endswith("/chat/completions"):
        template = CHAT_TOKENS_PER_MESSAGE + CHAT_GENERATION_PROMPT_TOKENS
        text = prompt_text(spec, max(0, spec.prompt_tokens - template), seed)
        body: dict[str, Any] = {"model": model,
                                "messages": [{"role": "user", "content": text}],
                                "max_completion_tokens": None}
        max_tokens_key = "max_completion_tokens"
    else:
        body = {"model": model, "prompt": prompt_text(spec, spec.prompt_tokens, seed)}
        max_tokens_key = "max_tokens"
    body[max_tokens_key] = max_tokens_for(spec, max_tokens_policy, slack, fixed_cap,
                                          context_limit)
    body.update({"temperature": 0.0, "ignore_eos": False, "stream": True,
                 "stream_options": {"include_usage": True}})
    headers = {OUTPUT_TOKENS_HEADER: str(spec.output_tokens)}
    if hint:
        headers[HINT_HEADER] = str(spec.output_tokens)
    return endpoint, body, headers


def prefix_reuse(specs: Sequence[RequestSpec]) -> float | None:
    """The share of prompt tokens an infinite prefix cache would serve: tokens in blocks
    (``hash_ids``) that an earlier request already had (None without blocks)."""
    seen: set[int] = set()
    reused = total = 0
    for spec in sorted(specs, key=lambda s: s.arrival_s):
        if not spec.hash_ids:
            total += spec.prompt_tokens
            continue
        for k, h in enumerate(spec.hash_ids):
            size = min(MOONCAKE_BLOCK_TOKENS,
                       spec.prompt_tokens - k * MOONCAKE_BLOCK_TOKENS)
            if size <= 0:
                break
            total += size
            if h in seen:
                reused += size
            seen.add(h)
    return reused / total if seen and total else None


def total_tokens(specs: Iterable[RequestSpec]) -> tuple[int, int]:
    """(prompt tokens, output tokens) summed over ``specs``."""
    prompt = output = 0
    for s in specs:
        prompt += s.prompt_tokens
        output += s.output_tokens
    return prompt, output
