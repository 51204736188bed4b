"""The routers users would deploy instead of blockproxy, started like blockproxy is.

A *router spec* names what stands between the load generator and the emulated cluster:
``POLICY`` is blockproxy with that policy; ``PEER:POLICY`` is a peer router:

=================  ==========================================  =============================
peer               policies                                    install
=================  ==========================================  =============================
``sglang``         ``cache_aware`` (its default),              ``pip install
                   ``round_robin``, ``power_of_two``,          "blockproxy[peers]"``
                   ``random``                                  (``sglang-router``, SGLang's
                                                               model gateway, Rust)
``vllm-router``    ``cache_aware``, ``kv_aware``,              same extra (``vllm-router``,
                   ``power_of_two``, ``consistent_hash``,      Rust)
                   ``round_robin`` (its default), ``random``
``nginx``          ``round_robin`` (its default),              the system package
                   ``least_conn``                              (``apt-get install nginx``)
=================  ==========================================  =============================

Each peer runs with its documented defaults apart from the ports (and its Prometheus
exporter's, which would otherwise collide) and the instances it routes to; ``extra_args``
(``loadgen compare --peer-arg``) are appended to its command line.  A peer that is not
installed is a :class:`PeerMissing` error naming the install command.  None of them
forwards unknown headers reliably, so runs through them take the true output lengths from
the truth file (:mod:`loadgen.truth`).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sysconfig
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from loadgen.procs import HOST, free_ports

INSTALL_PEERS = "pip install 'blockproxy[peers]' (from a checkout: pip install '.[peers]')"


class PeerMissing(RuntimeError):
    """A peer router named in a router spec is not installed."""


@dataclass(frozen=True)
class Peer(ABC):
    """One peer router: how to start it, how to tell it is ready, how to install it."""

    name: str
    policies: tuple[str, ...]
    default_policy: str
    install: str

    @abstractmethod
    def executable(self) -> list[str]:
        """The command that runs this peer; :class:`PeerMissing` if it is not installed."""

    @abstractmethod
    def version(self) -> str:
        """Name and version, for the results."""

    @abstractmethod
    def argv(self, policy: str, workers: Sequence[str], port: int, workdir: Path,
             extra_args: Sequence[str]) -> list[str]:
        """The full command line (files it needs are written to ``workdir``)."""

    def workers_ready(self, url: str, workers: Sequence[str]) -> bool:
        """Whether the router has registered every worker (it may answer before)."""
        return True


class _RustGateway(Peer):
    """sglang-router and vllm-router: a console script from PyPI with --worker-urls."""

    #: the distribution on PyPI, also the name of its console script
    distribution: ClassVar[str]
    #: the router's endpoint that lists its workers
    workers_path: ClassVar[str]

    def executable(self) -> list[str]:
        script = Path(sysconfig.get_path("scripts")) / self.distribution
        found = str(script) if script.is_file() else shutil.which(self.distribution)
        if found is None:
            raise PeerMissing(f"{self.distribution} is not installed: {self.install}")
        return [found]

    def version(self) -> str:
        try:
            return f"{self.distribution} {importlib.metadata.version(self.distribution)}"
        except importlib.metadata.PackageNotFoundError:
            return f"{self.distribution} (version unknown)"

    def _common(self, policy: str, workers: Sequence[str], port: int) -> list[str]:
        (metrics_port,) = free_ports(1)
        return ["--worker-urls", *workers, "--policy", policy, "--host", HOST,
                "--port", str(port), "--prometheus-port", str(metrics_port)]

    def workers_ready(self, url: str, workers: Sequence[str]) -> bool:
        try:
            with urllib.request.urlopen(url + self.workers_path, timeout=2) as resp:
                listed = json.loads(resp.read())
        except (OSError, ValueError):
            return False
        return len(self._urls(listed)) >= len(workers)

    @abstractmethod
    def _urls(self, listed: Any) -> list[str]:
        """The worker URLs in the answer of :attr:`workers_path`."""


class SglangRouter(_RustGateway):
    distribution = "sglang-router"
    workers_path = "/workers"

    def argv(self, policy: str, workers: Sequence[str], port: int, workdir: Path,
             extra_args: Sequence[str]) -> list[str]:
        return [*self.executable(), "launch", *self._common(policy, workers, port),
                "--log-level", "warn", *extra_args]

    def _urls(self, listed: Any) -> list[str]:
        return [str(w["url"]) for w in listed.get("workers", [])
                if isinstance(w, dict) and "url" in w]


class VllmRouter(_RustGateway):
    distribution = "vllm-router"
    workers_path = "/list_workers"

    def argv(self, policy: str, workers: Sequence[str], port: int, workdir: Path,
             extra_args: Sequence[str]) -> list[str]:
        return [*self.executable(), *self._common(policy, workers, port),
                "--log-level", "warning", *extra_args]

    def _urls(self, listed: Any) -> list[str]:
        return list(listed.get("urls", []))


#: nginx in front of vLLM as an operator would write it: HTTP/1.1 keep-alive upstreams,
#: no buffering either way (streams pass through), generous read timeouts.
NGINX_CONF = """\
worker_processes 1;
pid nginx.pid;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path client_body_temp;
    proxy_temp_path proxy_temp;
    fastcgi_temp_path fastcgi_temp;
    uwsgi_temp_path uwsgi_temp;
    scgi_temp_path scgi_temp;
    upstream vllm {{
{balance}{servers}
        keepalive 256;
        keepalive_requests 100000;
    }}
    server {{
        listen {host}:{port};
        client_max_body_size 64m;
        location / {{
            proxy_pass http://vllm;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"""


class Nginx(Peer):
    def executable(self) -> list[str]:
        found = shutil.which("nginx") or next(
            (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)),
            None)
        if found is None:
            raise PeerMissing(f"nginx is not installed: {self.install}")
        return [found]

    def version(self) -> str:
        done = subprocess.run([*self.executable(), "-v"], capture_output=True, text=True,
                              timeout=10)
        return (done.stderr or done.stdout).strip().replace("nginx version: ", "")

    def argv(self, policy: str, workers: Sequence[str], port: int, workdir: Path,
             extra_args: Sequence[str]) -> list[str]:
        servers = "\n".join(f"        server {w.split('://', 1)[-1]};" for w in workers)
        balance = "        least_conn;\n" if policy == "least_conn" else ""
        conf = workdir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(balance=balance, servers=servers, host=HOST,
                                          port=port))
        # As root, workers would switch to a user that may not enter the work directory.
        globals_ = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")
        return [*self.executable(), "-p", str(workdir), "-c", str(conf),
                "-e", str(workdir / "error.log"), "-g", globals_, *extra_args]


PEERS: dict[str, Peer] = {
    "sglang": SglangRouter("sglang", ("cache_aware", "round_robin", "power_of_two", "random"),
                           "cache_aware", INSTALL_PEERS),
    "vllm-router": VllmRouter("vllm-router", ("cache_aware", "kv_aware", "power_of_two",
                                              "consistent_hash", "round_robin", "random"),
                              "round_robin", INSTALL_PEERS),
    "nginx": Nginx("nginx", ("round_robin", "least_conn"), "round_robin",
                   "apt-get install nginx"),
}


def parse_router(spec: str) -> tuple[Peer | None, str]:
    """``"sglang:cache_aware"`` -> (the sglang peer, ``"cache_aware"``); ``"block"`` ->
    (None, ``"block"``) for blockproxy; ``"nginx"`` -> nginx with its default policy."""
    name, sep, policy = spec.partition(":")
    if not sep and name not in PEERS:
        return None, spec
    if name not in PEERS:
        raise ValueError(f"unknown router {name!r} in {spec!r}; peers: {', '.join(PEERS)}")
    peer = PEERS[name]
    policy = policy or peer.default_policy
    if policy not in peer.policies:
        raise ValueError(f"{name} has no policy {policy!r}; choose from "
                         f"{', '.join(peer.policies)}")
    return peer, policy
