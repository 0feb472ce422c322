"""pwemoe: Pareto set learning on large models through weight-ensembling mixture of experts."""

from .core import DirichletSampler, Router, WeightEnsemblingModule, simplex_grid
from .core.factored import FactoredEnsemblingModule
from .lora import LoraAdapter, read_lora_adapter
from .upscale import (
    SharedMerge,
    UpscaleInfo,
    ensembling_modules,
    find_targets,
    fixed_lambda,
    get_preference,
    gradient_checkpointing,
    load_router_state_dict,
    merge_and_unload,
    merge_into,
    num_tasks,
    preference,
    router_state_dict,
    routing_weights,
    save_lora_adapter,
    set_preference,
    shared_merge,
    upscale,
)

__version__ = "0.1.0"


def __getattr__(name: str):  # the serving API loads the run layers only when asked for
    if name == "PreferenceModel":
        from .serve import PreferenceModel

        return PreferenceModel
    raise AttributeError(f"module 'pwemoe' has no attribute {name!r}")


__all__ = [
    "DirichletSampler",
    "FactoredEnsemblingModule",
    "LoraAdapter",
    "PreferenceModel",
    "Router",
    "UpscaleInfo",
    "WeightEnsemblingModule",
    "__version__",
    "ensembling_modules",
    "find_targets",
    "fixed_lambda",
    "merge_into",
    "shared_merge",
    "SharedMerge",
    "get_preference",
    "gradient_checkpointing",
    "load_router_state_dict",
    "merge_and_unload",
    "num_tasks",
    "preference",
    "read_lora_adapter",
    "router_state_dict",
    "routing_weights",
    "save_lora_adapter",
    "set_preference",
    "simplex_grid",
    "upscale",
]
