"""The endpoints beside generation: models, liveness, readiness, metrics, the debug view,
vLLM's other request paths passed through, and the answer to every other path."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from yarl import URL

from blockproxy import simulator
from blockproxy.cluster.requests import LOCAL, PHANTOM
from blockproxy.cluster.scraper import Scraper
from blockproxy.cluster.view import ClusterView
from blockproxy.front import door, paths
from blockproxy.front.gate import Gate
from blockproxy.front.generate import GenerateHandler, error_response
from blockproxy.gossip.node import Gossiper
from blockproxy.metrics import Metrics
from blockproxy.request import ApiError
from blockproxy.routing.lengths import LengthPredictor
from blockproxy.supervise import Supervisor
from blockproxy.upstream import Upstream, UpstreamError


class Endpoints:
    def __init__(self, view: ClusterView, gate: Gate, metrics: Metrics, upstream: Upstream,
                 generate: GenerateHandler, predictor: LengthPredictor, rng: random.Random,
                 gossip: Gossiper | None, scraper: Scraper | None) -> None:
        self.view = view
        self.gate = gate
        self.metrics = metrics
        self.upstream = upstream
        self.generate = generate
        self.predictor = predictor
        self.rng = rng
        self.gossip = gossip
        self.scraper = scraper
        #: the background loops, whose failing ones turn /health red (set by the Proxy)
        self.supervisor: Supervisor | None = None

    async def models(self, request: web.Request) -> web.Response:
        """Union of the model cards of healthy instances."""
        cards: dict[str, dict[str, Any]] = {}
        for inst in self.view.instances.values():
            if inst.healthy:
                for model in sorted(inst.models):
                    cards.setdefault(model, inst.model_cards.get(model) or {
                        "id": model, "object": "model", "created": int(time.time()),
                        "owned_by": "blockproxy", "root": model, "parent": None})
        return web.json_response({"object": "list", "data": list(cards.values())},
                                 dumps=lambda o: orjson.dumps(o).decode())

    async def health(self, request: web.Request) -> web.Response:
        """Liveness: 503 while a background loop keeps crashing (see :mod:`supervise`)."""
        failing = self.supervisor.failing() if self.supervisor is not None else []
        if failing:
            return web.json_response({"status": "failing", "failing_loops": failing},
                                     status=503)
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        ready = not self.gate.leaving and \
            any(i.accepts_new() for i in self.view.instances.values())
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain",
                            charset="utf-8")

    async def debug_cluster(self, request: web.Request) -> web.Response:
        out = []
        for inst in self.view.instances.values():
            described = inst.describe()
            described["by_origin"] = {_origin_name(o): c
                                      for o, c in inst.requests.by_origin().items()}
            described["kv_cache_usage"] = self.scraper.kv_usage.get(inst.name) \
                if self.scraper else None
            out.append(described)
        body = {"policy": self.generate.policy_name, "simulator": simulator.IMPLEMENTATION,
                "in_flight": self.gate.in_flight, "leaving": self.gate.leaving,
                "tasks": len(asyncio.all_tasks()),
                "draining": self.gate.draining,
                "predictor": self.predictor.stats(), "instances": out,
                "gossip": self.gossip.info() if self.gossip else None}
        return web.Response(body=orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
                            content_type="application/json")

    def pass_through(self, path: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        """The handler of one of vLLM's other request paths (:data:`paths.PASS_THROUGH`):
        forwarded unchanged to ``path`` on one instance serving the body's model."""
        async def handle(request: web.Request) -> web.Response:
            try:
                with self.gate.inside():
                    return await self._pass(request, path)
            except ApiError as err:
                return error_response(err)
        return handle

    async def _pass(self, request: web.Request, path: str) -> web.Response:
        cfg = self.generate.config
        if self.gate.draining:
            raise ApiError(503, "the proxy is shutting down", "ServiceUnavailableError")
        try:
            raw = await door.read_body(request, cfg.body_timeout, self.metrics)
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(413, f"request body larger than {cfg.max_body_bytes} bytes",
                           "RequestEntityTooLarge") from None
        try:
            body = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}") from None
        model = body.get("model") if isinstance(body, dict) else None
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "`model` must be a string", param="model")
        if model is not None and not self.view.knows_model(model):
            raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError",
                           "model")
        pool = [i for i in self.view.instances.values() if i.accepts_new()
                and (model is None or i.serves(model))]
        if not pool:
            raise ApiError(503, "no healthy instance for this request",
                           "ServiceUnavailableError")
        self.rng.shuffle(pool)
        pool.sort(key=lambda i: i.active)  # the least busy, ties at random
        target = path + ("?" + request.query_string if request.query_string else "")
        headers = self.upstream.forward_headers(request.raw_headers,
                                                request.get(door.ID_KEY))
        for inst in pool[:cfg.max_retries + 1]:
            try:
                status, ctype, payload = await self.upstream.passthrough(
                    "POST", inst.url + target, raw, headers, cfg.unary_timeout)
            except UpstreamError as exc:
                if not exc.sent:  # never reached the instance: try another
                    if not exc.local:
                        self.generate.failed(inst, exc)
                    continue
                raise self.generate.after_send(inst, exc, stream=False) from None
            self.generate.answered(inst, status)
            return web.Response(status=status, body=payload,
                                content_type=ctype or "application/json")
        raise ApiError(502, "no instance could serve the request", "BadGatewayError")

    async def not_found(self, request: web.Request) -> web.StreamResponse:
        """Every path that is not a route as written: read as nginx reads it (decoded,
        ``//`` merged, dot segments resolved) and served by the route it names, else 404
        (405 for a route asked with the wrong method)."""
        raw_path = request.raw_path.split("?", 1)[0]
        try:
            norm = paths.normalise(raw_path)
        except UnicodeDecodeError:
            norm = None
        if norm is None:
            return error_response(ApiError(400, "the request path is malformed or climbs "
                                           "above the root"))
        allow = _allowed_methods(request.app, norm)
        if allow is not None and request.method in allow.split(", ") and norm != raw_path:
            clone = request.clone(rel_url=URL.build(path=norm,
                                                    query_string=request.query_string))
            match = await request.app.router.resolve(clone)
            if match.handler is not self.not_found:
                return await match.handler(clone)
        if allow is not None:
            return web.Response(status=405, headers={"Allow": allow},
                                body=ApiError(405, f"{request.method} is not allowed on "
                                              f"{norm}; use {allow}",
                                              "MethodNotAllowed").body(),
                                content_type="application/json")
        return error_response(ApiError(404, f"no route for {request.method} {norm}",
                                       "NotFoundError"))


def _allowed_methods(app: web.Application, path: str) -> str | None:
    """The methods of the route at exactly ``path`` (the catch-all aside), as ``Allow``."""
    for resource in app.router.resources():
        if resource.canonical == path:
            methods = sorted({route.method for route in resource} - {"*", "HEAD"})
            return ", ".join(methods) or None
    return None


def _origin_name(origin: int) -> str:
    return "local" if origin == LOCAL else "phantom" if origin == PHANTOM else f"{origin:016x}"
