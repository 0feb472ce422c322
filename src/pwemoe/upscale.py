"""Hugging Face surgery: find target modules, build task vectors streamed, swap in ensembling modules.

One code path for every architecture; per-architecture knowledge lives in `architectures.py`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .architectures import get_architecture
from .core.ensembling import EnsemblingModule, WeightEnsemblingModule
from .core.factored import FactoredEnsemblingModule, LowRank, concat_factors, lowrank_columns, truncated_svd
from .core.merge import add_task_vector_
from .core.preference import PreferenceLike, normalize_preference
from .core.router import Router
from .core.task_vector import check_compatible
from .devices import CHECKPOINT_SCOPES
from .lora import LoraAdapter, is_lora_adapter, read_lora_adapter
from .models import ModelSource, describe, fingerprint_tensors, load_model

log = logging.getLogger(__name__)

Targets = str | Sequence[str] | None


@dataclass
class UpscaleInfo:
    """What was upcycled and from what; stored on the model as `model.pwemoe_info`."""

    task_names: list[str]
    targets: list[str]
    init_lambda: float
    router_hidden_layers: int
    task_vector_dtype: str
    model_type: str | None
    base_id: str = ""
    expert_ids: dict[str, str] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    expert_format: str = "dense"  # "dense" (full checkpoints) or "lora" (PEFT adapters, never densified)
    router_init: str = "constant"
    task_vector_rank: int | float | None = None  # truncated-SVD rank (or energy) of dense task vectors

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- target matching (peft semantics) ----------------------------------------------------------
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


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _check_same_architecture(base: nn.Module, expert: nn.Module, name: str) -> None:
    if type(base) is not type(expert) or _model_type(base) != _model_type(expert):
        raise ValueError(
            f"expert {name!r} is a {type(expert).__name__} (model_type={_model_type(expert)!r}) but the base is a "
            f"{type(base).__name__} (model_type={_model_type(base)!r}); experts must share the base's architecture. "
            "For task models (e.g. *ForSequenceClassification) pass their backbones (`model.base_model`)."
        )


# --- upscale -------------------------------------------------------------------------------------
def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D"  # GPT-2's linear layer, weight stored [in, out]


def _linear_children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, layer) for nn.Linear and GPT-2 Conv1D layers inside `module` ("" for the module itself)."""
    return [(p, m) for p, m in module.named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)]


def _io_features(m: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D layer."""
    w = m.weight
    return (w.shape[0], w.shape[1]) if _is_conv1d(m) else (w.shape[1], w.shape[0])


def check_task_vector_rank(rank: Any) -> int | float | None:
    """None, an int >= 1 (the rank), or a float in (0, 1] (the share of ||tau||_F^2 to keep)."""
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise TypeError(f"task_vector_rank must be an int >= 1 or a float in (0, 1], got {rank!r}")
    if isinstance(rank, int) and rank < 1:
        raise ValueError(f"task_vector_rank must be >= 1 (or an energy fraction in (0, 1]), got {rank}")
    if isinstance(rank, float) and not 0.0 < rank <= 1.0:
        raise ValueError(f"task_vector_rank as an energy fraction must be in (0, 1], got {rank}")
    return rank


def _load_expert(src: Any, model_class: Any, like: nn.Module, name: str) -> nn.Module | LoraAdapter:
    if isinstance(src, LoraAdapter):
        return src
    if is_lora_adapter(src):
        return read_lora_adapter(src, f"expert {name!r}")
    return load_model(src, model_class or type(like))


@torch.no_grad()
def upscale(
    base: ModelSource,
    experts: Mapping[str, ModelSource | LoraAdapter],
    targets: Targets = None,
    init_lambda: float = 0.3,
    router_hidden_layers: int = 2,
    include_attention: bool = False,
    task_vector_dtype: torch.dtype | None = None,
    model_class: Any = None,
    router_init_std: float = 0.01,
    device: torch.device | str | None = None,
    task_vector_rank: int | float | None = None,
    base_names: Sequence[str] = (),
    router_init: str = "constant",
) -> nn.Module:
    """Upcycle `base` with k experts into a Pareto weight-ensembling MoE model.

    Args:
        base: pretrained model (hub id, local dir or nn.Module). An nn.Module is modified in place.
        experts: task name -> fine-tuned model (same sources), or a PEFT LoRA adapter (its folder, or a
            `LoraAdapter`). Models are loaded and processed one at a time, so peak memory is about
            theta_0 + target task vectors + one expert. LoRA experts are never densified: each adapted
            linear layer computes W_0 x + sum_i lambda_i(r) s_i B_i (A_i x) (`FactoredEnsemblingModule`).
        targets: which modules to upcycle (see `find_targets`); default from the architecture table
            (for LoRA experts: the table's MLP and attention blocks that hold adapted layers).
        init_lambda: task-arithmetic scale for the non-target parameters, and the router's
            initial output, so the untrained model equals task arithmetic.
        router_hidden_layers: 0, 1 or 2 (default 2: k -> 2k -> ReLU -> k).
        task_vector_dtype: storage dtype of the task vectors (default: the parameter dtype);
            torch.bfloat16 halves their memory.
        model_class: transformers class used to load string sources (default AutoModel).
        device: where the upcycled model lives (default: where `base` is). The base moves there
            first and the task vectors are built there while experts stream from disk one at a
            time, so the device holds at most theta_0 + T + one parameter of the current expert.
        task_vector_rank: dense experts only: compress the task vector of every linear weight inside
            the targets by truncated SVD to this rank (int), or to the rank that keeps this share of its
            squared Frobenius norm (float in (0, 1]); run like LoRA experts, with s_i = 1.
        base_names: names the base goes by (hub id, local path); a LoRA adapter whose
            `base_model_name_or_path` is none of them is refused.
        router_init: "constant" (the paper's: lambda = init_lambda for every task, task arithmetic) or
            "preference" (lambda(r) = init_lambda * k * r: preference-weighted task arithmetic).

    Returns:
        The base model with each target replaced by an ensembling module; only routers
        require grad. `model.pwemoe_info` records what was done.
    """
    if not isinstance(experts, Mapping):
        raise TypeError(f"experts must be a dict of task name -> model, got {type(experts).__name__}")
    task_names = list(experts)
    if len(task_names) < 2:
        raise ValueError(f"need at least 2 experts (k >= 2) to learn a Pareto set, got {len(task_names)}: {task_names}")
    bad_names = [n for n in task_names if not isinstance(n, str) or not n]
    if bad_names:
        raise TypeError(f"task names must be non-empty strings, got {bad_names!r}")
    rank = check_task_vector_rank(task_vector_rank)
    k = len(task_names)
    base_model = load_model(base, model_class)
    if any(isinstance(m, EnsemblingModule) for m in base_model.modules()):
        raise ValueError("the base model is already upcycled; pass the original pretrained model")
    hashes = {"base": fingerprint_tensors(dict(base_model.named_parameters()))}  # hashed where it was loaded
    first = _load_expert(experts[task_names[0]], model_class, base_model, task_names[0])
    if isinstance(first, LoraAdapter):
        if rank is not None:
            raise ValueError("task_vector_rank compresses dense experts; LoRA experts are low-rank already: unset it")
        return _upscale_lora(
            base_model,
            base,
            experts,
            first,
            targets,
            include_attention,
            init_lambda,
            router_hidden_layers,
            task_vector_dtype,
            router_init_std,
            device,
            base_names,
            hashes,
            model_class,
            router_init,
        )
    target_names = find_targets(base_model, targets, include_attention)
    if device is not None:  # the targets first; the rest is merged where it is and moved at the end
        for t in target_names:
            base_model.get_submodule(t).to(device)
    params = dict(base_model.named_parameters())
    target_keys = [f"{t}.{p}" for t in target_names for p, _ in base_model.get_submodule(t).named_parameters()]
    target_set = set(target_keys)
    # Linear weights inside the targets whose task vectors are compressed (task_vector_rank): key -> transposed
    factored: dict[str, bool] = {}
    if rank is not None:
        for t in target_names:
            for path, m in _linear_children(base_model.get_submodule(t)):
                factored[f"{t}.{path}.weight" if path else f"{t}.weight"] = _is_conv1d(m)
        if not factored:
            raise ValueError(f"task_vector_rank needs linear layers inside the targets; {target_names[:3]} have none")
    # Task vectors of the targets, allocated once: [k, *shape] each (factored weights: per-expert SVD factors).
    T = {
        key: torch.empty((k, *p.shape), dtype=task_vector_dtype or p.dtype, device=p.device)
        for key, p in ((key, params[key]) for key in target_keys if key not in factored)
    }
    F: dict[str, list] = {key: [] for key in factored}
    # Sum of task vectors for everything else, merged by task arithmetic at the end.
    rest = {n: torch.zeros_like(p) for n, p in params.items() if n not in target_set and p.is_floating_point()}
    expert_ids = {}
    for i, name in enumerate(task_names):
        src = experts[name]
        expert = first if i == 0 else _load_expert(src, model_class, base_model, name)
        if isinstance(expert, LoraAdapter):
            raise ValueError(
                f"expert {name!r} is a LoRA adapter but {task_names[0]!r} is a full model; give all experts "
                "in one form (all PEFT adapters on the base, or all fine-tuned checkpoints)"
            )
        _check_same_architecture(base_model, expert, name)
        ep = dict(expert.named_parameters())
        check_compatible(params, ep, f"expert {name!r}")
        for key in T:  # the difference in theta_0's dtype, then rounded to the storage dtype
            T[key][i].copy_(ep[key].to(params[key].device, non_blocking=True) - params[key])
        for key, transposed in factored.items():  # SVD on the device, one matrix at a time
            tau = ep[key].to(params[key].device) - params[key]
            B, A = truncated_svd(tau.t() if transposed else tau, **_rank_kw(rank))
            dt = task_vector_dtype or params[key].dtype
            F[key].append((i, A.to(dt), B.to(dt), 1.0))
            del tau
        for key, acc in rest.items():
            add_task_vector_(acc, ep[key], params[key])
        hashes[name] = fingerprint_tensors(ep)
        expert_ids[name] = describe(src)
        log.info("task vectors of expert %d/%d (%s) built", i + 1, k, name)
        del ep, expert  # streamed: drop this expert before the next is loaded
        first = None
    for key, acc in rest.items():
        params[key].add_(acc, alpha=init_lambda)
    del rest
    if device is not None:
        base_model.to(device)
    for t in target_names:
        module = base_model.get_submodule(t)
        router = _new_router(k, router_hidden_layers, init_lambda, router_init_std, module, router_init)
        lowrank = {
            key[len(t) + 1 : -len(".weight")] if key != f"{t}.weight" else "": concat_factors(F.pop(key), transposed)
            for key, transposed in factored.items()
            if key == f"{t}.weight" or key.startswith(t + ".")
        }
        tv = {p: T.pop(f"{t}.{p}") for p, _ in module.named_parameters() if f"{t}.{p}" in T}
        if lowrank:
            new: EnsemblingModule = FactoredEnsemblingModule(module, lowrank, tv, router, task_names)
        else:
            new = WeightEnsemblingModule(module, tv, router, task_names)
        base_model.set_submodule(t, new)
    _only_routers_train(base_model)
    base_model.pwemoe_info = UpscaleInfo(
        task_names=task_names,
        targets=target_names,
        init_lambda=float(init_lambda),
        router_hidden_layers=router_hidden_layers,
        task_vector_dtype=str(task_vector_dtype or next(iter(params.values())).dtype).replace("torch.", ""),
        model_type=_model_type(base_model),
        base_id=describe(base),
        expert_ids=expert_ids,
        hashes=hashes,
        task_vector_rank=rank,
        router_init=router_init,
    )
    return base_model


def _rank_kw(rank: int | float) -> dict[str, Any]:
    return {"rank": rank} if isinstance(rank, int) else {"energy": float(rank)}


def _new_router(k: int, hidden: int, init_lambda: float, std: float, module: nn.Module, init: str) -> Router:
    router = Router(k, hidden, init_lambda, std, init)  # initialised on the CPU RNG
    p0 = next(module.parameters())
    return router.to(device=p0.device, dtype=p0.dtype if p0.is_floating_point() else torch.float32)


def _only_routers_train(model: nn.Module) -> None:
    for n, p in model.named_parameters():
        p.requires_grad_(".router." in f".{n}")


def _resolve_adapted(name: str, modules: dict[str, nn.Module], model: nn.Module) -> str | None:
    """The model's name for an adapter's module name: as is, or across the task model / backbone prefix."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    cands = [name, name.split(".", 1)[1] if "." in name else name]
    if prefix:
        cands += [f"{prefix}.{name}", name[len(prefix) + 1 :] if name.startswith(prefix + ".") else name]
    return next((c for c in cands if c in modules), None)


def _upscale_lora(
    base_model: nn.Module,
    base: Any,
    experts: Mapping[str, Any],
    first: LoraAdapter,
    targets: Targets,
    include_attention: bool,
    init_lambda: float,
    router_hidden_layers: int,
    task_vector_dtype: torch.dtype | None,
    router_init_std: float,
    device: Any,
    base_names: Sequence[str],
    hashes: dict[str, str],
    model_class: Any,
    router_init: str = "constant",
) -> nn.Module:
    """LoRA experts: each adapted linear layer keeps its factors; the rest of the model stays theta_0."""
    task_names = list(experts)
    k = len(task_names)
    modules = dict(base_model.named_modules())
    adapted: dict[str, list[tuple[int, Any]]] = {}
    errors: list[str] = []
    expert_ids = {}
    names_ok = {str(n) for n in base_names if n}
    for i, name in enumerate(task_names):
        ad = first if i == 0 else _load_expert(experts[name], model_class, base_model, name)
        if not isinstance(ad, LoraAdapter):
            raise ValueError(
                f"expert {name!r} is a full model but {task_names[0]!r} is a LoRA adapter; give all experts in "
                "one form (all PEFT adapters on the base, or all fine-tuned checkpoints)"
            )
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
            if not (isinstance(m, nn.Linear) or _is_conv1d(m)):
                errors.append(f"expert {name!r}: {target!r} is a {type(m).__name__}, not a linear layer")
                continue
            fin, fout = _io_features(m)
            if layer.A.shape[1] != fin or layer.B.shape[0] != fout:
                errors.append(
                    f"expert {name!r}: adapter {ad.path} on {target!r} has A {tuple(layer.A.shape)}, B "
                    f"{tuple(layer.B.shape)}, but the base layer is {fin} -> {fout}; the adapter was made for "
                    "a base model of another size"
                )
                continue
            adapted.setdefault(target, []).append((i, layer))
        src = experts[name]
        expert_ids[name] = describe(src) if not isinstance(src, LoraAdapter) else src.path
        hashes[name] = fingerprint_tensors(
            {f"{m}.{p}": t for m, layer in ad.layers.items() for p, t in (("A", layer.A), ("B", layer.B))}
            | {f"{m}.scaling": torch.tensor(layer.scaling, dtype=torch.float64) for m, layer in ad.layers.items()}
        )
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
    target_names = sorted(set(owner.values()), key=list(modules).index)
    for t in target_names:
        module = base_model.get_submodule(t)
        if device is not None:
            module.to(device)
        lowrank = {}
        for a in (a for a in adapted if owner[a] == t):
            m = modules[a]
            dev, dt = m.weight.device, task_vector_dtype or m.weight.dtype
            rel = a[len(t) + 1 :] if a != t else ""
            lowrank[rel] = concat_factors(
                [(i, ly.A.to(dev, dt), ly.B.to(dev, dt), ly.scaling) for i, ly in adapted[a]], _is_conv1d(m)
            )
        router = _new_router(k, router_hidden_layers, init_lambda, router_init_std, module, router_init)
        base_model.set_submodule(t, FactoredEnsemblingModule(module, lowrank, {}, router, task_names))
    if device is not None:
        base_model.to(device)
    _only_routers_train(base_model)
    base_model.pwemoe_info = UpscaleInfo(
        task_names=task_names,
        targets=target_names,
        init_lambda=float(init_lambda),
        router_hidden_layers=router_hidden_layers,
        task_vector_dtype=str(task_vector_dtype or next(base_model.parameters()).dtype).replace("torch.", ""),
        model_type=_model_type(base_model),
        base_id=describe(base),
        expert_ids=expert_ids,
        hashes=hashes,
        expert_format="lora",
        router_init=router_init,
    )
    return base_model


# --- the public API on an upcycled model ---------------------------------------------------------
def ensembling_modules(model: nn.Module) -> Iterator[tuple[str, EnsemblingModule]]:
    """(name, module) for every upcycled module (dense or factored), in model order.

    `named_modules` order, without descending into the upcycled modules themselves (they hold only
    theta_0's layer and the router): a training step walks the model once, and the walk showed.
    """
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        if isinstance(m, EnsemblingModule):
            yield name, m
            continue
        stack.extend((f"{name}.{n}" if name else n, c) for n, c in reversed(m._modules.items()) if c is not None)


def _modules_or_raise(model: nn.Module) -> list[tuple[str, EnsemblingModule]]:
    mods = list(ensembling_modules(model))
    if not mods:
        raise ValueError(f"{type(model).__name__} has no upcycled modules; build it with pwemoe.upscale first")
    return mods


def num_tasks(model: nn.Module) -> int:
    return _modules_or_raise(model)[0][1].k


def set_preference(model: nn.Module, r: PreferenceLike) -> torch.Tensor:
    """Validate r, normalise it to sum 1 and set it on every upcycled module. Returns the normalised r."""
    mods = _modules_or_raise(model)
    rn = normalize_preference(r, mods[0][1].k)
    _set_on([m for _, m in mods], rn)
    return rn


def _set_on(mods: list[EnsemblingModule], rn: torch.Tensor) -> None:
    """rn on every module, copied to each device once (not once per module: a host-to-device copy each)."""
    on: dict[torch.device, torch.Tensor] = {}
    for m in mods:
        dev = m.preference.device
        if dev not in on:
            on[dev] = rn.to(dev)
        m.set_preference(on[dev])


def get_preference(model: nn.Module) -> torch.Tensor:
    return _modules_or_raise(model)[0][1].preference.detach().cpu().clone()


@contextlib.contextmanager
def preference(model: nn.Module, r: PreferenceLike) -> Iterator[torch.Tensor]:
    """Context manager: run with preference r, then restore the previous one."""
    old = get_preference(model)
    try:
        yield set_preference(model, r)
    finally:
        set_preference(model, old)


def routing_weights(model: nn.Module, r: PreferenceLike | None = None) -> dict[str, torch.Tensor]:
    """lambda(r) for every upcycled module: {module_name: Tensor[k]} (current preference if r is None)."""
    ctx = preference(model, r) if r is not None else contextlib.nullcontext()
    with ctx, torch.no_grad():
        return {n: m.routing_weights().detach().clone() for n, m in _modules_or_raise(model)}


@contextlib.contextmanager
def fixed_lambda(model: nn.Module, lam: PreferenceLike) -> Iterator[None]:
    """Bypass every router with fixed lambda (Tensor[k]); used for baselines and the expert test."""
    mods = _modules_or_raise(model)
    t = torch.as_tensor(lam, dtype=torch.float32)
    try:
        for _, m in mods:
            m.set_lambda_override(t)
        yield
    finally:
        for _, m in mods:
            m.set_lambda_override(None)


class SharedMerge:
    """One merge theta(r) shared by several forwards (`shared_merge`); gradients reach the routers on demand.

    The forwards inside the block run on detached leaf copies of theta(r), so each forward's
    backward stops at the leaves (dL/dW, summed over forwards) and frees its activations at once.
    `backward()` then carries the summed dL/dW through the merge to the routers in one pass over T;
    `router_grads()` does the same without touching `.grad`, for per-task gradients (EPO).
    """

    def __init__(self, modules: list[EnsemblingModule]) -> None:
        self.modules = modules

    def _roots(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        roots, grads = [], []
        for m in self.modules:
            r, g = m.shared_roots()
            roots += r
            grads += g
        return roots, grads

    def zero_grad(self) -> None:
        for m in self.modules:
            m.zero_shared_grad()

    def backward(self) -> None:
        """Accumulate the routers' gradients (p.grad) from the leaves' gradients, then zero the leaves."""
        roots, grads = self._roots()
        if roots:
            torch.autograd.backward(roots, grads, retain_graph=True)
        self.zero_grad()

    def task_router_grads(self, params: Sequence[torch.Tensor], k: int) -> torch.Tensor:
        """G: Tensor[k, p], row i = dL_i/d(params) from the per-task leaves of `task_segments`; zeroes them.

        The merge's backward for all k tasks takes one pass over each T (`lambda_grads`); only the
        routers' tiny backward runs once per task.
        """
        lams, glams = [], []
        for m in self.modules:
            g = m.segment_lambda_grads(k)
            if g is not None and m._shared_lam is not None:
                lams.append(m._shared_lam)
                glams.append(g.to(m._shared_lam.dtype))
        rows = []
        for i in range(k):
            out = (
                torch.autograd.grad(lams, list(params), [g[i] for g in glams], retain_graph=True, allow_unused=True)
                if lams
                else [None] * len(params)
            )
            rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, out)]))
        self.zero_grad()
        return torch.stack(rows)

    def router_grads(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """d(sum of backwards since the last zero)/d(params), one tensor per param; zeroes the leaves."""
        roots, grads = self._roots()
        out = torch.autograd.grad(roots, list(params), grads, retain_graph=True, allow_unused=True) if roots else ()
        self.zero_grad()
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, out or [None] * len(params))]


@contextlib.contextmanager
def task_segments(model: nn.Module, sizes: Sequence[int]) -> Iterator[None]:
    """Inside `shared_merge`: the next forwards (and their backwards, which may replay them under
    gradient checkpointing) hold sizes[i] rows of task i, in task order. Each task's rows run on its
    own leaf view of theta(r), so one forward and one backward of sum_i L_i give every dL_i/dW
    (`SharedMerge.task_router_grads`), since a row's activations depend on no other row."""
    mods = [m for _, m in _modules_or_raise(model)]
    # a KV cache would collect every segment's keys in one object: training forwards need none
    configs = {id(c): c for sub in model.modules() if (c := getattr(sub, "config", None)) is not None}
    caching = {i: getattr(c, "use_cache", None) for i, c in configs.items()}
    for m in mods:
        m._segments = list(sizes)
    for i, c in configs.items():
        if caching[i]:
            c.use_cache = False
    try:
        yield
    finally:
        for m in mods:
            m._segments = None
        for i, c in configs.items():
            if caching[i]:
                c.use_cache = caching[i]


@contextlib.contextmanager
def shared_merge(model: nn.Module, r: PreferenceLike | None = None) -> Iterator[SharedMerge]:
    """Under autograd, compute theta(r) once and run every forward inside the block on it.

    Gradients stop at the merged weights; call `.backward()` on the yielded `SharedMerge` (once,
    after all forwards' backwards) to reach the routers. Merges are dropped on exit. With `r`, the
    preference is set first, as `set_preference` would (one walk over the model per step, not two).
    """
    mods = [m for _, m in _modules_or_raise(model)]
    if r is not None:
        _set_on(mods, normalize_preference(r, mods[0].k))
    for m in mods:
        m.clear_cache()
        m.share_under_grad = True
        if torch.is_grad_enabled():
            m.begin_shared()  # merged here, not inside a (checkpointed) forward, which would replay it
    try:
        yield SharedMerge(mods)
    finally:
        for m in mods:
            m.share_under_grad = False
            m.clear_cache()


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


@torch.no_grad()
def merge_and_unload(model: nn.Module, r: PreferenceLike | None = None) -> nn.Module:
    """A new plain model of the original class with the weights theta(r) baked in.

    The upcycled model is left intact. The copy shares nothing with it, holds no task
    vectors and no routers, and `save_pretrained` writes a directory that plain transformers
    loads. Task vectors are never duplicated during the copy (they are memoised away).
    """
    mods = _modules_or_raise(model)
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
    new = copy.deepcopy(model, memo)
    gradient_checkpointing(new, enable=False)  # a plain model: no training-time wrappers
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
        for name, m in _modules_or_raise(model):
            target = plain.get_submodule(name)
            merged = m.merged_weights()
            for pn, p in target.named_parameters():
                p.copy_(merged[pn])
            m.clear_cache()
    return plain


def router_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Router parameters only: {'<module>.router.<param>': tensor} (a few hundred numbers per module)."""
    return {
        f"{n}.router.{pn}": p.detach().clone()
        for n, m in _modules_or_raise(model)
        for pn, p in m.router.named_parameters()
    }


@torch.no_grad()
def load_router_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load router parameters; missing, unexpected and mis-shaped keys are all named."""
    own = {f"{n}.router.{pn}": p for n, m in _modules_or_raise(model) for pn, p in m.router.named_parameters()}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(p.shape)}"
        for k, p in own.items()
        if k in state and state[k].shape != p.shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            "router state dict does not match the model: "
            + "; ".join(
                s
                for s in (
                    f"missing {missing}" if missing else "",
                    f"unexpected {unexpected}" if unexpected else "",
                    f"shape mismatch {shapes}" if shapes else "",
                )
                if s
            )
            + ". Was it saved from a model upcycled with the same targets, k and router_hidden_layers?"
        )
    for k, p in own.items():
        p.copy_(state[k].to(p))


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
    from .lora import write_lora_adapter

    mods = _modules_or_raise(model)
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
