"""``POST /v1/completions`` and ``/v1/chat/completions``: the request path, top to bottom.

parse (:mod:`blockproxy.request`) → describe (:mod:`blockproxy.routing.describe`) →
choose and reserve (:mod:`blockproxy.routing.dispatch`) → forward (:mod:`blockproxy.upstream`,
retrying another instance before the first byte) → relay the chunks as they arrive,
observing first token and progress (:mod:`blockproxy.front.relay`) → learn from the end →
release.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from typing import Any

from aiohttp import web

from blockproxy.cluster.autoscale import Autoscaler
from blockproxy.cluster.instance import ACTIVE, Instance
from blockproxy.cluster.requests import Entry
from blockproxy.cluster.view import ClusterView
from blockproxy.config import ProxyConfig
from blockproxy.front import door
from blockproxy.front.admission import PRIORITY_HEADER, Admission, priority_of
from blockproxy.front.continuation import (
    Splice,
    Transcript,
    continuation_body,
    finish_event,
    refusal,
    slice_body,
    token_prompt,
    usage_event,
)
from blockproxy.front.gate import Gate
from blockproxy.front.relay import (
    DONE_EVENT,
    EVENT_END,
    TAIL_CHUNKS,
    Usage,
    parse_usage,
    stream_complete,
    token_events,
)
from blockproxy.metrics import Metrics
from blockproxy.request import CHAT, ApiError, RequestInfo, parse_request
from blockproxy.routing import tokenizer
from blockproxy.routing.describe import Describer
from blockproxy.routing.dispatch import Dispatcher
from blockproxy.routing.features import TENANT_HEADER, tenant_of
from blockproxy.routing.job import Job
from blockproxy.routing.lengths import HINT_HEADER
from blockproxy.routing.prefix import MAX_BYTES, MAX_IDS
from blockproxy.upstream import Upstream, UpstreamError, UpstreamResponse

log = logging.getLogger("blockproxy")

#: statuses that say the instance (or what fronts it) is failing, not the request: they
#: count towards ejection.  Every 5xx is passed to the client, none is retried.
INSTANCE_FAILURE = frozenset({502, 503, 504})

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}
#: the response header naming the instance a request was sent to (a stream's first part)
INSTANCE_HEADER = "X-Blockproxy-Instance"
#: the request header setting a request's slice size (SCLS slice mode; 0 = none)
SLICE_HEADER = "x-blockproxy-slice-tokens"


def error_response(err: ApiError) -> web.Response:
    return web.Response(status=err.status, body=err.body(), content_type="application/json",
                        headers=err.headers)


class HandOff(Exception):
    """A stream leaves an instance that is draining (or was removed): not a failure."""


class _Part:
    """One upstream generation of a client's stream: its reservation, its response, the
    splice that rewrites it (a continuation's), the chunk held back for the end, and
    when the part before it failed (a continuation's)."""

    __slots__ = ("entry", "failed_at", "first", "held", "max_tokens", "model", "partial",
                 "splice", "upstream")

    def __init__(self, entry: Entry, upstream: UpstreamResponse, splice: Splice | None,
                 model: str, max_tokens: int | None) -> None:
        self.entry = entry
        self.model = model
        self.max_tokens = max_tokens  # this part's budget (None: up to the context)
        self.upstream = upstream
        self.splice = splice
        self.held = b""
        self.partial = b""  # the start of an event whose end has not come
        self.failed_at = 0.0
        self.first = False  # the client's first part: its first token is the stream's


class GenerateHandler:
    """Serves completions and chat requests through the cluster view."""

    def __init__(self, config: ProxyConfig, view: ClusterView, describer: Describer,
                 dispatcher: Dispatcher, upstream: Upstream, metrics: Metrics,
                 gate: Gate) -> None:
        self.config = config
        self.view = view
        self.describer = describer
        self.dispatcher = dispatcher
        self.upstream = upstream
        self.metrics = metrics
        self.gate = gate
        self.policy_name = dispatcher.policy.name
        self._counted: dict[tuple[str, int], Any] = {}
        #: holds what no instance can start within its model's TTFT objective (when the
        #: proxy or the backends file sets one)
        self.admission = Admission(config.admission_queue, metrics) if config.admission \
            else None
        #: told of every request's predicted fate (auto-provisioning), when it runs
        self.autoscaler: Autoscaler | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        route = request.path
        arrived = time.monotonic()
        try:
            info = await self._read_request(request, route)
            candidates = self._candidates(info.model)
            with self.gate.inside():
                return await self._serve(request, info, candidates, arrived)
        except ApiError as err:
            self._count(route, err.status)
            return error_response(err)

    def _count(self, route: str, status: int) -> None:
        counter = self._counted.get((route, status))
        if counter is None:  # labels() takes a lock and builds a key: look each up once
            counter = self._counted[(route, status)] = self.metrics.requests.labels(
                route, str(status), self.policy_name)
        counter.inc()

    async def _read_request(self, request: web.Request, route: str) -> RequestInfo:
        ctype = request.headers.get("Content-Type", "application/json")
        if ctype.split(";")[0].strip().lower() not in ("application/json", ""):
            raise ApiError(415, f"unsupported content type {ctype!r}; use application/json",
                           "UnsupportedMediaType")
        if self.gate.draining:
            raise ApiError(503, "the proxy is shutting down", "ServiceUnavailableError")
        try:
            raw = await door.read_body(request, self.config.body_timeout, self.metrics)
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

    @staticmethod
    async def _token_ids(info: RequestInfo, inst: Instance) -> tuple[list[int] | None, bool]:
        """The prompt's token ids when the instance is in exact mode (its tokenizer is
        configured, or it publishes KV events) and they are known: a token-id prompt, a
        completions prompt the tokenizer encodes, or a chat the model's template renders.
        Also whether they are the whole prompt."""
        tok = inst.tokenizer
        if info.route == CHAT:
            if tok is None:
                return None, False
            try:
                text = tok.render_chat(info.body)
            except Exception as exc:  # a template that refuses these messages
                log.debug("chat template of %s: %s", inst.name, exc)
                return None, False
            if text is None:
                return None, False
            whole = len(text) <= MAX_BYTES
            return await tok.encode(text[:MAX_BYTES], special=False), whole
        prompt = info.body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return prompt[:MAX_IDS], len(prompt) <= MAX_IDS
        if tok is None:
            return None, False
        text = tokenizer.prompt_text(info)
        if text is None:
            return None, False
        return await tok.encode(text), len(text) == info.prompt_chars

    async def _job(self, request: web.Request, info: RequestInfo,
                   candidates: list[Instance]) -> Job:
        limit = min(inst.limits.max_model_len for inst in candidates)
        first = candidates[0]
        ids, exact_count = None, False
        if first.tokenizer is not None or first.spec.kv_events is not None:  # exact mode
            ids, exact_count = await self._token_ids(info, first)
        return self.describer.describe(
            info, request.headers.get(HINT_HEADER), limit, ids, first.limits.block_size,
            exact_count, tenant_of(request.headers.get(TENANT_HEADER), info))

    def _slice_tokens(self, request: web.Request, info: RequestInfo,
                      candidates: list[Instance]) -> int:
        """The slice size this request is generated in (0: one piece)."""
        header = request.headers.get(SLICE_HEADER)
        size = self.config.slice_tokens
        if header is not None:
            try:
                size = int(header)
            except ValueError:
                size = -1
            if size < 0:
                raise ApiError(400, f"{SLICE_HEADER} must be a non-negative integer, got "
                               f"{header!r}", "BadRequestError")
        if size <= 0 or not info.stream or (info.max_tokens is not None
                                            and info.max_tokens <= size):
            return 0
        if refusal(info, candidates[0].tokenizer is not None) is not None:
            return 0
        return size

    def _pool(self, model: str, tried: list[Instance]) -> list[Instance]:
        """The instances a request may be sent to now: those taking new requests, else
        (all are draining or ejected) any that serves the model; none it was tried on."""
        everyone = self.view.candidates(model)
        return [c for c in everyone if c not in tried and c.accepts_new()] or \
            [c for c in everyone if c not in tried]

    async def _admit(self, request: web.Request, info: RequestInfo, job: Job,
                     pool: list[Instance], arrived: float, slo: tuple[float, float]
                     ) -> Entry:
        """Dispatch under the TTFT objective: at once, or after holding (or 429)."""
        assert self.admission is not None
        priority = priority_of(request.headers.get(PRIORITY_HEADER))
        tenant = tenant_of(request.headers.get(TENANT_HEADER), info) or \
            request.headers.get("Authorization") or ""

        def dispatch(budget: float, held: bool) -> Entry | None:
            now_pool = self._pool(info.model, [])
            if not now_pool:
                return None
            return self.dispatcher.dispatch_in_time(now_pool, job, budget, held)
        missed = True
        try:
            entry = await self.admission.admit(
                dispatch, lambda: self.dispatcher.idle_service(pool, job), tenant, priority,
                arrived, slo[0])
            missed = entry.held_s > 0 or self._misses(entry, slo)
            return entry
        finally:  # held, refused or dispatched: predicted to miss unless dispatched at once
            if self.autoscaler is not None:
                self.autoscaler.observe(info.model, time.perf_counter(), missed)

    @staticmethod
    def _misses(entry: Entry, slo: tuple[float, float]) -> bool:
        """Whether the dispatched request is predicted to miss an objective (with
        ``block``, on the best instance: so on every one)."""
        return (0 < slo[0] < entry.predicted_ttft) or (0 < slo[1] < entry.predicted_e2e)

    async def _serve(self, request: web.Request, info: RequestInfo,
                     candidates: list[Instance], arrived: float) -> web.StreamResponse:
        slice_ = self._slice_tokens(request, info, candidates)
        sent = parse_request(info.route, slice_body(info, slice_)) if slice_ else info
        job = await self._job(request, sent, candidates)
        tried: list[Instance] = []
        headers = self.upstream.forward_headers(request.raw_headers,
                                                request.get(door.ID_KEY))
        # A stream may wait for its headers (and then each chunk) up to the read timeout;
        # vLLM answers a unary request only when it is done, so that has a deadline.
        timeout = self.config.read_timeout if info.stream else self.config.unary_timeout
        slo = self.view.objective(info.model)
        for attempt in range(self.config.max_retries + 1):
            pool = self._pool(info.model, tried)
            if not pool:
                break
            if attempt == 0 and slo[0] > 0 and self.admission is not None:
                entry = await self._admit(request, info, job, pool, arrived, slo)
            else:
                entry = self.dispatcher.dispatch(pool, job)
                if attempt == 0 and self.autoscaler is not None:
                    self.autoscaler.observe(info.model, time.perf_counter(),
                                            self._misses(entry, slo))
            entry.slo_ttft = slo[0]
            # one stream event is one token of one sequence: with several, events do not
            # time engine steps, so such a request is estimated rather than observed
            entry.observed = info.stream and info.sequences == 1
            inst = entry.instance
            tried.append(inst)
            deadline = time.monotonic() + timeout
            try:
                upstream = await self.upstream.open(inst.url + info.route, sent.raw, headers,
                                                    timeout)
            except UpstreamError as exc:
                inst.release(entry)
                if not exc.sent:  # it never reached the engine: another instance may take it
                    if not exc.local:
                        self.failed(inst, exc)
                    self.metrics.retries.labels(inst.name).inc()
                    continue
                return self._failed_after_send(info, inst, exc)
            except asyncio.CancelledError:
                inst.release(entry)
                self.metrics.cancellations.inc()
                raise
            try:
                return await self._relay(request, info, job, entry, upstream, deadline,
                                         headers, slice_)
            finally:
                upstream.close()
                inst.release(entry)
                if self.admission is not None:
                    self.admission.poke()
        err = ApiError(502 if tried else 503, "no instance could serve the request "
                       f"(tried {', '.join(i.name for i in tried) or 'none'})",
                       "BadGatewayError" if tried else "ServiceUnavailableError")
        self._count(info.route, err.status)
        return error_response(err)

    def _failed_after_send(self, info: RequestInfo, inst: Instance,
                           exc: UpstreamError) -> web.Response:
        err = self.after_send(inst, exc, info.stream)
        self._count(info.route, err.status)
        return error_response(err)

    def after_send(self, inst: Instance, exc: UpstreamError, stream: bool) -> ApiError:
        """The request was written to ``inst`` and then no answer came: it may be running
        there, so it is not sent anywhere else.  Counts the failure where it is the
        instance's, and returns the client's error."""
        if exc.timeout:
            if stream:  # silent past the read timeout: the instance is stuck
                self.failed(inst, exc)
                what = f"sent no response headers within {self.config.read_timeout:g} s"
            else:  # a long generation is the request's own doing
                what = f"did not finish within {self.config.unary_timeout:g} s"
            return ApiError(504, f"instance {inst.name} {what}", "GatewayTimeoutError")
        self.failed(inst, exc)
        return ApiError(502, f"instance {inst.name} failed after the request was sent "
                        "(not retried: it may have run)", "BadGatewayError")

    def answered(self, inst: Instance, status: int) -> None:
        """What an instance's answer says of its health: 502/503/504 count as failures; a
        500 is the engine's answer to that request, neither failure nor success."""
        if status in INSTANCE_FAILURE:
            self.failed(inst, UpstreamError(f"HTTP {status}"))
        elif status < 500:
            inst.record_success()

    def failed(self, inst: Instance, exc: Exception) -> None:
        """An instance failed: count it, eject after too many in a row."""
        log.warning("instance %s (%s) failed: %s", inst.name, inst.url, exc)
        if inst.record_failure(time.monotonic(), self.config.eject_after,
                               self.config.probe_interval,
                               self.view.may_eject(self.config.max_ejected_percent)):
            log.warning("instance %s ejected after %d failures", inst.name, inst.failures)
            self.metrics.ejections.labels(inst.name).inc()

    async def _relay(self, request: web.Request, info: RequestInfo, job: Job, entry: Entry,
                     upstream: UpstreamResponse, deadline: float, headers: bytes,
                     slice_: int) -> web.StreamResponse:
        status = upstream.status
        inst = entry.instance
        self.answered(inst, status)
        if status == 200 and info.stream:
            return await self._relay_stream(request, info, job, entry, upstream, headers,
                                            slice_)
        try:
            payload = await upstream.read(deadline - time.monotonic())
        except UpstreamError as exc:
            return self._failed_after_send(info, inst, exc)
        done = time.perf_counter()
        if status == 200:
            usage = parse_usage(payload)
            if usage.completion_tokens is not None:
                self._learn(info, job, entry, usage, usage.completion_tokens, done)
        self._count(info.route, status)
        return web.Response(status=status, body=payload,
                            content_type=upstream.content_type or "application/json",
                            headers={INSTANCE_HEADER: inst.name})

    async def _relay_stream(self, request: web.Request, info: RequestInfo, job: Job,
                            entry: Entry, upstream: UpstreamResponse, headers: bytes,
                            slice_: int) -> web.StreamResponse:
        """Relay a stream; when its instance fails mid-stream, continue it on another
        (:mod:`.continuation`) while the request allows it and the budget lasts; in
        slices of ``slice_`` tokens (SCLS), place each next slice anew.  The first part's
        entry and response are the caller's to release; continuations' are released
        here."""
        response = web.StreamResponse(status=200, headers={
            **SSE_HEADERS, INSTANCE_HEADER: entry.instance.name})
        await response.prepare(request)
        transcript: Transcript | None = None
        reason = None
        if self.config.max_continuations > 0 and not slice_:  # slices: checked already
            reason = refusal(info, entry.instance.tokenizer is not None)
        if reason is None and (self.config.max_continuations > 0 or slice_):
            transcript = Transcript(info.route == CHAT)
        sliced = None
        if slice_ and transcript is not None:
            sliced = Splice(transcript, 0, info.include_usage, None, slice_=True)
        relay = _Part(entry, upstream, sliced, info.model, slice_ or info.max_tokens)
        relay.first = True
        known_prompt = entry.prompt_tokens if job.exact_prompt else None
        failed: list[Instance] = []
        opened: list[_Part] = []
        try:
            while True:
                inst = relay.entry.instance
                failed_at = 0.0
                outcome: _Part | bytes | str
                try:
                    ending, events = await self._pump(request, response, relay, transcript)
                    if relay.splice is None or not relay.splice.slice_end:
                        break
                    # a slice ended: the policy places the next one
                    assert transcript is not None
                    why = "slice"
                    relay.upstream.close()
                    inst.release(relay.entry)
                    outcome = await self._continuation(
                        request, info, transcript, failed, headers, relay,
                        f"the next slice after instance {inst.name} could not be placed",
                        known_prompt, slice_, why)
                except (UpstreamError, HandOff) as exc:
                    failed_at = time.perf_counter()
                    why = "drain" if isinstance(exc, HandOff) else "failure"
                    if why == "failure":
                        self.metrics.stream_failures.labels(inst.name).inc()
                        log.warning("instance %s failed mid-stream: %s", inst.name, exc)
                        self.failed(inst, exc)
                    failed.append(inst)
                    relay.upstream.close()  # aborts the generation if it is still running
                    inst.release(relay.entry)
                    outcome = f"upstream instance {inst.name} failed mid-stream: {exc}"
                    if reason is not None:
                        outcome += f" (not continued: {reason})"
                    elif transcript is not None and \
                            len(failed) <= self.config.max_continuations:
                        outcome = await self._continuation(
                            request, info, transcript, failed, headers, relay, outcome,
                            known_prompt, slice_ or None, why)
                if isinstance(outcome, _Part):
                    relay = outcome
                    opened.append(relay)
                    relay.failed_at = failed_at
                    self.metrics.continuations.labels(inst.name, why).inc()
                    continue
                if isinstance(outcome, bytes):  # it had ended at the seam
                    await response.write_eof(outcome)
                    self._count(info.route, 200)
                    return response
                err = ApiError(502, outcome, "BadGatewayError")
                await response.write(b"data: " + err.body() + b"\n\ndata: [DONE]\n\n")
                self._count(info.route, 502)
                await response.write_eof()
                return response
        except door.SendTimeout as exc:  # the client stopped reading: let it go
            self.metrics.client_timeouts.labels("send").inc()
            log.info("closing a client connection: %s", exc)
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError(str(exc)) from None
        except (ConnectionResetError, asyncio.CancelledError):
            self.metrics.cancellations.inc()
            raise
        finally:
            for part in opened:
                part.upstream.close()
                part.entry.instance.release(part.entry)
        done = time.perf_counter()
        if opened:
            assert transcript is not None
            self._learn_continued(info, job, entry, transcript, relay, done)
        else:
            usage = parse_usage(ending)
            if usage.completion_tokens is not None:
                output = usage.completion_tokens
            else:  # token events, less a chat stream's first (role-only) events, per sequence
                first = info.sequences if info.route == CHAT else 0
                output = max(events - first, 0) // info.sequences
            self._learn(info, job, entry, usage, output, done)
        self._count(info.route, 200)
        await response.write_eof(relay.held)
        return response

    async def _pump(self, request: web.Request, response: web.StreamResponse, part: _Part,
                    transcript: Transcript | None) -> tuple[bytes, int]:
        """Relay one upstream stream to the client until its end; returns its last chunks
        and its token events.  The chunk ending in ``[DONE]`` is kept in ``part.held``
        (sent with the end of the body, one write).  Raises :class:`UpstreamError` when
        the stream breaks or, once it has started and could be continued, stalls past
        the stall timeout."""
        entry, upstream, splice = part.entry, part.upstream, part.splice
        inst = entry.instance
        tail: collections.deque[bytes] = collections.deque(maxlen=TAIL_CHUNKS)
        send_timeout = self.config.send_timeout
        timeout = self.config.read_timeout
        stall = self.config.stall_timeout if transcript is not None else 0.0
        write = door.write
        events = 0
        chunk = upstream.chunk
        try:
            while data := await chunk(timeout):
                now = time.perf_counter()
                if splice is not None:  # complete events only
                    data = splice.rewrite(data)
                    if not data:
                        continue
                elif transcript is not None and not data.endswith(EVENT_END):
                    # hold back a split event: were the stream continued, the client
                    # would otherwise get half of it, then the continuation's events
                    data = part.partial + data
                    cut = data.rfind(EVENT_END)
                    cut = cut + len(EVENT_END) if cut >= 0 else 0
                    part.partial = data[cut:]
                    data = data[:cut]
                    if not data:
                        continue
                elif part.partial:
                    data = part.partial + data
                    part.partial = b""
                if transcript is not None:
                    transcript.add(data)
                if part.held:
                    await write(request, response, part.held, send_timeout)
                    part.held = b""
                if data.endswith(DONE_EVENT):
                    part.held = data
                else:
                    await write(request, response, data, send_timeout)
                count = token_events(data)
                events += count
                if count > 0:
                    if not entry.first_token_at:
                        inst.first_token(entry, now)
                        count -= 1
                        if part.first and entry.slo_ttft > 0:
                            self._slo(entry)
                        if part.failed_at:
                            self.metrics.continuation_gap.observe(now - part.failed_at)
                        if stall > 0:
                            timeout = stall
                    if count and entry.observed:
                        inst.streamed(entry, now, count)
                tail.append(data)
                if transcript is not None and (inst.state != ACTIVE or inst.removed) and \
                        not part.held and self._hand_off(part, events):
                    raise HandOff(f"instance {inst.name} is {inst.state}")
        except UpstreamError:
            # after its [DONE] or the end of its slice, the part is whole
            if not part.held and not (splice is not None and splice.slice_end):
                raise
        ending = b"".join(tail)
        if splice is not None and splice.slice_end:
            return ending, events
        if not stream_complete(ending):
            raise UpstreamError("the stream ended without [DONE]")
        return ending, events

    def _hand_off(self, part: _Part, events: int) -> bool:
        """Whether a stream on a draining instance moves: when another instance takes new
        requests, unless it is predicted to end (or must end, by its budget) within
        ``--handoff-tokens``.  A stream already past its predicted length is expected to
        run on, so it moves.  Streams on an instance that auto-provisioning drains finish
        where they are."""
        within = self.config.handoff_tokens
        here = part.entry.instance
        if within <= 0 or (here.finish_in_place and not here.removed):
            return False
        if part.max_tokens is not None and part.max_tokens - events <= within:
            return False
        left = part.entry.predicted_tokens - events
        if 0 < left <= within:
            return False
        return any(c is not here and c.accepts_new() for c in self.view.candidates(part.model))

    async def _continuation(self, request: web.Request, info: RequestInfo,
                            transcript: Transcript, failed: list[Instance], headers: bytes,
                            broken: _Part, problem: str, prompt_tokens: int | None,
                            budget: int | None = None, reason: str = "failure"
                            ) -> _Part | bytes | str:
        """Continue ``info``'s stream after ``transcript`` on an instance not in
        ``failed`` (with at most ``budget`` more tokens: a slice): the open
        continuation, or the bytes that end a stream which needs none (its budget ran out
        at the seam, or its last event had come), or why it could not be continued."""
        text = transcript.text
        generated = transcript.tokens
        if broken.splice is not None and broken.splice.prompt_tokens is not None:
            prompt_tokens = broken.splice.prompt_tokens
        if transcript.finish is not None or (
                info.max_tokens is not None and generated >= info.max_tokens):
            tail = b"" if transcript.finish is not None else finish_event(transcript, "length")
            if info.include_usage:  # the proxy's count where the engine's never came
                if prompt_tokens is None:
                    before = broken.splice.before if broken.splice is not None else 0
                    prompt_tokens = max(broken.entry.prompt_tokens - before, 1)
                tail += usage_event(transcript, prompt_tokens)
            return tail + DONE_EVENT
        ids = None
        tok = broken.entry.instance.tokenizer
        if info.route != CHAT and tok is not None and \
                token_prompt(info.body["prompt"]) is not None:
            ids = await tok.encode(text, special=False)
        left = None if info.max_tokens is None else info.max_tokens - generated
        if budget is not None and left is not None and left <= budget:
            budget = None  # the last slice: it may end the stream
        raw = continuation_body(info, text, generated, ids, budget)
        try:
            cinfo = parse_request(info.route, raw)
        except ApiError as err:
            return f"{problem}; its continuation is invalid: {err.message}"
        pool = self._pool(info.model, failed)
        if not pool:
            return problem + " (no other instance to continue on)"
        job = await self._job(request, cinfo, pool)
        old = broken.entry.instance
        if reason == "slice" and job.blocks and old.spec.kv_events is None:
            # the engine keeps the slice's own blocks cached: staying is cheap, and priced
            old.prefix.insert(job.blocks)
        timeout = self.config.read_timeout
        for _ in range(self.config.max_retries + 1):
            if not pool:
                break
            entry = self.dispatcher.dispatch(pool, job)
            entry.observed = True
            inst = entry.instance
            pool.remove(inst)
            try:
                upstream = await self.upstream.open(inst.url + info.route, raw, headers,
                                                    timeout)
            except UpstreamError as exc:
                inst.release(entry)
                if not exc.local:
                    self.failed(inst, exc)
                if not exc.sent:
                    self.metrics.retries.labels(inst.name).inc()
                    continue
                return f"{problem}; its continuation on {inst.name} failed too: {exc}"
            except BaseException:
                inst.release(entry)
                raise
            self.answered(inst, upstream.status)
            if upstream.status != 200:
                try:
                    detail = (await upstream.read(timeout)).decode("utf-8", "replace")[:500]
                except UpstreamError as exc:
                    detail = str(exc)
                upstream.close()
                inst.release(entry)
                return (f"{problem}; its continuation on {inst.name} was refused "
                        f"(HTTP {upstream.status}): {detail}")
            if reason != "slice":
                log.info("continuing a stream on %s after %d tokens", inst.name, generated)
            splice = Splice(transcript, generated, info.include_usage, prompt_tokens,
                            slice_=budget is not None)
            return _Part(entry, upstream, splice, info.model, cinfo.max_tokens)
        return problem + " (no other instance could be reached to continue it)"

    def _learn_continued(self, info: RequestInfo, job: Job, entry: Entry,
                         transcript: Transcript, last: _Part, done: float) -> None:
        """A stream served in parts: its length is the request's (learned); its latency
        was no prediction's, so only the client's view (E2E, TTFT) is observed."""
        output = transcript.tokens
        prompt = last.splice.prompt_tokens if last.splice is not None else None
        self.describer.learn(info, entry.prompt_tokens, entry.predicted_tokens, prompt,
                             output, transcript.finish, job)
        self.metrics.e2e.observe(done - entry.dispatched_at)
        if entry.first_token_at:
            self.metrics.ttft.observe(entry.first_token_at - entry.dispatched_at)

    def _slo(self, entry: Entry) -> None:
        """Count a stream's first token against its model's TTFT objective, from its
        arrival (the time it was held included)."""
        ttft = entry.first_token_at - entry.dispatched_at + entry.held_s
        self.metrics.slo.labels("met" if ttft <= entry.slo_ttft else "missed").inc()

    def _learn(self, info: RequestInfo, job: Job, entry: Entry, usage: Usage, output: int,
               done: float) -> None:
        """Feed a completed request back: lengths, token ratio, latency and error metrics."""
        e2e = done - entry.dispatched_at
        m = self.metrics
        if log.isEnabledFor(logging.DEBUG):
            log.debug("done on %s: prompt %s~%d, output %d (predicted %d), ttft %.4f (predicted "
                      "%.4f), e2e %.4f (predicted %.4f)", entry.instance.name,
                      usage.prompt_tokens, entry.prompt_tokens, output, entry.predicted_tokens,
                      (entry.first_token_at or done) - entry.dispatched_at, entry.predicted_ttft,
                      e2e, entry.predicted_e2e)
        m.e2e.observe(e2e)
        self.describer.learn(info, entry.prompt_tokens, entry.predicted_tokens,
                             usage.prompt_tokens, output, usage.finish_reason, job)
        if math.isfinite(entry.predicted_e2e_high):
            (m.tail_within if e2e <= entry.predicted_e2e_high else m.tail_exceeded).inc()
        if output > 0:
            m.length_error.observe(abs(entry.predicted_tokens - output) / output)
        if math.isfinite(entry.predicted_e2e) and e2e > 0:
            rel = (entry.predicted_e2e - e2e) / e2e
            m.e2e_error.observe(abs(rel))
            m.e2e_bias.observe(rel)
        if entry.first_token_at:
            ttft = entry.first_token_at - entry.dispatched_at
            m.ttft.observe(ttft)
            if math.isfinite(entry.predicted_ttft) and ttft > 0:
                rel = (entry.predicted_ttft - ttft) / ttft
                m.ttft_error.observe(abs(rel))
                m.ttft_bias.observe(rel)
            if output > 1:
                m.itl.observe((done - entry.first_token_at) / (output - 1))
