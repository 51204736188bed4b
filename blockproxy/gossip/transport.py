"""The gossip socket: the only place gossip touches the network (one UDP socket).

``loss`` drops that fraction of outgoing datagrams at random (tests and experiments only).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

log = logging.getLogger("blockproxy.gossip")

Address = tuple[str, int]


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, Address], None]) -> None:
        self.on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: Address) -> None:  # type: ignore[override]
        self.on_datagram(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a peer that is down: normal, membership expires it.
        log.debug("gossip socket error: %s", exc)


class Transport:
    """One bound UDP socket that sends to many peers."""

    def __init__(self, on_datagram: Callable[[bytes, Address], None], loss: float = 0.0,
                 rng: random.Random | None = None) -> None:
        self.on_datagram = on_datagram
        self.loss = loss
        self.rng = rng or random.Random()
        self._transport: asyncio.DatagramTransport | None = None
        self.address: Address | None = None

    async def start(self, host: str, port: int) -> Address:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self.on_datagram), local_addr=(host, port))
        self._transport = transport
        sockname = transport.get_extra_info("sockname")
        self.address = (sockname[0], sockname[1])
        return self.address

    def send(self, data: bytes, peers: list[Address]) -> int:
        """Send one datagram to every peer; returns how many were sent (not lost)."""
        if self._transport is None or self._transport.is_closing():
            return 0
        sent = 0
        for addr in peers:
            if self.loss and self.rng.random() < self.loss:
                continue
            try:
                self._transport.sendto(data, addr)
                sent += 1
            except OSError as exc:
                log.debug("gossip send to %s failed: %s", addr, exc)
        return sent

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
