"""The router: a tiny MLP that maps a preference r (dim k) to mixing weights lambda (dim k)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

ROUTER_INITS = ("constant", "preference")


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
    init="constant" (the paper's): weights start from N(0, init_std), the first bias at 0 and the last
    bias at init_lambda, so an untrained router returns ~init_lambda for every task (task arithmetic).
    init="preference": the router starts at lambda(r) = init_lambda * k * r (preference-weighted task
    arithmetic with c = init_lambda * k, its default scale), plus the same N(0, init_std) noise; with two
    hidden layers through relu(r) - relu(-r), which is r for any r.
    """

    def __init__(
        self, k: int, hidden_layers: int = 2, init_lambda: float = 0.3, init_std: float = 0.01, init: str = "constant"
    ) -> None:
        super().__init__()
        if hidden_layers not in (0, 1, 2):
            raise ValueError(f"router hidden_layers must be 0, 1 or 2, got {hidden_layers!r}")
        if k < 2:
            raise ValueError(f"router needs k >= 2 tasks, got {k}")
        if init not in ROUTER_INITS:
            raise ValueError(f"router init must be one of {ROUTER_INITS}, got {init!r}")
        self.k, self.hidden_layers, self.init_lambda, self.init = k, hidden_layers, float(init_lambda), init
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
        if self.init == "preference":  # lambda(r) = c r, on top of the noise
            c, eye = self.init_lambda * self.k, torch.eye(self.k)
            biases[-1].zero_()
            if self.hidden_layers == 0:
                weights[0].add_(c)
            elif self.hidden_layers == 1:
                weights[0].add_(c * eye)
            else:
                weights[0].add_(torch.cat([eye, -eye]))  # [2k, k]: relu(r), relu(-r)
                weights[1].add_(c * torch.cat([eye, -eye], dim=1))  # [k, 2k]: c (relu(r) - relu(-r))

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        """r: Tensor[k] or Tensor[..., k] -> lambda of the same shape."""
        if self.hidden_layers == 2:  # the same ops without three module calls, which cost more than the math
            first, act, last = self.net
            if not any(m._forward_hooks or m._forward_pre_hooks for m in (self.net, first, act, last)):
                return F.linear(F.relu(F.linear(r, first.weight, first.bias)), last.weight, last.bias)
        return self.net(r)  # through the modules, so hooks on them (weight_norm's, a user's) still run
