"""Typed config: dataclasses + YAML. Every error is collected with its key path and raised at once."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """All problems of a config, one per line, each with its key path."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__(f"{len(errors)} config error(s):\n" + "\n".join(f"  - {e}" for e in errors))


@dataclass
class DataConfig:
    """Where a task's examples come from (through the `datasets` library).

    source: 'hub' (path = dataset id, name = its config), 'csv' | 'json' | 'parquet' | 'imagefolder'
    (path = file, directory or glob; `files` maps split -> path instead), or 'adapter'
    (path = a registered local adapter, see pwemoe.tasks.data.ADAPTERS).
    """

    source: str = "hub"
    path: str = ""
    name: str | None = None
    files: dict[str, str] | None = None
    train_split: str = "train"
    test_split: str = "test"
    text_column: str = "text"
    text_pair_column: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    max_train_samples: int | None = None
    max_test_samples: int | None = None


@dataclass
class TaskConfig:
    name: str = ""
    type: str = "sequence_classification"  # or 'clip_zero_shot'
    expert: str = ""  # hub id or local dir of the fine-tuned model
    data: DataConfig = field(default_factory=DataConfig)
    class_names: list[str] | None = None  # default: the expert's id2label, or the data's ClassLabel names
    templates: list[str] | None = None  # CLIP prompts, e.g. 'a photo of a {}.'
    max_length: int = 128


@dataclass
class ModelConfig:
    base: str = ""
    targets: list[str] | None = None
    include_attention: bool = False
    init_lambda: float = 0.3
    router_hidden_layers: int = 2
    task_vector_dtype: str = "float32"
    path_map: dict[str, str] = field(default_factory=dict)  # hub id -> local path (offline mirrors)


@dataclass
class TrainConfig:
    objective: str = "ls"
    objective_args: dict[str, Any] = field(default_factory=dict)
    steps: int = 2000
    lr: float = 1e-2
    min_lr_ratio: float = 0.1
    batch_size: int = 16
    alpha: float = 1.0
    rays_per_step: int = 1
    seed: int = 0
    save_interval: int = 100
    log_interval: int = 10
    concat_forward: bool = True


@dataclass
class EvalConfig:
    batch_size: int = 64
    grid: int = 11
    baselines: bool = True
    pwta_scale: float | None = None  # default init_lambda * k
    ta_scales: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 11)])
    reference_point: float = 0.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: list[TaskConfig] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_dir: str = "runs/pwemoe"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


# --- building dataclasses from plain data, collecting errors --------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str, errors: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        local: list[str] = []
        for a in args:
            if a is type(None):
                continue
            trial: list[str] = []
            out = _convert(value, a, path, trial)
            if not trial:
                return out
            local.extend(trial)
        errors.append(f"{path}: expected {' or '.join(_type_name(a) for a in args)}, got {type(value).__name__} {value!r}")
        return None
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, errors)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {type(value).__name__} {value!r}")
            return None
        return [_convert(v, item, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
            return None
        return {k: _convert(v, vt, f"{path}.{k}", errors) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        errors.append(f"{path}: expected {tp.__name__}, got bool {value!r}")
        return None
    if isinstance(tp, type) and not isinstance(value, tp):
        errors.append(f"{path}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return None
    return value


def _build(cls: type, data: Any, path: str, errors: list[str]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(f"{path or '<root>'}: expected a mapping, got {type(data).__name__} {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            errors.append(f"{path + '.' if path else ''}{key}: unknown key; allowed keys are {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(data[f.name], hints[f.name], f"{path + '.' if path else ''}{f.name}", errors)
    try:
        return cls(**{k: v for k, v in kwargs.items() if v is not None or _optional(hints[k])})
    except TypeError as e:  # pragma: no cover - all fields have defaults
        errors.append(f"{path}: {e}")
        return cls()


def _optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _validate(cfg: Config, errors: list[str]) -> None:
    from .objectives import OBJECTIVES
    from .tasks import TASK_TYPES

    m, t = cfg.model, cfg.train
    if not m.base:
        errors.append("model.base: required (hub id or local directory of the pretrained model)")
    if m.router_hidden_layers not in (0, 1, 2):
        errors.append(f"model.router_hidden_layers: must be 0, 1 or 2, got {m.router_hidden_layers}")
    if m.task_vector_dtype not in ("float32", "bfloat16", "float16"):
        errors.append(f"model.task_vector_dtype: must be float32, bfloat16 or float16, got {m.task_vector_dtype!r}")
    if len(cfg.tasks) < 2:
        errors.append(f"tasks: need at least 2 tasks (one expert each), got {len(cfg.tasks)}")
    seen = set()
    for i, task in enumerate(cfg.tasks):
        p = f"tasks[{i}]"
        if not task.name:
            errors.append(f"{p}.name: required")
        elif task.name in seen:
            errors.append(f"{p}.name: duplicate task name {task.name!r}")
        seen.add(task.name)
        if task.type not in TASK_TYPES:
            errors.append(f"{p}.type: unknown task type {task.type!r}; known: {sorted(TASK_TYPES)}")
        if not task.expert:
            errors.append(f"{p}.expert: required (hub id or local directory of this task's fine-tuned model)")
        if task.data.source not in ("hub", "csv", "json", "parquet", "imagefolder", "adapter"):
            errors.append(f"{p}.data.source: must be hub, csv, json, parquet, imagefolder or adapter, got {task.data.source!r}")
        if not task.data.path and not task.data.files:
            errors.append(f"{p}.data.path: required (dataset id, file or adapter name)")
    if t.objective not in OBJECTIVES:
        errors.append(f"train.objective: unknown objective {t.objective!r}; known: {sorted(OBJECTIVES)}")
    for key, val, ok in [
        ("train.steps", t.steps, t.steps >= 1),
        ("train.lr", t.lr, t.lr > 0),
        ("train.min_lr_ratio", t.min_lr_ratio, 0 <= t.min_lr_ratio <= 1),
        ("train.batch_size", t.batch_size, t.batch_size >= 1),
        ("train.alpha", t.alpha, t.alpha > 0),
        ("train.save_interval", t.save_interval, t.save_interval >= 1),
        ("train.log_interval", t.log_interval, t.log_interval >= 1),
        ("eval.batch_size", cfg.eval.batch_size, cfg.eval.batch_size >= 1),
        ("eval.grid", cfg.eval.grid, cfg.eval.grid >= 2),
    ]:
        if isinstance(val, (int, float)) and not ok:
            errors.append(f"{key}: invalid value {val!r}")
    if isinstance(t.rays_per_step, int) and not 1 <= t.rays_per_step <= t.batch_size:
        errors.append(f"train.rays_per_step: must be between 1 and train.batch_size ({t.batch_size}), got {t.rays_per_step}")


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config; raise ConfigError listing every problem."""
    errors: list[str] = []
    cfg = _build(Config, data, "", errors)
    if not errors:
        _validate(cfg, errors)
    else:
        # type errors make semantic checks unreliable, but still report what can be checked
        try:
            _validate(cfg, errors)
        except Exception:  # noqa: BLE001 - a partially built config may not validate cleanly
            pass
    if errors:
        raise ConfigError(list(dict.fromkeys(errors)))
    return cfg


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply 'a.b.c=value' overrides (value parsed as YAML) to nested dicts; 'tasks.0.name=x' indexes lists."""
    errors = []
    for o in overrides:
        if "=" not in o:
            errors.append(f"override {o!r}: expected key=value, e.g. train.steps=100")
            continue
        key, raw = o.split("=", 1)
        node: Any = data
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
            else:
                errors.append(f"override {o!r}: cannot descend into {part!r}")
                break
        else:
            last = parts[-1]
            val = yaml.safe_load(raw)
            if isinstance(node, list) and last.isdigit() and int(last) < len(node):
                node[int(last)] = val
            elif isinstance(node, dict):
                node[last] = val
            else:
                errors.append(f"override {o!r}: cannot set {last!r}")
    if errors:
        raise ConfigError(errors)
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError([f"<root>: expected a mapping at the top of {path}, got {type(data).__name__}"])
    return config_from_dict(apply_overrides(data, overrides or []))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
