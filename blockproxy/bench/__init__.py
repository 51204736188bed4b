"""Benchmarks that print figures: ``bench sim``, ``bench decision``, ``bench overhead``.

``bench decision`` and ``bench overhead`` are documented in
:mod:`blockproxy.bench.decision` and :mod:`blockproxy.bench.overhead`.

``bench sim``: how long one simulator prediction takes.

For the compiled simulator and its pure-Python twin, times one ``predict()`` on one
instance holding 16, 64 and 256 active requests and prints the median microseconds per
prediction (``--json`` for machine-readable output).  Each size uses several seeded random
instance states: request lengths sampled from the ShareGPT length trace (prompt and output
tokens), about 80% of the requests decoding (generated uniform in [1, predicted)), 10%
prefilling, 10% waiting, with requests that would not fit in 90% of the KV cache moved to
the waiting queue, as vLLM would hold them.  The new request has a sampled prompt and 256
output tokens.  Without the trace, lengths come from a lognormal fit of it (documented in
the output).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from blockproxy import simulator
from blockproxy.profile import load_profile

LENGTHS_FILE = "sharegpt_8k_filtered_stats_llama2_tokenizer.csv"
DEFAULT_PROFILE = "llama-3.1-8b-h100-tp1"
SIZES = (16, 64, 256)
NEW_OUTPUT_TOKENS = 256
#: Lognormal (mu, sigma) of ln(tokens) fitted to the ShareGPT trace, used without it.
SYNTHETIC_PROMPT = (7.01, 1.63)
SYNTHETIC_OUTPUT = (5.77, 1.00)
SYNTHETIC_CLIP = (8141, 1024)
#: Fraction of the KV cache the running requests of a generated state may hold.
KV_FILL = 0.9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", nargs="?", choices=["sim", "decision", "overhead"],
                        default="sim",
                        help="sim: one prediction; decision: one routing decision over 4 and "
                             "16 instances; overhead: TTFT added by the proxy vs direct")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--profile", default=DEFAULT_PROFILE,
                        help="profile name or file: engine limits and step-time model")
    parser.add_argument("--lengths", default=None,
                        help="CSV with num_prefill_tokens,num_decode_tokens columns; when "
                             f"not given, {LENGTHS_FILE} on the load generator's trace "
                             "search path (LOADGEN_TRACE_PATH), else synthetic lengths")
    parser.add_argument("--states", type=int, default=20,
                        help="random instance states per size")
    parser.add_argument("--seed", type=int, default=1, help="random seed")
    parser.add_argument("--min-time", type=float, default=0.002,
                        help="seconds per timed batch of predictions (the compiled simulator "
                             "gets 5 batches per state, the twin 1)")
    parser.add_argument("--skip-py", action="store_true",
                        help="do not time the pure-Python twin (it takes a while at 256)")
    decision = parser.add_argument_group("bench decision")
    decision.add_argument("--decisions", type=int, default=2000, help="decisions timed")
    decision.add_argument("--active", type=int, default=64,
                          help="active requests per instance")
    decision.add_argument("--arrival-rate", type=float, default=30.0,
                          help="recent arrivals per second at each instance (what the "
                               "chosen instance's prediction expects more of; 0 = none)")
    decision.add_argument("--policies", default="block,least_tokens,round_robin",
                          help="policies to time")
    decision.add_argument("--tail-every", type=int, default=None,
                          help="one job in this many carries a tail length (4x its "
                               "median) whose E2E the dispatch predicts too, as the "
                               "server's --length-tail-every (default: the server's; "
                               "0 = none)")
    decision.add_argument("--delay-weight", type=float, default=1.0,
                          help="also time block with this --delay-weight (unbounded slack: "
                               "every candidate simulated with its expected arrivals; "
                               "0 = not timed)")
    from blockproxy.bench.overhead import add_arguments as add_overhead_arguments

    add_overhead_arguments(parser.add_argument_group("bench overhead"))


def find_lengths_file(explicit: str | None) -> Path | None:
    """The ShareGPT length file: ``--lengths``, else the trace named ``sharegpt`` on the
    load generator's search path; None (synthetic lengths) without either."""
    if explicit:
        return Path(explicit)
    try:
        from loadgen.workload import resolve_trace
    except ImportError:  # the proxy alone is installed: synthetic lengths
        return None
    try:
        return resolve_trace("sharegpt")
    except FileNotFoundError:
        return None


def load_lengths(path: Path | None, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """(prompt, output) token pairs, shape (k, 2), and a note on where they came from."""
    if path is not None:
        with open(path) as f:
            header = f.readline().strip().split(",")
        cols = [header.index("num_prefill_tokens"), header.index("num_decode_tokens")]
        data = np.loadtxt(path, delimiter=",", skiprows=1, usecols=cols, dtype=np.float64)
        pairs = np.maximum(np.rint(data).astype(np.int64).reshape(-1, 2), 1)
        return pairs, f"ShareGPT lengths from {path} ({len(pairs)} requests)"
    k = 10_000
    prompt = np.exp(rng.normal(SYNTHETIC_PROMPT[0], SYNTHETIC_PROMPT[1], k))
    output = np.exp(rng.normal(SYNTHETIC_OUTPUT[0], SYNTHETIC_OUTPUT[1], k))
    pairs = np.stack([np.clip(np.rint(prompt), 1, SYNTHETIC_CLIP[0]),
                      np.clip(np.rint(output), 2, SYNTHETIC_CLIP[1])], axis=1).astype(np.int64)
    return pairs, (f"{LENGTHS_FILE} not found: synthetic lognormal lengths, ln(prompt) ~ "
                   f"N{SYNTHETIC_PROMPT}, ln(output) ~ N{SYNTHETIC_OUTPUT}, clipped to "
                   f"{SYNTHETIC_CLIP} (a fit of the ShareGPT trace)")


def make_state(size: int, pairs: np.ndarray, num_gpu_blocks: int, block_size: int,
               rng: np.random.Generator) -> tuple[np.ndarray, dict[str, int]]:
    """One instance state with ``size`` active requests (running first, then waiting)."""
    picks = pairs[rng.integers(0, len(pairs), size)]
    running: list[tuple[int, int, int, int, int]] = []
    waiting: list[tuple[int, int, int, int, int]] = []
    mix = {"decode": 0, "prefill": 0, "waiting": 0}
    kv_left = int(num_gpu_blocks * KV_FILL)
    for prompt, output in picks.tolist():
        output = max(output, 2)
        role = rng.random()
        cached = int(rng.integers(0, prompt)) if rng.random() < 0.3 else 0
        if role < 0.8:
            gen = int(rng.integers(1, output))
            blocks = math.ceil((prompt + gen - 1) / block_size)
            req = (prompt, cached, gen, output, 1)
            kind = "decode"
        elif role < 0.9:
            blocks = math.ceil(min(cached, prompt - 1) / block_size)
            req = (prompt, cached, 0, output, 1)
            kind = "prefill"
        else:
            blocks, req, kind = 0, (prompt, cached, 0, output, 0), "waiting"
        if kind != "waiting" and blocks > kv_left:
            req, kind = (prompt, cached, 0, output, 0), "waiting"
        if kind == "waiting":
            waiting.append(req)
        else:
            kv_left -= blocks
            running.append(req)
        mix[kind] += 1
    state = np.zeros((simulator.NUM_COLUMNS, size), dtype=np.int64)
    for i, req in enumerate(running + waiting):
        state[:, i] = req
    return state, mix


def time_one(predict: Callable[[], Any], min_time: float, batches: int) -> list[float]:
    """Microseconds per call, one figure per timed batch."""
    t0 = time.perf_counter()
    predict()
    once = max(time.perf_counter() - t0, 1e-7)
    per_batch = max(1, int(min_time / once))
    out = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(per_batch):
            predict()
        out.append((time.perf_counter() - t0) / per_batch * 1e6)
    return out


def bench_sim(args: argparse.Namespace) -> dict[str, Any]:
    profile = load_profile(args.profile)
    eng = profile.engine
    rng = np.random.default_rng(args.seed)
    lengths_path = find_lengths_file(args.lengths)
    pairs, lengths_note = load_lengths(lengths_path, rng)
    impls: dict[str, type | None] = {"c": simulator.InstanceModelC,
                                     "py": None if args.skip_py else simulator.InstanceModelPy}
    states: dict[int, list[tuple[np.ndarray, int, int]]] = {}
    mixes: dict[str, dict[str, float]] = {}
    for size in SIZES:
        states[size] = []
        totals = {"decode": 0, "prefill": 0, "waiting": 0}
        for _ in range(args.states):
            state, mix = make_state(size, pairs, eng.num_gpu_blocks, eng.block_size, rng)
            new_prompt = int(pairs[rng.integers(0, len(pairs)), 0])
            states[size].append((state, new_prompt, 0))
            for key in totals:
                totals[key] += mix[key]
        mixes[str(size)] = {k: v / args.states for k, v in totals.items()}

    result: dict[str, Any] = {}
    steps: dict[str, float] = {}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for name, cls in impls.items():
            if cls is None:
                result[name] = None
                continue
            model = simulator.model_from_profile(profile, implementation=cls)
            per_size: dict[str, float] = {}
            for size in SIZES:
                samples: list[float] = []
                size_steps = []
                for state, new_prompt, new_cached in states[size]:
                    def predict(state=state, new_prompt=new_prompt, new_cached=new_cached,
                                model=model, size=size):
                        return model.predict(state, size, new_prompt, new_cached,
                                             NEW_OUTPUT_TOKENS)
                    size_steps.append(predict()[5])
                    samples += time_one(predict, args.min_time, 5 if name == "c" else 1)
                per_size[str(size)] = round(statistics.median(samples), 3)
                steps[str(size)] = statistics.mean(size_steps)
            result[name] = per_size
    finally:
        if gc_was_enabled:
            gc.enable()

    c, py = result.get("c"), result.get("py")
    result["speedup_64"] = round(py["64"] / c["64"], 1) if c and py else None
    result["predictions_per_second_per_core_64"] = round(1e6 / c["64"]) if c else None
    notes = [lengths_note,
             f"profile {profile.name}: max_num_seqs={eng.max_num_seqs}, "
             f"max_num_batched_tokens={eng.max_num_batched_tokens}, "
             f"num_gpu_blocks={eng.num_gpu_blocks}, block_size={eng.block_size}",
             f"new request: sampled prompt, {NEW_OUTPUT_TOKENS} output tokens, no cache hit",
             f"{args.states} states per size, median of per-call means of timed batches "
             f"(~{args.min_time * 1e3:g} ms each; 5 per state for c, 1 for py), GC off"]
    if simulator.InstanceModelC is None:
        notes.append("compiled simulator not built (blockproxy._fastcore missing): c is null")
    if args.skip_py:
        notes.append("pure-Python twin skipped (--skip-py)")
    result["states_per_size"] = args.states
    result["mean_request_mix"] = mixes
    result["mean_simulated_steps"] = {k: round(v, 1) for k, v in steps.items()}
    result["implementation_notes"] = notes
    return result


def print_table(result: dict[str, Any]) -> None:
    def fmt(row: dict[str, float] | None, size: str, missing: str) -> str:
        return missing if row is None else f"{row[size]:.1f}"
    print("simulator: median microseconds per prediction (one instance)")
    print(f"{'active requests':>16} {'compiled (c)':>14} {'twin (py)':>14} {'speedup':>9}"
          f" {'sim steps':>10}")
    c, py = result["c"], result["py"]
    for size in map(str, SIZES):
        speedup = f"{py[size] / c[size]:.0f}x" if c and py else "-"
        print(f"{size:>16} {fmt(c, size, 'not built'):>14} {fmt(py, size, 'skipped'):>14}"
              f" {speedup:>9}"
              f" {result['mean_simulated_steps'].get(size, '-'):>10}")
    if result["predictions_per_second_per_core_64"]:
        print(f"predictions per second per core at 64 requests: "
              f"{result['predictions_per_second_per_core_64']}")
    for note in result["implementation_notes"]:
        print(f"  - {note}")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``blockproxy bench``."""
    if args.lengths and not Path(args.lengths).is_file():
        print(f"blockproxy bench: --lengths {args.lengths}: no such file", file=sys.stderr)
        return 2
    if args.what == "sim":
        result = bench_sim(args)
        if not args.json:
            print_table(result)
            return 0
    elif args.what == "decision":
        from blockproxy.bench.decision import bench_decision

        result = bench_decision(args)
    else:
        from blockproxy.bench.overhead import bench_overhead

        result = bench_overhead(args)
    print(json.dumps(result, indent=2))
    return 0
