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
import functools
import json
import re
from pathlib import Path
from typing import Any

from blockproxy.request import CHAT, RequestInfo
from blockproxy.routing.prefix import MAX_BYTES

#: prompts up to this many characters are encoded on the event loop
INLINE_CHARS = 8192


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
        if len(text) <= INLINE_CHARS:
            return list(self.tokenizer.encode(text, add_special_tokens=special).ids)
        loop = asyncio.get_running_loop()
        enc = await loop.run_in_executor(
            None, functools.partial(self.tokenizer.encode, text, add_special_tokens=special))
        return list(enc.ids)


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
