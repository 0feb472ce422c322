"""pwemoe: Pareto set learning on large models through weight-ensembling mixture of experts."""

from .core import DirichletSampler, Router, WeightEnsemblingModule, simplex_grid
from .core.factored import FactoredEnsemblingModule
from .export import PlainCopy, merge_and_unload, merge_into
from .lora import LoraAdapter, read_lora_adapter
from .lora.export import save_lora_adapter
from .recompute import gradient_checkpointing
from .routing import (
    ensembling_modules,
    fixed_lambda,
    get_preference,
    load_router_state_dict,
    num_tasks,
    preference,
    router_state_dict,
    routing_weights,
    row_preferences,
    set_preference,
    set_row_preferences,
)
from .targets import find_targets
from .upcycle import UpcycleInfo, UpcycleOptions, upcycle

__version__ = "0.1.0"

# Loaded when first asked for: the serving API and the training engine import the run layers (configs,
# tasks, data), which `import pwemoe` for the model-level API above does not need.
_LAZY = {
    "PreferenceModel": ("serve", "PreferenceModel"),
    "shared_merge": ("training", "shared_merge"),
    "SharedMerge": ("training", "SharedMerge"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'pwemoe' has no attribute {name!r}")


__all__ = [
    "DirichletSampler",
    "FactoredEnsemblingModule",
    "LoraAdapter",
    "PlainCopy",
    "PreferenceModel",
    "Router",
    "SharedMerge",
    "UpcycleInfo",
    "UpcycleOptions",
    "WeightEnsemblingModule",
    "__version__",
    "ensembling_modules",
    "find_targets",
    "fixed_lambda",
    "get_preference",
    "gradient_checkpointing",
    "load_router_state_dict",
    "merge_and_unload",
    "merge_into",
    "num_tasks",
    "preference",
    "read_lora_adapter",
    "router_state_dict",
    "routing_weights",
    "row_preferences",
    "save_lora_adapter",
    "set_preference",
    "set_row_preferences",
    "shared_merge",
    "simplex_grid",
    "upcycle",
]
