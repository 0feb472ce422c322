"""The router: a tiny MLP that maps a preference r (dim k) to mixing weights lambda (dim k)."""

from __future__ import annotations

import torch
from torch import nn


class ElementwiseAffine(nn.Module):
    """lambda_i = w_i * r_i + b_i: the 0-hidden-layer router (2k parameters)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(k))
        self.bias = nn.Parameter(torch.empty(k))

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return r * self.weight + self.bias


class Router(nn.Module):
    """Preference -> lambda.

    hidden_layers=2 (default): Linear(k, 2k) -> ReLU -> Linear(2k, k), 4k^2 + 3k parameters.
    hidden_layers=1: Linear(k, k). hidden_layers=0: per-task affine w * r + b.
    Weights start from N(0, init_std), the first bias at 0 and the last bias at init_lambda,
    so an untrained router returns ~init_lambda for every task (task arithmetic).
    """

    def __init__(self, k: int, hidden_layers: int = 2, init_lambda: float = 0.3, init_std: float = 0.01) -> None:
        super().__init__()
        if hidden_layers not in (0, 1, 2):
            raise ValueError(f"router hidden_layers must be 0, 1 or 2, got {hidden_layers!r}")
        if k < 2:
            raise ValueError(f"router needs k >= 2 tasks, got {k}")
        self.k, self.hidden_layers, self.init_lambda = k, hidden_layers, float(init_lambda)
        if hidden_layers == 0:
            self.net: nn.Module = ElementwiseAffine(k)
        elif hidden_layers == 1:
            self.net = nn.Sequential(nn.Linear(k, k))
        else:
            self.net = nn.Sequential(nn.Linear(k, 2 * k), nn.ReLU(), nn.Linear(2 * k, k))
        self.reset_parameters(init_std)

    @torch.no_grad()
    def reset_parameters(self, init_std: float = 0.01) -> None:
        weights = [p for n, p in self.net.named_parameters() if n.endswith("weight")]
        biases = [p for n, p in self.net.named_parameters() if n.endswith("bias")]
        for w in weights:
            w.normal_(0.0, init_std)
        for b in biases[:-1]:
            b.zero_()
        biases[-1].fill_(self.init_lambda)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        """r: Tensor[k] or Tensor[..., k] -> lambda of the same shape."""
        return self.net(r)
