"""Merge methods as pure functions over state dicts (mergekit / torchtune style)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .task_vector import StateDict, check_compatible


def weighted_task_arithmetic(
    base: StateDict, experts: Mapping[str, StateDict], weights: Sequence[float] | torch.Tensor
) -> dict[str, torch.Tensor]:
    """theta_0 + sum_i w_i (theta_i - theta_0) for every key of `base`.

    Experts are visited one at a time and accumulated into one output copy, so memory is
    base + output + whatever the caller holds.
    """
    names = list(experts)
    w = torch.as_tensor(weights, dtype=torch.float64).flatten().tolist()
    if len(w) != len(names):
        raise ValueError(f"need one weight per expert: {len(names)} experts {names}, got {len(w)} weights")
    out = {k: v.detach().clone() for k, v in base.items()}
    for n, wi in zip(names, w):
        check_compatible(base, experts[n], f"expert {n!r}")
        if wi == 0:
            continue
        for k, v in base.items():
            if v.is_floating_point():
                out[k].add_(experts[n][k].detach().to(v.dtype) - v, alpha=wi)
    return out


def task_arithmetic(base: StateDict, experts: Mapping[str, StateDict], scaling: float) -> dict[str, torch.Tensor]:
    """theta_0 + scaling * sum_i tau_i (Ilharco et al., 2023)."""
    return weighted_task_arithmetic(base, experts, [scaling] * len(experts))


def simple_average(base: StateDict, experts: Mapping[str, StateDict]) -> dict[str, torch.Tensor]:
    """(1/k) sum_i theta_i, written as task arithmetic with scaling 1/k."""
    return task_arithmetic(base, experts, 1.0 / len(experts))


def preference_weighted_task_arithmetic(
    base: StateDict, experts: Mapping[str, StateDict], r: torch.Tensor, c: float
) -> dict[str, torch.Tensor]:
    """theta_0 + c * sum_i r_i tau_i: the training-free preference-conditioned baseline."""
    return weighted_task_arithmetic(base, experts, c * torch.as_tensor(r, dtype=torch.float64))
