"""The endpoints beside generation: models, liveness, readiness, metrics, the debug view,
and pass-through of other ``/v1/*`` paths."""

from __future__ import annotations

import random
import time
from typing import Any

import orjson
from aiohttp import web

from blockproxy import simulator
from blockproxy.cluster.requests import LOCAL, PHANTOM
from blockproxy.cluster.scraper import Scraper
from blockproxy.cluster.view import ClusterView
from blockproxy.front.gate import Gate
from blockproxy.front.generate import GenerateHandler, error_response
from blockproxy.gossip.node import Gossiper
from blockproxy.metrics import Metrics
from blockproxy.request import ApiError
from blockproxy.routing.lengths import LengthPredictor
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
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        ready = not self.gate.draining and \
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
                "in_flight": self.gate.in_flight, "draining": self.gate.draining,
                "predictor": self.predictor.stats(), "instances": out,
                "gossip": self.gossip.info() if self.gossip else None}
        return web.Response(body=orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
                            content_type="application/json")

    async def forward(self, request: web.Request) -> web.StreamResponse:
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
                self.upstream.forward_headers(request.raw_headers))
        except UpstreamError as exc:
            self.generate.failed(inst, exc)
            return error_response(ApiError(502, f"instance {inst.name} failed: {exc}",
                                           "BadGatewayError"))
        return web.Response(status=status, body=payload, content_type=ctype)


def _origin_name(origin: int) -> str:
    return "local" if origin == LOCAL else "phantom" if origin == PHANTOM else f"{origin:016x}"
