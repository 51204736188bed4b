"""The front door under faults and abuse: benchmarks that print figures (JSON).

    python scripts/front_door.py faults [--duration 180] [--kill-every 15] [--continuation off]
    python scripts/front_door.py drain [--handoff-tokens 0]
    python scripts/front_door.py soak [--requests 100000] [--rate 250]
    python scripts/front_door.py slow-clients [--clients 1000]
    python scripts/front_door.py fuzz [--examples 2000]

Every run starts its own processes on loopback (emulated vLLM instances, one ``blockproxy
serve``) and stops them, also on failure.

- ``faults``: 4 emulated instances (one process each) under steady streaming and unary
  load; every ``--kill-every`` seconds one instance is killed (SIGKILL) and restarted on
  its port 5 s later.  Reports requests accepted, completed (a stream: every token asked
  for), failed (by how: an error status, or an error event mid-stream), the proxy's
  retries (only of requests that never reached an engine), its continuations (streams
  whose instance died, continued on another) and lost ones: a response that is neither
  complete nor an explicit error (must be 0).  No request runs twice: the proxy writes a
  request to a second instance only when writing it to the first failed
  (``retried_not_reached``) or to continue a dead instance's stream from where it
  stopped, so its dispatches less those equal the requests it dispatched.  The failover
  gap: for each stream that was on an instance when it was killed (the proxy names it in
  ``X-Blockproxy-Instance``), its longest pause in the 5 s after the kill, p50/p99.
  ``--continuation off`` runs the proxy with ``--max-continuations 0`` for comparison.
- ``drain``: 4 emulated instances under closed-loop streaming load (500-3,000 tokens);
  after ``--warmup`` seconds the first is set to ``draining`` in the backends file.
  Reports how long until it is idle (no request running or waiting there), the
  continuations by reason and every request's outcome; ``--handoff-tokens 0`` lets its
  streams finish where they are, for comparison.
- ``soak``: short requests at a steady rate; samples the proxy's RSS, open descriptors and
  asyncio tasks every 5 s; after a warm-up they must stay within 10%.
- ``slow-clients``: ``--clients`` streams whose clients never read (a 4 KiB receive
  buffer), beside one normal stream: the proxy's RSS while they hang, the normal stream's
  inter-chunk gaps, and that the send timeout releases every one of them (instances idle
  after it).
- ``fuzz``: hypothesis-generated methods, paths, headers and bodies against a live proxy in
  front of a recording backend: every answer is a success or a well-formed OpenAI error
  with a matching code, the proxy's RSS and descriptors stay bounded, and no request the
  proxy refused itself reached the backend, nor any path outside the routed ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import numpy as np
import orjson
from aiohttp import web

from loadgen.cluster import ProxyProcess
from loadgen.procs import ChildProcess, command, free_port_range, wait_healthy

PROFILE = "llama-3.1-8b-h100-tp1"
HOST = "127.0.0.1"


def proc_stats(pid: int) -> dict[str, float]:
    status = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.strip()
    return {"rss_mib": round(int(status["VmRSS"].split()[0]) / 1024, 1),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


class Emulators:
    """N single-instance emulator processes on fixed ports, each killable and restartable."""

    def __init__(self, n: int, time_scale: float, log_dir: Path, extra: list[str]) -> None:
        self.base = free_port_range(n)
        self.urls = [f"http://{HOST}:{self.base + i}" for i in range(n)]
        self.time_scale = time_scale
        self.log_dir = log_dir
        self.extra = extra
        self.children: list[ChildProcess | None] = [None] * n

    def _args(self, i: int) -> list[str]:
        return [*command("loadgen"), "emulate", "--instances", "1", "--host", HOST,
                "--base-port", str(self.base + i), "--profile", PROFILE, "--time-scale",
                repr(self.time_scale), "--stall-prob", "0", "--seed", str(i), *self.extra]

    async def start(self, i: int | None = None) -> None:
        which = range(len(self.urls)) if i is None else [i]
        for k in which:
            self.children[k] = ChildProcess(self._args(k), f"emulator-{k}-{time.time_ns()}",
                                            self.log_dir)
        await wait_healthy([self.urls[k] for k in which],
                           [c for c in self.children if c is not None], timeout=30.0)

    def kill(self, i: int) -> None:
        child = self.children[i]
        if child is not None:
            child.signal(signal.SIGKILL)
            child.stop()
            self.children[i] = None

    def stop(self) -> None:
        for i in range(len(self.children)):
            child = self.children[i]
            if child is not None:
                child.stop()
                self.children[i] = None

    def entries(self) -> list[dict[str, Any]]:
        return [{"url": u, "name": f"i{i}", "profile": PROFILE}
                for i, u in enumerate(self.urls)]


class Pauses:
    """A stream's instance (``X-Blockproxy-Instance``), lifetime and its pauses over 20 ms
    between two events: what a failover costs the client."""

    __slots__ = ("end", "instance", "pauses", "start")

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.end = 0.0
        self.instance = ""
        self.pauses: list[tuple[float, float]] = []


async def one_request(session: aiohttp.ClientSession, url: str, stream: bool,
                      tokens: int, outcome: dict[str, int],
                      watch: list[Pauses] | None = None) -> None:
    """One request; counts how it ended (``lost``: neither complete nor an explicit error).
    With ``watch``, a stream's pauses are recorded there."""
    rid = uuid.uuid4().hex
    body = {"model": "tiny", "prompt": f"request {rid} " + "word " * 30, "max_tokens": tokens,
            "ignore_eos": True, "stream": stream}
    seen = Pauses()
    try:
        async with session.post(url + "/v1/completions", json=body,
                                headers={"X-Request-Id": rid}) as resp:
            if resp.status != 200:
                try:
                    error = orjson.loads(await resp.read()).get("error", {})
                except orjson.JSONDecodeError:
                    error = {}
                key = f"error_{resp.status}_{'stream' if stream else 'unary'}"
                outcome[key] = outcome.get(key, 0) + 1
                if error.get("code") != resp.status:
                    outcome["lost"] += 1
                return
            outcome["accepted"] += 1
            if not stream:
                data = orjson.loads(await resp.read())
                ok = data["usage"]["completion_tokens"] == tokens
                outcome["completed" if ok else "lost"] += 1
                return
            seen.instance = resp.headers.get("X-Blockproxy-Instance", "")
            events, errored, done = 0, False, False
            last = time.monotonic()
            async for line in resp.content:
                if line.startswith(b"data: [DONE]"):
                    done = True
                elif line.startswith(b'data: {"error"'):
                    errored = True
                elif line.startswith(b"data: "):
                    events += 1
                    now = time.monotonic()
                    if now - last > 0.02:
                        seen.pauses.append((last, now))
                    last = now
            if errored and done:
                outcome["failed_mid_stream"] += 1
            elif done and events == tokens:
                outcome["completed"] += 1
            else:
                outcome["lost"] += 1
    except (aiohttp.ClientError, asyncio.TimeoutError):
        outcome["lost"] += 1
    finally:
        seen.end = time.monotonic()
        if watch is not None and stream:
            watch.append(seen)


def failover_gaps(streams: list[Pauses], kills: list[tuple[float, str]]) -> list[float]:
    """For each stream running on an instance when it was killed, its longest pause
    (ms) in the 5 s after the kill: the gap a client sees when its stream fails over."""
    gaps = []
    for s in streams:
        for at, name in kills:
            if s.instance == name and s.start < at < s.end:
                after = [b - a for a, b in s.pauses if b > at and a < at + 5.0]
                gaps.append(1000 * max(after, default=0.0))
    return gaps


async def faults(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    emus = Emulators(4, args.time_scale, log_dir, [])
    await emus.start()
    outcome = {"accepted": 0, "completed": 0, "failed_mid_stream": 0, "lost": 0}
    kills: list[dict[str, Any]] = []
    killed_at: list[tuple[float, str]] = []
    streams: list[Pauses] = []
    low, high = (int(x) for x in args.stream_tokens.split(","))
    extra = [] if args.continuation == "on" else ["--max-continuations", "0"]
    try:
        proxy = ProxyProcess(emus.entries(), "block",
                             ["--log-level", "warning", "--probe-interval", "0.5",
                              "--speed", str(args.time_scale), *extra], log_dir=log_dir)
        async with proxy, aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=300)) as session:
            stop_at = time.monotonic() + args.duration
            rng = random.Random(0)

            async def client(k: int) -> None:
                while time.monotonic() < stop_at:
                    if not args.unary_every or k % args.unary_every != 0:
                        await one_request(session, proxy.url, True, rng.randint(low, high),
                                          outcome, streams)
                    else:
                        await one_request(session, proxy.url, False, rng.randint(20, 120),
                                          outcome)

            async def chaos() -> None:
                victim = 0
                while time.monotonic() + args.kill_every < stop_at:
                    await asyncio.sleep(args.kill_every - 5)
                    emus.kill(victim)
                    killed_at.append((time.monotonic(), f"i{victim}"))
                    kills.append({"instance": f"i{victim}",
                                  "at_s": round(args.duration - (stop_at - time.monotonic()))})
                    await asyncio.sleep(5)
                    await emus.start(victim)
                    victim = (victim + 1) % 4

            clients = [asyncio.create_task(client(k)) for k in range(args.clients)]
            await chaos()
            await asyncio.gather(*clients)
            metrics = await proxy.get_text("/metrics")
    finally:
        emus.stop()
    from loadgen import promtext

    retried = _total(metrics, "blockproxy_retries_total")
    dispatches = _total(metrics, "blockproxy_decisions_total")
    continuations = _total(metrics, "blockproxy_continuations_total")
    requests = sum(v for k, v in outcome.items() if k != "accepted")
    not_dispatched = promtext.find(metrics, "blockproxy_requests_total",
                                   route="/v1/completions", status="503") or 0
    gaps = failover_gaps(streams, killed_at)
    gap_n = _total(metrics, "blockproxy_continuation_gap_seconds_count")

    def pct(values: list[float], q: float) -> float | None:
        return round(float(np.percentile(values, q)), 1) if values else None

    return {"duration_s": args.duration, "continuation": args.continuation,
            "stream_tokens": [low, high], "unary_every": args.unary_every, "kills": kills,
            "requests": requests,
            "streams": len(streams), **outcome,
            "retried_not_reached": retried, "dispatches": dispatches,
            "continuations": continuations,
            "dispatches_less_retries_and_continuations": dispatches - retried - continuations,
            "requests_dispatched": requests - not_dispatched,
            "ejections": _total(metrics, "blockproxy_ejections_total"),
            "streams_on_a_killed_instance": len(gaps),
            "failover_gap_ms": {"p50": pct(gaps, 50), "p99": pct(gaps, 99),
                                "max": round(max(gaps), 1) if gaps else None},
            "proxy_gap_mean_ms": round(1000 * _total(
                metrics, "blockproxy_continuation_gap_seconds_sum") / gap_n, 1)
            if gap_n else None}


async def drain(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """Drain one of 4 instances under streaming load; how long until it is idle."""
    from loadgen import promtext

    emus = Emulators(4, args.time_scale, log_dir, [])
    await emus.start()
    outcome = {"accepted": 0, "completed": 0, "failed_mid_stream": 0, "lost": 0}
    low, high = (int(x) for x in args.stream_tokens.split(","))
    entries = emus.entries()
    result: dict[str, Any] = {"handoff_tokens": args.handoff_tokens,
                              "stream_tokens": [low, high]}
    try:
        proxy = ProxyProcess(entries, "block",
                             ["--log-level", "warning", "--reload-interval", "0.2",
                              "--speed", str(args.time_scale),
                              "--handoff-tokens", str(args.handoff_tokens)], log_dir=log_dir)
        async with proxy, aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=600)) as session:
            rng = random.Random(0)
            stop_at = [float("inf")]

            async def client() -> None:
                while time.monotonic() < stop_at[0]:
                    await one_request(session, proxy.url, True, rng.randint(low, high),
                                      outcome)

            async def busy(url: str) -> float:
                async with session.get(url + "/metrics") as resp:
                    text = await resp.text()
                return sum(promtext.find(text, name) or 0 for name in
                           ("vllm:num_requests_running", "vllm:num_requests_waiting"))

            clients = [asyncio.create_task(client()) for _ in range(args.clients)]
            await asyncio.sleep(args.warmup)
            result["streams_on_it_before"] = await busy(emus.urls[0])
            entries[0] = {**entries[0], "state": "draining"}
            (log_dir / "backends.yaml").write_text(json.dumps({"backends": entries}))
            start = time.monotonic()
            while await busy(emus.urls[0]) > 0:
                await asyncio.sleep(0.05)
            result["idle_after_s"] = round(time.monotonic() - start, 2)
            stop_at[0] = time.monotonic() + 5
            await asyncio.gather(*clients)
            metrics = await proxy.get_text("/metrics")
    finally:
        emus.stop()
    result.update(outcome)
    result["continuations"] = {
        labels: v for labels, v in (
            (s.labels.get("reason", ""), s.value) for s in promtext.samples(metrics)
            if s.name == "blockproxy_continuations_total")}
    result["stream_failures"] = _total(metrics, "blockproxy_stream_failures_total")
    return result


def _total(text: str, name: str) -> float:
    """The sum of a counter's samples over its label sets."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rpartition(" ")[2])
    return total


async def soak(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    emus = Emulators(2, 0.02, log_dir, [])
    await emus.start()
    samples: list[dict[str, float]] = []
    outcome = {"accepted": 0, "completed": 0, "failed_mid_stream": 0, "lost": 0}
    try:
        proxy = ProxyProcess(emus.entries(), "block", ["--log-level", "warning",
                                                       "--speed", "0.02"], log_dir=log_dir)
        async with proxy, aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=200)) as session:
            pid = proxy.pids[0]
            start = time.monotonic()
            sent = 0
            tasks: set[asyncio.Task[None]] = set()
            next_sample = start
            while sent < args.requests:
                now = time.monotonic()
                due = int((now - start) * args.rate)
                while sent < min(due, args.requests):
                    t = asyncio.create_task(one_request(session, proxy.url, sent % 2 == 0,
                                                        8, outcome))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                    sent += 1
                if now >= next_sample:
                    next_sample += 5
                    view = orjson.loads(await proxy.get_text("/debug/cluster"))
                    samples.append({"t_s": round(now - start), "sent": sent,
                                    **proc_stats(pid), "tasks": view["tasks"],
                                    "in_flight": view["in_flight"]})
                await asyncio.sleep(0.005)
            await asyncio.gather(*tasks)
            view = orjson.loads(await proxy.get_text("/debug/cluster"))
            samples.append({"t_s": round(time.monotonic() - start), "sent": sent,
                            **proc_stats(pid), "tasks": view["tasks"],
                            "in_flight": view["in_flight"]})
            took = time.monotonic() - start
    finally:
        emus.stop()
    after = samples[len(samples) // 5:]  # the first fifth is warm-up
    spread = {k: round(max(s[k] for s in after) / max(min(s[k] for s in after), 1) - 1, 3)
              for k in ("rss_mib", "fds")}
    return {"requests": sent, "rate_per_s": round(sent / took, 1), **outcome,
            "after_warmup_max_over_min": spread,
            "tasks_after_warmup": [min(s["tasks"] for s in after),
                                   max(s["tasks"] for s in after)],
            "samples": samples}


async def slow_clients(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    emus = Emulators(4, args.time_scale, log_dir, ["--max-num-seqs", "512"])
    await emus.start()
    result: dict[str, Any] = {"clients": args.clients, "send_timeout_s": args.send_timeout,
                              "send_buffer_bytes": args.send_buffer, "tokens": args.tokens}
    try:
        entries = [{**e, "max_num_seqs": 512} for e in emus.entries()]
        proxy = ProxyProcess(entries, "block", [
            "--log-level", "warning", "--speed", str(args.time_scale),
            "--send-timeout", str(args.send_timeout),
            "--send-buffer-bytes", str(args.send_buffer)], log_dir=log_dir)
        async with proxy, aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=120)) as session:

            async def debug() -> dict[str, Any]:
                async with session.get(proxy.url + "/debug/cluster") as resp:
                    return orjson.loads(await resp.read())
            pid = proxy.pids[0]
            result["rss_before_mib"] = proc_stats(pid)["rss_mib"]
            port = int(proxy.url.rsplit(":", 1)[1])
            body = orjson.dumps({"model": "tiny", "prompt": "slow " * 20,
                                 "max_tokens": args.tokens, "ignore_eos": True,
                                 "stream": True})
            head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                    b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
            socks = []
            loop = asyncio.get_running_loop()
            for _ in range(args.clients):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.setblocking(False)
                await loop.sock_connect(s, (HOST, port))
                await loop.sock_sendall(s, head + body)
                socks.append(s)
            await asyncio.sleep(args.send_timeout / 2)
            result["rss_while_hanging_mib"] = proc_stats(pid)["rss_mib"]
            asked = time.monotonic()
            view = await debug()
            result["in_flight_while_hanging"] = view["in_flight"]
            result["debug_answered_in_s"] = round(time.monotonic() - asked, 2)
            arrivals = []
            normal = {"model": "tiny", "prompt": "normal " * 20, "max_tokens": 200,
                      "ignore_eos": True, "stream": True}
            async with session.post(proxy.url + "/v1/completions", json=normal) as resp:
                async for _ in resp.content:
                    arrivals.append(time.perf_counter())
            gaps = np.diff(np.array(arrivals[3:])) * 1e3
            result["normal_stream_gap_ms"] = {
                "p50": round(float(np.percentile(gaps, 50)), 2),
                "p99": round(float(np.percentile(gaps, 99)), 2)}
            deadline = time.monotonic() + args.send_timeout * 3
            while time.monotonic() < deadline:
                view = await debug()
                if view["in_flight"] == 0:
                    break
                await asyncio.sleep(0.5)
            result["in_flight_after_timeout"] = view["in_flight"]
            result["active_on_instances_after"] = sum(i["active_requests"]
                                                      for i in view["instances"])
            async with session.get(proxy.url + "/metrics") as resp:
                metrics = await resp.text()
            from loadgen import promtext
            result["send_timeouts"] = promtext.find(
                metrics, "blockproxy_client_timeouts_total", kind="send") or 0
            result["rss_after_mib"] = proc_stats(pid)["rss_mib"]
            for s in socks:
                s.close()
    finally:
        emus.stop()
    return result


async def recording_backend() -> tuple[web.AppRunner, str, list[tuple[str, str]]]:
    """A backend that answers like vLLM (briefly) and records (path, request id)."""
    seen: list[tuple[str, str]] = []

    async def any_path(request: web.Request) -> web.StreamResponse:
        seen.append((request.path, request.headers.get("X-Request-Id", "")))
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = {}
        if isinstance(body, dict) and body.get("stream") is True:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b'data: {"choices":[{"index":0,"text":"x"}]}\n\ndata: [DONE]\n\n')
            return resp
        return web.json_response({"id": "x", "choices": [{"index": 0, "text": "x"}],
                                  "usage": {"prompt_tokens": 1, "completion_tokens": 1}})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "tiny"}]})

    async def health(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_route("*", "/{tail:.*}", any_path)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port_range(1)
    await web.TCPSite(runner, HOST, port).start()
    return runner, f"http://{HOST}:{port}", seen


#: statuses the proxy answers with its own error, without forwarding
OWN_ERRORS = {400, 401, 404, 405, 408, 413, 415}


def fuzz(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from blockproxy.front.paths import PASS_THROUGH

    routed = {"/v1/completions", "/v1/chat/completions", *PASS_THROUGH}
    loop = asyncio.new_event_loop()
    _runner, url, seen = loop.run_until_complete(recording_backend())
    backend_thread = _serve_loop_in_thread(loop)
    tally: dict[str, int] = {}
    bad: list[str] = []
    proxy = ProxyProcess([{"url": url, "name": "i0", "models": ["tiny"]}], "block",
                         ["--log-level", "error", "--max-body-bytes", "65536",
                          "--body-timeout", "2", "--header-timeout", "2"], log_dir=log_dir)
    segments = st.sampled_from(["v1", "completions", "chat", "..", ".", "", "%2e%2e",
                                "%2F", "metrics", "debug", "cluster", "tokenize", "models",
                                "embeddings", "health", "x" * 300, "%ff", "ä"])
    paths = st.one_of(st.sampled_from(sorted(routed) + ["/v1/models", "/metrics",
                                                        "/health", "/debug/cluster"]),
                      st.lists(segments, min_size=1, max_size=6).map(
                          lambda s: "/" + "/".join(s)))
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats()
        | st.text(max_size=50),
        lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=10),
                                                                   kids, max_size=5),
        max_leaves=30)
    fields = st.fixed_dictionaries({}, optional={
        "model": st.one_of(st.just("tiny"), st.just("nope"), json_values),
        "prompt": json_values, "messages": json_values, "max_tokens": json_values,
        "stream": json_values, "n": json_values, "stream_options": json_values})
    valid = st.fixed_dictionaries({
        "model": st.just("tiny"),
        "prompt": st.one_of(st.text(max_size=200),
                            st.lists(st.integers(0, 50000), max_size=50)),
        "max_tokens": st.integers(1, 8), "stream": st.booleans()})
    chats = st.fixed_dictionaries({
        "model": st.just("tiny"), "max_tokens": st.integers(1, 8), "stream": st.booleans(),
        "messages": st.lists(st.fixed_dictionaries({
            "role": st.sampled_from(["user", "assistant", "system", "x"]),
            "content": st.one_of(st.text(max_size=50), json_values)}), max_size=4)})
    bodies = st.one_of(fields.map(orjson.dumps), valid.map(orjson.dumps),
                       chats.map(orjson.dumps), st.binary(max_size=300),
                       st.just(b'{"model": "tiny", "prompt": "' + b"x" * 70000 + b'"}'))
    headers = st.dictionaries(
        st.sampled_from(["Content-Type", "Authorization", "X-Request-Id", "Transfer-Encoding",
                         "Expect", "Connection", "X-Junk"]),
        st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
        max_size=4)
    methods = st.sampled_from(["POST"] * 6 + ["GET", "PUT", "DELETE", "OPTIONS", "HEAD",
                                              "PATCH"])

    def check(method: str, path: str, body: bytes, hdrs: dict[str, str]) -> None:
        import http.client

        rid = uuid.uuid4().hex
        hdrs = {k: v for k, v in hdrs.items() if k not in ("Transfer-Encoding", "Expect")}
        hdrs["X-Request-Id"] = rid
        conn = http.client.HTTPConnection(HOST, int(proxy.url.rsplit(":", 1)[1]), timeout=10)
        try:
            conn.putrequest(method, quote(path, safe="/%.:@!$&'()*+,;=-_~"),
                            skip_accept_encoding=True)
            for k, v in hdrs.items():
                conn.putheader(k, v)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
            status = resp.status
        except (ConnectionError, http.client.HTTPException) as exc:
            bad.append(f"{method} {path}: {exc!r}")
            return
        finally:
            conn.close()
        tally[str(status)] = tally.get(str(status), 0) + 1
        if status >= 400 and method != "HEAD":
            try:
                err = orjson.loads(data)["error"]
                assert err["code"] == status and isinstance(err["message"], str)
            except Exception:
                bad.append(f"{method} {path} -> {status}: not an OpenAI error: "
                           f"{data[:120]!r}")
        elif status >= 500:
            bad.append(f"{method} {path} -> {status}")
        reached = [p for p, r in seen if r == rid]
        if status in OWN_ERRORS and reached:
            bad.append(f"{method} {path} -> {status} but reached the backend at {reached}")
        for p in reached:
            if p not in routed:
                bad.append(f"{method} {path} reached the backend at {p}")

    result: dict[str, Any] = {}
    try:
        loop_proxy = asyncio.new_event_loop()
        loop_proxy.run_until_complete(proxy.start())
        pid = proxy.pids[0]
        before = proc_stats(pid)
        stats_during: list[dict[str, float]] = []

        @settings(max_examples=args.examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(methods, paths, bodies, headers)
        def run(method: str, path: str, body: bytes, hdrs: dict[str, str]) -> None:
            check(method, path, body, hdrs)
            if sum(tally.values()) % 200 == 0:
                stats_during.append(proc_stats(pid))

        run()
        after = proc_stats(pid)
        result = {"examples": sum(tally.values()), "statuses": dict(sorted(tally.items())),
                  "violations": bad[:20], "violation_count": len(bad),
                  "backend_requests": len(seen),
                  "proxy_before": before, "proxy_after": after,
                  "proxy_peak_rss_mib": max([s["rss_mib"] for s in stats_during] or [0]),
                  "proxy_peak_fds": max([s["fds"] for s in stats_during] or [0])}
    finally:
        proxy.stop()
        loop.call_soon_threadsafe(loop.stop)
        backend_thread.join(5)
    return result


def _serve_loop_in_thread(loop: asyncio.AbstractEventLoop) -> Any:
    import threading

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    return thread


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", help="also write the figures to this file")
    sub = parser.add_subparsers(dest="what", required=True)
    load = argparse.ArgumentParser(add_help=False)  # faults and drain: closed-loop clients
    load.add_argument("--clients", type=int, default=16)
    load.add_argument("--time-scale", type=float, default=0.5)
    p = sub.add_parser("faults", parents=[common, load])
    p.add_argument("--duration", type=float, default=180.0)
    p.add_argument("--kill-every", type=float, default=15.0)
    p.add_argument("--stream-tokens", default="100,800",
                   help="MIN,MAX tokens of the streams (unary requests: 20-120)")
    p.add_argument("--continuation", choices=("on", "off"), default="on",
                   help="off: the proxy runs with --max-continuations 0")
    p.add_argument("--unary-every", type=int, default=4,
                   help="every Nth client sends unary requests (0: all stream)")
    p = sub.add_parser("drain", parents=[common, load])
    p.add_argument("--stream-tokens", default="500,3000", help="MIN,MAX tokens of the streams")
    p.add_argument("--warmup", type=float, default=20.0,
                   help="seconds of load before the first instance is set to draining")
    p.add_argument("--handoff-tokens", type=int, default=64,
                   help="the proxy's --handoff-tokens (0: streams finish where they are)")
    p = sub.add_parser("soak", parents=[common])
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--rate", type=float, default=250.0)
    p = sub.add_parser("slow-clients", parents=[common])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--send-timeout", type=float, default=10.0)
    p.add_argument("--send-buffer", type=int, default=16384,
                   help="the proxy's --send-buffer-bytes (loopback buffers grow to MBs)")
    p.add_argument("--tokens", type=int, default=1500)
    p.add_argument("--time-scale", type=float, default=1.0)
    p = sub.add_parser("fuzz", parents=[common])
    p.add_argument("--examples", type=int, default=2000)
    args = parser.parse_args()
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"front-door-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    if args.what == "fuzz":
        result = fuzz(args, log_dir)
    else:
        run = {"faults": faults, "drain": drain, "soak": soak,
               "slow-clients": slow_clients}[args.what]
        result = asyncio.run(run(args, log_dir))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    cli()
