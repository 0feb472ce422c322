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

import numpy as np
import torch

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
    """Weights the task gradients by k * alpha, alpha from the EPO LP on C = G G^T."""

    name = "epo"
    needs_task_gradients = True

    def __init__(self, eps: float = 1e-4) -> None:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"epo eps must be a number >= 0, got {eps!r}")
        self.eps = float(eps)
        self.fallbacks = 0
        self.calls = 0
        self.moves = {"bal": 0, "dom": 0}

    def weights(self, losses: torch.Tensor, r: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        k = len(losses)
        l_np = losses.detach().double().cpu().numpy()
        r_np = r.detach().double().cpu().numpy()
        Gd = G.detach().double()
        C = (Gd @ Gd.T).cpu().numpy()
        self.calls += 1
        alpha, move = epo_lp(l_np, r_np, C, self.eps)
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
        return torch.as_tensor(k * alpha, dtype=losses.dtype, device=losses.device)

    def state_dict(self) -> dict[str, int]:
        return {"fallbacks": self.fallbacks, "calls": self.calls, **{f"moves_{m}": v for m, v in self.moves.items()}}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.fallbacks, self.calls = int(state["fallbacks"]), int(state["calls"])
        self.moves = {m: int(state[f"moves_{m}"]) for m in self.moves}

    def stats(self) -> dict[str, float]:
        return {
            "epo_fallbacks": self.fallbacks,
            "epo_calls": self.calls,
            **{f"epo_{m}": v for m, v in self.moves.items()},
        }
