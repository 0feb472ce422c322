"""A preference of a LoRA-expert run written as one PEFT LoRA adapter (`save_lora_adapter`).

At full rank the adapter holds, per layer, A = [A_1; ...; A_k] and B = [lambda_1 s_1 B_1, ..., lambda_k s_k B_k]
(rank sum_i r_i, which may differ per layer). Serving engines want one rank per adapter, at most their
`max_lora_rank`: with `rank=R` each layer holds the best rank-R approximation of sum_i lambda_i s_i B_i A_i
(`compress_lowrank`), computed from the factors, never from a dense out x in product.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ..core.checks import positive_int
from ..core.factored import FactoredEnsemblingModule, LowRank, lowrank_columns
from ..core.preference import PreferenceLike
from ..routing import modules_or_raise, preference
from .adapter import write_lora_adapter


@torch.no_grad()
def save_lora_adapter(
    model: nn.Module,
    out: str | Any,
    r: PreferenceLike | None = None,
    base_model_name_or_path: str | None = None,
    prefix: str = "",
    task_type: str | None = "CAUSAL_LM",
    overwrite: bool = False,
    rank: int | None = None,
    errors: dict[str, float] | None = None,
) -> Any:
    """Write theta(r) as one PEFT LoRA adapter of rank sum_i r_i per layer, loadable by `PeftModel.from_pretrained`.

    Layer by layer: A = [A_1; ...; A_k] and B = [lambda_1 s_1 B_1, ..., lambda_k s_k B_k] with scaling 1, so
    W_0 x + B (A x) equals the upcycled layer at r exactly. Only models upcycled from LoRA experts (or
    compressed task vectors with nothing else changed) have such a form. `prefix` maps the model's
    module names to the ones of the model the adapter will be loaded on (e.g. "model." for a
    backbone whose *ForCausalLM wraps it).

    rank: one rank R for every layer (no `rank_pattern`): each layer's best rank-R approximation, zero-padded
    where a layer's own rank is smaller; R above the largest per-layer rank is refused. `errors`, if given,
    receives each layer's relative Frobenius error ||delta - delta_R||_F / ||delta||_F.
    """
    mods = modules_or_raise(model)
    info = getattr(model, "pwemoe_info", None)
    bad = [n for n, m in mods if not isinstance(m, FactoredEnsemblingModule) or m.dense_names]
    if bad or (info is not None and info.expert_format != "lora" and info.init_lambda != 0.0):
        raise ValueError(
            "a LoRA adapter can hold only low-rank changes of linear layers, but this model also changes "
            + (
                f"dense parameters in {bad[:3]}"
                if bad
                else "the non-target parameters (task arithmetic of dense experts)"
            )
            + "; export it as a plain model instead (merge_and_unload / pwemoe export)"
        )
    ctx = preference(model, r) if r is not None else contextlib.nullcontext()
    layers, transposed = {}, False
    with ctx:
        for name, m in mods:
            lam = m.routing_weights().float()
            for path in m.factored_paths:
                lr: LowRank = m.factors(path)
                cols = lowrank_columns(lam, lr.owner, lr.scale.float())
                full = prefix + (f"{name}.{path}" if path else name)
                layers[full] = (lr.A.float(), lr.B.float() * cols)
                transposed |= lr.transposed
    if rank is not None:
        most = max(a.shape[0] for a, _ in layers.values())
        hint = f"; at {most}, the largest rank sum_i r_i of a layer, the adapter is exact"
        positive_int("adapter rank", rank, maximum=most, hint=hint)
        for full, (a, b) in list(layers.items()):
            a2, b2, err = compress_lowrank(a, b, rank)
            layers[full] = (a2, b2)
            if errors is not None:
                errors[full] = err
    return write_lora_adapter(out, layers, base_model_name_or_path, task_type, transposed, overwrite)


@torch.no_grad()
def compress_lowrank(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` factors of delta = B A (A Tensor[R, in], B Tensor[out, R]), from the factors alone.

    QR of B and of A^T, then an SVD of the small R x R core: delta = Q_b (R_b R_a^T) Q_a^T, so no out x in
    matrix is formed. Returns (A' Tensor[rank, in], B' Tensor[out, rank], relative Frobenius error); rows and
    columns beyond delta's own rank are zero. Computed in float64, returned in A's dtype.
    """
    dt = A.dtype
    qa, ra = torch.linalg.qr(A.double().t())  # A^T = Q_a R_a: [in, m], [m, R]
    qb, rb = torch.linalg.qr(B.double())  # B = Q_b R_b: [out, n], [n, R]
    u, sv, vh = torch.linalg.svd(rb @ ra.t())  # [n, m] core
    keep = min(rank, sv.numel())
    root = sv[:keep].sqrt()
    b2 = torch.zeros(B.shape[0], rank, dtype=torch.float64)
    a2 = torch.zeros(rank, A.shape[1], dtype=torch.float64)
    b2[:, :keep] = (qb @ u[:, :keep]) * root
    a2[:keep] = root[:, None] * (vh[:keep] @ qa.t())
    total = float((sv * sv).sum())
    err = (float((sv[keep:] * sv[keep:]).sum()) / total) ** 0.5 if total > 0 else 0.0
    return a2.to(dt), b2.to(dt), err


__all__ = ["compress_lowrank", "save_lora_adapter"]
