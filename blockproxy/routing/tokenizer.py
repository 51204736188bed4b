"""Exact prompt tokens from a model's own tokenizer (``tokenizer.json``, no hub access).

A backends entry may name the tokenizer of the model it serves (``tokenizer:``, the path of
a ``tokenizer.json`` or of the directory holding one, as a model directory does).  With
it the proxy knows a completions prompt's exact token ids: its prompt tokens are counted,
not estimated, and its prefix blocks are the engine's own (``block_size`` tokens each,
:func:`blockproxy.routing.prefix.token_hashes`), the blocks the instance's KV events
report (:class:`blockproxy.cluster.prefix.EngineBlocks`).  The prompt is encoded as vLLM
encodes a completions prompt, special tokens (BOS) included.  Chat requests keep the
byte blocks unless the tokenizer comes with the model's chat template
(``chat_template.jinja`` or ``tokenizer_config.json``'s ``chat_template``): then the proxy
renders the messages with it, as vLLM does (Jinja, sandboxed), and tokenizes the result.

The ``tokenizers`` library (Rust) encodes about 10 MB/s of text: an 8k-token prompt costs
a few milliseconds, so prompts over :data:`INLINE_CHARS` are encoded in a worker thread
(the library releases the GIL) while the event loop serves other streams.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import re
from pathlib import Path
from typing import Any

from blockproxy.request import CHAT, RequestInfo
from blockproxy.routing.prefix import MAX_BYTES

#: prompts up to this many characters are encoded on the event loop
INLINE_CHARS = 8192
#: characters of a cached tokenization chunk (at least; cut before the next space)
CHUNK_CHARS = 2048


class ModelTokenizer:
    """A model's tokenizer and chat template, as vLLM uses them."""

    def __init__(self, tokenizer: Any, template: str | None, config: dict[str, Any]) -> None:
        self.tokenizer = tokenizer
        self.template_source = template
        self._template: Any = None
        self.special = {name: _token_text(config.get(name))
                        for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
        # vLLM passes content parts as a list to templates that iterate over them, and
        # joins their text into one string for the others.
        self.parts_as_list = bool(template) and _ITERATES_PARTS.search(template or "") is not None
        enc = tokenizer.encode
        self._wrap = self._special_wrap(enc)
        self.chunks = ChunkedEncoder(lambda t: list(enc(t, add_special_tokens=False).ids))

    def render_chat(self, body: dict[str, Any]) -> str | None:
        """The chat template applied to a request's messages (generation prompt added
        unless the request says otherwise), or None without a template."""
        if self.template_source is None:
            return None
        if self._template is None:
            self._template = _environment().from_string(self.template_source)
        messages = body.get("messages") or []
        if not self.parts_as_list:
            messages = [{**m, "content": _joined(m.get("content"))}
                        if isinstance(m, dict) and isinstance(m.get("content"), list) else m
                        for m in messages]
        kwargs = body.get("chat_template_kwargs")
        text = self._template.render(
            messages=messages, add_generation_prompt=body.get("add_generation_prompt", True),
            continue_final_message=body.get("continue_final_message", False),
            tools=body.get("tools"), **self.special,
            **(kwargs if isinstance(kwargs, dict) else {}))
        return str(text)

    async def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of ``text``; ``special``: add the tokenizer's special tokens (BOS), as
        vLLM does for completions prompts and not for rendered chats."""
        if special and self._wrap is None:  # specials that are not a plain wrap
            return list(self.tokenizer.encode(text, add_special_tokens=True).ids)
        ids = await self.chunks.encode(text)
        if special and self._wrap is not None:
            return self._wrap[0] + ids + self._wrap[1]
        return ids

    @staticmethod
    def _special_wrap(enc: Any) -> tuple[list[int], list[int]] | None:
        """(ids before, ids after) that special tokens add around any text, or None when
        the post-processor does something else."""
        empty = list(enc("", add_special_tokens=True).ids)
        probe = list(enc("a", add_special_tokens=True).ids)
        plain = list(enc("a", add_special_tokens=False).ids)
        for cut in range(len(empty) + 1):
            before, after = empty[:cut], empty[cut:]
            if probe == before + plain + after:
                return before, after
        return None


class ChunkedEncoder:
    """Tokenization with a cache of text chunks, so a conversation's next turn tokenizes
    only what is new.

    The text is cut into chunks of at least :data:`CHUNK_CHARS` characters, each cut just
    before a space (where word-level, byte-level BPE and most pre-tokenizers split anyway);
    a chunk's ids are cached under the chain of the chunks before it, so the shared start
    of two prompts is tokenized once.  Whether cutting changes anything is checked when
    the encoder is made, on a probe text with spaces, newlines, runs of whitespace and
    punctuation: a tokenizer for which the cut pieces differ from the whole (SentencePiece
    models that prepend a space marker to every piece, say) encodes every prompt whole.
    Encoding that cannot use the cache and is long runs in a worker thread.
    """

    def __init__(self, encode: Any, max_cached_ids: int = 4_000_000) -> None:
        self._encode = encode
        self._cache: collections.OrderedDict[Any, list[int]] = collections.OrderedDict()
        self._cached_ids = 0
        self.max_cached_ids = max_cached_ids
        self.hits = self.misses = 0
        probe = ("The quick  brown fox, jumps over\nthe lazy dog.\n\n  Again: "
                 "1234 56789 tokens!! ") * (2 * CHUNK_CHARS // 60 + 2)
        self.chunked = self._split_encode(probe) == encode(probe)
        self._cache.clear()
        self._cached_ids = 0

    @staticmethod
    def cuts(text: str) -> list[int]:
        """End offsets of the chunks of ``text``."""
        out = []
        i = 0
        while True:
            j = text.find(" ", i + CHUNK_CHARS)
            if j < 0:
                out.append(len(text))
                return out
            out.append(j)
            i = j

    def _split_encode(self, text: str) -> list[int]:
        keys, pieces, cached = self._plan(text)
        return self._finish(keys, pieces, cached, [self._encode(p) for p in pieces[cached:]])

    def _plan(self, text: str) -> tuple[list[Any], list[str], int]:
        """The chunks of ``text``, their cache keys, and how many leading ones are cached."""
        keys: list[Any] = []
        pieces: list[str] = []
        key: Any = None
        start = 0
        for end in self.cuts(text):
            piece = text[start:end]
            key = (key, hash(piece), end - start)
            keys.append(key)
            pieces.append(piece)
            start = end
        cached = 0
        while cached < len(keys) and keys[cached] in self._cache:
            cached += 1
        return keys, pieces, cached

    def _finish(self, keys: list[Any], pieces: list[str], cached: int,
                fresh: list[list[int]]) -> list[int]:
        ids: list[int] = []
        for key, piece in zip(keys[:cached], pieces):
            got = self._cache.get(key)
            if got is None:  # evicted while the fresh pieces were encoded in a thread
                got = self._encode(piece)
                self._remember(key, got)
            else:
                self._cache.move_to_end(key)
            ids.extend(got)
        for key, got in zip(keys[cached:], fresh):
            ids.extend(got)
            self._remember(key, got)
        self.hits += cached
        self.misses += len(fresh)
        return ids

    def _remember(self, key: Any, ids: list[int]) -> None:
        self._cache[key] = ids
        self._cached_ids += len(ids)
        while self._cached_ids > self.max_cached_ids and self._cache:
            _, old = self._cache.popitem(last=False)
            self._cached_ids -= len(old)

    async def encode(self, text: str) -> list[int]:
        if not self.chunked:
            if len(text) <= INLINE_CHARS:
                return list(self._encode(text))
            return list(await asyncio.get_running_loop().run_in_executor(
                None, self._encode, text))
        keys, pieces, cached = self._plan(text)
        new = pieces[cached:]
        if sum(map(len, new)) <= INLINE_CHARS:  # a new turn's tail: short
            fresh = [self._encode(p) for p in new]
        else:
            fresh = await asyncio.get_running_loop().run_in_executor(
                None, lambda: [self._encode(p) for p in new])
        return self._finish(keys, pieces, cached, fresh)


_ITERATES_PARTS = re.compile(r"content'?\]?\s+is\s+string|for\s+\w+\s+in\s+\w+\[?['\"]?content")


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _joined(content: Any) -> str:
    return "\n".join(p["text"] for p in content
                     if isinstance(p, dict) and isinstance(p.get("text"), str))


@functools.lru_cache(maxsize=1)
def _environment() -> Any:
    """Jinja as Hugging Face templates expect it: sandboxed, trimmed blocks, loop
    controls, ``raise_exception``, ``strftime_now``."""
    import datetime

    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


@functools.lru_cache(maxsize=16)
def load(path: str) -> ModelTokenizer:
    """The tokenizer at ``path`` (a ``tokenizer.json``, or a model directory with one and
    maybe its ``tokenizer_config.json`` and ``chat_template.jinja``), loaded once per
    path.  Raises ValueError with the path when it cannot be read."""
    from tokenizers import Tokenizer

    p = Path(path).expanduser()
    directory = p if p.is_dir() else p.parent
    if p.is_dir():
        p = p / "tokenizer.json"
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as exc:  # the library raises a bare Exception on bad files
        raise ValueError(f"cannot load tokenizer {p}: {exc}") from None
    config: dict[str, Any] = {}
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read {config_path}: {exc}") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template
                         if isinstance(t, dict) and t.get("name") == "default"), None)
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        template = jinja_file.read_text()
    return ModelTokenizer(tok, template if isinstance(template, str) else None, config)


def prompt_text(info: RequestInfo) -> str | None:
    """The text of a completions prompt the tokenizer would encode (the first
    :data:`~blockproxy.routing.prefix.MAX_BYTES` characters), or None."""
    if info.route == CHAT:
        return None
    prompt = info.body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    return prompt[:MAX_BYTES] if isinstance(prompt, str) else None
