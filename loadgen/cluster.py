"""Start and stop an emulated vLLM cluster and blockproxy processes, cleanup guaranteed.

:class:`EmulatedCluster` runs ``loadgen emulate``; :class:`ProxyProcess` runs ``blockproxy
serve`` in front of it.  Both are async context managers (``start()`` waits for every
``/health``; ``stop()`` is synchronous so it also works from ``finally`` and ``atexit``).
Their processes are :class:`~loadgen.procs.ChildProcess` es, stopped by PID (see
:mod:`loadgen.procs` for how cleanup is guaranteed).

One emulator process sustains about 6 busy instances at time-scale 1 before its step
timing drifts, so a cluster is split over ``ceil(N / instances_per_process)`` processes
(default 6 instances each) on one range of consecutive ports; a larger time-scale (slower
emulated GPU) keeps a busy cluster faithful on a small machine.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from loadgen.peers import Peer
from loadgen.procs import (
    HOST,
    ChildProcess,
    command,
    free_port_range,
    free_ports,
    wait_for,
    wait_healthy,
)
from loadgen.tokenizer import write_tokenizer

_M = TypeVar("_M", bound="_Managed")
#: seconds a peer router may take to list every worker once it answers
START_TIMEOUT_S = 60.0
#: tries with fresh ports when a child dies at start (another process took a port)
START_ATTEMPTS = 3
#: emulator flags that change an engine limit; the proxy is told the same value
_LIMIT_FLAGS = ("max-num-seqs", "max-num-batched-tokens", "num-gpu-blocks", "block-size",
                "max-model-len")


class _Managed:
    """Shared start/stop plumbing: children, a temp dir for logs, context managers."""

    kind = "process"

    def __init__(self, log_dir: str | Path | None) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if log_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"loadgen-{self.kind}-")
            log_dir = self._tmp.name
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children: list[ChildProcess] = []
        self.urls: list[str] = []

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self.children]

    def _launch(self) -> tuple[list[ChildProcess], list[str]]:
        raise NotImplementedError

    async def start(self) -> None:
        """Start the processes and wait until every URL is healthy."""
        for attempt in range(START_ATTEMPTS):
            self.children, self.urls = [], []
            try:
                self.children, self.urls = self._launch()
                await wait_healthy(self.urls, self.children)
                return
            except RuntimeError as exc:
                # A child that lost a port race to another process is retried on new
                # ports; any other early exit (bad flags, bad profile) is final.
                self.stop(keep_logs=True)
                if attempt == START_ATTEMPTS - 1 or "in use" not in str(exc).lower():
                    raise
            except BaseException:
                self.stop()
                raise

    def stop(self, keep_logs: bool = False) -> None:
        """Stop every child (SIGTERM, then SIGKILL); safe to call twice."""
        children, self.children = self.children, []
        for child in children:
            child.stop()
        if self._tmp is not None and not keep_logs:
            self._tmp.cleanup()
            self._tmp = None

    async def __aenter__(self: _M) -> _M:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()


class EmulatedCluster(_Managed):
    """N emulated vLLM instances (``loadgen emulate``) on consecutive free ports."""

    kind = "emulator"

    def __init__(self, instances: int, *, profile: str | Sequence[str],
                 time_scale: float = 1.0, speed_factors: Sequence[float] | None = None,
                 seed: int = 0, extra_args: Sequence[str] = (),
                 instances_per_process: int = 6, kv_events: bool = False,
                 hide_profiles: bool = False, log_dir: str | Path | None = None) -> None:
        if instances < 1 or instances_per_process < 1:
            raise ValueError("instances and instances_per_process must be at least 1")
        if speed_factors and len(speed_factors) not in (1, instances):
            raise ValueError(f"{len(speed_factors)} speed factors for {instances} instances")
        super().__init__(log_dir)
        self.instances = instances
        #: the profile of each instance (what its GPU is)
        self.profiles = instance_profiles(profile, instances)
        self.profile = self.profiles[0]
        self.time_scale = time_scale
        self.speed_factors = list(speed_factors or [1.0])
        self.seed = seed
        self.extra_args = list(extra_args)
        self.instances_per_process = instances_per_process
        #: publish KV events (``--kv-events-port``) and describe the word tokenizer
        self.kv_events = kv_events
        #: the backends file names no profile (the proxy's calibration has to find out)
        self.hide_profiles = hide_profiles
        self.event_urls: list[str] = []

    def _groups(self) -> list[tuple[int, int]]:
        """(first, count) of each emulator process: consecutive instances with the same
        profile, at most ``instances_per_process`` of them."""
        groups: list[tuple[int, int]] = []
        first = 0
        while first < self.instances:
            count = 1
            while (first + count < self.instances and count < self.instances_per_process
                   and self.profiles[first + count] == self.profiles[first]):
                count += 1
            groups.append((first, count))
            first += count
        return groups

    def _launch(self) -> tuple[list[ChildProcess], list[str]]:
        # One range for both: the event ports follow the HTTP ports.
        base = free_port_range(self.instances * (2 if self.kv_events else 1))
        events = base + self.instances
        self.event_urls = [f"tcp://{HOST}:{events + i}" for i in range(self.instances)] \
            if self.kv_events else []
        if self.kv_events:
            write_tokenizer(self.log_dir / "tokenizer")
        children: list[ChildProcess] = []
        try:
            for k, (first, count) in enumerate(self._groups()):
                factors = (self.speed_factors if len(self.speed_factors) == 1
                           else self.speed_factors[first:first + count])
                # Process k > 0 gets another seed so its engines' noise differs from
                # process 0's (the emulator seeds instance i with a function of seed, i).
                args = [*command("loadgen"), "emulate",
                        "--instances", str(count), "--base-port", str(base + first),
                        "--host", HOST, "--profile", self.profiles[first],
                        "--time-scale", repr(self.time_scale),
                        "--speed-factors", ",".join(repr(f) for f in factors),
                        "--seed", str(self.seed + 1000 * k), *self.extra_args]
                if self.kv_events:
                    args += ["--kv-events-port", str(events + first)]
                children.append(ChildProcess(args, f"emulator-{base + first}", self.log_dir))
        except BaseException:
            for child in children:
                child.stop()
            raise
        return children, [f"http://{HOST}:{base + i}" for i in range(self.instances)]

    def backend_entries(self) -> list[dict[str, Any]]:
        """Backends-file entries for the running instances (limits overridden by the
        emulator flags are passed on, as an operator would configure them)."""
        limits = engine_limits_from_args(self.extra_args)
        entries: list[dict[str, Any]] = [{"url": url, "name": f"i{i}", **limits}
                                         for i, url in enumerate(self.urls)]
        if not self.hide_profiles:
            for entry, profile in zip(entries, self.profiles):
                entry["profile"] = profile
        if self.kv_events:
            for entry, events in zip(entries, self.event_urls):
                entry.update(kv_events=events, tokenizer=str(self.log_dir / "tokenizer"))
        return entries


def instance_profiles(spec: str | Sequence[str], instances: int) -> list[str]:
    """The profile of each of ``instances``: one name for all, or a list (a string is split
    at commas) whose items may repeat as ``NAME*COUNT``, summing to ``instances``:
    ``llama-3.1-8b-h100-tp1*4,llama-3.1-8b-a100-80gb-tp1*4``."""
    items = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        name, _, count = item.rpartition("*") if "*" in item else (item, "", "1")
        try:
            n = int(count)
        except ValueError:
            raise ValueError(f"bad profile count in {item!r} (NAME*COUNT)") from None
        if not name or n < 1:
            raise ValueError(f"bad profile item {item!r} (NAME or NAME*COUNT)")
        out += [name] * n
    if len(out) == 1:
        return out * instances
    if len(out) != instances:
        raise ValueError(f"{len(out)} profiles for {instances} instances")
    return out


def engine_limits_from_args(args: Sequence[str]) -> dict[str, int]:
    """Backends-file fields for ``--max-num-seqs N`` style emulator flags in ``args``."""
    out: dict[str, int] = {}
    items = list(args)
    for i, item in enumerate(items):
        flag, eq, value = item.partition("=")
        name = flag.removeprefix("--")
        if name in _LIMIT_FLAGS:
            if not eq:
                value = items[i + 1] if i + 1 < len(items) else ""
            try:
                out[name.replace("-", "_")] = int(value)
            except ValueError:
                raise ValueError(f"emulator flag {flag} needs an integer: {value!r}") from None
    return out


class ProxyProcess(_Managed):
    """``blockproxy serve`` with a temporary backends file, on a free (or given) port."""

    kind = "proxy"

    def __init__(self, backends: Sequence[str | dict[str, Any]], policy: str = "block",
                 extra_args: Sequence[str] = (), port: int | None = None,
                 profile: str | None = None, log_dir: str | Path | None = None) -> None:
        super().__init__(log_dir)
        self.entries = [b if isinstance(b, dict) else {"url": b, "name": f"i{i}"}
                        for i, b in enumerate(backends)]
        self.policy = policy
        self.extra_args = list(extra_args)
        self.port = port
        self.profile = profile
        self.url = ""

    def _launch(self) -> tuple[list[ChildProcess], list[str]]:
        port = self.port or free_port_range(1)
        backends = self.log_dir / "backends.yaml"
        backends.write_text(json.dumps({"backends": self.entries}))  # JSON is valid YAML
        # (a run's end is no deployment's: the proxy need not wait for load balancers)
        args = [*command("blockproxy"), "serve", "--backends", str(backends),
                "--host", HOST, "--port", str(port), "--policy", self.policy,
                "--drain-grace", "0"]
        if self.profile:
            args += ["--profile", self.profile]
        child = ChildProcess([*args, *self.extra_args], f"proxy-{port}", self.log_dir)
        self.url = f"http://{HOST}:{port}"
        return [child], [self.url]

    async def get_text(self, path: str) -> str:
        """GET a path of the proxy (``/metrics``, ``/debug/cluster``) as text."""
        return (await get_texts([self.url + path]))[0]


class PeerProcess(_Managed):
    """A peer router (:mod:`loadgen.peers`) in front of ``workers``, on a free port."""

    kind = "peer"

    def __init__(self, peer: Peer, policy: str, workers: Sequence[str],
                 log_dir: str | Path | None = None, extra_args: Sequence[str] = ()) -> None:
        super().__init__(log_dir)
        self.peer, self.policy = peer, policy
        self.workers = list(workers)
        self.extra_args = list(extra_args)
        self.url = ""
        self.version = peer.version()

    def _launch(self) -> tuple[list[ChildProcess], list[str]]:
        (port,) = free_ports(1)
        name = f"{self.peer.name}-{port}"
        workdir = self.log_dir / name
        workdir.mkdir(parents=True, exist_ok=True)
        argv = self.peer.argv(self.policy, self.workers, port, workdir, self.extra_args)
        self.url = f"http://{HOST}:{port}"
        return [ChildProcess(argv, name, self.log_dir)], [self.url]

    async def start(self) -> None:
        """Start, wait for ``/health``, then until the router lists every worker (it may
        answer before it has registered them all)."""
        await super().start()
        try:
            if not await wait_for(lambda: self.peer.workers_ready(self.url, self.workers),
                                  START_TIMEOUT_S):
                raise TimeoutError(f"{self.peer.name} never listed all {len(self.workers)} "
                                   f"workers:\n{self.children[0].log_tail()}")
        except BaseException:
            self.stop()
            raise


async def get_texts(urls: Sequence[str]) -> list[str]:
    """GET each URL (a started process's ``/metrics`` and such) as text."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        out = []
        for url in urls:
            async with s.get(url) as resp:
                resp.raise_for_status()
                out.append(await resp.text())
        return out

