"""A serving copy of a model's frozen linear weights in the autocast dtype, swapped in for a forward.

Under autocast to bf16 (or fp16) every linear layer rounds its fp32 weight to that dtype at every call: for a small
model decoding a few rows, those casts cost about as much as the matmuls. `ServingWeights` rounds each frozen weight
once (round to nearest even, as autocast's cast does, so the layers' outputs are the same bits) and puts the copies
in place only for the forwards it wraps: merges, exports and training keep reading the fp32 weights.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from collections.abc import Iterator

import torch
from torch import nn

from ..core.ensembling import EnsemblingModule, WeightEnsemblingModule


class ServingWeights:
    """Copies in `dtype` of every frozen floating parameter of `model`'s nn.Linear layers, kept while the originals
    are the same, unchanged tensors. Left as they are: a parameter shared with another module (a tied output layer),
    the routers (they run in their own dtype, autocast off), the layers of upcycled modules that merge their
    weights from theta_0 (dense experts, dense biases or norms): their merges must read the fp32 theta_0, and the
    LoRA layers a factored module serves from its own copy ([W_0; A] fused, `fused_layers`).

    Memory: the linear weights once more, at the width of `dtype` (half of fp32 for bf16)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        self.model, self.dtype = model, dtype
        self._slots: list[tuple[dict, str, torch.Tensor, tuple[int, int], torch.Tensor]] = []
        self._build()

    def _build(self) -> None:
        uses = Counter(id(p) for _, p in self.model.named_parameters(remove_duplicate=False))
        skip: set[int] = set()
        for m in self.model.modules():
            if isinstance(m, EnsemblingModule):
                skip |= {id(c) for c in m.router.modules()}
                if isinstance(m, WeightEnsemblingModule) or getattr(m, "dense_names", None):
                    skip |= {id(c) for c in m.base_layer.modules()}
                else:  # layers the module's serving path runs on its own fused copy
                    skip |= {id(m.base_layer.get_submodule(p)) for p in m.fused_layers(self.dtype)}
        slots = []
        with torch.no_grad():
            for m in self.model.modules():
                if not isinstance(m, nn.Linear) or id(m) in skip:
                    continue
                params = [(n, p) for n, p in m._parameters.items() if p is not None]
                if any(uses[id(p)] != 1 or p.requires_grad or not p.is_floating_point() for _, p in params):
                    continue  # shared, trainable (routers) or not a float: left as it is
                for n, p in params:
                    if p.dtype != self.dtype:
                        slots.append((m._parameters, n, p, (p._version, p.data_ptr()), p.detach().to(self.dtype)))
        self._slots = slots

    def _current(self) -> bool:
        # the version changes with an in-place update, the data pointer with `.data =` (Module.to moves them so)
        return all(params.get(n) is p and (p._version, p.data_ptr()) == v for params, n, p, v, _ in self._slots)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The copies in place of the originals for the block (cast again first if an original was replaced or
        changed in place since)."""
        if not self._current():
            self._build()
        done = []
        try:
            for params, n, p, _, cast in self._slots:
                params[n] = cast
                done.append((params, n, p))
            yield
        finally:
            for params, n, p in reversed(done):
                params[n] = p


_MADE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def serving_weights(model: nn.Module, dtype: torch.dtype | None) -> ServingWeights | None:
    """The model's `ServingWeights` in `dtype`, one per model and dtype (the decoder and the prompt scorer share
    it); None for fp32 (no autocast, nothing to cast)."""
    if dtype is None or dtype == torch.float32:
        return None
    per_model = _MADE.setdefault(model, {})
    if dtype not in per_model:
        per_model[dtype] = ServingWeights(model, dtype)
    return per_model[dtype]


__all__ = ["ServingWeights", "serving_weights"]
