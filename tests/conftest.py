"""Shared fixtures.

``sim_impl`` runs a test against both simulator implementations (ids ``c`` and ``py``),
as propcache does; ``--no-c-extensions`` or ``BLOCKPROXY_NO_EXTENSIONS=1`` keeps only the
pure-Python twin.
"""

from __future__ import annotations

import os

import pytest

from blockproxy import simulator


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
