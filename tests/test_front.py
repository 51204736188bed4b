"""The HTTP front in process (aiohttp's pytest plugin), in front of a real emulated instance
served in the same event loop: a failure here points at a handler, not at a process."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from blockproxy.backends import BackendSpec
from blockproxy.config import ProxyConfig
from blockproxy.front.app import Proxy
from loadgen import promtext

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def proxy(instance_url: str) -> Proxy:
    config = ProxyConfig(backends="(in process)", scrape_interval=0.0, max_body_bytes=4096)
    return Proxy(config, [BackendSpec(url=instance_url, name="i0", models=("tiny",))])


@pytest.fixture
async def client(proxy: Proxy, aiohttp_client: Callable[..., Awaitable[Client]]) -> Client:
    return await aiohttp_client(proxy.make_app())


async def _error(resp: Any) -> dict[str, Any]:
    body = await resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == resp.status
    return body["error"]


async def test_stream_is_relayed_counted_and_released(client: Client, proxy: Proxy) -> None:
    body = {"model": "tiny", "prompt": "hello " * 20, "max_tokens": 12, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    resp = await client.post("/v1/completions", json=body)
    assert resp.status == 200 and resp.headers["X-Accel-Buffering"] == "no"
    text = await resp.text()
    assert text.count('"text"') == 12 and text.endswith("data: [DONE]\n\n")
    inst = proxy.view.instances["i0"]
    assert inst.active == 0  # released at the end
    metrics = await (await client.get("/metrics")).text()
    assert promtext.find(metrics, "blockproxy_requests_total", route="/v1/completions",
                         status="200") == 1
    assert promtext.find(metrics, "blockproxy_output_length_abs_relative_error_count") == 1
    stats = proxy.predictor.stats()
    assert stats["observations"] == 1


async def test_unary_chat_is_learned(client: Client, proxy: Proxy) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi there"}],
            "max_tokens": 5, "ignore_eos": True}
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200
    assert (await resp.json())["usage"]["completion_tokens"] == 5
    stats = proxy.predictor.stats()
    assert stats["observations"] == 1


@pytest.mark.parametrize(("headers", "data", "status"), [
    ({"Content-Type": "application/json"}, b"{not json", 400),
    ({"Content-Type": "application/json"}, b'{"model": "nope", "prompt": "x"}', 404),
    ({"Content-Type": "text/plain"}, b'{"model": "tiny", "prompt": "x"}', 415),
    ({"Content-Type": "application/json"}, b'{"model": "tiny", "prompt": "' + b"x" * 5000
     + b'"}', 413),
])
async def test_bad_input_gets_openai_errors(client: Client, headers: dict[str, str],
                                            data: bytes, status: int) -> None:
    resp = await client.post("/v1/completions", data=data, headers=headers)
    assert resp.status == status
    await _error(resp)


async def test_ready_and_draining(client: Client, proxy: Proxy) -> None:
    assert (await client.get("/ready")).status == 200
    proxy.gate.close()
    assert (await client.get("/ready")).status == 503
    resp = await client.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert resp.status == 503
    assert (await _error(resp))["type"] == "ServiceUnavailableError"


async def test_debug_view_and_models(client: Client) -> None:
    view = await (await client.get("/debug/cluster")).json()
    (inst,) = view["instances"]
    assert inst["name"] == "i0" and inst["active_requests"] == 0
    assert inst["by_origin"] == {} and inst["predicted_queue_delay_s"] >= 0
    models = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]


async def test_background_loops_run_with_the_app(client: Client, proxy: Proxy) -> None:
    assert set(proxy.supervisor.tasks) == {"probe", "progress", "kv_events", "autoscale"}
    assert all(not t.done() for t in proxy.supervisor.tasks.values())


def test_a_mistyped_policy_option_is_an_error() -> None:
    from blockproxy.routing.policies import make_policy

    with pytest.raises(ValueError, match="no option tie_tolerence"):
        make_policy("block", tie_tolerence=0.1)
    with pytest.raises(ValueError, match="no option sample_k"):
        make_policy("round_robin", sample_k=2)

