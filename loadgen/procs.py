"""Processes on loopback: free ports, start a command by PID, wait for health, stop.

The one process helper of the project: :mod:`loadgen.cluster`, blockproxy's benchmarks
and the tests all start their emulators and proxies through it.

How cleanup is guaranteed:

* every child runs in its own session, so a Ctrl-C typed at the terminal reaches only the
  parent, which then stops its children in order (rather than every process dying at
  once, mid-request);
* :meth:`ChildProcess.stop` sends SIGTERM to the PID it started, waits, then SIGKILLs it;
* a module-level registry stops whatever is still running at interpreter exit;
* on Linux each child also gets ``PR_SET_PDEATHSIG`` = SIGTERM, so even a SIGKILLed parent
  leaves no emulator or proxy behind.

Children run the *installed* console scripts (:func:`command`), never the source tree in
the working directory: ``python -m blockproxy`` run from a checkout's root would import
the uninstalled ``blockproxy/`` folder there instead of the installed package.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import inspect
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import aiohttp

HOST = "127.0.0.1"
#: seconds between SIGTERM and SIGKILL
STOP_TIMEOUT_S = 5.0
#: seconds to wait for ``/health`` after a start
START_TIMEOUT_S = 30.0

_live: set[ChildProcess] = set()
_Child = TypeVar("_Child", bound="ChildProcess")


# ---- ports ------------------------------------------------------------------------------------
def free_port_range(count: int, attempts: int = 100) -> int:
    """A base port P such that P .. P+count-1 can be bound on 127.0.0.1 right now."""
    for _ in range(attempts):
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            base = probe.getsockname()[1]
        if base + count > 65535:
            continue
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind((HOST, port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return base
    raise RuntimeError(f"no {count} consecutive free ports on {HOST}")


def free_ports(count: int, kind: int = socket.SOCK_STREAM) -> list[int]:
    """``count`` ports (TCP, or UDP with ``socket.SOCK_DGRAM``) free on 127.0.0.1 now."""
    socks = [socket.socket(socket.AF_INET, kind) for _ in range(count)]
    try:
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_udp_ports(count: int) -> list[int]:
    """``count`` UDP ports free on 127.0.0.1 right now (for gossip)."""
    return free_ports(count, socket.SOCK_DGRAM)


# ---- commands and children --------------------------------------------------------------------
def command(script: str) -> list[str]:
    """The argv that runs the installed console script ``script`` (``blockproxy``,
    ``loadgen``) of this interpreter's environment; ``python -m`` as a fallback, with the
    working directory kept off ``sys.path`` (``PYTHONSAFEPATH``, see :func:`child_env`)."""
    path = Path(sysconfig.get_path("scripts")) / script
    if path.is_file() and os.access(path, os.X_OK):
        return [str(path)]
    return [sys.executable, "-m", "loadgen.cli" if script == "loadgen" else script]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONSAFEPATH"] = "1"
    env.update(extra or {})
    return env


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: SIGTERM when the parent thread dies.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class ChildProcess:
    """One child process with its output in a log file, stopped by PID."""

    def __init__(self, args: Sequence[str], name: str, log_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.args = list(args)
        self.name = name
        self.log_path = Path(log_dir) / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed by stop())
        self.popen = subprocess.Popen(
            self.args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, env=child_env(env),
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        _live.add(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the child if it still runs."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; returns the exit status."""
        try:
            if self.popen.poll() is None:
                self.popen.send_signal(signal.SIGTERM)
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(timeout)
        finally:
            _live.discard(self)
            self._log.close()
        return self.popen.returncode

    def output(self) -> str:
        """Everything the child wrote so far."""
        if not self._log.closed:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 2000) -> str:
        return self.output()[-chars:]

    def __enter__(self: _Child) -> _Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@atexit.register
def stop_all() -> None:
    """Stop every child still running (the backstop behind each owner's ``finally``)."""
    for child in list(_live):
        child.stop()


# ---- CPU accounting ---------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return text[text.rindex(")") + 2:].split()


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (nginx's workers, a server's engine core)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, []))
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` and all their descendants (Linux
    ``/proc``; processes that already exited count no more)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for root in pids:
        for pid in descendants(root):
            fields = _stat_fields(pid)
            if fields is not None:
                total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


# ---- waiting ----------------------------------------------------------------------------------
def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET ``url`` (blocking): status and body, also for HTTP errors."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _check_running(children: Sequence[ChildProcess]) -> None:
    for child in children:
        if not child.running():
            raise RuntimeError(f"{child.name} exited with {child.popen.returncode}:\n"
                               f"{child.log_tail()}")


async def wait_healthy(urls: Sequence[str], children: Sequence[ChildProcess],
                       timeout: float = START_TIMEOUT_S) -> None:
    """Return when every ``url/health`` answers 200; raise if a child exits or time runs out."""
    deadline = time.monotonic() + timeout
    pending = list(urls)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as session:
        while pending:
            _check_running(children)
            url = pending[0]
            try:
                async with session.get(url + "/health") as resp:
                    if resp.status == 200:
                        pending.pop(0)
                        continue
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not healthy after {timeout:.0f} s")
            await asyncio.sleep(0.05)


def wait_healthy_blocking(urls: Sequence[str], children: Sequence[ChildProcess],
                          timeout: float = START_TIMEOUT_S) -> None:
    """:func:`wait_healthy` for callers without an event loop."""
    deadline = time.monotonic() + timeout
    for url in urls:
        while True:
            _check_running(children)
            try:
                if http_get(url + "/health", timeout=1.0)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not healthy after {timeout:.0f} s")
            time.sleep(0.05)


async def wait_for(predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0,
                   interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true; False if it still is not after ``timeout``.

    A plain predicate runs in a thread, so one that blocks (an HTTP scrape) does not stall
    the streams the caller's event loop is reading; an async one is awaited.  A predicate
    that raises ``OSError`` (a scrape that timed out under load) counts as not yet true.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if asyncio.iscoroutinefunction(predicate):
                result = await predicate()
            else:
                result = await asyncio.to_thread(predicate)
                if inspect.isawaitable(result):
                    result = await result
        except OSError:
            result = False
        if result:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)
