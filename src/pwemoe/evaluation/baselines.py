"""Whole-model merges for the baselines: theta_0 + sum_i w_i tau_i over every parameter.

The upcycled model keeps theta_0 and tau only for its targets (the rest is already merged),
so the baselines hold their own full stack: theta_0 + T_all, built streamed, one expert at a time.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..core.ensembling import merge_weights
from ..core.task_vector import check_compatible


class TaskVectorBank:
    """theta_0 and the stacked task vectors of all floating parameters of a backbone."""

    def __init__(self, base: nn.Module, experts: Mapping[str, Callable[[], nn.Module]]) -> None:
        self.template = copy.deepcopy(base).eval().requires_grad_(False)
        params = {n: p for n, p in self.template.named_parameters() if p.is_floating_point()}
        self.names = list(experts)
        self.theta0 = {n: p.detach().clone() for n, p in params.items()}
        self.T = {n: torch.empty((len(self.names), *p.shape), dtype=p.dtype) for n, p in params.items()}
        for i, name in enumerate(self.names):
            e = experts[name]()
            ep = dict(e.named_parameters())
            check_compatible(self.theta0, {n: v for n, v in ep.items() if v.is_floating_point()}, f"expert {name!r}")
            with torch.no_grad():
                for n in self.theta0:
                    self.T[n][i].copy_(ep[n] - self.theta0[n])
            del e, ep

    @torch.no_grad()
    def model(self, weights: torch.Tensor | list[float]) -> nn.Module:
        """The backbone with theta_0 + sum_i w_i tau_i loaded (reuses one template module)."""
        w = torch.as_tensor(weights, dtype=torch.float32)
        for n, p in self.template.named_parameters():
            if n in self.T:
                p.copy_(merge_weights(w, self.theta0[n], self.T[n]))
        return self.template
