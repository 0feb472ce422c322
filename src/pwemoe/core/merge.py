"""theta_0 + sum_i w_i tau_i, the one merge everything in pwemoe is made of (mergekit / torchtune style).

Two forms of the same formula: `merge_weights` over stacked task vectors T (Tensor[k, *shape]),
differentiable in w, used by the ensembling modules and the baselines' bank; and
`add_task_vector_` for experts that stream one at a time (upcycle, state-dict merges).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .task_vector import StateDict, check_compatible


class _Merge(torch.autograd.Function):
    """merged = theta0 + sum_i lam_i * T_i, with a gradient for lam only.

    Computed without a k x P temporary: one addmv when T has theta0's dtype, otherwise one
    upcast expert row at a time. Backward is grad_lam = T @ grad (a matrix-vector product),
    and nothing is saved beyond T itself, which is stored anyway.
    """

    @staticmethod
    def forward(ctx, lam: torch.Tensor, theta0: torch.Tensor, T: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(T)
        return _merged(lam, theta0, T)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (T,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return lambda_grad(T, grad), None, None


def _merged(lam: torch.Tensor, theta0: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """theta0 + sum_i lam_i T_i, no autograd: one addmv when T has theta0's dtype, else one row at a time."""
    k = T.shape[0]
    flat0 = theta0.reshape(-1)
    Tf = T.reshape(k, -1)
    if T.dtype == theta0.dtype:
        out = torch.addmv(flat0, Tf.t(), lam.detach().to(theta0.dtype))
    else:
        # add_ with a mixed-dtype operand upcasts on the fly: no per-row temporary.
        out = flat0.clone()
        for i, li in enumerate(lam.detach().tolist()):
            out.add_(Tf[i], alpha=li)
    return out.view_as(theta0)


def lambda_grad(T: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """dL/dlam = T [k, *s] . grad [*s] -> Tensor[k] in grad's dtype (one row of T upcast at a time if they differ)."""
    k = T.shape[0]
    g = grad.reshape(-1)
    Tf = T.reshape(k, -1)
    if Tf.dtype == g.dtype:
        return torch.mv(Tf, g)
    return torch.stack([torch.dot(Tf[i].to(g.dtype), g) for i in range(k)])


def lambda_grads(T: torch.Tensor, grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """dL_j/dlam for several weight gradients: Tensor[J, k], row j = T [k, *s] . grads[j] [*s] (None: zeros).

    The J products run back to back, so T (a few MB per weight) is read from memory once and then
    from cache; the gradients are not stacked into a [J, *s] copy, whose allocation and writes cost
    as much as the products (EPO's per-task router gradients, `task_segments`).
    """
    like = next((g for g in grads if g is not None), None)
    dtype = like.dtype if like is not None else torch.float32
    zeros = torch.zeros(T.shape[0], dtype=dtype, device=T.device)
    return torch.stack([zeros if g is None else lambda_grad(T, g) for g in grads])


def merge_weights(lam: torch.Tensor, theta0: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """theta0 + sum_i lam[i] * T[i].  lam: Tensor[k]; theta0: Tensor[*s]; T: Tensor[k, *s] -> Tensor[*s]."""
    if lam.requires_grad and torch.is_grad_enabled():
        return _Merge.apply(lam, theta0, T)
    return _merged(lam, theta0, T)  # an autograd.Function's call costs more than a small layer's merge


@torch.no_grad()
def add_task_vector_(acc: torch.Tensor, expert: torch.Tensor, base: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """acc += weight * (expert - base), in place, for one parameter of one streamed expert."""
    return acc.add_(expert.detach().to(device=base.device, dtype=base.dtype) - base, alpha=weight)


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
                add_task_vector_(out[k], experts[n][k], v, wi)
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
