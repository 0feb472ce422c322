"""Hugging Face surgery: build task vectors with the experts streamed, and swap in ensembling modules.

One code path for every architecture; which modules are targets is `targets.py` (with the per-architecture
table of `architectures.py`); LoRA experts are mapped by `lora.upcycle`. The preference API on the result is
`routing.py`, its export `export.py` (plain models) and `lora.export` (one PEFT adapter).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from .core.checks import positive_int
from .core.ensembling import EnsemblingModule, WeightEnsemblingModule
from .core.factored import FactoredEnsemblingModule, concat_factors, truncated_svd
from .core.merge import add_task_vector_
from .core.router import Router
from .core.task_vector import check_compatible
from .lora.adapter import LoraAdapter, is_lora_adapter, read_lora_adapter
from .lora.upcycle import adapter_fingerprint, block_factors, expert_id, plan_lora
from .models import ModelSource, describe, fingerprint_tensors, load_model
from .targets import Targets, find_targets, is_conv1d, linear_children, model_type

log = logging.getLogger(__name__)


@dataclass
class UpcycleInfo:
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


def _check_same_architecture(base: nn.Module, expert: nn.Module, name: str) -> None:
    if type(base) is not type(expert) or model_type(base) != model_type(expert):
        raise ValueError(
            f"expert {name!r} is a {type(expert).__name__} (model_type={model_type(expert)!r}) but the base is a "
            f"{type(base).__name__} (model_type={model_type(base)!r}); experts must share the base's architecture. "
            "For task models (e.g. *ForSequenceClassification) pass their backbones (`model.base_model`)."
        )


def check_task_vector_rank(rank: Any) -> int | float | None:
    """None, an int >= 1 (the rank), or a float in (0, 1] (the share of ||tau||_F^2 to keep)."""
    if rank is None:
        return None
    if not isinstance(rank, float):  # a rank (an int; not a bool)
        return positive_int("task_vector_rank", rank, hint=" (or a float in (0, 1]: the share of energy to keep)")
    if not 0.0 < rank <= 1.0:
        raise ValueError(f"task_vector_rank as an energy fraction must be in (0, 1], got {rank}")
    return rank


def _load_expert(src: Any, model_class: Any, like: nn.Module, name: str) -> nn.Module | LoraAdapter:
    if isinstance(src, LoraAdapter):
        return src
    if is_lora_adapter(src):
        return read_lora_adapter(src, f"expert {name!r}")
    return load_model(src, model_class or type(like))


@dataclass(frozen=True)
class UpcycleOptions:
    """How `upcycle` builds the upcycled model: every setting but the base and the experts.

    Attributes:
        targets: which modules to upcycle (see `find_targets`); default from the architecture table
            (for LoRA experts: the table's MLP and attention blocks that hold adapted layers).
        init_lambda: task-arithmetic scale for the non-target parameters, and the router's
            initial output, so the untrained model equals task arithmetic.
        router_hidden_layers: 0, 1 or 2 (default 2: k -> 2k -> ReLU -> k).
        include_attention: upcycle attention blocks as well as MLPs (with the default targets).
        task_vector_dtype: storage dtype of the task vectors (default: the parameter dtype);
            torch.bfloat16 halves their memory.
        model_class: transformers class used to load string sources (default AutoModel).
        router_init_std: standard deviation of the routers' initial weights.
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
    """

    targets: Targets = None
    init_lambda: float = 0.3
    router_hidden_layers: int = 2
    include_attention: bool = False
    task_vector_dtype: torch.dtype | None = None
    model_class: Any = None
    router_init_std: float = 0.01
    device: torch.device | str | None = None
    task_vector_rank: int | float | None = None
    base_names: Sequence[str] = ()
    router_init: str = "constant"


@dataclass
class _Sources:
    """What a build starts from: the loaded base (modified in place), the base as given, the experts as given,
    the first expert already loaded (it tells dense from LoRA) and the content hashes so far."""

    model: nn.Module
    base: ModelSource
    experts: Mapping[str, Any]
    first: nn.Module | LoraAdapter | None
    hashes: dict[str, str]

    @property
    def task_names(self) -> list[str]:
        return list(self.experts)


@torch.no_grad()
def upcycle(
    base: ModelSource,
    experts: Mapping[str, ModelSource | LoraAdapter],
    options: UpcycleOptions | None = None,
    **settings: Any,
) -> nn.Module:
    """Upcycle `base` with k experts into a Pareto weight-ensembling MoE model.

    `upcycle(base, experts, init_lambda=0.6, include_attention=True)` and
    `upcycle(base, experts, UpcycleOptions(init_lambda=0.6, include_attention=True))` are the same call: keyword
    settings are the fields of `UpcycleOptions` (given with `options`, they replace its fields).

    Args:
        base: pretrained model (hub id, local dir or nn.Module). An nn.Module is modified in place.
        experts: task name -> fine-tuned model (same sources), or a PEFT LoRA adapter (its folder, or a
            `LoraAdapter`). Models are loaded and processed one at a time, so peak memory is about
            theta_0 + target task vectors + one expert. LoRA experts are never densified: each adapted
            linear layer computes W_0 x + sum_i lambda_i(r) s_i B_i (A_i x) (`FactoredEnsemblingModule`).
        options: the settings (`UpcycleOptions`); default: its defaults.
        **settings: fields of `UpcycleOptions`, by name.

    Returns:
        The base model with each target replaced by an ensembling module; only routers
        require grad. `model.pwemoe_info` records what was done.
    """
    opts = _options(options, settings)
    if not isinstance(experts, Mapping):
        raise TypeError(f"experts must be a dict of task name -> model, got {type(experts).__name__}")
    task_names = list(experts)
    if len(task_names) < 2:
        raise ValueError(f"need at least 2 experts (k >= 2) to learn a Pareto set, got {len(task_names)}: {task_names}")
    bad_names = [n for n in task_names if not isinstance(n, str) or not n]
    if bad_names:
        raise TypeError(f"task names must be non-empty strings, got {bad_names!r}")
    rank = check_task_vector_rank(opts.task_vector_rank)
    base_model = load_model(base, opts.model_class)
    if any(isinstance(m, EnsemblingModule) for m in base_model.modules()):
        raise ValueError("the base model is already upcycled; pass the original pretrained model")
    hashes = {"base": fingerprint_tensors(dict(base_model.named_parameters()))}  # hashed where it was loaded
    # the first expert, loaded to tell dense from LoRA experts, is held only by `src` (which drops it once used)
    src = _Sources(
        base_model,
        base,
        experts,
        _load_expert(experts[task_names[0]], opts.model_class, base_model, task_names[0]),
        hashes,
    )
    if isinstance(src.first, LoraAdapter):
        if rank is not None:
            raise ValueError("task_vector_rank compresses dense experts; LoRA experts are low-rank already: unset it")
        return _upcycle_lora(src, opts)
    return _upcycle_dense(src, opts)


def _options(options: UpcycleOptions | None, settings: dict[str, Any]) -> UpcycleOptions:
    """`options` with `settings` (field name -> value) in place of its fields; every unknown name refused at once."""
    if options is not None and not isinstance(options, UpcycleOptions):
        raise TypeError(
            f"options must be an UpcycleOptions, got {type(options).__name__}; give settings by name, e.g. "
            "upcycle(base, experts, targets=[...])"
        )
    known = {f.name for f in fields(UpcycleOptions)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"upcycle() got unknown settings {unknown}; known: {sorted(known)}")
    return replace(options or UpcycleOptions(), **settings)


def _upcycle_dense(src: _Sources, opts: UpcycleOptions) -> nn.Module:
    """Full-checkpoint experts: task vectors of the targets stacked (or factored by truncated SVD with
    task_vector_rank), every other parameter merged by task arithmetic, the experts streamed one at a time."""
    base_model, task_names, k = src.model, src.task_names, len(src.experts)
    rank, device, dtype = opts.task_vector_rank, opts.device, opts.task_vector_dtype
    target_names = find_targets(base_model, opts.targets, opts.include_attention)
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
            for path, m in linear_children(base_model.get_submodule(t)):
                factored[f"{t}.{path}.weight" if path else f"{t}.weight"] = is_conv1d(m)
        if not factored:
            raise ValueError(f"task_vector_rank needs linear layers inside the targets; {target_names[:3]} have none")
    # Task vectors of the targets, allocated once: [k, *shape] each (factored weights: per-expert SVD factors).
    T = {
        key: torch.empty((k, *p.shape), dtype=dtype or p.dtype, device=p.device)
        for key, p in ((key, params[key]) for key in target_keys if key not in factored)
    }
    F: dict[str, list] = {key: [] for key in factored}
    # Sum of task vectors for everything else, merged by task arithmetic at the end.
    rest = {n: torch.zeros_like(p) for n, p in params.items() if n not in target_set and p.is_floating_point()}
    expert_ids = {}
    for i, name in enumerate(task_names):
        source = src.experts[name]
        expert = src.first if i == 0 else _load_expert(source, opts.model_class, base_model, name)
        src.first = None
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
            dt = dtype or params[key].dtype
            F[key].append((i, A.to(dt), B.to(dt), 1.0))
            del tau
        for key, acc in rest.items():
            add_task_vector_(acc, ep[key], params[key])
        src.hashes[name] = fingerprint_tensors(ep)
        expert_ids[name] = describe(source)
        log.info("task vectors of expert %d/%d (%s) built", i + 1, k, name)
        del ep, expert  # streamed: drop this expert before the next is loaded
    for key, acc in rest.items():
        params[key].add_(acc, alpha=opts.init_lambda)
    del rest
    if device is not None:
        base_model.to(device)
    for t in target_names:
        module = base_model.get_submodule(t)
        router = _new_router(k, module, opts)
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
    dtype_name = str(dtype or next(iter(params.values())).dtype)
    return _finish(src, opts, target_names, expert_ids, dtype_name, "dense")


def _rank_kw(rank: int | float) -> dict[str, Any]:
    return {"rank": rank} if isinstance(rank, int) else {"energy": float(rank)}


def _new_router(k: int, module: nn.Module, opts: UpcycleOptions) -> Router:
    router = Router(k, opts.router_hidden_layers, opts.init_lambda, opts.router_init_std, opts.router_init)
    p0 = next(module.parameters())  # initialised on the CPU RNG, then moved beside the module
    return router.to(device=p0.device, dtype=p0.dtype if p0.is_floating_point() else torch.float32)


def _only_routers_train(model: nn.Module) -> None:
    for n, p in model.named_parameters():
        p.requires_grad_(".router." in f".{n}")


def _upcycle_lora(src: _Sources, opts: UpcycleOptions) -> nn.Module:
    """LoRA experts: each adapted linear layer keeps its factors (`lora.upcycle`); the rest stays theta_0."""
    base_model, task_names = src.model, src.task_names
    adapters: dict[str, LoraAdapter] = {}
    expert_ids = {}
    for i, name in enumerate(task_names):
        ad = src.first if i == 0 else _load_expert(src.experts[name], opts.model_class, base_model, name)
        if not isinstance(ad, LoraAdapter):
            raise ValueError(
                f"expert {name!r} is a full model but {task_names[0]!r} is a LoRA adapter; give all experts in "
                "one form (all PEFT adapters on the base, or all fine-tuned checkpoints)"
            )
        adapters[name] = ad
        expert_ids[name] = expert_id(src.experts[name])
        src.hashes[name] = adapter_fingerprint(ad)
    plan = plan_lora(base_model, adapters, opts.targets, opts.include_attention, opts.base_names)
    for t, layers in plan.items():
        module = base_model.get_submodule(t)
        if opts.device is not None:
            module.to(opts.device)
        lowrank = block_factors(module, layers, opts.task_vector_dtype)
        router = _new_router(len(task_names), module, opts)
        base_model.set_submodule(t, FactoredEnsemblingModule(module, lowrank, {}, router, task_names))
    if opts.device is not None:
        base_model.to(opts.device)
    dtype_name = str(opts.task_vector_dtype or next(base_model.parameters()).dtype)
    return _finish(src, opts, list(plan), expert_ids, dtype_name, "lora")


def _finish(
    src: _Sources, opts: UpcycleOptions, targets: list[str], expert_ids: dict[str, str], dtype: str, fmt: str
) -> nn.Module:
    """Only the routers train; `pwemoe_info` records what was upcycled and from what."""
    model = src.model
    _only_routers_train(model)
    model.pwemoe_info = UpcycleInfo(
        task_names=src.task_names,
        targets=targets,
        init_lambda=float(opts.init_lambda),
        router_hidden_layers=opts.router_hidden_layers,
        task_vector_dtype=dtype.replace("torch.", ""),
        model_type=model_type(model),
        base_id=describe(src.base),
        expert_ids=expert_ids,
        hashes=src.hashes,
        expert_format=fmt,
        router_init=opts.router_init,
        task_vector_rank=opts.task_vector_rank if fmt == "dense" else None,
    )
    return model


__all__ = ["UpcycleInfo", "UpcycleOptions", "check_task_vector_rank", "upcycle"]
