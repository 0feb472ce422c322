"""Linear scalarisation: sum_i r_i L_i."""

from __future__ import annotations

import torch

from .base import Objective


class LinearScalarization(Objective):
    name = "ls"

    def loss(self, losses: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return (r.to(losses) * losses).sum()

    def linear_weights(self, r: torch.Tensor) -> torch.Tensor:
        return r
