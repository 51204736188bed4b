"""Step-time profiles: the data that tells the simulator how fast an instance is.

A profile is a JSON file (format in ``profiles/README.md``) shipped as package data under
``blockproxy.profiles``.  :func:`load_profile` accepts a profile name or a file path and
validates every field, naming the offending one in the error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1


class ProfileError(ValueError):
    """A profile file is missing, unreadable or has a bad field."""


@dataclass(frozen=True)
class EngineLimits:
    """vLLM engine limits of one instance."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    num_gpu_blocks: int = 26000
    block_size: int = 16
    max_model_len: int = 131072


@dataclass(frozen=True)
class StepTime:
    """Linear model of one engine step, in seconds."""

    fixed_s: float
    per_prefill_token_s: float
    per_decode_seq_s: float
    per_context_token_s: float = 0.0
    #: time before the engine queues a request (HTTP, tokenisation, API-server scheduling)
    per_request_s: float = 0.0

    def step_seconds(self, prefill_tokens: int, decode_seqs: int, context_tokens: int = 0) -> float:
        """Time of one step that computes ``prefill_tokens`` and decodes ``decode_seqs``."""
        return (self.fixed_s + self.per_prefill_token_s * prefill_tokens
                + self.per_decode_seq_s * decode_seqs
                + self.per_context_token_s * context_tokens)


@dataclass(frozen=True)
class Profile:
    """Step-time model plus the engine limits it was measured with."""

    name: str
    model: str
    hardware: str
    tensor_parallel_size: int
    step_time: StepTime
    engine: EngineLimits
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        """The profile in its file format."""
        st = self.step_time
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "model": self.model,
            "hardware": self.hardware,
            "tensor_parallel_size": self.tensor_parallel_size,
            "source": self.source,
            "step_time": {
                "fixed_ms": st.fixed_s * 1e3,
                "per_prefill_token_us": st.per_prefill_token_s * 1e6,
                "per_decode_seq_us": st.per_decode_seq_s * 1e6,
                "per_context_token_us": st.per_context_token_s * 1e6,
                "per_request_ms": st.per_request_s * 1e3,
            },
            "engine": {
                "max_num_seqs": self.engine.max_num_seqs,
                "max_num_batched_tokens": self.engine.max_num_batched_tokens,
                "num_gpu_blocks": self.engine.num_gpu_blocks,
                "block_size": self.engine.block_size,
                "max_model_len": self.engine.max_model_len,
            },
        }


def _number(obj: dict[str, Any], key: str, where: str) -> float:
    if key not in obj:
        raise ProfileError(f"{where}{key}: missing")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value < 0:
        raise ProfileError(f"{where}{key}: expected a non-negative number, got {value!r}")
    return float(value)


def _positive_int(obj: dict[str, Any], key: str, where: str) -> int:
    if key not in obj:
        raise ProfileError(f"{where}{key}: missing")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ProfileError(f"{where}{key}: expected a positive integer, got {value!r}")
    return value


def _section(obj: dict[str, Any], key: str) -> dict[str, Any]:
    value = obj.get(key)
    if not isinstance(value, dict):
        raise ProfileError(f"{key}: expected an object, got {value!r}")
    return value


def parse_profile(data: Any, default_name: str = "") -> Profile:
    """Validate a decoded profile document and build a :class:`Profile`."""
    if not isinstance(data, dict):
        raise ProfileError(f"profile: expected a JSON object, got {type(data).__name__}")
    version = data.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ProfileError(f"format_version: expected {FORMAT_VERSION}, got {version!r}")
    for key in ("name", "model", "hardware", "source"):
        if key in data and not isinstance(data[key], str):
            raise ProfileError(f"{key}: expected a string, got {data[key]!r}")
    st = _section(data, "step_time")
    step_time = StepTime(
        fixed_s=_number(st, "fixed_ms", "step_time.") / 1e3,
        per_prefill_token_s=_number(st, "per_prefill_token_us", "step_time.") / 1e6,
        per_decode_seq_s=_number(st, "per_decode_seq_us", "step_time.") / 1e6,
        per_context_token_s=(_number(st, "per_context_token_us", "step_time.") / 1e6
                             if "per_context_token_us" in st else 0.0),
        per_request_s=(_number(st, "per_request_ms", "step_time.") / 1e3
                       if "per_request_ms" in st else 0.0),
    )
    eng = _section(data, "engine")
    engine = EngineLimits(**{f: _positive_int(eng, f, "engine.") for f in (
        "max_num_seqs", "max_num_batched_tokens", "num_gpu_blocks", "block_size",
        "max_model_len")})
    tp = data.get("tensor_parallel_size", 1)
    if isinstance(tp, bool) or not isinstance(tp, int) or tp <= 0:
        raise ProfileError(f"tensor_parallel_size: expected a positive integer, got {tp!r}")
    return Profile(name=data.get("name", default_name), model=data.get("model", ""),
                   hardware=data.get("hardware", ""), tensor_parallel_size=tp,
                   step_time=step_time, engine=engine, source=data.get("source", ""))


def available_profiles() -> list[str]:
    """Names of the profiles shipped with blockproxy."""
    root = resources.files("blockproxy.profiles")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))


def load_profile(name_or_path: str | Path) -> Profile:
    """Load a shipped profile by name, or any profile file by path."""
    text: str
    path = Path(name_or_path)
    shipped = resources.files("blockproxy.profiles").joinpath(f"{name_or_path}.json")
    try:
        if path.suffix == ".json" or path.exists():
            text = path.read_text()
        elif shipped.is_file():
            text = shipped.read_text()
        else:
            raise ProfileError(f"unknown profile {str(name_or_path)!r}; shipped profiles: "
                               f"{', '.join(available_profiles())}")
    except OSError as exc:
        raise ProfileError(f"cannot read profile {str(name_or_path)!r}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{name_or_path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    try:
        return parse_profile(data, default_name=path.stem)
    except ProfileError as exc:
        raise ProfileError(f"{name_or_path}: {exc}") from exc


def save_profile(profile: Profile, path: str | Path) -> None:
    """Write a profile in its file format."""
    Path(path).write_text(json.dumps(profile.to_json(), indent=2) + "\n")
