"""LoRA experts mapped onto the upcycled modules: which block owns each adapted layer, and its factors.

Each adapted linear layer keeps every expert's factors, concatenated along the rank (`core.factored.LowRank`);
the rest of the model stays theta_0. `pwemoe.upcycle.upcycle` calls this when the experts are PEFT adapters and
adds the routers; every problem of every adapter is reported at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..core.factored import LowRank, concat_factors
from ..models import fingerprint_tensors
from ..targets import Targets, find_targets, io_features, is_conv1d
from .adapter import LoraAdapter, LoraLayer

# target block -> {path of the adapted layer inside the block ("" for the block itself): [(expert index, layer)]}
LoraPlan = dict[str, dict[str, list[tuple[int, LoraLayer]]]]


def adapter_fingerprint(ad: LoraAdapter) -> str:
    """sha256 of an adapter's factors and scalings (run provenance, as `fingerprint_tensors` for models)."""
    return fingerprint_tensors(
        {f"{m}.{p}": t for m, layer in ad.layers.items() for p, t in (("A", layer.A), ("B", layer.B))}
        | {f"{m}.scaling": torch.tensor(layer.scaling, dtype=torch.float64) for m, layer in ad.layers.items()}
    )


def _resolve_adapted(name: str, modules: dict[str, nn.Module], model: nn.Module) -> str | None:
    """The model's name for an adapter's module name: as is, or across the task model / backbone prefix."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    cands = [name, name.split(".", 1)[1] if "." in name else name]
    if prefix:
        cands += [f"{prefix}.{name}", name[len(prefix) + 1 :] if name.startswith(prefix + ".") else name]
    return next((c for c in cands if c in modules), None)


def plan_lora(
    base_model: nn.Module,
    adapters: Mapping[str, LoraAdapter],
    targets: Targets,
    include_attention: bool,
    base_names: Sequence[str] = (),
) -> LoraPlan:
    """Where every expert's LoRA layers go: the target block owning each adapted layer (see `LoraPlan`).

    targets=None: one block per attention / MLP block of the architecture table that holds an adapted layer
    (an unknown architecture: one per adapted layer). Refused, all at once: an adapter made for another base
    (by `base_model_name_or_path`, or by shapes), a LoRA layer on a module the model does not have or that is
    not linear, and with explicit targets, a layer outside them or a target no adapter touches.
    """
    modules = dict(base_model.named_modules())
    adapted: dict[str, list[tuple[int, LoraLayer]]] = {}
    errors: list[str] = []
    names_ok = {str(n) for n in base_names if n}
    for i, (name, ad) in enumerate(adapters.items()):
        if names_ok and ad.base_model_name_or_path and ad.base_model_name_or_path not in names_ok:
            errors.append(
                f"expert {name!r}: adapter {ad.path} was made for base_model_name_or_path="
                f"{ad.base_model_name_or_path!r}, but the base is {sorted(names_ok)}; use that adapter's base "
                "model, or fix base_model_name_or_path in its adapter_config.json if it names the same weights"
            )
        for mod, layer in ad.layers.items():
            target = _resolve_adapted(mod, modules, base_model)
            if target is None:
                errors.append(
                    f"expert {name!r}: adapter {ad.path} has a LoRA layer on {mod!r}, which the base model "
                    f"{type(base_model).__name__} does not have; was the adapter made for another model?"
                )
                continue
            m = modules[target]
            if not (isinstance(m, nn.Linear) or is_conv1d(m)):
                errors.append(f"expert {name!r}: {target!r} is a {type(m).__name__}, not a linear layer")
                continue
            fin, fout = io_features(m)
            if layer.A.shape[1] != fin or layer.B.shape[0] != fout:
                errors.append(
                    f"expert {name!r}: adapter {ad.path} on {target!r} has A {tuple(layer.A.shape)}, B "
                    f"{tuple(layer.B.shape)}, but the base layer is {fin} -> {fout}; the adapter was made for "
                    "a base model of another size"
                )
                continue
            adapted.setdefault(target, []).append((i, layer))
    if errors:
        raise ValueError("; ".join(errors))
    if targets is None:
        try:
            blocks = find_targets(base_model, None, include_attention=True)
        except ValueError:  # unknown architecture: one router per adapted layer
            blocks = []
        owner = {a: next((b for b in blocks if a == b or a.startswith(b + ".")), a) for a in adapted}
    else:
        blocks = find_targets(base_model, targets, include_attention)
        owner = {}
        for a in adapted:
            b = next((b for b in blocks if a == b or a.startswith(b + ".")), None)
            if b is None:
                errors.append(
                    f"the LoRA layer {a!r} is outside every target module ({blocks[:3]}...); "
                    "add it (or its block) to model.targets, or leave targets unset"
                )
            owner[a] = b
        unused = [b for b in blocks if b not in owner.values()]
        if unused:
            errors.append(f"targets {unused[:5]} hold no layer adapted by any expert; narrow model.targets")
        if errors:
            raise ValueError("; ".join(errors))
    plan: LoraPlan = {}
    for t in sorted(set(owner.values()), key=list(modules).index):
        plan[t] = {(a[len(t) + 1 :] if a != t else ""): adapted[a] for a in adapted if owner[a] == t}
    return plan


def block_factors(
    block: nn.Module, layers: dict[str, list[tuple[int, LoraLayer]]], dtype: torch.dtype | None
) -> dict[str, LowRank]:
    """{path: LowRank} of one target block: each adapted layer's experts concatenated along the rank, on the
    layer's device, in `dtype` (default: the layer's)."""
    out = {}
    for rel, factors in layers.items():
        m = block.get_submodule(rel)
        dev, dt = m.weight.device, dtype or m.weight.dtype
        out[rel] = concat_factors(
            [(i, ly.A.to(dev, dt), ly.B.to(dev, dt), ly.scaling) for i, ly in factors], is_conv1d(m)
        )
    return out


def expert_id(src: Any) -> str:
    """How an adapter expert is named in the run's provenance."""
    from ..models import describe

    return src.path if isinstance(src, LoraAdapter) else describe(src)


__all__ = ["LoraPlan", "adapter_fingerprint", "block_factors", "expert_id", "plan_lora"]
