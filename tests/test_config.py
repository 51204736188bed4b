"""Flags, environment variables and defaults of ``blockproxy serve``."""

from __future__ import annotations

import argparse

import pytest

from blockproxy.config import ProxyConfig, add_config_arguments


def parse(argv: list[str]) -> ProxyConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return ProxyConfig.from_args(parser.parse_args(argv))


def test_defaults():
    config = parse([])
    assert config == ProxyConfig()
    assert config.policy == "block" and config.port == 8000


def test_environment_then_flag_precedence(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("BLOCKPROXY_PORT", "9100")
    monkeypatch.setenv("BLOCKPROXY_POLICY", "round_robin")
    monkeypatch.setenv("BLOCKPROXY_CALIBRATE", "false")
    config = parse(["--policy", "llumnix"])
    assert config.port == 9100 and config.policy == "llumnix" and config.calibrate is False


def test_bad_environment_value_is_an_error(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("BLOCKPROXY_PORT", "eighty")
    with pytest.raises(SystemExit):
        parse([])
