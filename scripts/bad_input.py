"""What hostile request bodies cost the proxy: the gap they open in another client's stream.

    python scripts/bad_input.py [--repeats 5] [--json OUT.json]

Starts two emulated instances in two emulator processes, one serving model ``tiny`` and
one serving model ``bad``, and one ``blockproxy serve`` (policy ``block``, prefix cache on)
in front of both.  A long stream for ``tiny`` runs through the proxy while bad bodies for
``bad`` are sent through the same proxy, one at a time: the bad bodies' engine work
happens in the other emulator process, so any stall the stream sees is the proxy's (its
parse, prompt hashing, prefix lookup and forwarding of the body).  Bodies:

- ``prompt_4mb``: a completions prompt of 4,000,000 random characters;
- ``messages_10k``: a chat request of 10,000 messages;
- ``repeated_char``: a completions prompt of 4,000,000 times the same character;
- ``token_ids_600k``: a completions prompt of 600,000 token ids.

All are under the proxy's default 4 MiB body limit, so the proxy does its whole work on
each.  The same bodies are also sent straight to the ``bad`` emulator, bypassing the
proxy, while the stream still goes through it (``direct``): on a small machine the
emulator's own work on a huge body competes for the CPU, and the difference between the
two is what the proxy costs.

For each kind (and a quiet baseline with no bad bodies) it reports the stream's
inter-chunk gaps as the client sees them (p50, p99, max, ms), how long each bad request
took (the proxy answers every one: the engine's own 400 for a prompt over the context, or
a 413 above ``--max-body-bytes``), and the proxy's resident memory (peak, from
``/proc``).  Every process started is stopped, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import string
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson

from loadgen.cluster import EmulatedCluster, ProxyProcess

PROFILE = "llama-3.1-8b-h100-tp1"


def bodies() -> dict[str, tuple[str, bytes]]:
    rng = random.Random(0)
    letters = string.ascii_letters + " "
    text = "".join(rng.choice(letters) for _ in range(4_000_000))
    words = text[:100_000].split()
    messages = [{"role": "user" if i % 2 == 0 else "assistant",
                 "content": " ".join(rng.choice(words) for _ in range(5))}
                for i in range(10_000)]
    return {
        "prompt_4mb": ("/v1/completions", orjson.dumps(
            {"model": "bad", "prompt": text, "max_tokens": 16})),
        "messages_10k": ("/v1/chat/completions", orjson.dumps(
            {"model": "bad", "messages": messages, "max_tokens": 16})),
        "repeated_char": ("/v1/completions", orjson.dumps(
            {"model": "bad", "prompt": "a" * 4_000_000, "max_tokens": 16})),
        "token_ids_600k": ("/v1/completions", orjson.dumps(
            {"model": "bad", "prompt": [rng.randrange(32000) for _ in range(600_000)],
             "max_tokens": 16})),
    }


def rss_kib(pid: int) -> tuple[int, int]:
    """(current, peak) resident set of ``pid`` in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


async def stream(session: aiohttp.ClientSession, url: str, tokens: int) -> list[float]:
    """Chunk arrival times of one long stream for ``tiny``."""
    arrivals = []
    body = {"model": "tiny", "prompt": "hello " * 50, "max_tokens": tokens,
            "ignore_eos": True, "stream": True}
    async with session.post(url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for _ in resp.content:
            arrivals.append(time.perf_counter())
    return arrivals


async def phase(session: aiohttp.ClientSession, url: str, target: str,
                body: tuple[str, bytes] | None, repeats: int, tokens: int) -> dict[str, Any]:
    """The stream through the proxy at ``url`` while ``body`` is sent ``repeats`` times to
    ``target``."""
    task = asyncio.create_task(stream(session, url, tokens))
    await asyncio.sleep(0.5)  # the stream is decoding
    statuses, took = [], []
    if body is not None:
        path, raw = body
        for _ in range(repeats):
            start = time.perf_counter()
            async with session.post(target + path, data=raw,
                                    headers={"content-type": "application/json"}) as resp:
                await resp.read()
                statuses.append(resp.status)
            took.append((time.perf_counter() - start) * 1e3)
            await asyncio.sleep(0.2)
    arrivals = await task
    gaps = np.diff(np.array(arrivals[5:])) * 1e3  # skip the first chunks (prefill)
    out: dict[str, Any] = {
        "stream_chunks": len(arrivals),
        "gap_ms": {"p50": round(float(np.percentile(gaps, 50)), 2),
                   "p99": round(float(np.percentile(gaps, 99)), 2),
                   "max": round(float(gaps.max()), 2)}}
    if body is not None:
        out["bad_request_status"] = sorted(set(statuses))
        out["bad_request_ms"] = {"median": round(float(np.median(took)), 1),
                                 "max": round(float(max(took)), 1)}
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    good = EmulatedCluster(1, profile=PROFILE, extra_args=["--stall-prob", "0"])
    bad = EmulatedCluster(1, profile=PROFILE,
                          extra_args=["--stall-prob", "0", "--model-name", "bad"])
    result: dict[str, Any] = {"repeats": args.repeats}
    async with good, bad:
        entries = [{**good.backend_entries()[0], "name": "good", "models": ["tiny"]},
                   {**bad.backend_entries()[0], "name": "bad", "models": ["bad"]}]
        proxy = ProxyProcess(entries, "block", ["--log-level", "warning"])
        async with proxy:
            pid = proxy.pids[0]
            kinds = bodies()
            async with aiohttp.ClientSession() as session:
                result["baseline"] = await phase(session, proxy.url, proxy.url, None, 0,
                                                 args.tokens)
                for name, body in kinds.items():
                    result[name] = {"body_bytes": len(body[1])}
                    for how, target in (("proxy", proxy.url), ("direct", bad.urls[0])):
                        result[name][how] = await phase(session, proxy.url, target, body,
                                                        args.repeats, args.tokens)
            rss, peak = rss_kib(pid)
            result["proxy_rss_mib"] = {"end": round(rss / 1024, 1),
                                       "peak": round(peak / 1024, 1)}
    return result


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="bad bodies per kind")
    parser.add_argument("--tokens", type=int, default=600, help="tokens of the long stream")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    result = asyncio.run(main(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    cli()
