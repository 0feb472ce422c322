"""Tchebycheff scalarisation max_i r_i (L_i - z_i), and its smooth version (STCH, Lin et al. 2024)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Objective


def _check_ideal(ideal: float | Sequence[float], k: int) -> str | None:
    if isinstance(ideal, (int, float)) and not isinstance(ideal, bool):
        return None
    if (
        isinstance(ideal, Sequence)
        and not isinstance(ideal, str)
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in ideal)
    ):
        return (
            None if len(ideal) == k else f"ideal must have one value per task (k={k}), got {len(ideal)}: {list(ideal)}"
        )
    return f"ideal must be a number or a list of k={k} numbers, got {ideal!r}"


def _ideal(z: float | Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(z, dtype=like.dtype, device=like.device).expand_as(like)


class Tchebycheff(Objective):
    """max_i r_i (L_i - z_i); z is the ideal point (0 for non-negative losses)."""

    name = "tchebycheff"

    def __init__(self, ideal: float | Sequence[float] = 0.0) -> None:
        self.ideal = ideal

    def check(self, k: int) -> str | None:
        return _check_ideal(self.ideal, k)

    def loss(self, losses: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return (r.to(losses) * (losses - _ideal(self.ideal, losses))).max()


class SmoothTchebycheff(Objective):
    """mu * log sum_i exp(r_i (L_i - z_i) / mu): a smooth upper bound of Tchebycheff, tight as mu -> 0."""

    name = "stch"

    def __init__(self, mu: float = 0.1, ideal: float | Sequence[float] = 0.0) -> None:
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not mu > 0:
            raise ValueError(f"stch mu must be > 0, got {mu}")
        self.mu, self.ideal = float(mu), ideal

    def check(self, k: int) -> str | None:
        return _check_ideal(self.ideal, k)

    def loss(self, losses: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        u = r.to(losses) * (losses - _ideal(self.ideal, losses))
        return self.mu * torch.logsumexp(u / self.mu, dim=0)
