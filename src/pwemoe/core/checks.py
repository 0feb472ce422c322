"""Checks of argument values that every layer makes, each written once with one wording."""

from __future__ import annotations

from typing import Any


def positive_int_problem(name: str, value: Any, minimum: int = 1, maximum: int | None = None) -> str | None:
    """None when `value` is an int in [minimum, maximum] (a bool is not an int here, though Python's `True == 1`),
    else the message: "{name} must be an integer >= {minimum}, got {value!r}"."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        return f"{name} must be an integer {bounds}, got {value!r}"
    return None


def positive_int(name: str, value: Any, minimum: int = 1, maximum: int | None = None, hint: str = "") -> int:
    """`value` when it is an int (not a bool) in [minimum, maximum]; else ValueError naming `name`, the bounds and the
    value received, followed by `hint` (e.g. "; at 16 the adapter is exact")."""
    problem = positive_int_problem(name, value, minimum, maximum)
    if problem is not None:
        raise ValueError(problem + hint)
    return value


__all__ = ["positive_int", "positive_int_problem"]
