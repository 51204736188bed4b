"""The backends file: which vLLM instances the proxy routes to, re-read on change.

``blockproxy --backends FILE`` reads one of three formats, chosen by the file's extension:

* ``.yaml`` / ``.yml`` -- the documented format, below;
* ``.toml`` -- the same fields: an optional ``[defaults]`` table and one ``[[backends]]``
  table per instance;
* anything else -- a plain list of URLs, one per line; ``#`` starts a comment, blank lines
  are ignored.  Every instance gets the defaults of every field.

YAML format::

    defaults:                         # optional; applied to every entry below
      profile: llama-3.1-8b-h100-tp1
    backends:                         # required, non-empty
      - url: http://127.0.0.1:8001    # a bare URL string works as an entry too
        name: gpu-a
        max_num_seqs: 128
      - http://127.0.0.1:8002

A top-level list (of mappings or URL strings) is accepted as well, meaning ``backends:``
without ``defaults:``.  Fields of one entry (every field but ``url`` and ``name`` may also
appear under ``defaults:``; an entry's own value wins):

``url`` (required)
    Base URL of the instance: ``http`` or ``https``, a host, an optional port and an
    optional path prefix (``http://gpu-3:8000/vllm``).  Stored without a trailing slash;
    requests go to ``{url}/v1/...``.  Credentials, query strings and fragments are refused.
``name`` (default: ``host:port`` of the url)
    The instance's name in metrics, logs and gossip.  Must be unique within the file; two
    instances on one ``host:port`` behind different path prefixes need explicit names.
``profile`` (default: none, the proxy's ``--profile``)
    Step-time profile: a shipped profile name (``llama-3.1-8b-h100-tp1``) or a file path.
``max_num_seqs``, ``max_num_batched_tokens``, ``num_gpu_blocks``, ``block_size``,
``max_model_len`` (positive integers; default: the profile's engine limits)
    The instance's vLLM engine limits, when they differ from the profile's: sequence cap
    per step, token budget per step, KV cache size in blocks, tokens per KV block, and
    context limit (prompt + output).
``weight`` (number > 0; default ``1.0``)
    Relative capacity of the instance; policies that pick without the simulator use it.
``state`` (default ``active``)
    ``active`` takes new requests; ``draining`` gets no new requests and hands its streams
    over to other instances by continuation (``--handoff-tokens``); ``standby`` gets no
    requests and is held for auto-provisioning.
``models`` (list of model ids; default: discovered from the instance's ``/v1/models``)
    Models the instance serves.  A single string means a one-element list.
``tokenizer`` (default: none)
    Path of the served model's ``tokenizer.json`` (or of the directory holding it): the
    proxy then counts a completions prompt's tokens exactly and hashes the engine's own
    token blocks (:mod:`blockproxy.routing.tokenizer`).
``kv_events`` (default: none)
    The instance's KV-events endpoint, ``tcp://host:port`` (or ``ipc://path`` on the same
    host), as vLLM publishes it with ``--kv-events-config '{"enable_kv_cache_events": true,
    "publisher": "zmq", "endpoint": "tcp://*:PORT"}'`` (vLLM binds only a wildcard, IPv6 or
    ``ipc://`` endpoint; any other it connects to): the proxy subscribes and its model of
    the instance's prefix cache follows the engine's (exact mode; needs ``tokenizer`` for
    text prompts).
``slo_ttft_ms``, ``slo_e2e_ms`` (numbers >= 0, ms; default: ``--slo-ttft-ms``,
    ``--slo-e2e-ms``)
    Latency objectives of the models this instance serves, for admission and
    auto-provisioning, when they differ from the proxy's: per model, the strictest set on
    any of its instances wins (0 = none).  Usually given under ``defaults:`` of a file
    serving one model, or on each instance of a model with its own objective.

Errors name the file, the line (YAML; TOML has none for fields) and the field, for
example ``backends.yaml:7: backends[1].max_num_seqs: expected a positive integer, got -3``.
Unknown keys are errors, with the closest known key suggested.

:class:`BackendsWatcher` polls the file and hands every valid new list to a callback;
an invalid file on reload is logged and the last good list stays in force.
"""

from __future__ import annotations

import asyncio
import difflib
import hashlib
import logging
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 has no stdlib TOML parser; YAML still works
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

STATES = ("active", "draining", "standby")
#: longest instance name (UTF-8 bytes): what a gossip datagram carries
MAX_NAME_BYTES = 200


class BackendsError(ValueError):
    """A backends file is unreadable or has a bad field.

    ``source``, ``line`` (1-based, or None when unknown) and ``field`` (a path such as
    ``backends[1].max_num_seqs``, or None) are kept for callers; the message holds them all.
    """

    def __init__(self, source: str, reason: str, line: int | None = None,
                 field: str | None = None) -> None:
        self.source = source
        self.line = line
        self.field = field
        self.reason = reason
        where = source if line is None else f"{source}:{line}"
        super().__init__(f"{where}: {field}: {reason}" if field else f"{where}: {reason}")


@dataclass(frozen=True)
class BackendSpec:
    """One instance from the backends file, validated and normalised."""

    url: str
    name: str
    profile: str | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    num_gpu_blocks: int | None = None
    block_size: int | None = None
    weight: float = 1.0
    state: str = "active"
    models: tuple[str, ...] | None = None
    max_model_len: int | None = None
    tokenizer: str | None = None
    kv_events: str | None = None
    slo_ttft_ms: float | None = None
    slo_e2e_ms: float | None = None


FIELDS = tuple(f.name for f in fields(BackendSpec))
# url and name identify one instance, so a shared default for them makes no sense.
DEFAULTABLE_FIELDS = tuple(f for f in FIELDS if f not in ("url", "name"))
_TOP_LEVEL_KEYS = ("backends", "defaults")
_ZMQ_ENDPOINT = re.compile(r"tcp://(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}|ipc://.+")
_INT_FIELDS = ("max_num_seqs", "max_num_batched_tokens", "num_gpu_blocks", "block_size",
               "max_model_len")


# --- raw documents ---------------------------------------------------------------------------
# Every format is first turned into the same raw shape, values paired with their line
# (None where the format cannot tell), so validation is written once.

@dataclass
class _Value:
    value: Any
    line: int | None


@dataclass
class _Entry:
    """One element of ``backends``: a mapping of field -> value, or a bare URL string."""

    line: int | None
    fields: dict[str, _Value] | None = None
    url: str | None = None


@dataclass
class _Document:
    entries: list[_Entry]
    defaults: dict[str, _Value]
    defaults_line: int | None = None
    backends_line: int | None = None


class _Checker:
    """Builds :class:`BackendsError` for one source file."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, reason: str, line: int | None = None,
              field: str | None = None) -> BackendsError:
        return BackendsError(self.source, reason, line, field)

    def unknown_key(self, key: Any, known: tuple[str, ...], line: int | None,
                    where: str) -> BackendsError:
        hint = ""
        if isinstance(key, str):
            close = difflib.get_close_matches(key, known, n=1)
            if close:
                hint = f"; did you mean {close[0]!r}?"
        field = f"{where}.{key}" if where else str(key)
        return self.error(f"unknown key{hint} (known keys: {', '.join(known)})", line, field)


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _yaml_document(text: str, chk: _Checker) -> _Document:
    # compose() keeps every node's position, which yaml.safe_load throws away.
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else None
            raise chk.error(f"invalid YAML: {exc.problem or exc}", line) from exc
        except yaml.YAMLError as exc:
            raise chk.error(f"invalid YAML: {exc}") from exc
        if root is None:
            raise chk.error("the file is empty; expected a 'backends:' list")

        def scalar(node: yaml.Node) -> Any:
            try:
                return loader.construct_object(node, deep=True)
            except yaml.YAMLError as exc:
                raise chk.error(f"invalid value: {exc}", _line(node)) from exc

        def mapping(node: yaml.MappingNode, where: str) -> dict[str, _Value]:
            # yaml.safe_load lets a repeated key silently win; here it is an error.  Keys
            # brought in by a '<<: *anchor' merge are not repeats: explicit keys override.
            explicit: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = scalar(key_node)
                if not isinstance(key, str):
                    raise chk.error(f"keys must be strings, got {key!r}", _line(key_node), where)
                if key in explicit:
                    raise chk.error("duplicate key", _line(key_node), f"{where}.{key}")
                explicit.add(key)
            loader.flatten_mapping(node)  # merged pairs first, explicit ones after
            out: dict[str, _Value] = {}
            for key_node, value_node in node.value:
                key = scalar(key_node)
                if not isinstance(key, str):
                    raise chk.error(f"keys must be strings, got {key!r}", _line(key_node), where)
                out[key] = _Value(scalar(value_node), _line(value_node))
            return out

        def entries(node: yaml.Node) -> list[_Entry]:
            if not isinstance(node, yaml.SequenceNode):
                raise chk.error("expected a list of instances", _line(node), "backends")
            result = []
            for i, item in enumerate(node.value):
                where = f"backends[{i}]"
                if isinstance(item, yaml.MappingNode):
                    result.append(_Entry(_line(item), fields=mapping(item, where)))
                elif isinstance(item, yaml.ScalarNode) and isinstance(scalar(item), str):
                    result.append(_Entry(_line(item), url=scalar(item)))
                else:
                    raise chk.error("expected a mapping with 'url' or a URL string",
                                    _line(item), where)
            return result

        if isinstance(root, yaml.SequenceNode):
            return _Document(entries(root), {})
        if not isinstance(root, yaml.MappingNode):
            raise chk.error("expected a mapping with a 'backends:' list, or a list",
                            _line(root))
        doc = _Document([], {})
        seen_backends = False
        for key_node, value_node in root.value:
            key = scalar(key_node)
            if key not in _TOP_LEVEL_KEYS:
                raise chk.unknown_key(key, _TOP_LEVEL_KEYS, _line(key_node), "")
            if key == "backends":
                if seen_backends:
                    raise chk.error("duplicate key", _line(key_node), "backends")
                seen_backends = True
                doc.entries = entries(value_node)
                doc.backends_line = _line(key_node)
            else:
                if doc.defaults_line is not None:
                    raise chk.error("duplicate key", _line(key_node), "defaults")
                if not isinstance(value_node, yaml.MappingNode):
                    raise chk.error("expected a mapping", _line(value_node), "defaults")
                doc.defaults = mapping(value_node, "defaults")
                doc.defaults_line = _line(value_node)
        if not seen_backends:
            raise chk.error("missing the 'backends:' list", _line(root))
        return doc
    finally:
        loader.dispose()


_TOML_LINE = re.compile(r"at line (\d+)")


def _toml_document(text: str, chk: _Checker) -> _Document:
    if tomllib is None:  # pragma: no cover
        raise chk.error("reading TOML needs Python 3.11+ or the 'tomli' package; use YAML")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib (3.11-3.13) keeps the position only in the message text.
        match = _TOML_LINE.search(str(exc))
        raise chk.error(f"invalid TOML: {exc}", int(match.group(1)) if match else None) from exc
    for key in data:
        if key not in _TOP_LEVEL_KEYS:
            raise chk.unknown_key(key, _TOP_LEVEL_KEYS, None, "")
    if "backends" not in data:
        raise chk.error("missing the [[backends]] tables")
    raw = data["backends"]
    if not isinstance(raw, list):
        raise chk.error("expected an array of tables ([[backends]])", field="backends")
    entries = []
    for i, item in enumerate(raw):
        if isinstance(item, dict):
            entries.append(_Entry(None, fields={k: _Value(v, None) for k, v in item.items()}))
        elif isinstance(item, str):
            entries.append(_Entry(None, url=item))
        else:
            raise chk.error("expected a table with 'url' or a URL string",
                            field=f"backends[{i}]")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise chk.error("expected a table ([defaults])", field="defaults")
    return _Document(entries, {k: _Value(v, None) for k, v in defaults.items()})


def _list_document(text: str) -> _Document:
    entries = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        # A URL with a fragment is refused anyway, so '#' can always start a comment.
        line = raw.split("#", 1)[0].strip()
        if line:
            entries.append(_Entry(lineno, url=line))
    return _Document(entries, {})


# --- validation ------------------------------------------------------------------------------

def normalise_url(url: str) -> str:
    """Return ``url`` as ``scheme://host[:port][/prefix]``; raise ValueError if it is bad."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"expected a URL string, got {url!r}")
    url = url.strip()
    if any(c.isspace() for c in url):
        raise ValueError(f"a URL cannot contain spaces, got {url!r}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"the URL has no host: {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in the URL are not supported")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ValueError(f"the URL cannot have a query or fragment: {url!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in {url!r}") from exc
    host = parts.hostname
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}"


def default_name(url: str) -> str:
    """``host:port`` of a normalised URL, with the scheme's default port when none is given."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_field(key: str, value: Any) -> Any:
    """Validate and convert one field's value; raise ValueError with the reason."""
    if key in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"expected a positive integer, got {value!r}")
        return value
    if key in ("slo_ttft_ms", "slo_e2e_ms"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value < 0:
            raise ValueError(f"expected a number of milliseconds >= 0, got {value!r}")
        return float(value)
    if key == "weight":
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value <= 0:
            raise ValueError(f"expected a number > 0, got {value!r}")
        return float(value)
    if key == "state":
        if value not in STATES:
            raise ValueError(f"expected one of {', '.join(STATES)}, got {value!r}")
        return value
    if key == "kv_events":
        if not isinstance(value, str) or not _ZMQ_ENDPOINT.fullmatch(value.strip()):
            raise ValueError("expected a ZeroMQ endpoint tcp://host:port or ipc://path, "
                             f"got {value!r}")
        return value.strip()
    if key == "tokenizer":
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"expected the path of a tokenizer.json, got {value!r}")
        path = Path(value.strip()).expanduser()
        if not (path / "tokenizer.json" if path.is_dir() else path).is_file():
            raise ValueError(f"no tokenizer.json at {value.strip()}")
        return str(path)
    if key in ("name", "profile"):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"expected a non-empty string, got {value!r}")
        return value.strip()
    if key == "models":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items \
                or not all(isinstance(m, str) and m.strip() for m in items):
            raise ValueError(f"expected a non-empty list of model names, got {value!r}")
        return tuple(dict.fromkeys(m.strip() for m in items))
    if key == "url":
        return normalise_url(value)
    raise AssertionError(f"unhandled field {key}")  # pragma: no cover


def _build(doc: _Document, chk: _Checker) -> list[BackendSpec]:
    defaults: dict[str, Any] = {}
    for key, val in doc.defaults.items():
        if key not in DEFAULTABLE_FIELDS:
            if key in FIELDS:
                raise chk.error("cannot be a default; set it on each instance",
                                val.line, f"defaults.{key}")
            raise chk.unknown_key(key, DEFAULTABLE_FIELDS, val.line, "defaults")
        try:
            defaults[key] = _check_field(key, val.value)
        except ValueError as exc:
            raise chk.error(str(exc), val.line, f"defaults.{key}") from exc
    if not doc.entries:
        raise chk.error("no backends: the list is empty", doc.backends_line, "backends")

    specs: list[BackendSpec] = []
    first_seen: dict[tuple[str, str], tuple[int, int | None]] = {}
    for i, entry in enumerate(doc.entries):
        where = f"backends[{i}]"
        raw = entry.fields if entry.fields is not None else {"url": _Value(entry.url, entry.line)}
        values = dict(defaults)
        for key, val in raw.items():
            if key not in FIELDS:
                raise chk.unknown_key(key, FIELDS, val.line, where)
            try:
                values[key] = _check_field(key, val.value)
            except ValueError as exc:
                raise chk.error(str(exc), val.line, f"{where}.{key}") from exc
        if "url" not in values:
            raise chk.error("missing", entry.line, f"{where}.url")
        values.setdefault("name", default_name(values["url"]))
        if len(values["name"].encode()) > MAX_NAME_BYTES:
            line = raw["name"].line if "name" in raw else entry.line
            raise chk.error(f"a name is at most {MAX_NAME_BYTES} bytes (gossip carries it); "
                            f"got {len(values['name'].encode())}"
                            + ("" if "name" in raw else ": give the instance a name"),
                            line, f"{where}.name")
        spec = BackendSpec(**values)
        for key in ("url", "name"):
            value = getattr(spec, key)
            line = raw[key].line if key in raw else entry.line
            if (key, value) in first_seen:
                j, jline = first_seen[(key, value)]
                at = f"backends[{j}]" + (f", line {jline}" if jline else "")
                fix = "; give them distinct names" if key == "name" and "name" not in raw else ""
                raise chk.error(f"duplicate {key} {value!r} (also {at}){fix}", line,
                                f"{where}.{key}")
            first_seen[(key, value)] = (i, line)
        specs.append(spec)
    return specs


# --- public API ------------------------------------------------------------------------------

def format_for_path(path: str | os.PathLike[str]) -> str:
    """The format a file is read in, by extension: ``yaml``, ``toml`` or ``list``."""
    suffix = Path(path).suffix.lower()
    if suffix in (".yaml", ".yml"):
        return "yaml"
    if suffix == ".toml":
        return "toml"
    return "list"


def parse_backends(text: str, fmt: str, source: str = "<backends>") -> list[BackendSpec]:
    """Parse and validate backends from ``text`` in ``fmt`` (``yaml``, ``toml`` or ``list``).

    ``source`` names the text in error messages.  Raises :class:`BackendsError`.
    """
    chk = _Checker(source)
    if fmt == "yaml":
        doc = _yaml_document(text, chk)
    elif fmt == "toml":
        doc = _toml_document(text, chk)
    elif fmt == "list":
        doc = _list_document(text)
    else:
        raise ValueError(f"unknown backends format {fmt!r}; expected yaml, toml or list")
    return _build(doc, chk)


def _decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BackendsError(source, f"not UTF-8 text: {exc}") from exc


def load_backends(path: str | os.PathLike[str]) -> list[BackendSpec]:
    """Read and validate a backends file; raise :class:`BackendsError` naming the problem."""
    source = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BackendsError(source, f"cannot read: {exc.strerror or exc}") from exc
    return parse_backends(_decode(data, source), format_for_path(path), source)


def diff_backends(old: list[BackendSpec], new: list[BackendSpec]
                  ) -> tuple[list[BackendSpec], list[BackendSpec], list[BackendSpec]]:
    """Compare two lists by name: ``(added, removed, changed)``.

    ``added`` and ``changed`` hold specs from ``new``; ``removed`` holds specs from ``old``.
    """
    old_by_name = {s.name: s for s in old}
    new_names = {s.name for s in new}
    added = [s for s in new if s.name not in old_by_name]
    removed = [s for s in old if s.name not in new_names]
    changed = [s for s in new if s.name in old_by_name and old_by_name[s.name] != s]
    return added, removed, changed


class BackendsWatcher:
    """Polls a backends file and applies every valid change through ``on_change``.

    The initial load happens in the constructor and raises :class:`BackendsError` if the
    file is bad, so a proxy refuses to start on it.  Later, a bad file is logged and the
    last good list stays in force; a deleted file is logged and the list kept until the
    file comes back.  A rewrite that parses to the same list (comments, reordering of
    keys) does not call ``on_change``.
    """

    def __init__(self, path: str | os.PathLike[str],
                 on_change: Callable[[list[BackendSpec]], None] | None = None,
                 interval: float = 1.0, logger: logging.Logger | None = None) -> None:
        self.path = Path(path)
        self.source = os.fspath(path)
        self.interval = interval
        self.log = logger or logging.getLogger(__name__)
        #: called with every new valid list (set later by whoever owns the view)
        self.on_change = on_change
        self._stopped = False
        self._wakeup: asyncio.Event | None = None
        self._missing = False
        # stat before reading: a write that lands in between then changes the stat and
        # is picked up by the next poll, never missed.
        try:
            self._stat_key: tuple[int, int, int] | None = self._stat()
            data = self.path.read_bytes()
        except OSError as exc:
            raise BackendsError(self.source, f"cannot read: {exc.strerror or exc}") from exc
        self._digest = hashlib.sha256(data).digest()
        self.current: list[BackendSpec] = parse_backends(
            _decode(data, self.source), format_for_path(self.path), self.source)

    def _stat(self) -> tuple[int, int, int]:
        st = self.path.stat()
        # The inode catches an atomic replace (rename over the file) with equal mtime/size.
        return st.st_mtime_ns, st.st_size, st.st_ino

    def check_now(self) -> bool:
        """Poll the file once; return True if a new list was applied.

        ``on_change`` must apply a list whole or raise having changed nothing; when it
        raises, the list is refused like an invalid file and ``current`` stays.
        """
        try:
            key = self._stat()
        except FileNotFoundError:
            if not self._missing:
                self._missing = True
                self.log.warning("backends file %s disappeared; keeping the last good list "
                                 "(%d instances)", self.source, len(self.current))
            return False
        except OSError as exc:
            self.log.warning("cannot stat backends file %s: %s; keeping the last good list",
                             self.source, exc)
            return False
        if self._missing:
            self._missing = False
            self.log.info("backends file %s is back", self.source)
        if key == self._stat_key:
            return False
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            # Leave _stat_key alone so the next poll tries again.
            self.log.warning("cannot read backends file %s: %s; keeping the last good list",
                             self.source, exc)
            return False
        self._stat_key = key
        digest = hashlib.sha256(data).digest()
        if digest == self._digest:
            return False
        # Remember bad content too, so one bad save is logged once, not every poll.
        self._digest = digest
        try:
            new = parse_backends(_decode(data, self.source), format_for_path(self.path),
                                 self.source)
        except BackendsError as exc:
            self.log.warning("invalid backends file, keeping the last good list "
                             "(%d instances): %s", len(self.current), exc)
            return False
        if new == self.current:
            return False
        added, removed, changed = diff_backends(self.current, new)
        if self.on_change is not None:
            try:
                self.on_change(new)  # all or nothing: it raises before changing anything
            except Exception as exc:
                self.log.warning("the new backends list cannot be applied, keeping the last "
                                 "good list (%d instances): %s", len(self.current), exc)
                return False
        self.log.info("backends reloaded from %s: added %s, removed %s, changed %s",
                      self.source, [s.name for s in added], [s.name for s in removed],
                      [s.name for s in changed])
        self.current = new
        return True

    async def run(self) -> None:
        """Poll every ``interval`` seconds until :meth:`stop` is called."""
        self._wakeup = asyncio.Event()
        try:
            while not self._stopped:
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=self.interval)
                except asyncio.TimeoutError:
                    pass
                if self._stopped:
                    break
                try:
                    self.check_now()
                except Exception:
                    # A failing callback must not stop reloads for the rest of the run.
                    self.log.exception("applying the new backends list failed")
        finally:
            self._wakeup = None

    def stop(self) -> None:
        """Make :meth:`run` return at its next wake-up (at once if it is waiting)."""
        self._stopped = True
        if self._wakeup is not None:
            self._wakeup.set()
