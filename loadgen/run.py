"""One benchmark run against any OpenAI-compatible endpoint, measured like vLLM's bench.

The workload is a trace (``--trace`` path or name: azure-conv, mooncake, sharegpt,
arxiv, or length-only ones taken in turn: ``sharegpt+arxiv``), or synthetic lengths.
Requests are sent at the trace's own timestamps (``--use-trace-timestamps``, sped up by
``--rate-multiplier``) or at a Poisson/gamma ``--request-rate``; ``--max-concurrency``
caps requests in flight (closed loop when the rate is inf).

Time scale: ``--time-scale S`` matches an emulator started with the same ``S``; every
arrival gap is multiplied by ``S / rate-multiplier``, so the load (arrival rate x service
time) is that of the real GPU, and ``--request-rate`` is in real-GPU requests per second.
Reported metrics are wall-clock; when ``S != 1`` the JSON also has an ``unscaled`` block
with the same time keys divided by ``S`` (throughputs multiplied by ``S``), which read as
real-GPU figures.

Probes (``--until first-token``, used by ``loadgen capacity`` and ``loadgen compare
--capacity`` when the SLO is on TTFT): the run stops once every request has had its first
token, instead of waiting for the longest answers to finish; every stream stays open until
then, so the load the cluster sees is unchanged while TTFTs are measured.  With a TTFT
bound (``ttft_abort_ms``), a run also stops as soon as so many requests are (or will be)
over the bound that the percentile must exceed it (``aborted`` in the JSON).  Requests
stopped either way are ``cut``, neither completed nor failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from loadgen import measure
from loadgen.client import RequestRecord, send_request
from loadgen.truth import write_truth
from loadgen.workload import (
    DEFAULT_MAX_TOKENS_CAP,
    FORMATS,
    MAX_TOKENS_POLICIES,
    RequestSpec,
    arrival_times,
    assign_arrivals,
    assign_schedule,
    build_request,
    clip_lengths,
    detect_format,
    load_trace,
    parse_schedule,
    resolve_trace,
    schedule_times,
    send_times,
    sessions,
    slice_specs,
    synthetic,
)

#: vLLM's bench default request timeout (6 hours).
DEFAULT_TIMEOUT_S = 6 * 60 * 60
#: when a run ends: every request done (vLLM's bench), or every first token received
UNTIL = ("done", "first-token")
#: seconds between two looks of the probe watcher
_WATCH_INTERVAL_S = 0.05


class Progress:
    """A one-line progress bar on a stream (no dependency; redrawn at most 10 times/s)."""

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 30) -> None:
        self.total, self.done, self.failed = total, 0, 0
        self.stream = stream or sys.stderr
        self.width = width
        self._start = time.monotonic()
        self._drawn = 0.0

    def update(self, ok: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        now = time.monotonic()
        if now - self._drawn >= 0.1 or self.done == self.total:
            self._drawn = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = self.done / self.total if self.total else 1.0
        filled = int(frac * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = now - self._start
        self.stream.write(f"\r[{bar}] {self.done}/{self.total} failed {self.failed} "
                          f"{elapsed:6.1f}s")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def _offsets(specs: Sequence[RequestSpec], request_rate: float, burstiness: float,
             use_trace_arrivals: bool, rate_multiplier: float, time_scale: float,
             seed: int) -> list[float]:
    if use_trace_arrivals:
        return send_times(specs, time_scale, rate_multiplier)
    return [t * time_scale for t in arrival_times(len(specs), request_rate, burstiness, seed)]


async def run_benchmark(target: str | Sequence[str], specs: Sequence[RequestSpec], *,
                        model: str = "tiny",
                        endpoint: str = "/v1/completions", request_rate: float = math.inf,
                        burstiness: float = 1.0, max_concurrency: int | None = None,
                        use_trace_arrivals: bool = False, rate_multiplier: float = 1.0,
                        time_scale: float = 1.0, max_tokens_policy: str = "cap",
                        max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP, slack: float = 1.2,
                        hint: bool = False, goodput: dict[str, float] | None = None,
                        percentiles: Sequence[float] = (99,), progress: bool = False,
                        detail: bool = False, seed: int = 0,
                        context_limit: int | None = None,
                        timeout: float = DEFAULT_TIMEOUT_S, until: str = "done",
                        ttft_abort_ms: float | None = None,
                        abort_percentile: float = 99.0,
                        truth: str | None = None) -> dict[str, Any]:
    """Send ``specs`` to ``target`` and return the metrics dict (see :mod:`loadgen.measure`).

    ``target`` may be a list: requests then go round-robin across them (several proxies
    behind a load balancer).  ``detail=True`` adds ``per_request`` (ttft/e2el/tpot in ms,
    ITL list, tokens, error).
    ``until="first-token"`` stops the run once every request has had its first token;
    ``ttft_abort_ms`` stops it once the ``abort_percentile`` TTFT must exceed that bound
    (see the module doc).  SLOs (``goodput``, ``ttft_abort_ms``) are real-GPU ms: they are
    multiplied by ``time_scale`` before being compared with wall-clock records.
    ``truth`` names the truth file to write before the first send (:mod:`loadgen.truth`:
    the emulator reads it, whatever router stands in between).
    """
    if until not in UNTIL:
        raise ValueError(f"until must be one of {', '.join(UNTIL)}: {until!r}")
    targets = [target] if isinstance(target, str) else list(target)
    urls = [t.rstrip("/") + endpoint for t in targets]
    offsets = _offsets(specs, request_rate, burstiness, use_trace_arrivals, rate_multiplier,
                       time_scale, seed)
    # Bodies are built before the clock starts so prompt generation never delays a send.
    requests = [build_request(s, model, endpoint, max_tokens_policy, slack, max_tokens_cap,
                              hint, seed=f"{seed}:{i}", context_limit=context_limit)
                for i, s in enumerate(specs)]
    if truth:
        write_truth(truth, ((path, body, s.output_tokens)
                            for (path, body, _), s in zip(requests, specs)))
    records = [RequestRecord(s.prompt_tokens, s.output_tokens) for s in specs]
    semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = Progress(len(specs)) if progress else None
    # limit=0: no client-side cap on connections, so only max_concurrency limits load.
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    session = aiohttp.ClientSession(
        connector=connector, read_bufsize=4 * 1024 * 1024,
        timeout=aiohttp.ClientTimeout(total=timeout))

    async def one(i: int, start: float) -> None:
        delay = start + offsets[i] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        _, body, headers = requests[i]
        if semaphore is None:
            await send_request(session, urls[i % len(urls)], body, headers, records[i], start)
        else:
            async with semaphore:
                await send_request(session, urls[i % len(urls)], body, headers, records[i],
                                   start)
        if bar is not None:
            bar.update(records[i].success)

    aborted: str | None = None
    try:
        start = time.perf_counter()
        tasks = [asyncio.ensure_future(one(i, start)) for i in range(len(specs))]
        if until == "done" and ttft_abort_ms is None:
            await asyncio.gather(*tasks)
        else:
            aborted = await _watch(tasks, records, start, until == "first-token",
                                   None if ttft_abort_ms is None else ttft_abort_ms * time_scale,
                                   abort_percentile)
        duration = time.perf_counter() - start
    finally:
        await session.close()
        if bar is not None:
            bar.close()
    # SLOs are real-GPU ms, as the tables show; the records are wall-clock.
    wall_goodput = {k: v * time_scale for k, v in goodput.items()} if goodput else None
    metrics = measure.calculate_metrics(records, duration, percentiles, wall_goodput)
    if goodput:
        metrics["goodput_slos_ms"] = dict(goodput)
    metrics["until"] = until
    if aborted:
        metrics["aborted"] = aborted
    metrics.update({
        "target": target, "endpoint": endpoint, "model": model, "num_prompts": len(specs),
        "request_rate": "trace" if use_trace_arrivals else _json_number(request_rate),
        "burstiness": burstiness, "max_concurrency": max_concurrency,
        "rate_multiplier": rate_multiplier, "time_scale": time_scale, "seed": seed,
        "max_tokens_policy": max_tokens_policy, "hint": hint,
    })
    if time_scale != 1.0:
        metrics["unscaled"] = measure.unscale(metrics, time_scale)
    if detail:
        metrics["per_request"] = measure.per_request(records)
    return metrics


def abort_threshold(count: int, percentile: float) -> int:
    """How many of ``count`` values over a bound make their ``percentile`` exceed it.

    numpy's linear interpolation puts the percentile between sorted values ``k`` and
    ``k + 1``, ``k = floor(p/100 * (n - 1))``; once ``n - k`` values are over the bound,
    value ``k`` is too, whatever the rest.  ``n - k`` never shrinks as ``n`` grows, so the
    figure for all ``count`` requests holds even if some end without a first token.
    """
    return count - math.floor(percentile / 100.0 * (count - 1))


async def _watch(tasks: Sequence[asyncio.Future[Any]], records: Sequence[RequestRecord],
                 start: float, first_token: bool, ttft_abort_ms: float | None,
                 percentile: float) -> str | None:
    """Wait for ``tasks`` until they end, every request has its first token
    (``first_token``), or the TTFT bound is lost; cancel the rest.  Returns the abort
    reason, or None."""
    pending = set(tasks)
    limit = abort_threshold(len(records), percentile)
    bound_s = None if ttft_abort_ms is None else ttft_abort_ms / 1000.0
    reason = None
    try:
        while pending:
            done, pending = await asyncio.wait(pending, timeout=_WATCH_INTERVAL_S)
            for task in done:
                if task.exception() is not None:  # a bug, not a failed request: surface it
                    raise task.exception()  # type: ignore[misc]
            if first_token and all(r.ended or (r.sent and r.ttft > 0) for r in records):
                break
            if bound_s is not None:
                # Waiting longer than the bound already: its TTFT will be over it too.
                late = time.perf_counter() - start - bound_s
                over = sum(1 for r in records if r.ttft > bound_s or (
                    r.sent and not r.ended and r.ttft == 0 and r.start_s < late))
                if over >= limit:
                    reason = (f"{over} of {len(records)} requests over the TTFT bound of "
                              f"{ttft_abort_ms:.0f} ms: p{percentile:g} TTFT must exceed it")
                    break
    finally:
        for task in pending:
            task.cancel()
        for record in records:
            if not record.ended:
                record.cut = True
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    return reason


def _json_number(value: float) -> float | str:
    # JSON has no infinity; vLLM writes "inf" as a string.
    return "inf" if math.isinf(value) else value


# --------------------------------------------------------------------------- CLI


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """Workload and client flags shared by ``loadgen run`` and ``loadgen capacity``."""
    parser.add_argument("--target", required=True,
                        help="base URL of the endpoint, e.g. http://127.0.0.1:8000")
    parser.add_argument("--trace", help="trace file, or a name: azure-conv, mooncake, "
                                        "sharegpt, arxiv; A+B takes length-only traces "
                                        "in turn (sharegpt+arxiv); omit for synthetic "
                                        "lengths")
    parser.add_argument("--trace-path", default=None, metavar="DIR[:DIR...]",
                        help="directories searched for a trace given by name, before the "
                             "bundled Azure slice [env LOADGEN_TRACE_PATH]")
    parser.add_argument("--format", default="auto", choices=FORMATS, help="trace format")
    parser.add_argument("--start", type=float, default=0.0,
                        help="start of the slice: trace seconds (row offset for length-only "
                             "files)")
    parser.add_argument("--duration", type=float,
                        help="length of the slice in trace seconds (before time scaling)")
    parser.add_argument("--num-requests", type=int, help="at most this many requests")
    parser.add_argument("--clip-context", type=int,
                        help="clip prompt + output to this context limit (and keep "
                             "max_tokens within it)")
    parser.add_argument("--synthetic-prompt-mean", type=int, default=512,
                        help="synthetic workload: mean prompt tokens")
    parser.add_argument("--synthetic-output-mean", type=int, default=128,
                        help="synthetic workload: mean output tokens")
    parser.add_argument("--synthetic-spread", type=float, default=0.5,
                        help="synthetic workload: lognormal sigma of lengths (0 = fixed)")
    group = parser.add_argument_group(
        "multi-turn sessions (--format sessions: no trace file; chats over shared system "
        "prompts, timestamped; output lengths from --synthetic-output-mean/-spread)")
    group.add_argument("--sessions", type=int, default=100, help="number of sessions")
    group.add_argument("--session-turns", type=float, default=4.0,
                       help="mean turns per session (geometric)")
    group.add_argument("--session-rate", type=_positive_float, default=1.0,
                       help="sessions starting per second (Poisson)")
    group.add_argument("--think-time", type=_positive_float, default=20.0,
                       help="mean seconds between a session's turns (exponential)")
    group.add_argument("--system-prompts", type=int, default=8,
                       help="distinct system prompts the sessions share")
    group.add_argument("--system-tokens", type=int, default=2048,
                       help="tokens per system prompt (whole 512-token blocks)")
    group.add_argument("--user-tokens", type=int, default=256,
                       help="mean tokens per user message")
    parser.add_argument("--request-rate", type=_positive_float, default=math.inf,
                        help="requests/s (real-GPU time) of the Poisson/gamma process; "
                             "inf sends everything at once")
    parser.add_argument("--burstiness", type=_positive_float, default=1.0,
                        help="gamma shape: 1 = Poisson, < 1 burstier, > 1 more regular")
    parser.add_argument("--rate-schedule", metavar="T:R,...",
                        help="synthetic or length-only workloads: arrivals of a Poisson "
                             "process whose rate (requests/s, real-GPU time) goes linearly "
                             "between the points (seconds from the start), up to the last "
                             "one: on/off loads with ramps, e.g. 0:100,20:100,25:400,45:400,"
                             "50:100,70:100.  The workload is then timestamped "
                             "(--use-trace-timestamps replays it)")
    parser.add_argument("--max-concurrency", type=int, help="cap on requests in flight")
    parser.add_argument("--use-trace-timestamps", action="store_true",
                        help="send at the trace's own arrival times")
    parser.add_argument("--rate-multiplier", type=_positive_float, default=1.0,
                        help="trace replay speed-up (2 = twice as fast)")
    parser.add_argument("--time-scale", type=_positive_float, default=1.0,
                        help="the emulator's time scale: arrival gaps x time-scale")
    parser.add_argument("--max-tokens-policy", default="cap", choices=MAX_TOKENS_POLICIES,
                        help="max_tokens = the true length (optimistic), a fixed cap "
                             "(realistic), or true length x slack")
    parser.add_argument("--max-tokens-cap", type=int, default=DEFAULT_MAX_TOKENS_CAP,
                        help="max_tokens under the cap policy")
    parser.add_argument("--slack", type=_positive_float, default=1.2,
                        help="multiplier of the slack policy")
    parser.add_argument("--hint", action="store_true",
                        help="send the true length as x-blockproxy-output-tokens (oracle)")
    parser.add_argument("--goodput", nargs="+", metavar="NAME:MS",
                        help="SLOs for goodput, e.g. ttft:2000 tpot:100 e2el:20000 (real-GPU "
                             "ms when --time-scale is set)")
    parser.add_argument("--metric-percentiles", default="99",
                        help="comma-separated percentiles to report")
    parser.add_argument("--seed", type=int, default=0, help="seed of arrivals and prompts")
    parser.add_argument("--model", default="tiny", help="model name in the requests")
    parser.add_argument("--endpoint", default="/v1/completions",
                        choices=("/v1/completions", "/v1/chat/completions"))
    parser.add_argument("--timeout", type=_positive_float, default=DEFAULT_TIMEOUT_S,
                        help="per-request timeout in seconds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--until", default="done", choices=UNTIL,
                        help="end the run when every request is done (vLLM's bench), or "
                             "when every request has had its first token (TTFT-only figures)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``loadgen run``."""
    add_workload_arguments(parser)
    parser.add_argument("--json", metavar="OUT", help="write the metrics JSON here")
    parser.add_argument("--detail", action="store_true",
                        help="include per-request records in the JSON")
    parser.add_argument("--truth", metavar="FILE",
                        help="write the workload's true output lengths here before sending, "
                             "for emulators started with loadgen emulate --truth FILE (they "
                             "then need no header, so any router may stand in between)")


def timestamped(args: argparse.Namespace) -> bool:
    """Whether the flags name a trace with its own arrival times (or a rate schedule
    gives them)."""
    if args.format == "sessions" or getattr(args, "rate_schedule", None):
        return True
    if not args.trace or args.format in ("lengths", "synthetic"):
        return False
    return timestamped_trace(args)


def timestamped_trace(args: argparse.Namespace) -> bool:
    """Whether the trace the flags name carries arrival times of its own (a mix of
    traces, ``A+B``, is of length-only ones)."""
    if "+" in args.trace and not Path(args.trace).exists():
        return False
    fmt = args.format if args.format != "auto" else \
        detect_format(resolve_trace(args.trace, args.trace_path))
    return fmt != "lengths"


def specs_from_args(args: argparse.Namespace) -> list[RequestSpec]:
    """The workload the flags describe (arrival times in trace seconds)."""
    if args.format == "sessions":
        specs = sessions(args.sessions, args.session_turns, args.system_prompts,
                         args.system_tokens, args.user_tokens, args.synthetic_output_mean,
                         args.synthetic_spread, args.session_rate, args.think_time,
                         seed=args.seed, max_context=args.clip_context)
        specs = slice_specs(specs, args.start, args.duration, args.num_requests)
    elif args.trace and args.format != "synthetic":
        specs = load_trace(args.trace, args.format, args.start, args.duration,
                           args.num_requests, args.clip_context, args.trace_path)
    else:
        count = args.num_requests if args.num_requests is not None else 100
        if args.rate_schedule and args.num_requests is None:  # as many as it brings
            count = len(schedule_times(parse_schedule(args.rate_schedule), args.seed))
        specs = synthetic(count, args.synthetic_prompt_mean, args.synthetic_output_mean,
                          args.synthetic_spread, seed=args.seed)
        if args.clip_context:
            specs = [clip_lengths(s, args.clip_context) for s in specs]
    if args.rate_schedule:
        if args.format == "sessions" or (args.trace and args.format not in (
                "synthetic", "lengths") and timestamped_trace(args)):
            raise ValueError("--rate-schedule replaces arrival times: it is for synthetic "
                             "or length-only workloads, not a timestamped trace")
        specs = assign_schedule(specs, parse_schedule(args.rate_schedule), args.seed)
    if args.use_trace_timestamps and len(specs) > 1 and all(s.arrival_s == 0 for s in specs):
        raise ValueError("this workload has no timestamps: use --request-rate instead of "
                         "--use-trace-timestamps")
    if not timestamped(args) and args.duration is not None \
            and not math.isinf(args.request_rate):
        # No timestamps: --duration cuts the synthetic arrival process (the runner draws
        # the same times again from the same seed).
        specs = slice_specs(assign_arrivals(specs, args.request_rate, args.burstiness,
                                            args.seed), 0.0, args.duration)
    if not specs:
        raise ValueError("the workload is empty (check --start/--duration/--num-requests)")
    return specs


def benchmark_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :func:`run_benchmark` from the shared flags."""
    return dict(model=args.model, endpoint=args.endpoint, request_rate=args.request_rate,
                burstiness=args.burstiness, max_concurrency=args.max_concurrency,
                use_trace_arrivals=args.use_trace_timestamps,
                rate_multiplier=args.rate_multiplier, time_scale=args.time_scale,
                max_tokens_policy=args.max_tokens_policy, max_tokens_cap=args.max_tokens_cap,
                slack=args.slack, hint=args.hint,
                goodput=measure.parse_goodput(args.goodput) if args.goodput else None,
                percentiles=measure.parse_percentiles(args.metric_percentiles),
                seed=args.seed, context_limit=args.clip_context, timeout=args.timeout,
                until=args.until, progress=not args.no_progress and sys.stderr.isatty())


def write_json(path: str, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON (non-finite numbers as strings)."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    with open(path, "w", encoding="utf-8") as f:
        json.dump(clean(data), f, indent=2)
        f.write("\n")


def run(args: argparse.Namespace) -> int:
    """``loadgen run``: one run, a summary table on stdout, JSON to ``--json``."""
    try:
        specs = specs_from_args(args)
        kwargs = benchmark_kwargs(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"loadgen run: {exc}", file=sys.stderr)
        return 2
    metrics = asyncio.run(run_benchmark(args.target, specs, detail=args.detail,
                                        truth=args.truth, **kwargs))
    print(measure.format_summary(metrics, kwargs["percentiles"]))
    if args.json:
        write_json(args.json, metrics)
    return 0 if metrics["completed"] > 0 else 1
