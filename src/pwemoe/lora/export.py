"""A preference of a LoRA-expert run written as one PEFT LoRA adapter (`save_lora_adapter`)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

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
) -> Any:
    """Write theta(r) as one PEFT LoRA adapter of rank sum_i r_i per layer, loadable by `PeftModel.from_pretrained`.

    Layer by layer: A = [A_1; ...; A_k] and B = [lambda_1 s_1 B_1, ..., lambda_k s_k B_k] with scaling 1, so
    W_0 x + B (A x) equals the upcycled layer at r exactly. Only models upcycled from LoRA experts (or
    compressed task vectors with nothing else changed) have such a form. `prefix` maps the model's
    module names to the ones of the model the adapter will be loaded on (e.g. "model." for a
    backbone whose *ForCausalLM wraps it).
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
    return write_lora_adapter(out, layers, base_model_name_or_path, task_type, transposed, overwrite)


__all__ = ["save_lora_adapter"]
