"""The workload's ground truth, in a file only the emulator reads: router-neutral.

Real routers drop headers they do not know, so the true output length of a request cannot
ride in ``x-loadgen-output-tokens`` through sglang-router, vllm-router or nginx.  Instead
the load generator writes a *truth file* before it sends anything: for every request, the
digest of its prompt (the emulator's own tokens of it, so key order, whitespace in the JSON
or a router's re-serialisation do not matter) and its true output length.  ``loadgen
emulate --truth FILE`` looks every request up there by its prompt; the header is the
fallback, then the emulator's own draw.  A router never sees the file.

Format (JSON): ``{"format": "loadgen-truth/1", "entries": [["<digest hex>", tokens], ...]}``.
A digest listed more than once (the same prompt twice in a workload) gives its lengths in
order, the last one again after that.  The emulator re-reads the file when it changes (at
most once per :data:`RELOAD_INTERVAL_S` on a miss), so a run may write it after the
emulator started.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from loadgen.emulator.outputs import prompt_digest
from loadgen.emulator.protocol import prompt_tokens

FORMAT = "loadgen-truth/1"
RELOAD_INTERVAL_S = 0.5


def request_digest(path: str, body: dict[str, Any]) -> int:
    """The digest the emulator computes for a request to ``path`` with ``body``."""
    return prompt_digest(prompt_tokens(body, path.rstrip("/").endswith("/chat/completions")))


def write_truth(file: str | os.PathLike[str],
                requests: Iterable[tuple[str, dict[str, Any], int]]) -> int:
    """Write the truth of ``(path, body, true output tokens)`` requests atomically;
    returns the number of entries."""
    entries = [[f"{request_digest(path, body):016x}", tokens] for path, body, tokens in requests]
    target = Path(file)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(orjson.dumps({"format": FORMAT, "entries": entries}))
    os.replace(tmp, target)
    return len(entries)


class Truth:
    """The emulator's side: true output lengths by prompt digest, from a truth file."""

    def __init__(self, file: str | os.PathLike[str]) -> None:
        self.path = Path(file)
        self._lengths: dict[int, deque[int]] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked_at = -1e9
        self._reload()

    def __len__(self) -> int:
        return sum(len(q) for q in self._lengths.values())

    def lookup(self, digest: int) -> int | None:
        """The true output length of the prompt with ``digest``, or None if not listed."""
        lengths = self._lengths.get(digest)
        if lengths is None and self._reload():
            lengths = self._lengths.get(digest)
        if not lengths:
            return None
        return lengths.popleft() if len(lengths) > 1 else lengths[0]

    def _reload(self) -> bool:
        """Re-read the file if it changed (checked at most every RELOAD_INTERVAL_S)."""
        now = time.monotonic()
        if now - self._checked_at < RELOAD_INTERVAL_S:
            return False
        self._checked_at = now
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return False
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp == self._stamp:
            return False
        data = orjson.loads(self.path.read_bytes())
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{self.path}: not a {FORMAT} truth file")
        lengths: dict[int, deque[int]] = {}
        for digest, tokens in data["entries"]:
            lengths.setdefault(int(digest, 16), deque()).append(int(tokens))
        self._lengths, self._stamp = lengths, stamp
        return True
