"""Routing policies, selected by name from a registry (one small module each).

Every policy answers one question through the same code path: given the instances that
may take the request now and the request's description, which one?  A policy scores the
candidates in its own way and picks one; it may return the simulator's prediction for its
choice, and the dispatcher computes it otherwise, so prediction error is measured the same
way whatever the policy.  A policy's options are the keyword parameters of its class,
listed in ``OPTIONS``; :func:`make_policy` refuses any other.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from blockproxy.cluster.instance import Instance
from blockproxy.routing.job import Job
from blockproxy.simulator import Prediction


class Policy(ABC):
    """Base of every policy: its registered name and its random source."""

    #: keyword options the constructor takes beyond ``name`` and ``rng``
    OPTIONS: ClassVar[tuple[str, ...]] = ()
    #: it routes on the job's output-length bucket (``Job.bucket_tokens``)
    USES_BUCKETS: ClassVar[bool] = False

    def __init__(self, name: str, rng: random.Random) -> None:
        self.name = name
        self.rng = rng
        #: the predictions ``choose`` returns include the expected future arrivals (the
        #: dispatcher records them as they are instead of simulating the choice again)
        self.predicts_future = False

    @abstractmethod
    def choose(self, candidates: Sequence[Instance], job: Job
               ) -> tuple[Instance, Prediction | None]:
        """Pick one of ``candidates`` (never empty); the prediction for it, if computed."""


REGISTRY: dict[str, type[Policy]] = {}


def register(*names: str) -> Callable[[type[Policy]], type[Policy]]:
    def wrap(cls: type[Policy]) -> type[Policy]:
        for name in names:
            REGISTRY[name] = cls
        return cls
    return wrap


def policy_class(name: str) -> type[Policy]:
    """The class registered as ``name``; ValueError for an unknown name."""
    _load_all()
    if name not in REGISTRY:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def make_policy(name: str, rng: random.Random | None = None, **options: Any) -> Policy:
    """Build the policy called ``name``; an option it does not take is a ValueError."""
    cls = policy_class(name)
    unknown = sorted(set(options) - set(cls.OPTIONS))
    if unknown:
        takes = ", ".join(cls.OPTIONS) or "no options"
        raise ValueError(f"policy {name!r} has no option {', '.join(unknown)} (it takes "
                         f"{takes})")
    return cls(name=name, rng=rng or random.Random(), **options)


def policy_names() -> list[str]:
    _load_all()
    return sorted(REGISTRY)


def least_loaded(candidates: Sequence[Instance], rng: random.Random) -> Instance:
    """Fewest active requests per unit of weight; ties broken at random."""
    best = min(inst.active / inst.weight for inst in candidates)
    return rng.choice([inst for inst in candidates if inst.active / inst.weight == best])


def _load_all() -> None:
    # Importing the modules registers them.
    from blockproxy.routing.policies import (  # noqa: F401
        block,
        intelligent_router,
        least_requests,
        least_tokens,
        llumnix,
        lmetric,
        power_of_two,
        prefix_affinity,
        random_choice,
        round_robin,
    )
