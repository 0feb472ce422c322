"""Typed run configuration: pydantic models read from YAML, every error reported at once with its key path.

One module per job:

- `schema`: the sections (`ModelConfig`, `TaskConfig`, `DataConfig`, `TrainConfig`, `EvalConfig`, `Config`), the
  settings a resume may change (`RESUMABLE`) and the `Registries` that the layers above pass in;
- `task_types`: the config model of a set of task types (`tasks` as a union keyed by `type`);
- `validation`: a mapping validated into a Config, pydantic's errors rewritten with key paths and fixes;
- `overrides`: `key=value` overrides;
- `safe_yaml`: YAML read within size and alias-expansion limits;
- `explanation`: `pwemoe config --explain`.

Reading a config with the registries filled in is `pwemoe.configfile` (it knows the task types and objectives).
"""

from .errors import ConfigError
from .explanation import explain
from .overrides import apply_overrides
from .safe_yaml import MAX_YAML_BYTES, MAX_YAML_VALUES, dump_config, dump_yaml, load_yaml, read_yaml
from .schema import (
    DATA_SOURCES,
    DEFAULT_TASK_TYPE,
    RESUMABLE,
    Config,
    DataConfig,
    EvalConfig,
    LMEvalConfig,
    ModelConfig,
    Registries,
    TaskConfig,
    TrainConfig,
    resumable_keys,
)
from .task_types import config_model, task_config_class
from .validation import config_from_dict, load_config

__all__ = [
    "DATA_SOURCES",
    "DEFAULT_TASK_TYPE",
    "MAX_YAML_BYTES",
    "MAX_YAML_VALUES",
    "RESUMABLE",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LMEvalConfig",
    "ModelConfig",
    "Registries",
    "TaskConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_model",
    "dump_config",
    "dump_yaml",
    "explain",
    "load_config",
    "load_yaml",
    "read_yaml",
    "resumable_keys",
    "task_config_class",
]
