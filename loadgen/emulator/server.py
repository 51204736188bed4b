"""The aiohttp application of one emulated instance: vLLM's HTTP surface over an Engine.

Handlers validate the body, queue an :class:`EngineRequest` and then only wait on it:
the engine resolves the request's waiter at the end of every step that sampled a token
for it, and the handler writes one SSE event per token.  A client that goes away (failed
write, or handler cancellation on a closed connection) aborts its request, which leaves
the batch at the next step boundary.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import orjson
from aiohttp import web

from loadgen.emulator import outputs, protocol
from loadgen.emulator.engine import Engine
from loadgen.emulator.metrics import InstanceMetrics
from loadgen.emulator.protocol import APIError, ParsedRequest
from loadgen.emulator.scheduler import FINISHED, EngineRequest
from loadgen.headers import OUTPUT_TOKENS_HEADER
from loadgen.tokenizer import token_ids
from loadgen.truth import Truth

VLLM_VERSION = "0.32.0"
JSON = "application/json"


@dataclass
class Instance:
    """One emulated vLLM instance: its engine, metrics and identity."""

    index: int
    model_name: str
    engine: Engine
    metrics: InstanceMetrics
    started: int
    #: true output lengths by prompt (``--truth FILE``), shared by a process's instances
    truth: Truth | None = None


def error_response(err: APIError) -> web.Response:
    return web.Response(status=err.status, body=err.body(), content_type=JSON)


def _true_length(request: web.Request, parsed: ParsedRequest, digest: int,
                 truth: Truth | None) -> int:
    """The truth file's length for this prompt, else the header's, else the own draw."""
    if truth is not None:
        listed = truth.lookup(digest)
        if listed is not None:
            return listed
    header = request.headers.get(OUTPUT_TOKENS_HEADER)
    if header is not None:
        try:
            value = int(header)
        except ValueError:
            value = 0
        if value < 1:
            raise protocol.bad_request(
                f"{OUTPUT_TOKENS_HEADER} must be a positive integer, got {header!r}.")
        return value
    return outputs.drawn_output_length(digest, len(parsed.tokens), parsed.chat)


class Handlers:
    """Route handlers bound to one instance."""

    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self.engine = instance.engine
        limits = instance.engine.limits
        self.max_model_len = limits.max_model_len
        self.kv_capacity = limits.num_gpu_blocks * limits.block_size

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps({"version": VLLM_VERSION}), content_type=JSON)

    async def models(self, request: web.Request) -> web.Response:
        inst = self.instance
        return web.Response(body=protocol.models_body(inst.model_name, inst.started,
                                                      self.max_model_len), content_type=JSON)

    async def metrics(self, request: web.Request) -> web.Response:
        text = self.instance.metrics.render(self.engine)
        return web.Response(text=text, content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def debug_engine(self, request: web.Request) -> web.Response:
        """Recent step records (model vs true vs measured durations) and engine state."""
        try:
            last = max(0, int(request.query.get("last", "1000")))
        except ValueError:
            last = 1000
        engine = self.engine
        steps = list(engine.steps)[-last:] if last else []
        body = {
            "instance": self.instance.index,
            "timing": engine.timing.__dict__,
            "num_steps": engine.num_steps,
            "num_resyncs": engine.num_resyncs,
            "running": len(engine.scheduler.running),
            "waiting": len(engine.scheduler.waiting),
            "step_fields": list(steps[0]._fields) if steps else [],
            "steps": [list(s) for s in steps],
        }
        return web.Response(body=orjson.dumps(body), content_type=JSON)

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM's ``/tokenize``: a completions ``prompt`` or chat ``messages`` in token ids."""
        try:
            body = protocol.decode_json(await request.read())
            model = body.get("model")
            if model is not None and model != self.instance.model_name:
                raise APIError(404, f"The model `{model}` does not exist.", "NotFoundError",
                               "model")
            tokens = protocol.prompt_tokens(body, "messages" in body)
        except APIError as err:
            return error_response(err)
        ids = token_ids(tokens)
        return web.Response(body=orjson.dumps({"count": len(ids), "max_model_len":
                                               self.max_model_len, "tokens": ids,
                                               "token_strs": None}), content_type=JSON)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    def _parse(self, request: web.Request, raw: bytes, chat: bool) -> tuple[ParsedRequest, int]:
        body = protocol.decode_json(raw)
        model = body.get("model")
        if model is not None and model != self.instance.model_name:
            raise APIError(404, f"The model `{model}` does not exist.", "NotFoundError",
                           "model")
        parsed = protocol.parse_request(body, chat, self.max_model_len)
        if len(parsed.tokens) + 1 > self.kv_capacity:
            raise protocol.bad_request(
                f"The request needs more KV cache than this emulated instance has "
                f"({self.kv_capacity} tokens).")
        digest = outputs.prompt_digest(parsed.tokens)
        return parsed, digest

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        raw = await request.read()
        try:
            parsed, digest = self._parse(request, raw, chat)
            true_len = _true_length(request, parsed, digest, self.instance.truth)
        except APIError as err:
            return error_response(err)
        if parsed.ignore_eos or true_len > parsed.max_tokens:
            output_len, reason = parsed.max_tokens, "length"
        else:
            output_len, reason = true_len, "stop"
        # A request that could never fit in the KV cache would wait forever; cap it.
        output_len = min(output_len, max(1, self.kv_capacity - len(parsed.tokens)))
        prefix = "chatcmpl-" if chat else "cmpl-"
        request_id = f"{prefix}{uuid.uuid4().hex}"
        arrival = time.perf_counter()
        timing = self.engine.timing
        if timing.request_overhead_s > 0:  # the API server's share, before the engine
            await asyncio.sleep(timing.request_overhead_s * timing.time_scale)
        req = EngineRequest(request_id, parsed.tokens, output_len, reason,
                            self.engine.limits.block_size, arrival)
        self.engine.submit(req)
        try:
            if parsed.stream:
                return await self._stream(request, req, parsed, digest)
            return await self._respond(req, parsed, digest)
        finally:
            if req.state != FINISHED:
                self.engine.abort(req)

    async def _respond(self, req: EngineRequest, parsed: ParsedRequest,
                       digest: int) -> web.Response:
        loop = asyncio.get_running_loop()
        while req.state != FINISHED:
            req.waiter = loop.create_future()
            await req.waiter
        text = outputs.output_text(digest, req.num_output)
        build = protocol.chat_body if parsed.chat else protocol.completion_body
        body = build(req.request_id, int(time.time()), self.instance.model_name, text,
                     req.finish_reason_if_done, req.num_prompt_tokens, req.num_output)
        return web.Response(body=body, content_type=JSON)

    async def _stream(self, request: web.Request, req: EngineRequest, parsed: ParsedRequest,
                      digest: int) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        writer = protocol.ChunkWriter(req.request_id, int(time.time()),
                                      self.instance.model_name, parsed.chat)
        loop = asyncio.get_running_loop()
        sent = 0
        try:
            while True:
                if req.aborted:
                    return resp
                produced = req.num_output
                if produced > sent:
                    parts = [writer.role()] if parsed.chat and sent == 0 else []
                    done = req.state == FINISHED
                    for i in range(sent, produced):
                        last = done and i == produced - 1
                        parts.append(writer.token(outputs.output_word(digest, i),
                                                  req.finish_reason_if_done if last else None))
                    sent = produced
                    if done:
                        if parsed.include_usage:
                            parts.append(writer.usage(req.num_prompt_tokens, produced))
                        parts.append(protocol.DONE)
                    await resp.write(b"".join(parts))
                    if done:
                        return resp
                req.waiter = loop.create_future()
                await req.waiter
        except (ConnectionError, RuntimeError):
            # The client went away mid-stream (aiohttp raises ConnectionResetError, or
            # RuntimeError on a closed transport): abort, as vLLM does.
            self.engine.abort(req)
            return resp


def create_app(instance: Instance) -> web.Application:
    """The aiohttp application serving one instance."""
    handlers = Handlers(instance)
    app = web.Application(client_max_size=256 * 1024 * 1024)
    app.router.add_get("/health", handlers.health)
    app.router.add_get("/version", handlers.version)
    app.router.add_get("/v1/models", handlers.models)
    app.router.add_get("/metrics", handlers.metrics)
    app.router.add_get("/debug/engine", handlers.debug_engine)
    app.router.add_post("/tokenize", handlers.tokenize)
    app.router.add_post("/v1/completions", handlers.completions)
    app.router.add_post("/v1/chat/completions", handlers.chat_completions)
    return app
