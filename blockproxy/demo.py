"""Show what blockproxy's simulator predicts for one request on a small cluster.

Builds four instances of the chosen profile, each holding a different load (seeded), asks
the simulator what the new request's TTFT and end-to-end latency would be on each, and
shows which instance the ``block`` policy (minimum predicted end-to-end latency) picks and
how long the whole decision took.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from blockproxy import sim
from blockproxy.profile import load_profile


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="llama-3.1-8b-h100-tp1", help="step-time profile")
    parser.add_argument("--prompt-tokens", type=int, default=1000, help="new request's prompt")
    parser.add_argument("--output-tokens", type=int, default=256,
                        help="new request's predicted output length")
    parser.add_argument("--seed", type=int, default=1, help="seed of the instances' loads")


def random_load(rng: np.random.Generator, n: int) -> np.ndarray:
    """An instance holding ``n`` requests: most decoding, a few prefilling or queued."""
    state = np.zeros((sim.NUM_COLUMNS, max(n, 1)), dtype=np.int64)
    prompt = rng.lognormal(6.5, 1.0, n).astype(np.int64) + 1
    output = rng.lognormal(5.3, 0.9, n).astype(np.int64) + 1
    started = rng.random(n) < 0.85
    state[sim.COL_PROMPT, :n] = prompt
    state[sim.COL_PREDICTED, :n] = output
    state[sim.COL_GENERATED, :n] = np.where(started, (rng.random(n) * output).astype(np.int64), 0)
    state[sim.COL_STARTED, :n] = started
    return state


def run(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile)
    rng = np.random.default_rng(args.seed)
    loads = [int(x) for x in rng.integers(0, 120, size=4)]
    states = [random_load(rng, n) for n in loads]
    model = sim.model_from_profile(profile)
    print(f"profile {profile.name}: {profile.hardware}, TP{profile.tensor_parallel_size}; "
          f"simulator implementation: {sim.IMPLEMENTATION}")
    print(f"new request: {args.prompt_tokens} prompt tokens, "
          f"{args.output_tokens} predicted output tokens\n")
    print(f"{'instance':>8} {'active':>6} {'TTFT ms':>9} {'E2E ms':>9} {'queue ms':>9} "
          f"{'preempt':>7} {'peak KV':>8}")
    start = time.perf_counter()
    predictions = [sim.Prediction(*model.predict(st, n, args.prompt_tokens, 0,
                                                 args.output_tokens))
                   for st, n in zip(states, loads)]
    elapsed = time.perf_counter() - start
    for i, (n, p) in enumerate(zip(loads, predictions)):
        print(f"{i:>8} {n:>6} {p.ttft * 1e3:>9.1f} {p.e2e * 1e3:>9.1f} "
              f"{p.queue_delay * 1e3:>9.1f} {p.preemptions:>7} {p.peak_blocks:>8}")
    best = min(range(len(predictions)), key=lambda i: predictions[i].e2e)
    print(f"\nblock routes it to instance {best} "
          f"(predicted end-to-end {predictions[best].e2e * 1e3:.1f} ms); "
          f"the decision over {len(states)} instances took {elapsed * 1e6:.0f} µs")
    return 0
