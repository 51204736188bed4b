"""Shared fixtures.

``emulated`` starts emulated vLLM instances (the real emulator app and engine) served in
the test's own event loop; ``instance_url`` is one, 20x faster than an H100.
``sim_impl`` runs a test against both simulator implementations (ids ``c`` and ``py``),
as propcache does; ``--no-c-extensions`` or ``BLOCKPROXY_NO_EXTENSIONS=1`` keeps only the
pure-Python twin.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp.test_utils import TestServer

from blockproxy import simulator
from loadgen import emulate
from loadgen.emulator.server import create_app


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--no-c-extensions", action="store_true", default=False,
                     help="test only the pure-Python simulator twin")


def _implementations(config: pytest.Config) -> list:
    impls = [pytest.param(simulator.InstanceModelPy, id="py")]
    no_ext = config.getoption("--no-c-extensions") or simulator.NO_EXTENSIONS
    if not no_ext:
        if simulator.InstanceModelC is None and os.environ.get("CI"):
            raise RuntimeError("the compiled simulator is not built")
        if simulator.InstanceModelC is not None:
            impls.insert(0, pytest.param(simulator.InstanceModelC, id="c"))
    return impls


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "sim_impl" in metafunc.fixturenames:
        metafunc.parametrize("sim_impl", _implementations(metafunc.config))


@pytest.fixture
async def emulated(aiohttp_server: Callable[..., Awaitable[TestServer]]
                   ) -> AsyncIterator[Callable[[float], Awaitable[str]]]:
    """Starts emulated vLLM instances (the real emulator app and engine) on loopback, each
    at the given time scale (0.05: 20x faster than the profile's GPU); returns its URL."""
    engines: list[asyncio.Task[None]] = []

    async def start(time_scale: float) -> str:
        parser = argparse.ArgumentParser()
        emulate.add_arguments(parser)
        args = parser.parse_args(["--time-scale", str(time_scale), "--stall-prob", "0",
                                  "--seed", "1"])
        inst = emulate.build_instances(args)[0]
        engines.append(asyncio.create_task(inst.engine.run()))
        server = await aiohttp_server(create_app(inst))
        return str(server.make_url("")).rstrip("/")

    yield start
    for engine in engines:
        engine.cancel()
    await asyncio.gather(*engines, return_exceptions=True)


@pytest.fixture
async def instance_url(emulated: Callable[[float], Awaitable[str]]) -> str:
    """One emulated vLLM instance, 20x faster than an H100."""
    return await emulated(0.05)
