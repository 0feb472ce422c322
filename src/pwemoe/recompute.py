"""Activation checkpointing for router training: recompute activations in the backward instead of keeping them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .devices import CHECKPOINT_SCOPES
from .routing import ensembling_modules


def gradient_checkpointing(model: nn.Module, enable: bool = True, scope: str = "layers") -> int:
    """Recompute activations in the backward instead of keeping them.

    scope="layers": every Hugging Face `GradientCheckpointingLayer` (each transformer layer keeps only
    its input). scope="upcycled": only the upcycled modules (an MLP keeps its input and recomputes its
    hidden activations, the largest a layer saves, from one GEMM), so less memory is freed for much
    less recomputation. Each forward is wrapped in a non-reentrant `torch.utils.checkpoint` (works in
    eval mode, unlike `gradient_checkpointing_enable`, which needs `model.train()` and so dropout).
    Inside `shared_merge` the recomputation reuses the step's merge. Returns the number of modules
    wrapped; raises when the model has none. enable=False unwraps both scopes.
    """
    if scope not in CHECKPOINT_SCOPES:
        raise ValueError(f"gradient checkpointing scope must be one of {CHECKPOINT_SCOPES}, got {scope!r}")
    if not enable:
        wrapped = [m for m in model.modules() if isinstance(m.__dict__.get("forward"), _CheckpointedForward)]
        for m in wrapped:
            del m.__dict__["forward"]
        return len(wrapped)
    if scope == "upcycled":
        targets: list[nn.Module] = [m for _, m in ensembling_modules(model)]
        if not targets:
            raise ValueError(
                f"{type(model).__name__} has no upcycled modules to checkpoint; set train.gradient_checkpointing "
                "to layers or false"
            )
    else:
        targets = [
            m for m in model.modules() if any(c.__name__ == "GradientCheckpointingLayer" for c in type(m).__mro__)
        ]
        if not targets:
            raise ValueError(
                f"{type(model).__name__} has no Hugging Face GradientCheckpointingLayer to checkpoint; "
                "set train.gradient_checkpointing=false"
            )
    cfg = getattr(model, "config", None)
    for m in targets:
        if "forward" in m.__dict__:
            continue  # already wrapped
        m.forward = _CheckpointedForward(m)
    if scope == "layers" and cfg is not None and getattr(cfg, "use_cache", None):
        cfg.use_cache = False  # a recomputed layer must not write a cache (upcycled MLPs write none)
    return len(targets)


class _CheckpointedForward:
    """A module's own forward through a non-reentrant `torch.utils.checkpoint`, set as `module.forward`.

    It holds the module, not a bound method or a closure, so `copy.deepcopy` (through its memo) and
    pickle rebind it to the copy: a copied model runs its own layers, not the original's.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from torch.utils.checkpoint import checkpoint

        orig = type(self.module).forward.__get__(self.module)
        if not torch.is_grad_enabled():
            return orig(*args, **kwargs)
        for key in ("past_key_values", "layer_past", "cache"):  # a recomputed layer must not write a cache twice
            if kwargs.get(key) is not None:
                kwargs[key] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        return checkpoint(orig, *args, use_reentrant=False, **kwargs)


def unwrap(model: nn.Module) -> int:
    """Remove every checkpointing wrapper (`gradient_checkpointing(model, enable=False)`); returns how many."""
    return gradient_checkpointing(model, enable=False)


__all__ = ["gradient_checkpointing", "unwrap"]
