"""Reads step-time profiles (``profiles/*.json``) without importing ``blockproxy``.

The emulator is the proxy's ground truth, so it keeps its own small reader instead of
sharing the proxy's loader.  A profile is found by name in loadgen's own package data
(``loadgen.profiles``: the repository's ``profiles/`` folder, installed with loadgen), or
given as a path to a JSON file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class StepTimeModel:
    """Coefficients of one engine step's duration, in seconds and seconds per unit."""

    fixed_s: float
    per_prefill_token_s: float
    per_decode_seq_s: float
    per_context_token_s: float
    #: what a request costs before the engine queues it (the API server's share)
    per_request_s: float = 0.0

    def seconds(self, prefill_tokens: int, decode_seqs: int, context_tokens: int) -> float:
        """Noise-free duration of a step at time-scale 1 and speed factor 1."""
        return (self.fixed_s + self.per_prefill_token_s * prefill_tokens
                + self.per_decode_seq_s * decode_seqs
                + self.per_context_token_s * context_tokens)


@dataclass(frozen=True)
class EngineLimits:
    """vLLM engine limits of one instance."""

    max_num_seqs: int
    max_num_batched_tokens: int
    num_gpu_blocks: int
    block_size: int
    max_model_len: int


@dataclass(frozen=True)
class Profile:
    """A named step-time model with the engine limits it was measured with."""

    name: str
    step_time: StepTimeModel
    engine: EngineLimits


def find_profile(name_or_path: str) -> Path:
    """Path of the profile called ``name_or_path``, or the JSON file it names."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".json" or candidate.is_file():
        if candidate.is_file():
            return candidate
        raise FileNotFoundError(f"profile file {name_or_path!r} does not exist")
    shipped = resources.files("loadgen.profiles")
    path = shipped.joinpath(f"{name_or_path}.json")
    if path.is_file():
        return Path(str(path))
    names = sorted(p.name[:-5] for p in shipped.iterdir() if p.name.endswith(".json"))
    raise FileNotFoundError(f"no profile named {name_or_path!r} (shipped: {', '.join(names)})")


def _number(section: dict[str, Any], key: str, where: str) -> float:
    value = section.get(key, 0.0 if key in ("per_context_token_us", "per_request_ms")
                        else None)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}.{key}: expected a non-negative number, got {value!r}")
    return float(value)


def _positive_int(section: dict[str, Any], key: str, where: str) -> int:
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{where}.{key}: expected a positive integer, got {value!r}")
    return value


def parse_profile(data: dict[str, Any], name: str = "") -> Profile:
    """Validate a profile's JSON object and build a :class:`Profile`."""
    step = data.get("step_time")
    engine = data.get("engine")
    if not isinstance(step, dict) or not isinstance(engine, dict):
        raise ValueError("profile needs 'step_time' and 'engine' objects")
    model = StepTimeModel(
        fixed_s=_number(step, "fixed_ms", "step_time") * 1e-3,
        per_prefill_token_s=_number(step, "per_prefill_token_us", "step_time") * 1e-6,
        per_decode_seq_s=_number(step, "per_decode_seq_us", "step_time") * 1e-6,
        per_context_token_s=_number(step, "per_context_token_us", "step_time") * 1e-6,
        per_request_s=_number(step, "per_request_ms", "step_time") * 1e-3,
    )
    limits = EngineLimits(*(_positive_int(engine, key, "engine") for key in (
        "max_num_seqs", "max_num_batched_tokens", "num_gpu_blocks", "block_size",
        "max_model_len")))
    return Profile(name=str(data.get("name", name)), step_time=model, engine=limits)


def load_profile(name_or_path: str) -> Profile:
    """Find, read and validate a profile by name or path."""
    path = find_profile(name_or_path)
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a profile is a JSON object")
    return parse_profile(data, name=path.stem)
