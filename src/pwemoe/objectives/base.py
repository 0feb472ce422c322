"""The objective interface: combine per-task losses L (Tensor[k]) under preference r (Tensor[k])."""

from __future__ import annotations

import torch


class Objective:
    """A multi-objective scalarisation.

    `needs_task_gradients`: when True the training loop passes G (Tensor[k, p]), the per-task
    gradients of the losses w.r.t. the router parameters, and uses the returned weights w
    (Tensor[k]) to form the update sum_i w_i grad L_i. Otherwise it backpropagates `loss`.
    """

    name = "objective"
    needs_task_gradients = False

    def loss(self, losses: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """losses: Tensor[k] (with graph), r: Tensor[k] -> scalar to backpropagate."""
        raise NotImplementedError

    def linear_weights(self, r: torch.Tensor) -> torch.Tensor | None:
        """c (Tensor[k]) when the objective is sum_i c_i L_i with c independent of L, else None.

        A linear objective lets the training loop backpropagate each forward as soon as it is done.
        """
        return None

    def weights(self, losses: torch.Tensor, r: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        """Gradient-based objectives: detached losses Tensor[k], G Tensor[k, p] -> weights Tensor[k]."""
        raise NotImplementedError

    def check(self, k: int) -> str | None:
        """None when the objective's settings fit k tasks, else what is wrong (e.g. a per-task list's length)."""
        return None

    def stats(self) -> dict[str, float]:
        """Counters worth logging (e.g. LP fallbacks)."""
        return {}

    def state_dict(self) -> dict[str, int]:
        """What a checkpoint must keep for an exact resume (counters); empty for stateless objectives."""
        return {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state:
            raise ValueError(f"objective {self.name!r} keeps no state, got {sorted(state)}")
