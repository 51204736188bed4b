"""The HTTP front: OpenAI endpoints, routing, streaming pass-through, health, metrics.

One request, top to bottom (DESIGN.md section 2): parse → describe → predict/choose →
reserve → forward (stream chunks through as they arrive) → observe → release.
Only :mod:`blockproxy.upstream` talks to the instances.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
import re
import time
from typing import Any

import orjson
from aiohttp import web

from blockproxy import sim
from blockproxy.backends import BackendSpec
from blockproxy.cluster import LOCAL, PHANTOM, ClusterView, Entry, Instance
from blockproxy.config import ProxyConfig
from blockproxy.gossip.node import Gossiper, load_key, parse_origin
from blockproxy.metrics import Metrics
from blockproxy.policies import Job, make_policy
from blockproxy.predictor import LengthPredictor, parse_hint
from blockproxy.request import CHAT, COMPLETIONS, ApiError, RequestInfo, parse_request
from blockproxy.scraper import Scraper
from blockproxy.tokens import PromptTokenEstimator
from blockproxy.upstream import Upstream, UpstreamError

log = logging.getLogger("blockproxy")

HINT_HEADER = "x-blockproxy-output-tokens"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}
EVENT = b"data: "
DONE_EVENT = b"data: [DONE]\n\n"
USAGE_MARK = b'"choices":[]'
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens":\s*(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens":\s*(\d+)')
_FINISH = re.compile(rb'"finish_reason":\s*"(\w+)"')
TAIL_CHUNKS = 3


def error_response(err: ApiError) -> web.Response:
    return web.Response(status=err.status, body=err.body(), content_type="application/json")


def _context_left(inst_limit: int, prompt_tokens: int) -> int:
    return max(inst_limit - prompt_tokens, 1)


class Proxy:
    """State of one proxy process and its request handlers."""

    def __init__(self, config: ProxyConfig, specs: list[BackendSpec],
                 rng: random.Random | None = None) -> None:
        self.config = config
        self.view = ClusterView(config.profile, config.past_prediction_tokens, config.calibrate,
                                config.speed)
        self.view.apply(specs)
        self.rng = rng or random.Random()
        self.policy = make_policy(config.policy, self.rng, sample_k=config.sample_k,
                                  tie_tolerance=config.tie_tolerance)
        self.predictor = LengthPredictor(quantile=config.length_quantile,
                                         default_tokens=config.default_output_tokens)
        self.tokens = PromptTokenEstimator()
        self.metrics = Metrics(self.view)
        self.upstream = Upstream(config.connect_timeout, config.read_timeout)
        self.gossip: Gossiper | None = None
        if config.gossip_bind:
            self.gossip = Gossiper(
                self.view, self.metrics.registry, bind=config.gossip_bind,
                seeds=config.gossip_seeds, key=load_key(config.gossip_key_file),
                origin=parse_origin(config.gossip_id, self.rng),
                interval=config.gossip_interval,
                snapshot_interval=config.gossip_snapshot_interval,
                expiry=config.gossip_expiry, window=config.gossip_window,
                loss=config.gossip_loss, progress_tokens=config.gossip_progress_tokens)
        self.scraper: Scraper | None = None
        if config.scrape_interval > 0:
            self.scraper = Scraper(self.view, self.upstream, self.metrics.registry,
                                   config.scrape_interval)
        self.in_flight = 0
        self.draining = False
        self.idle = asyncio.Event()
        self.idle.set()

    # ---- application ------------------------------------------------------------------------
    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes)
        app.router.add_post(COMPLETIONS, self.handle_generate)
        app.router.add_post(CHAT, self.handle_generate)
        app.router.add_get("/v1/models", self.handle_models)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/ready", self.handle_ready)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get("/debug/cluster", self.handle_debug_cluster)
        app.router.add_route("*", "/v1/{tail:.*}", self.handle_forward)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        await self.upstream.start()

    async def _on_cleanup(self, app: web.Application) -> None:
        await self.upstream.close()

    def apply_backends(self, specs: list[BackendSpec]) -> None:
        """Hot reload: make the view match a new backends list."""
        added, removed, changed = self.view.apply(specs)
        if added or removed or changed:
            log.info("backends reloaded: added %s, removed %s, changed %s",
                     added, removed, changed)

    # ---- the request path -------------------------------------------------------------------
    async def handle_generate(self, request: web.Request) -> web.StreamResponse:
        route = request.path
        try:
            info = await self._read_request(request, route)
            candidates = self._candidates(info.model)
        except ApiError as err:
            self.metrics.requests.labels(route, str(err.status), self.policy.name).inc()
            return error_response(err)
        self.in_flight += 1
        self.idle.clear()
        self.metrics.in_flight.inc()
        try:
            return await self._serve(request, info, candidates)
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()
            if self.in_flight == 0:
                self.idle.set()

    async def _read_request(self, request: web.Request, route: str) -> RequestInfo:
        ctype = request.headers.get("Content-Type", "application/json")
        if ctype.split(";")[0].strip().lower() not in ("application/json", ""):
            raise ApiError(415, f"unsupported content type {ctype!r}; use application/json",
                           "UnsupportedMediaType")
        if self.draining:
            raise ApiError(503, "the proxy is shutting down", "ServiceUnavailableError")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(413, f"request body larger than {self.config.max_body_bytes} bytes",
                           "RequestEntityTooLarge") from None
        return parse_request(route, raw)

    def _candidates(self, model: str) -> list[Instance]:
        if not self.view.knows_model(model):
            raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError",
                           "model")
        candidates = self.view.candidates(model)
        if not candidates:
            raise ApiError(503, f"no healthy instance serves model `{model}`",
                           "ServiceUnavailableError")
        return candidates

    def _job(self, request: web.Request, info: RequestInfo, limit: int) -> Job:
        prompt_tokens = self.tokens.estimate(info.model, info.prompt_chars)
        output = self.predictor.predict(info.model, prompt_tokens, info.max_tokens,
                                        _context_left(limit, prompt_tokens),
                                        parse_hint(request.headers.get(HINT_HEADER)))
        return Job(prompt_tokens, 0, output)

    def _dispatch(self, candidates: list[Instance], job: Job) -> Entry:
        """Choose an instance and reserve the request there (no await in between)."""
        start = time.perf_counter()
        inst, prediction = self.policy.choose(candidates, job)
        if prediction is None:
            prediction = inst.predict(job.prompt_tokens, job.cached_tokens, job.output_tokens)
        now = time.perf_counter()
        self.metrics.decision.labels(self.policy.name).observe(now - start)
        self.metrics.decisions.labels(self.policy.name, inst.name).inc()
        entry = inst.reserve(job.prompt_tokens, job.output_tokens, now)
        entry.predicted_ttft = prediction[0]
        entry.predicted_e2e = prediction[1]
        return entry

    async def _serve(self, request: web.Request, info: RequestInfo,
                     candidates: list[Instance]) -> web.StreamResponse:
        limit = min(inst.limits.max_model_len for inst in candidates)
        job = self._job(request, info, limit)
        tried: list[Instance] = []
        body = info.raw
        headers = self.upstream.forward_headers(request.headers)
        for attempt in range(self.config.max_retries + 1):
            pool = [c for c in candidates if c not in tried and c.accepts_new()] or \
                [c for c in self.view.candidates(info.model) if c not in tried]
            if not pool:
                break
            entry = self._dispatch(pool, job)
            entry.observed = info.stream
            inst = entry.instance
            tried.append(inst)
            try:
                upstream = await self.upstream.open(inst.url + info.route, body, headers)
            except UpstreamError as exc:
                inst.release(entry)
                self._failed(inst, exc)
                self.metrics.retries.labels(inst.name).inc()
                continue
            except asyncio.CancelledError:
                inst.release(entry)
                self.metrics.cancellations.inc()
                raise
            inst.record_success()
            try:
                return await self._relay(request, info, entry, upstream)
            finally:
                upstream.close()
                inst.release(entry)
        err = ApiError(502, "no instance could serve the request "
                       f"(tried {', '.join(i.name for i in tried) or 'none'})",
                       "BadGatewayError")
        self.metrics.requests.labels(info.route, "502", self.policy.name).inc()
        return error_response(err)

    def _failed(self, inst: Instance, exc: Exception) -> None:
        log.warning("instance %s failed before the first byte: %s", inst.name, exc)
        if inst.record_failure(time.monotonic(), self.config.eject_after,
                               self.config.probe_interval):
            log.warning("instance %s ejected after %d failures", inst.name, inst.failures)
            self.metrics.ejections.labels(inst.name).inc()

    async def _relay(self, request: web.Request, info: RequestInfo, entry: Entry,
                     upstream: Any) -> web.StreamResponse:
        status = upstream.status
        inst = entry.instance
        if status != 200 or not info.stream:
            payload = await upstream.read()
            done = time.perf_counter()
            if status == 200:
                self._learn_unary(info, entry, payload, done)
            self.metrics.requests.labels(info.route, str(status), self.policy.name).inc()
            return web.Response(status=status, body=payload,
                                content_type=upstream.content_type or "application/json")
        response = web.StreamResponse(status=200, headers=SSE_HEADERS)
        await response.prepare(request)
        # The last chunks hold finish_reason, usage and [DONE]; keep just those.
        tail: collections.deque[bytes] = collections.deque(maxlen=TAIL_CHUNKS)
        try:
            async for data in upstream.iter_chunks():
                now = time.perf_counter()
                await response.write(data)
                count = data.count(EVENT)
                if count:
                    # Token events only: not [DONE], nor the usage chunk ("choices":[]).
                    if data.endswith(DONE_EVENT):
                        count -= 1
                    if USAGE_MARK in data:
                        count -= 1
                    if count > 0:
                        if not entry.first_token_at:
                            inst.first_token(entry, now)
                            count -= 1
                        if count:
                            inst.streamed(entry, now, count)
                tail.append(data)
            ending = b"".join(tail)
            if b"[DONE]" not in ending:
                raise UpstreamError("the stream ended without [DONE]")
        except UpstreamError as exc:
            self.metrics.stream_failures.labels(inst.name).inc()
            log.warning("instance %s failed mid-stream: %s", inst.name, exc)
            err = ApiError(502, f"upstream instance {inst.name} failed mid-stream: {exc}",
                           "BadGatewayError")
            await response.write(b"data: " + err.body() + b"\n\ndata: [DONE]\n\n")
            self.metrics.requests.labels(info.route, "502", self.policy.name).inc()
            await response.write_eof()
            return response
        except (ConnectionResetError, asyncio.CancelledError):
            self.metrics.cancellations.inc()
            raise
        self._learn_stream(info, entry, ending, time.perf_counter())
        self.metrics.requests.labels(info.route, "200", self.policy.name).inc()
        await response.write_eof()
        return response

    # ---- learning from what passed through ----------------------------------------------------
    def _learn_stream(self, info: RequestInfo, entry: Entry, tail: bytes, done: float) -> None:
        prompt = _last_int(_PROMPT_TOKENS, tail)
        completion = _last_int(_COMPLETION_TOKENS, tail)
        finish = _FINISH.findall(tail)
        if completion is not None:
            output = completion
        else:  # token events, less a chat stream's first (role-only) event
            output = max(entry.generated - (1 if info.route == CHAT else 0), 0)
        self._learn(info, entry, prompt, output,
                    finish[-1].decode() if finish else None, done)

    def _learn_unary(self, info: RequestInfo, entry: Entry, payload: bytes, done: float) -> None:
        prompt = _last_int(_PROMPT_TOKENS, payload)
        completion = _last_int(_COMPLETION_TOKENS, payload)
        finish = _FINISH.findall(payload)
        if completion is None:
            return
        self._learn(info, entry, prompt, completion, finish[-1].decode() if finish else None,
                    done)

    def _learn(self, info: RequestInfo, entry: Entry, prompt_tokens: int | None, output: int,
               finish: str | None, done: float) -> None:
        inst = entry.instance
        e2e = done - entry.dispatched_at
        m = self.metrics
        if log.isEnabledFor(logging.DEBUG):
            log.debug("done on %s: prompt %s~%d, output %d (predicted %d), ttft %.4f (predicted "
                      "%.4f), e2e %.4f (predicted %.4f)", inst.name, prompt_tokens,
                      entry.prompt_tokens, output, entry.predicted_tokens,
                      (entry.first_token_at or done) - entry.dispatched_at, entry.predicted_ttft,
                      e2e, entry.predicted_e2e)
        m.e2e.observe(e2e)
        if prompt_tokens is not None:
            self.tokens.observe(info.model, info.prompt_chars, prompt_tokens)
        self.predictor.observe(info.model, prompt_tokens or entry.prompt_tokens, output,
                               info.max_tokens, finish, predicted=entry.predicted_tokens)
        if output > 0:
            m.length_error.observe(abs(entry.predicted_tokens - output) / output)
        if math.isfinite(entry.predicted_e2e) and e2e > 0:
            m.prediction_error.labels("e2e").observe(abs(entry.predicted_e2e - e2e) / e2e)
        if entry.first_token_at:
            ttft = entry.first_token_at - entry.dispatched_at
            m.ttft.observe(ttft)
            if math.isfinite(entry.predicted_ttft) and ttft > 0:
                m.prediction_error.labels("ttft").observe(
                    abs(entry.predicted_ttft - ttft) / ttft)
            if output > 1:
                m.itl.observe((done - entry.first_token_at) / (output - 1))

    # ---- other endpoints ----------------------------------------------------------------------
    async def handle_models(self, request: web.Request) -> web.Response:
        cards: dict[str, dict[str, Any]] = {}
        for inst in self.view.instances.values():
            if inst.healthy:
                for model in sorted(inst.models):
                    cards.setdefault(model, inst.model_cards.get(model) or {
                        "id": model, "object": "model", "created": int(time.time()),
                        "owned_by": "blockproxy", "root": model, "parent": None})
        return web.json_response({"object": "list", "data": list(cards.values())},
                                 dumps=lambda o: orjson.dumps(o).decode())

    async def handle_health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def handle_ready(self, request: web.Request) -> web.Response:
        ready = not self.draining and any(i.accepts_new() for i in self.view.instances.values())
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(),
                            content_type="text/plain", charset="utf-8")

    async def handle_debug_cluster(self, request: web.Request) -> web.Response:
        out = []
        for inst in self.view.instances.values():
            probe = sim.Prediction(*inst.predict(1, 0, 1))
            t = inst.table
            out.append({
                "name": inst.name, "url": inst.url, "state": inst.state,
                "healthy": inst.healthy, "failures": inst.failures,
                "models": sorted(inst.models), "profile": inst.profile.name,
                "active_requests": inst.n,
                "waiting_requests": int((t[sim.COL_STARTED, :inst.n] == 0).sum()),
                "predicted_queue_delay_s": probe.queue_delay,
                "calibration": {"speed": inst.model.speed,
                                "samples": inst.calibration.samples},
                "limits": vars(inst.limits),
                "by_origin": {_origin_name(o): c for o, c in inst.by_origin().items()},
                "kv_cache_usage": self.scraper.kv_usage.get(inst.name)
                if self.scraper else None,
            })
        body = {"policy": self.policy.name, "simulator": sim.IMPLEMENTATION,
                "in_flight": self.in_flight, "draining": self.draining,
                "predictor": self.predictor.stats(), "instances": out,
                "gossip": self.gossip.info() if self.gossip else None}
        return web.Response(body=orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
                            content_type="application/json")

    async def handle_forward(self, request: web.Request) -> web.StreamResponse:
        """Any other ``/v1/*`` path: forward unchanged to an instance serving the model."""
        raw = await request.read()
        model = None
        if raw:
            try:
                body = orjson.loads(raw)
                model = body.get("model") if isinstance(body, dict) else None
            except orjson.JSONDecodeError:
                model = None
        pool = [i for i in self.view.instances.values() if i.accepts_new()
                and (model is None or i.serves(model))]
        if not pool:
            return error_response(ApiError(503, "no healthy instance for this request",
                                           "ServiceUnavailableError"))
        inst = self.rng.choice(pool)
        try:
            status, ctype, payload = await self.upstream.passthrough(
                request.method, inst.url + request.path_qs, raw,
                self.upstream.forward_headers(request.headers))
        except UpstreamError as exc:
            self._failed(inst, exc)
            return error_response(ApiError(502, f"instance {inst.name} failed: {exc}",
                                           "BadGatewayError"))
        return web.Response(status=status, body=payload, content_type=ctype)

    # ---- background work ----------------------------------------------------------------------
    async def progress_loop(self, interval: float = 0.05) -> None:
        """Estimate the progress of non-streaming requests (see Instance.estimate_progress)."""
        while True:
            await asyncio.sleep(interval)
            now = time.perf_counter()
            for inst in self.view.instances.values():
                if inst.n:
                    inst.estimate_progress(now)

    async def probe_loop(self) -> None:
        """Bring ejected instances back when ``/health`` answers; discover model lists."""
        discovered_at: dict[str, float] = {}
        while True:
            now = time.monotonic()
            for inst in list(self.view.instances.values()):
                if not inst.healthy and now >= inst.next_probe_at:
                    if await self.upstream.healthy(inst.url):
                        inst.probe_succeeded()
                        log.info("instance %s is back", inst.name)
                    else:
                        inst.probe_failed(now)
                if inst.healthy and not inst.spec.models and \
                        now - discovered_at.get(inst.name, -1e9) > (30.0 if inst.models else 2.0):
                    discovered_at[inst.name] = now
                    cards = await self.upstream.models(inst.url)
                    if cards is not None:
                        inst.model_cards = {c["id"]: c for c in cards if "id" in c}
                        inst.models = set(inst.model_cards)
            await asyncio.sleep(min(self.config.probe_interval, 1.0))


def _origin_name(origin: int) -> str:
    return "local" if origin == LOCAL else "phantom" if origin == PHANTOM else f"{origin:016x}"


def _last_int(pattern: re.Pattern[bytes], data: bytes) -> int | None:
    found = pattern.findall(data)
    return int(found[-1]) if found else None
