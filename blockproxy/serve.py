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
from blockproxy.front.listener import raise_fd_limit
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
    raise_fd_limit()
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


#: the access log: combined log format, then request time (s) and the request id
ACCESS_LOG_FORMAT = ('%a - - %t "%r" %s %b "%{Referer}i" "%{User-Agent}i" %Tf '
                     '%{X-Request-Id}o')


def access_logger(target: str) -> logging.Logger | None:
    """The access log's logger, writing bare lines to ``target`` ('-': stdout)."""
    if not target:
        return None
    logger = logging.getLogger("blockproxy.access")
    logger.propagate = False
    handler: logging.Handler = (logging.StreamHandler(sys.stdout) if target == "-"
                                else logging.FileHandler(target))
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return logger


async def listen(proxy: Proxy, runner: web.BaseRunner, host: str, port: int
                 ) -> asyncio.Server:
    """The main listening socket, each connection guarded by ``proxy.listener``."""
    assert runner.server is not None
    return await asyncio.get_running_loop().create_server(
        proxy.listener.factory(runner.server), host, port, reuse_address=True, backlog=1024)


async def serve(proxy: Proxy) -> None:
    """Serve until SIGTERM/SIGINT, then leave: announce it (``/ready`` 503, ``Connection:
    close``) while still serving for the grace period (SIGINT or a second signal skips
    it), stop accepting, and let the requests inside finish."""
    config = proxy.config
    runner = web.AppRunner(proxy.make_app(), handler_cancellation=True,
                           access_log=access_logger(config.access_log),
                           access_log_format=ACCESS_LOG_FORMAT,
                           keepalive_timeout=config.keepalive_timeout)
    await runner.setup()  # starts the upstream client, gossip and the background loops
    server = await listen(proxy, runner, config.host, config.port)
    admin: web.AppRunner | None = None
    if config.admin_port:
        admin = web.AppRunner(proxy.make_admin_app(), access_log=None)
        await admin.setup()
        await web.TCPSite(admin, config.host, config.admin_port, reuse_address=True).start()
    # Everything built so far (modules, profiles, the cluster view) lives as long as the
    # process: out of the collector's sight, so a full collection, which a request body of
    # many objects can trigger, does not walk it while streams wait.
    gc.freeze()
    signals: asyncio.Queue[int] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    log.info("blockproxy listening on http://%s:%d (policy %s, %d instances, at most %d "
             "connections)", config.host, config.port, config.policy,
             len(proxy.view.instances), proxy.listener.max_connections)
    print(f"blockproxy listening on http://{config.host}:{config.port}", flush=True)
    first = await signals.get()
    proxy.gate.announce()
    if first == signal.SIGTERM and config.drain_grace > 0:
        log.info("leaving: /ready answers 503; still serving for %g s", config.drain_grace)
        try:
            await asyncio.wait_for(signals.get(), config.drain_grace)
        except asyncio.TimeoutError:
            pass
    server.close()
    proxy.gate.close()
    log.info("draining: %d requests in flight", proxy.gate.in_flight)
    if not await proxy.gate.wait_idle(config.drain_timeout):
        log.warning("drain timeout: %d requests still in flight", proxy.gate.in_flight)
    if admin is not None:
        await admin.cleanup()
    await runner.cleanup()  # stops the loops and gossip (BYE), closes the upstream client
