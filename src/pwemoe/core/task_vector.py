"""Task vectors tau_i = theta_i - theta_0, keyed by parameter name (never by position)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

StateDict = Mapping[str, torch.Tensor]

_MAX_LISTED = 5


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f" (and {len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return shown + more


def check_compatible(base: StateDict, other: StateDict, name: str = "expert") -> None:
    """Raise ValueError unless `other` has exactly the keys, shapes and dtypes of `base`.

    The message names the first offending keys, their shapes and which expert they belong to.
    """
    problems = []
    missing = [k for k in base if k not in other]
    unexpected = [k for k in other if k not in base]
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    shapes = [
        f"{k} {tuple(other[k].shape)} vs base {tuple(v.shape)}"
        for k, v in base.items()
        if k in other and other[k].shape != v.shape
    ]
    if shapes:
        problems.append(f"shape mismatch: {_listing(shapes)}")
    dtypes = [
        f"{k} {other[k].dtype} vs base {v.dtype}"
        for k, v in base.items()
        if k in other and other[k].shape == v.shape and other[k].dtype != v.dtype
    ]
    if dtypes:
        problems.append(f"dtype mismatch: {_listing(dtypes)}")
    if problems:
        raise ValueError(
            f"{name} is not compatible with the base model: "
            + "; ".join(problems)
            + ". Every expert must be fine-tuned from the base with the same architecture "
            "(same parameter names, shapes and dtypes)."
        )


def task_vector(base: StateDict, expert: StateDict, name: str = "expert") -> dict[str, torch.Tensor]:
    """tau = theta_expert - theta_base for every key, after validating the two match."""
    check_compatible(base, expert, name)
    return {k: expert[k].detach() - v.detach() for k, v in base.items()}


def stack_task_vectors(
    base: StateDict, experts: Mapping[str, StateDict], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Stack the task vectors of k experts: key -> Tensor[k, *param_shape].

    Experts are validated one by one; the result is allocated once and filled in place,
    so no list of k per-expert copies is ever held.
    """
    names = list(experts)
    if len(names) < 2:
        raise ValueError(f"need at least 2 experts to build a Pareto set, got {len(names)}: {names}")
    out = {k: torch.empty((len(names), *v.shape), dtype=dtype or v.dtype, device=v.device) for k, v in base.items()}
    for i, n in enumerate(names):
        check_compatible(base, experts[n], f"expert {n!r}")
        for k, v in base.items():
            out[k][i].copy_(experts[n][k].to(v.dtype) - v)
    return out
