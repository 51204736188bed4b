"""Run the proxy: ``blockproxy --backends FILE`` (same as ``blockproxy serve --backends FILE``).

Every flag can also be set with an environment variable ``BLOCKPROXY_<FLAG>`` (dashes as
underscores, upper case); the defaults shown are the values in force.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys

from aiohttp import web

from blockproxy.backends import BackendsError, BackendsWatcher
from blockproxy.config import ProxyConfig, add_config_arguments
from blockproxy.front.app import Proxy
from blockproxy.profile import ProfileError, load_profile
from blockproxy.routing.policies import policy_names

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
        # The file is read once, here; the watcher then applies every later change.
        watcher = BackendsWatcher(config.backends, interval=config.reload_interval, logger=log)
        proxy = Proxy(config, watcher.current, watcher=watcher)
    except (BackendsError, ProfileError, ValueError, OSError) as exc:
        print(f"blockproxy: {exc}", file=sys.stderr)
        return 2
    _install_uvloop()
    asyncio.run(serve(proxy))
    return 0


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(proxy: Proxy) -> None:
    """Serve until SIGTERM/SIGINT, then drain: stop accepting, let streams finish."""
    config = proxy.config
    runner = web.AppRunner(proxy.make_app(), handler_cancellation=True, access_log=None)
    await runner.setup()  # starts the upstream client, gossip and the background loops
    site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
    await site.start()
    # Everything built so far (modules, profiles, the cluster view) lives as long as the
    # process: out of the collector's sight, so a full collection, which a request body of
    # many objects can trigger, does not walk it while streams wait.
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("blockproxy listening on http://%s:%d (policy %s, %d instances)", config.host,
             config.port, config.policy, len(proxy.view.instances))
    print(f"blockproxy listening on http://{config.host}:{config.port}", flush=True)
    await stop.wait()
    log.info("shutting down: draining %d in-flight requests", proxy.gate.in_flight)
    proxy.gate.close()
    await site.stop()
    if not await proxy.gate.wait_idle(config.drain_timeout):
        log.warning("drain timeout: %d requests still in flight", proxy.gate.in_flight)
    await runner.cleanup()  # stops the loops and gossip (BYE), closes the upstream client
