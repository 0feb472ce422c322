"""Which modules to upcycle: target patterns matched against module names, with peft's semantics.

A list of exact names, name suffixes (`"mlp"`) or `re:` regexes, or the per-`model_type` table of
`architectures.py` when none are given. Also the few facts about linear layers that surgery needs
(GPT-2's `Conv1D` stores its weight transposed).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from .architectures import get_architecture

Targets = str | Sequence[str] | None


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def _check_patterns(patterns: list[str]) -> None:
    bad = []
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                bad.append(f"{p!r} ({e})")
    if bad:
        raise ValueError(f"invalid target regex: {'; '.join(bad)}; write 're:' followed by a Python regular expression")


def find_targets(model: nn.Module, targets: Targets = None, include_attention: bool = False) -> list[str]:
    """Names of the modules to upcycle.

    targets=None: the architecture table for `model.config.model_type` (MLPs, plus attention
    if `include_attention`). A str: one regex, fullmatch on module names (as peft). A list: each
    item an exact name or a name suffix (`"mlp"` matches `encoder.layers.3.mlp`), or a regex
    when prefixed with `re:`. Every item must match something, and matches may not nest.
    """
    names = [n for n, _ in model.named_modules() if n]
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        arch = get_architecture(model_type)
        patterns = ["re:" + p for p in arch.mlp + (arch.attention if include_attention else ())]
        require_each = False  # table rows list alternatives (e.g. ViT 4.x and 5.x layouts)
    elif isinstance(targets, str):
        patterns, require_each = ["re:" + targets], True
    else:
        patterns, require_each = list(targets), True
        bad = [t for t in patterns if not isinstance(t, str) or not t]
        if bad:
            raise TypeError(f"targets must be non-empty strings, got {bad!r}")
    _check_patterns(patterns)
    found = [n for n in names if any(_matches(n, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(_matches(n, p) for n in names)]
    if require_each and unmatched:
        raise ValueError(
            f"target pattern(s) {unmatched} matched no module of {type(model).__name__}. "
            f"Module names look like: {', '.join(names[:8])}, ... Use an exact name, a suffix, or 're:<regex>'."
        )
    if not found:
        raise ValueError(f"no module of {type(model).__name__} matched the targets {patterns}")
    nested = [(a, b) for a in found for b in found if b.startswith(a + ".")]
    if nested:
        raise ValueError(f"targets may not nest, but {nested[0][1]!r} is inside {nested[0][0]!r}; narrow the patterns")
    empty = [n for n in found if not any(True for _ in model.get_submodule(n).parameters())]
    if empty:
        raise ValueError(f"target modules without parameters cannot be upcycled: {empty[:5]}")
    return found


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D"  # GPT-2's linear layer, weight stored [in, out]


def linear_children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, layer) for nn.Linear and GPT-2 Conv1D layers inside `module` ("" for the module itself)."""
    return [(p, m) for p, m in module.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)]


def io_features(m: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D layer."""
    w = m.weight
    return (w.shape[0], w.shape[1]) if is_conv1d(m) else (w.shape[1], w.shape[0])


__all__ = ["Targets", "find_targets", "io_features", "is_conv1d", "linear_children", "model_type"]
