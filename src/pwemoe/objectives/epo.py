"""Exact Pareto optimal search (Mahapatra & Rajan, 2020), as used through the PHN solver.

The LPs are solved with scipy's HiGHS (no cvxpy). With l the losses, r the preference and
C = G G^T (G: the k x p Jacobian of the losses w.r.t. the router parameters):
rl = r*l, l_hat = rl / sum(rl), mu = KL(l_hat || uniform), a = r (log(k l_hat) - mu).
If mu > eps, the balance LP: max alpha.Ca s.t. alpha in the simplex, (C alpha)_j >= (Ca)_j for
the j with (Ca)_j <= 0 except argmax(rl), which gets (C alpha)_j >= 0 (all rows >= 0 if no
(Ca)_j is positive). Otherwise the descent LP: max sum(alpha^T C) s.t. alpha in the simplex,
alpha.Ca >= min(max(Ca), 0) and C alpha >= 0. The update is sum_i k alpha_i grad L_i.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from ..core.checks import positive_int
from .base import Objective

log = logging.getLogger(__name__)


def epo_adjustments(losses: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """rl = r*l, mu = KL(l_hat || uniform) over entries above machine eps, a = r (log(k l_hat) - mu)."""
    k = len(losses)
    rl = r * losses
    if (rl < 0).any():
        raise ValueError(f"EPO needs non-negative losses and preferences, got r*l = {rl}")
    total = rl.sum()
    l_hat = rl / total if total > 0 else np.full(k, 1.0 / k)
    eps = np.finfo(l_hat.dtype).eps
    kept = l_hat[l_hat > eps]
    mu = float(np.sum(kept * np.log(kept * k)))
    # log(0) would make a = -inf; entries that small carry no balance information.
    a = r * (np.log(np.maximum(l_hat, eps) * k) - mu)
    return rl, mu, a


def epo_lp(losses: np.ndarray, r: np.ndarray, C: np.ndarray, eps: float = 1e-4) -> tuple[np.ndarray | None, str]:
    """Solve the EPO LP. C = G G^T (k x k). Returns (alpha or None if the LP failed, 'bal' | 'dom')."""
    from scipy.optimize import linprog

    k = len(losses)
    rl, mu, a = epo_adjustments(losses, r)
    Ca = C @ a
    move = "bal" if mu > eps else "dom"
    if not (np.isfinite(C).all() and np.isfinite(Ca).all()):
        return None, move
    A_eq, b_eq = np.ones((1, k)), np.array([1.0])
    if move == "bal":
        rhs = Ca.copy()
        J = Ca > 0
        if J.any():
            rhs[J] = -np.inf
            rhs[rl == rl.max()] = 0.0
        else:
            rhs[:] = 0.0
        keep = np.isfinite(rhs)
        # max alpha.Ca  s.t. C alpha >= rhs (finite rows), alpha in simplex
        res = linprog(
            -Ca,
            A_ub=-C[keep] if keep.any() else None,
            b_ub=-rhs[keep] if keep.any() else None,
            A_eq=A_eq,
            b_eq=b_eq,
            bounds=[(0, None)] * k,
            method="highs",
        )
    else:
        # max sum(alpha^T C)  s.t. alpha.Ca >= min(max(Ca), 0), C alpha >= 0, alpha in simplex
        A_ub = np.vstack([-Ca[None, :], -C])
        b_ub = np.concatenate([[-min(Ca.max(), 0.0)], np.zeros(k)])
        res = linprog(
            -C.sum(axis=0), A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq, bounds=[(0, None)] * k, method="highs"
        )
    if res.status != 0 or res.x is None:
        return None, move
    return np.clip(res.x, 0.0, None), move


class EPO(Objective):
    """Weights the task gradients by k * alpha, alpha from the EPO LP on C = G G^T.

    Options (both off by default, which is the published method):
        normalize: "initial" divides each task's loss by its mean over the first `warmup` calls
            (the loss at the start of training), so tasks whose losses live on different scales
            (2-class vs 5-class cross-entropy) are balanced relative to where they started, as in
            normalised-loss EPO variants. The LP sees l_i / s_i and G_i / s_i; the returned weights
            apply to the raw losses (k alpha_i mean(s) / s_i).
        floor: mixes r with the uniform preference, r' = (1 - k floor) r + floor, so rays on the
            simplex boundary ask for finite loss ratios (at most (1 - (k-1) floor) / floor) and the
            balance LP is never degenerate (a zero r_i makes the adjustment vector a zero there).
    """

    name = "epo"
    needs_task_gradients = True

    def __init__(self, eps: float = 1e-4, normalize: str = "none", floor: float = 0.0, warmup: int = 8) -> None:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"epo eps must be a number >= 0, got {eps!r}")
        if normalize not in ("none", "initial"):
            raise ValueError(f"epo normalize must be 'none' or 'initial', got {normalize!r}")
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor < 0.5:
            raise ValueError(f"epo floor must be a number in [0, 1/k), got {floor!r}")
        positive_int("epo warmup", warmup)
        self.eps, self.normalize, self.floor, self.warmup = float(eps), normalize, float(floor), warmup
        self.fallbacks = 0
        self.calls = 0
        self.moves = {"bal": 0, "dom": 0}
        self._scale_sum: list[float] | None = None  # normalize="initial": summed losses of the first calls
        self._scale_n = 0

    def check(self, k: int) -> str | None:
        if self.floor * k >= 1:
            return f"epo floor must be below 1/k = {1 / k:.4f} for k = {k} tasks, got {self.floor}"
        return None

    def scales(self, losses: np.ndarray) -> np.ndarray:
        """s (k,): ones, or the mean loss of each task over the first `warmup` calls."""
        if self.normalize == "none":
            return np.ones_like(losses)
        if self._scale_n < self.warmup:
            self._scale_sum = (
                np.zeros_like(losses) if self._scale_sum is None else np.asarray(self._scale_sum)
            ) + losses
            self._scale_n += 1
        s = np.asarray(self._scale_sum) / self._scale_n
        return np.maximum(s, np.finfo(s.dtype).eps)

    def effective_preference(self, r: np.ndarray) -> np.ndarray:
        k = len(r)
        return (1 - k * self.floor) * r + self.floor

    def weights(self, losses: torch.Tensor, r: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        k = len(losses)
        l_np = losses.detach().double().cpu().numpy()
        r_np = self.effective_preference(r.detach().double().cpu().numpy())
        s = self.scales(l_np)
        Gd = G.detach().double() / torch.as_tensor(s, dtype=torch.float64, device=G.device)[:, None]
        C = (Gd @ Gd.T).cpu().numpy()
        self.calls += 1
        alpha, move = epo_lp(l_np / s, r_np, C, self.eps)
        self.moves[move] += 1
        if alpha is None:
            self.fallbacks += 1
            log.warning(
                "EPO %s LP failed (fallback %d of %d calls); using the normalised preference",
                move,
                self.fallbacks,
                self.calls,
            )
            alpha = r_np / r_np.sum()
        w = k * alpha * s.mean() / s  # per raw loss; the mean scale keeps the step size (s equal: w = k alpha)
        return torch.as_tensor(w, dtype=losses.dtype, device=losses.device)

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "fallbacks": self.fallbacks,
            "calls": self.calls,
            **{f"moves_{m}": v for m, v in self.moves.items()},
        }
        if self.normalize != "none":
            out["scale_n"] = self._scale_n
            # plain floats: numpy scalars would not pass the trainer state's weights_only load
            out["scale_sum"] = [float(x) for x in self._scale_sum] if self._scale_sum is not None else []
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fallbacks, self.calls = int(state["fallbacks"]), int(state["calls"])
        self.moves = {m: int(state[f"moves_{m}"]) for m in self.moves}
        if self.normalize != "none":
            self._scale_n = int(state.get("scale_n", 0))
            sums = state.get("scale_sum") or []
            self._scale_sum = [float(x) for x in sums] if sums else None

    def stats(self) -> dict[str, float]:
        return {
            "epo_fallbacks": self.fallbacks,
            "epo_calls": self.calls,
            **{f"epo_{m}": v for m, v in self.moves.items()},
        }
