"""`pwemoe export --engine mergekit`: theta(r) as a mergekit configuration, merged out of core by mergekit.

PWEMoE's model at a preference r is a per-module task arithmetic: every upcycled module m holds
theta_0 + sum_i lambda_{m,i}(r) tau_i, the rest of the backbone theta_0 + init_lambda * sum_i tau_i, and
what lies outside the backbone (a causal LM's head) is the base's. mergekit's `task_arithmetic` with no
normalisation states exactly this with per-tensor weights (its parameter filters: the first filter that is
a substring of a tensor's name gives its weight). lambda(r) comes from the router checkpoint alone, so no
model is loaded: mergekit streams tensors from the checkpoints' shards and writes shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_routers
from .configfile import read_config
from .core.router import Router
from .files import (
    CONFIG,
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    prepare_output,
    require_run_dir,
    staged_dir,
)
from .merges import require_mergekit, run_mergekit
from .runs import parse_preference_arg, routers_path

ENGINES = ("torch", "mergekit")


OUT_SHARD_BYTES = 1_000_000_000


def routing_weights_from_checkpoint(
    state: dict[str, torch.Tensor], r: torch.Tensor, k: int, hidden_layers: int, init_lambda: float, init: str
) -> dict[str, list[float]]:
    """lambda(r) of every upcycled module from the routers' state dict ('<module>.router.<param>' keys):
    {module: [k floats]}, computed as the upcycled model does, in the routers' dtype."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in state.items():
        module, sep, param = key.partition(".router.")
        if not sep:
            raise ValueError(f"router checkpoint key {key!r} is not '<module>.router.<parameter>'")
        groups.setdefault(module, {})[param] = v
    out = {}
    with torch.no_grad():
        for module, params in groups.items():
            router = Router(k, hidden_layers, init_lambda, 0.0, init)
            router.load_state_dict(params)
            router.to(next(iter(params.values())).dtype)
            out[module] = router(r.to(next(router.parameters()).dtype)).float().tolist()
    return out


def mergekit_plan(
    base: str,
    experts: list[str],
    lam: dict[str, list[float]],
    prefix: str,
    init_lambda: float,
    out_dtype: str | None = None,
) -> dict[str, Any]:
    """The mergekit configuration of theta(r): task arithmetic on `base`, each expert i weighted per tensor by
    lambda_{m,i} inside upcycled module m (`lam`, module names under the whole model), init_lambda in the rest
    of the backbone (`prefix`), 0 outside it. Filters are listed longest first, so a module's own filter wins
    over the backbone's (mergekit takes the first filter that is a substring of the tensor name)."""
    mods = sorted(lam, key=len, reverse=True)
    models = []
    for i, e in enumerate(experts):
        weight = [{"filter": f"{m}.", "value": float(lam[m][i])} for m in mods]
        weight += [{"filter": f"{prefix}.", "value": float(init_lambda)}, {"value": 0.0}]
        models.append({"model": e, "parameters": {"weight": weight}})
    cfg: dict[str, Any] = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": models,
        "parameters": {"normalize": False, "lambda": 1.0},
        "dtype": "float32",
    }
    if out_dtype:
        cfg["out_dtype"] = out_dtype
    return cfg


def _local(path: str, what: str) -> str:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(
            f"--engine mergekit reads local model folders; {what} {path!r} is not one (map hub ids to local "
            "copies with model.path_map)"
        )
    return str(p.resolve())  # absolute: mergekit takes a relative path with a slash for a hub id


def export_mergekit(
    run: str | Path, preference: Any, out: str | Path, overwrite: bool = False, plan_only: bool = False
) -> Path:
    """Write `out`/mergekit.yaml reproducing theta(r) and, unless `plan_only`, mergekit's out-of-core merge into
    `out`/model (sharded safetensors, config and tokenizer), with pwemoe.json beside it.

    Causal-LM runs with dense experts (full checkpoints) only: their export is one model folder whose
    tensors all follow the base's layout. `out` must be new or empty unless `overwrite` (as `export_run`).
    """
    from transformers import AutoConfig

    from .lora.adapter import is_lora_adapter
    from .modalities import MODALITIES
    from .tasks import TASK_TYPES

    run, out = Path(run), Path(out)
    out = prepare_output(out, overwrite, "export")  # refuse before anything is read
    require_run_dir(run)
    cfg = read_config(run / CONFIG)
    r = parse_preference_arg(preference, len(cfg.tasks))
    version = require_mergekit()
    m = cfg.model
    modality = MODALITIES[TASK_TYPES[cfg.tasks[0].type].modality]  # one per run (the workbench checks)
    if not modality.mergekit_export:
        able = sorted(n for n, cls in MODALITIES.items() if cls.mergekit_export)
        raise ValueError(
            f"--engine mergekit exports runs whose export is one model folder in the base's layout ({able} tasks); "
            f"this run's tasks are {modality.name} (per-task heads or a separate vision tower): use --engine torch"
        )
    resolve = lambda p: m.path_map.get(p, p)  # noqa: E731
    lora = [t.name for t in cfg.tasks if is_lora_adapter(resolve(t.expert))]
    if lora:
        raise ValueError(
            f"--engine mergekit merges dense experts; the experts of {lora} are LoRA adapters: use --engine torch "
            "(it also writes the preference as one PEFT adapter)"
        )
    if m.task_vector_rank is not None:
        raise ValueError(
            "--engine mergekit merges the experts' exact task vectors, but this run compressed them "
            f"(model.task_vector_rank={m.task_vector_rank}): use --engine torch"
        )
    base = _local(resolve(m.base), "model.base")
    experts = [_local(resolve(t.expert), f"tasks[{i}].expert") for i, t in enumerate(cfg.tasks)]
    path = routers_path(run, cfg)
    state, meta = load_routers(path)
    lam = routing_weights_from_checkpoint(
        state, r.tensor, len(cfg.tasks), m.router_hidden_layers, m.init_lambda, m.router_init
    )
    config = AutoConfig.from_pretrained(base)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = str(dtype).replace("torch.", "") if dtype is not None else None
    plan = mergekit_plan(base, experts, lam, modality.mergekit_prefix(base), m.init_lambda, dtype)
    from mergekit.config import MergeConfiguration

    text = MergeConfiguration.model_validate(plan).to_yaml() + "\n"
    with staged_dir(out, overwrite, "export") as tmp:
        atomic_write_text(tmp / "mergekit.yaml", text)
        if not plan_only:
            # shards of 1 GB: mergekit holds an output shard in memory until it is written (its default is 5 GB,
            # a whole 1B-parameter model in fp32)
            run_mergekit(plan, tmp / "model", copy_tokenizer=True, out_shard_size=OUT_SHARD_BYTES)
            info = {
                "preference": dict(zip(cfg.task_names, r.tolist())),
                "run": str(run.resolve()),
                "engine": f"mergekit {version}",
                "step": meta.get("step"),
                "routers_sha256": file_sha256(path),
                "base": meta.get("base"),
                "experts": meta.get("experts"),
                "hashes": meta.get("hashes"),
                "routing_weights": lam,
                "models": {t: str(out / "model") for t in cfg.task_names},
            }
            atomic_write_json(tmp / "pwemoe.json", info)
    print(
        f"{'wrote the mergekit plan' if plan_only else 'exported'} preference {r.tolist()} to {out} (engine mergekit)"
    )
    return out


__all__ = ["ENGINES", "export_mergekit", "mergekit_plan", "routing_weights_from_checkpoint"]
