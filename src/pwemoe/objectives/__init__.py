"""Multi-objective scalarisations, as pluggable objects in a literal registry."""

from __future__ import annotations

from typing import Any

from .base import Objective
from .epo import EPO, epo_adjustments, epo_lp
from .ls import LinearScalarization
from .tchebycheff import SmoothTchebycheff, Tchebycheff

OBJECTIVES: dict[str, type[Objective]] = {
    "ls": LinearScalarization,
    "epo": EPO,
    "tchebycheff": Tchebycheff,
    "stch": SmoothTchebycheff,
}


def check_objective_args(name: str, args: dict[str, Any], k: int) -> str | None:
    """None when objective `name` can be built from `args` for k tasks, else the reason (for config checks)."""
    if name not in OBJECTIVES:
        return f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}"
    try:
        obj = OBJECTIVES[name](**args)
    except (TypeError, ValueError) as e:
        return f"bad arguments for objective {name!r}: {args} ({e})"
    return obj.check(k)


def build_objective(name: str, **kwargs: Any) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    try:
        return OBJECTIVES[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for objective {name!r}: {kwargs} ({e})") from None


__all__ = [
    "EPO",
    "OBJECTIVES",
    "LinearScalarization",
    "Objective",
    "SmoothTchebycheff",
    "Tchebycheff",
    "build_objective",
    "check_objective_args",
    "epo_adjustments",
    "epo_lp",
]
