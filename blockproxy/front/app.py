"""The proxy as an aiohttp application: its parts, its routes, its background loops.

:class:`Proxy` builds one of everything a proxy process has (cluster view, policy and
dispatcher, length predictor, upstream client, metrics, gossip, scraper, prober) from a
:class:`~blockproxy.config.ProxyConfig` and the backends list, and :meth:`Proxy.make_app`
wires them into routes.  The upstream client, gossip and the supervised background loops
start and stop with the application (``cleanup_ctx``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import resource
import time
from collections.abc import AsyncIterator

from aiohttp import web

from blockproxy.backends import BackendSpec, BackendsWatcher
from blockproxy.cluster.autoscale import Autoscaler
from blockproxy.cluster.prober import Prober
from blockproxy.cluster.scraper import Scraper
from blockproxy.cluster.view import ClusterView
from blockproxy.config import ProxyConfig
from blockproxy.front import door, paths
from blockproxy.front.endpoints import Endpoints
from blockproxy.front.gate import Gate
from blockproxy.front.generate import GenerateHandler
from blockproxy.front.listener import Listener, default_max_connections
from blockproxy.gossip.node import Gossiper, load_key, parse_origin
from blockproxy.metrics import Metrics
from blockproxy.request import CHAT, COMPLETIONS
from blockproxy.routing.describe import Describer
from blockproxy.routing.dispatch import Dispatcher
from blockproxy.routing.lengths import LengthModel, LengthPredictor
from blockproxy.routing.policies import make_policy, policy_class
from blockproxy.supervise import Supervisor
from blockproxy.upstream import Upstream
from blockproxy.upstream.kv_events import KVEventSubscriptions

log = logging.getLogger("blockproxy")

#: seconds between estimates of non-streaming requests' progress
PROGRESS_INTERVAL_S = 0.05
#: seconds between checks that every instance publishing KV events is subscribed to
KV_EVENTS_SYNC_S = 1.0
#: seconds a --scale-command may run before it is killed
SCALE_COMMAND_TIMEOUT_S = 60


def policy_options(config: ProxyConfig) -> dict[str, object]:
    """The configured values of the options the chosen policy takes."""
    return {name: getattr(config, name) for name in policy_class(config.policy).OPTIONS}


class Proxy:
    """Everything one proxy process has, and the application that serves it."""

    def __init__(self, config: ProxyConfig, specs: list[BackendSpec],
                 rng: random.Random | None = None,
                 watcher: BackendsWatcher | None = None) -> None:
        self.config = config
        self.rng = rng or random.Random()
        self.view = ClusterView(config.profile, config.past_prediction_tokens, config.calibrate,
                                config.speed, arrival_window=config.arrival_window,
                                future_arrivals=config.future_arrivals,
                                learn_overhead=config.learn_overhead,
                                slo_ttft_ms=config.slo_ttft_ms, slo_e2e_ms=config.slo_e2e_ms)
        self.view.apply(specs)
        self.metrics = Metrics(self.view)
        self.gate = Gate(self.metrics.in_flight, config.max_in_flight)
        #: the main port's connection guard (:func:`blockproxy.serve.listen` uses it)
        self.listener = Listener(
            config.max_connections or default_max_connections(
                resource.getrlimit(resource.RLIMIT_NOFILE)[0]),
            config.header_timeout, self.metrics.connections,
            self.metrics.rejected_connections, self.metrics.client_timeouts,
            config.send_buffer_bytes)
        self.upstream = Upstream(config.connect_timeout, config.read_timeout,
                                 config.max_upstream_connections)
        model = (LengthModel.load(config.length_model, warmup=config.length_warmup)
                 if config.length_model else LengthModel(warmup=config.length_warmup))
        self.predictor = LengthPredictor(quantile=config.length_quantile,
                                         default_tokens=config.default_output_tokens,
                                         model=model)
        policy = make_policy(config.policy, self.rng, **policy_options(config))
        model.learn_buckets = policy.USES_BUCKETS
        self.generate = GenerateHandler(config, self.view, Describer(
            self.predictor, tail_quantile=config.length_tail_quantile,
            buckets=policy.USES_BUCKETS, tail_every=config.length_tail_every),
                                        Dispatcher(policy, self.metrics), self.upstream,
                                        self.metrics, self.gate)
        self.gossip: Gossiper | None = None
        if config.gossip_bind:
            if not config.gossip_key_file and not config.gossip_insecure:
                raise ValueError("gossip needs a shared key: --gossip-key-file FILE (e.g. "
                                 "head -c 32 /dev/urandom | base64 > FILE); "
                                 "--gossip-insecure runs without one, for tests only")
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
        self.kv_events = KVEventSubscriptions(self.view, self.metrics.registry)
        self.endpoints = Endpoints(self.view, self.gate, self.metrics, self.upstream,
                                   self.generate, self.predictor, self.rng, self.gossip,
                                   self.scraper)
        self.autoscaler: Autoscaler | None = None
        if config.autoscale != "off":
            self.autoscaler = Autoscaler(
                self.view, mode=config.autoscale, signal=config.autoscale_signal,
                horizon=config.arrival_window, down_margin=config.scale_down_margin,
                down_after=config.scale_down_after, up_cooldown=config.scale_up_cooldown,
                down_step=config.scale_down_step,
                min_instances=config.min_instances, queue_target=config.scale_queue_target,
                headroom=config.scale_headroom)
            self.metrics.add_autoscaler(self.autoscaler)
            self.generate.autoscaler = self.autoscaler
        self._desired: dict[str, int] = {}
        self._scale_commands: set[asyncio.Task[None]] = set()
        self.supervisor = Supervisor(self.metrics.task_restarts)
        self.endpoints.supervisor = self.supervisor
        self._add_loops(watcher)

    def _add_loops(self, watcher: BackendsWatcher | None) -> None:
        sup = self.supervisor
        if watcher is not None:
            watcher.on_change = self.apply_backends
            sup.loop("reload", watcher.run)
        sup.every("probe", min(self.config.probe_interval, 1.0),
                  Prober(self.view, self.upstream).check_once)
        sup.every("progress", PROGRESS_INTERVAL_S, self.view.estimate_progress)
        if self.scraper is not None:
            sup.every("scrape", self.scraper.interval, self.scraper.scrape_once)
        if self.gossip is not None:
            sup.loop("gossip", self.gossip.run)
        sup.every("kv_events", KV_EVENTS_SYNC_S, self.kv_events.sync)
        if self.autoscaler is not None:
            sup.every("autoscale", self.config.autoscale_interval, self.autoscale_once)

    def autoscale_once(self) -> None:
        """One auto-provisioning decision per model: apply it, count it, and run the
        scale command for every model whose desired count changed."""
        assert self.autoscaler is not None
        for model, action, inst in self.autoscaler.evaluate(time.perf_counter()):
            log.info("autoscale %s: %s %s", model, action, inst.name)
            self.metrics.scale_actions.labels(model, action).inc()
        for model, m in self.autoscaler.models.items():
            if not m.report or self._desired.get(model) == m.desired:
                continue
            self._desired[model] = m.desired
            if self.config.scale_command:
                task = asyncio.get_running_loop().create_task(self._run_scale_command(
                    model, m.desired, len(m.report["active"])))
                self._scale_commands.add(task)
                task.add_done_callback(self._scale_commands.discard)

    async def _run_scale_command(self, model: str, desired: int, active: int) -> None:
        env = {**os.environ, "BLOCKPROXY_MODEL": model,
               "BLOCKPROXY_DESIRED_INSTANCES": str(desired),
               "BLOCKPROXY_ACTIVE_INSTANCES": str(active)}
        proc = await asyncio.create_subprocess_shell(
            self.config.scale_command, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), SCALE_COMMAND_TIMEOUT_S)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            log.warning("scale command for %s timed out after %d s", model,
                        SCALE_COMMAND_TIMEOUT_S)
            return
        if proc.returncode:
            log.warning("scale command for %s exited %d: %s", model, proc.returncode,
                        err.decode("utf-8", "replace")[-500:])

    def apply_backends(self, specs: list[BackendSpec]) -> None:
        """Hot reload: make the view match a new backends list."""
        added, removed, changed = self.view.apply(specs)
        if added or removed or changed:
            log.info("backends reloaded: added %s, removed %s, changed %s",
                     added, removed, changed)

    def make_app(self) -> web.Application:
        """The main port's application: generation, vLLM's pass-through paths, models,
        probes, and (without ``--admin-port``) metrics and the debug view."""
        app = self._base_app(self.config.max_body_bytes)
        ep = self.endpoints
        app.router.add_post(COMPLETIONS, self.generate.handle)
        app.router.add_post(CHAT, self.generate.handle)
        app.router.add_get("/v1/models", ep.models)
        for path in paths.PASS_THROUGH:
            app.router.add_post(path, ep.pass_through(path))
        self._add_probes(app, admin=not self.config.admin_port)
        app.cleanup_ctx.append(self._running)
        return app

    def make_admin_app(self) -> web.Application:
        """The admin port's application (``--admin-port``): metrics, debug view, probes."""
        app = self._base_app(1024)
        self._add_probes(app, admin=True)
        return app

    def _base_app(self, max_body: int) -> web.Application:
        keys = tuple(k.strip() for k in self.config.api_key.split(",") if k.strip())
        app = web.Application(client_max_size=max_body, middlewares=[
            door.make_middleware(self.listener, keys, self.metrics)])
        app.on_response_prepare.append(door.make_prepare_hook(lambda: self.gate.leaving))
        return app

    def _add_probes(self, app: web.Application, admin: bool) -> None:
        ep = self.endpoints
        app.router.add_get("/health", ep.health)
        app.router.add_get("/ready", ep.ready)
        if admin:
            app.router.add_get("/metrics", ep.prometheus)
            app.router.add_get("/debug/cluster", ep.debug_cluster)
            app.router.add_get("/autoscale", self.autoscale_report)
        app.router.add_route("*", "/{tail:.*}", ep.not_found)  # last: what nothing matched

    async def autoscale_report(self, request: web.Request) -> web.Response:
        """``/autoscale``: the desired instances per model and the reasoning."""
        if self.autoscaler is None:
            body: dict[str, object] = {"mode": "off", "models": {}}
        else:
            body = self.autoscaler.describe()
        return web.json_response(body)

    async def _running(self, app: web.Application) -> AsyncIterator[None]:
        """Start gossip and the loops; stop them and close the upstream client at cleanup
        (it connects on first use)."""
        if self.gossip is not None:
            await self.gossip.start()
        self.supervisor.start()
        self.kv_events.sync()  # before the first tick: events from the start
        yield
        await self.supervisor.stop()
        for task in list(self._scale_commands):
            task.cancel()
        await self.kv_events.close()
        if self.gossip is not None:
            self.gossip.stop()
        await self.upstream.close()
