"""Who to gossip with: the seeds (resolved periodically) plus every peer heard from.

A seed is ``HOST:PORT`` (``[v6]:PORT`` too); a host name may resolve to several
addresses (a Kubernetes headless Service), all of which become peers.  Every batch goes
to every peer (full fan-out: fine for the handful of proxies this is for).
"""

from __future__ import annotations

import asyncio
import logging
import socket

from blockproxy.gossip.transport import Address

log = logging.getLogger("blockproxy.gossip")


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); raises ValueError."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def parse_seeds(text: str) -> list[tuple[str, int]]:
    return [parse_address(s) for s in text.split(",") if s.strip()]


class Membership:
    """The peers a gossiper sends to."""

    def __init__(self, seeds: list[tuple[str, int]], peer_timeout: float) -> None:
        self.seeds = seeds
        self.peer_timeout = peer_timeout
        self.resolved: set[Address] = set()
        self.heard: dict[Address, float] = {}
        self.own: set[Address] = set()

    async def resolve(self) -> None:
        """Re-resolve the seeds (a name may now point at other proxies)."""
        loop = asyncio.get_running_loop()
        found: set[Address] = set()
        for host, port in self.seeds:
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            except (OSError, UnicodeError) as exc:
                log.warning("gossip seed %s:%d does not resolve: %s", host, port, exc)
                continue
            for info in infos:
                sockaddr = info[4]
                found.add((str(sockaddr[0]), int(sockaddr[1])))
        self.resolved = found

    def heard_from(self, addr: Address, now: float) -> None:
        self.heard[addr] = now

    def expire(self, now: float) -> None:
        for addr in [a for a, t in self.heard.items() if now - t > self.peer_timeout]:
            del self.heard[addr]

    def peers(self) -> list[Address]:
        return sorted((self.resolved | set(self.heard)) - self.own)

    def live(self) -> int:
        """Peers heard from recently."""
        return len(self.heard)
