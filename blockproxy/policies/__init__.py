"""Routing policies, selected by name from a registry (one small module each).

Every policy answers one question through the same code path: given the instances that
may take the request now and the request's size, which one?  A policy may return the
simulator's prediction for its choice; the server computes it otherwise, so prediction
error is measured the same way whatever the policy.
"""

from __future__ import annotations

import random
from typing import Callable, NamedTuple, Protocol, Sequence

from blockproxy.cluster import Instance

Prediction = tuple[float, float, float, int, int, int]


class Job(NamedTuple):
    """What a policy knows about the request being routed."""

    prompt_tokens: int
    cached_tokens: int
    output_tokens: int


class Policy(Protocol):
    name: str

    def choose(self, candidates: Sequence[Instance], job: Job
               ) -> tuple[Instance, Prediction | None]:
        """Pick one of ``candidates`` (never empty)."""


PolicyFactory = Callable[..., Policy]
REGISTRY: dict[str, PolicyFactory] = {}


def register(*names: str) -> Callable[[PolicyFactory], PolicyFactory]:
    def wrap(factory: PolicyFactory) -> PolicyFactory:
        for name in names:
            REGISTRY[name] = factory
        return factory
    return wrap


def make_policy(name: str, rng: random.Random | None = None, **options: object) -> Policy:
    """Build the policy called ``name``; options a policy does not use are ignored."""
    _load_all()
    if name not in REGISTRY:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](name=name, rng=rng or random.Random(), **options)


def policy_names() -> list[str]:
    _load_all()
    return sorted(REGISTRY)


def _load_all() -> None:
    # Importing the modules registers them.
    from blockproxy.policies import (  # noqa: F401
        block,
        least_requests,
        least_tokens,
        llumnix,
        power_of_two,
        random_choice,
        round_robin,
    )
