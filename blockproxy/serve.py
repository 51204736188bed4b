"""Run the proxy: ``blockproxy --backends FILE`` (same as ``blockproxy serve --backends FILE``).

Every flag can also be set with an environment variable ``BLOCKPROXY_<FLAG>`` (dashes as
underscores, upper case); the defaults shown are the values in force.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from aiohttp import web

from blockproxy.backends import BackendsError, BackendsWatcher, load_backends
from blockproxy.config import ProxyConfig, add_config_arguments
from blockproxy.policies import policy_names
from blockproxy.profile import ProfileError, load_profile
from blockproxy.server import Proxy

log = logging.getLogger("blockproxy")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config = ProxyConfig.from_args(args)
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not config.backends:
        print("blockproxy: --backends FILE is required (or BLOCKPROXY_BACKENDS)",
              file=sys.stderr)
        return 2
    if config.policy not in policy_names():
        print(f"blockproxy: unknown policy {config.policy!r}; choose from "
              f"{', '.join(policy_names())}", file=sys.stderr)
        return 2
    try:
        load_profile(config.profile)
        proxy = Proxy(config, load_backends(config.backends))
        watcher = BackendsWatcher(config.backends, on_change=proxy.apply_backends,
                                  interval=config.reload_interval, logger=log)
    except (BackendsError, ProfileError, ValueError, OSError) as exc:
        print(f"blockproxy: {exc}", file=sys.stderr)
        return 2
    _install_uvloop()
    asyncio.run(serve(proxy, watcher))
    return 0


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(proxy: Proxy, watcher: BackendsWatcher) -> None:
    """Serve until SIGTERM/SIGINT, then drain: stop accepting, let streams finish."""
    config = proxy.config
    runner = web.AppRunner(proxy.make_app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(watcher.run()), asyncio.create_task(proxy.probe_loop()),
             asyncio.create_task(proxy.progress_loop())]
    if proxy.gossip is not None:
        await proxy.gossip.start()
        tasks.append(asyncio.create_task(proxy.gossip.run()))
    if proxy.scraper is not None:
        tasks.append(asyncio.create_task(proxy.scraper.run()))
    log.info("blockproxy listening on http://%s:%d (policy %s, %d instances)", config.host,
             config.port, config.policy, len(proxy.view.instances))
    print(f"blockproxy listening on http://{config.host}:{config.port}", flush=True)
    await stop.wait()
    log.info("shutting down: draining %d in-flight requests", proxy.in_flight)
    proxy.draining = True
    await site.stop()
    try:
        await asyncio.wait_for(proxy.idle.wait(), timeout=config.drain_timeout)
    except asyncio.TimeoutError:
        log.warning("drain timeout: %d requests still in flight", proxy.in_flight)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if proxy.gossip is not None:
        proxy.gossip.stop()
    await runner.cleanup()
