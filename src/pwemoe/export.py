"""theta(r) baked into a plain model: `merge_and_unload` (a new copy) and `merge_into` (re-merge a copy).

`PlainCopy` is the one way to evaluate many preferences: one plain copy, re-merged per preference.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
from torch import nn

from .core.preference import PreferenceLike
from .recompute import unwrap
from .routing import ensembling_modules, modules_or_raise, preference


@torch.no_grad()
def merge_and_unload(model: nn.Module, r: PreferenceLike | None = None) -> nn.Module:
    """A new plain model of the original class with the weights theta(r) baked in.

    The upcycled model is left intact. The copy shares nothing with it, holds no task
    vectors and no routers, and `save_pretrained` writes a directory that plain transformers
    loads. Task vectors are never duplicated during the copy (they are memoised away).
    """
    mods = modules_or_raise(model)
    ctx = preference(model, r) if r is not None else contextlib.nullcontext()
    memo: dict[int, Any] = {}
    with ctx:
        for _, m in mods:
            merged = m.merged_weights()
            for pn, p in m.base_layer.named_parameters():
                memo[id(p)] = nn.Parameter(merged[pn].detach().clone(), requires_grad=False)
            for t in m.stored_tensors():
                memo[id(t)] = torch.empty(0)
            m.clear_cache()  # the copy must not carry (or duplicate) a cached merge
    kept = [(m, m.take_row_cache()) for _, m in mods]  # nor serving's row state, which the model keeps
    try:
        new = copy.deepcopy(model, memo)
    finally:
        for m, cache in kept:
            m.put_row_cache(cache)
    unwrap(new)  # a plain model: no training-time wrappers
    for name, m in list(ensembling_modules(new)):
        new.set_submodule(name, m.base_layer)
    if hasattr(new, "pwemoe_info"):
        del new.pwemoe_info
    for p in new.parameters():
        p.requires_grad_(True)  # a plain model, as from_pretrained returns it
    return new


@torch.no_grad()
def merge_into(model: nn.Module, plain: nn.Module, r: PreferenceLike) -> nn.Module:
    """Write theta(r) of every upcycled module into `plain`, a `merge_and_unload` copy of `model`.

    Evaluating many preferences this way merges once per preference and then runs a plain
    model: no functional_call per batch, and no new copy of the model per preference.
    """
    with preference(model, r):
        for name, m in modules_or_raise(model):
            target = plain.get_submodule(name)
            merged = m.merged_weights()
            for pn, p in target.named_parameters():
                p.copy_(merged[pn])
            m.clear_cache()
    return plain


class PlainCopy:
    """One plain copy of an upcycled model, re-merged for each preference it is asked for.

    The first `at(r)` makes the copy (`merge_and_unload`); later ones write theta(r) into it
    (`merge_into`, no allocation). `fixed` gives the baselines' theta_0 + sum_i w_i tau_i of the
    upcycled modules (lambda fixed to w, the routers bypassed). Used by validation during training,
    evaluation sweeps, the baselines of LoRA runs and the serving cache.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.plain: nn.Module | None = None

    @torch.no_grad()
    def at(self, r: PreferenceLike) -> nn.Module:
        """The copy holding theta(r) (in eval mode)."""
        if self.plain is None:
            self.plain = merge_and_unload(self.model, r).eval()
        else:
            merge_into(self.model, self.plain, r)
        return self.plain

    @torch.no_grad()
    def fixed(self, weights: Any) -> nn.Module:
        """The copy holding theta_0 + sum_i w_i tau_i in the upcycled modules (lambda fixed to `weights`)."""
        from .routing import fixed_lambda, num_tasks

        w = torch.as_tensor(list(weights), dtype=torch.float32)
        uniform = torch.full((num_tasks(self.model),), 1.0)  # the preference is unused under fixed lambda
        with fixed_lambda(self.model, w):
            return self.at(uniform)

    def release(self) -> None:
        """Drop the copy (its memory is freed once no caller holds it)."""
        self.plain = None


__all__ = ["PlainCopy", "merge_and_unload", "merge_into"]
