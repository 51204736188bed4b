"""Output-length prediction per workload: the per-request length model against the
prompt-length rings it replaces, with MAPE and log2-bucket accuracy (JSON on stdout).

Each workload is a request log as ``blockproxy train-lengths`` reads it: the bodies
``loadgen`` sends (its prompts, its ``max_tokens``) and the true output lengths.  The first
``--train`` fraction is learned, the rest is predicted before it is learned (scored), as a
proxy that loaded a model trained offline and goes on learning.

* ``azure``: the Azure conversation trace (lengths from the trace; only the prompt length
  is visible);
* ``mooncake``: the Mooncake-format trace in ``../shared/traces`` (the same);
* ``emulator``: Azure prompt lengths, half of them chat, the output the emulator's own
  draw (its median depends on the prompt length and the endpoint, lognormal sigma 0.8);
* ``sessions``: loadgen's multi-turn sessions (each turn's answer drawn independently: the
  previous turn carries no signal there);
* ``tenants``: four tenants (header) whose medians are 40, 120, 300 and 800 tokens
  (lognormal sigma 0.5) on Azure prompt lengths: what a tenant feature can learn.

    LOADGEN_TRACE_PATH=../shared/traces python scripts/length_accuracy.py --requests 4000
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from blockproxy.routing.lengths import LengthModel  # noqa: E402
from blockproxy.train_lengths import train  # noqa: E402
from loadgen import workload  # noqa: E402
from loadgen.emulator import outputs, protocol  # noqa: E402

TENANT_MEDIANS = {"alpha": 40, "beta": 120, "gamma": 300, "delta": 800}
CHAT = "/v1/chat/completions"


def record(spec: workload.RequestSpec, index: int, endpoint: str = "/v1/completions",
           output: int | None = None, tenant: str | None = None) -> dict[str, Any]:
    path, body, _ = workload.build_request(spec, endpoint=endpoint, seed=f"len:{index}",
                                           context_limit=32768)
    for key in ("stream", "stream_options"):
        body.pop(key, None)
    if body.get("max_completion_tokens") is not None:
        body["max_tokens"] = body.pop("max_completion_tokens")
    rec: dict[str, Any] = {"endpoint": path, "body": body,
                           "output_tokens": spec.output_tokens if output is None else output,
                           "finish_reason": "stop"}
    if tenant:
        rec["tenant"] = tenant
    return rec


def azure(n: int) -> list[workload.RequestSpec]:
    return workload.load_trace("azure-conv", num_requests=n, clip_context=8192)


def workloads(n: int, seed: int) -> dict[str, list[dict[str, Any]]]:
    rng = random.Random(seed)
    out: dict[str, list[dict[str, Any]]] = {}
    out["azure"] = [record(s, i) for i, s in enumerate(azure(n))]
    moon = workload.load_trace("mooncake", num_requests=n,
                               clip_context=32768)
    out["mooncake"] = [record(s, i) for i, s in enumerate(moon)]
    emulator = []
    for i, spec in enumerate(azure(n)):
        endpoint = CHAT if i % 2 else "/v1/completions"
        rec = record(spec, i, endpoint)
        chat = endpoint == CHAT
        tokens = protocol.prompt_tokens(rec["body"], chat)
        rec["output_tokens"] = outputs.drawn_output_length(
            outputs.prompt_digest(tokens), len(tokens), chat)
        emulator.append(rec)
    out["emulator"] = emulator
    sess = workload.sessions(num_sessions=n // 4, seed=seed, max_context=16384)[:n]
    out["sessions"] = [record(s, i, CHAT) for i, s in enumerate(sess)]
    tenants = []
    for i, spec in enumerate(azure(n)):
        tenant = rng.choice(list(TENANT_MEDIANS))
        length = max(1, round(TENANT_MEDIANS[tenant] * math.exp(0.5 * rng.gauss(0, 1))))
        tenants.append(record(spec, i, output=length, tenant=tenant))
    out["tenants"] = tenants
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--train", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--save-logs", help="folder to write each workload's log to")
    args = parser.parse_args()
    report: dict[str, Any] = {"requests": args.requests, "train_fraction": args.train}
    for name, records in workloads(args.requests, args.seed).items():
        if args.save_logs:
            folder = Path(args.save_logs)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.jsonl").write_text(
                "\n".join(json.dumps(r) for r in records) + "\n")
        row: dict[str, Any] = {"requests": len(records)}
        for epochs in (1, 3):
            result = train(records, LengthModel(warmup=0), holdout=1 - args.train,
                           epochs=epochs)["holdout"]
            row[f"served_{epochs}_epochs"] = result["served"]
            row[f"length_model_{epochs}_epochs"] = result["length_model"]
            row["prompt_length_rings"] = result["prompt_length_rings"]
        report[name] = row
        print(name, json.dumps(row), file=sys.stderr)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
