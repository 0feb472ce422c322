"""Reading a config file with every name the layers above know (task types, objectives) checked in the same pass.

`pwemoe.config` holds the schema and knows no registries; this module supplies them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .baselines import check_baselines
from .config import Config, Registries, config_from_dict, load_config
from .objectives import OBJECTIVES, check_objective_args
from .tasks import TASK_TYPES
from .tasks.data import adapter_problem


def registries() -> Registries:
    """The names a config may use (and the code it may run), checked in the same pass as every other config error."""
    return Registries(
        task_configs={name: cls.config_class for name, cls in TASK_TYPES.items()},
        objectives=tuple(OBJECTIVES),
        check_objective=check_objective_args,
        check_baselines=check_baselines,
        check_adapter=adapter_problem,
    )


def read_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a YAML config with `key=value` overrides; all errors (schema and names) at once."""
    return load_config(path, overrides, registries())


def build_config(data: Mapping[str, Any]) -> Config:
    return config_from_dict(dict(data), registries())


__all__ = ["build_config", "read_config", "registries"]
