"""The paths the proxy serves, and how a path that is not one of them exactly is read.

Routing is by exact path: the generation routes, the proxy's own endpoints and a fixed list
of vLLM's other request paths, each forwarded to its own path on an instance (never to the
path the client wrote).  A path that matches none is read as nginx reads it (percent-decoded,
``//`` merged, ``.`` and ``..`` segments resolved) and, if that names a route, served by
it; a path that climbs above the root is a 400; anything else is a 404.
"""

from __future__ import annotations

from urllib.parse import unquote

#: vLLM's request paths beside generation that are forwarded unchanged (POST, JSON body
#: naming the model): one request to one instance serving its model.  Not listed, so 404:
#: the Responses API (stored responses live on the instance that made them), audio
#: (multipart bodies), and vLLM's operational endpoints (sleep, profiling, weight updates,
#: cache resets: an operator's business with one instance, not a client's).
PASS_THROUGH: tuple[str, ...] = (
    "/v1/embeddings", "/v1/score", "/v1/rerank", "/rerank", "/score", "/pooling",
    "/classify", "/tokenize", "/detokenize")

def normalise(raw_path: str) -> str | None:
    """``raw_path`` (without its query) as nginx resolves it, or None when it climbs above
    the root."""
    path = unquote(raw_path, errors="strict") if "%" in raw_path else raw_path
    out: list[str] = []
    for segment in path.split("/")[1:]:
        if segment in ("", "."):
            continue
        if segment == "..":
            if not out:
                return None
            out.pop()
        else:
            out.append(segment)
    tail = "/" if path.endswith(("/", "/.", "/..")) and out else ""
    return "/" + "/".join(out) + tail
