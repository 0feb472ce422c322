"""The config model of a set of task types: `tasks` as a union of their config models, keyed by `type`."""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import BaseModel, Discriminator, Tag, create_model

from .schema import DEFAULT_TASK_TYPE, Config, Registries, TaskConfig


def _task_type(v: Any) -> str | None:
    """The discriminator of a task entry: its `type` (default sequence_classification)."""
    t = v.get("type", DEFAULT_TASK_TYPE) if isinstance(v, dict) else getattr(v, "type", None)
    return t if isinstance(t, str) else None


_MODELS: dict[tuple, type[Config]] = {}


def config_model(registries: Registries | None = None) -> type[Config]:
    """`Config` whose `tasks` is the union of the registered task types' config models, keyed by `type`
    (a discriminated union: each entry is validated by its own type's model). Without task types: `Config`,
    whose tasks have the options every type shares."""
    configs = dict(registries.task_configs) if registries is not None else {}
    if not configs:
        return Config
    key = tuple(configs.items())
    if key not in _MODELS:
        members = [Annotated[c, Tag(t)] for t, c in configs.items()]
        if len(members) == 1:  # a union needs two members; this tag never matches
            members.append(Annotated[TaskConfig, Tag("\x00")])
        union = Annotated[Union[tuple(members)], Discriminator(_task_type)]  # noqa: UP007
        name = f"Config_{len(_MODELS)}"
        model = create_model(name, __base__=Config, tasks=(list[union], Config.model_fields["tasks"]))
        model.__module__ = __name__  # picklable by reference, like any model of this module
        globals()[name] = model
        _MODELS[key] = model
    return _MODELS[key]


def task_config_class(registries: Registries | None, task_type: str) -> type[BaseModel]:
    """The config model of one task type (the shared `TaskConfig` when it is not registered)."""
    return (registries.task_configs.get(task_type) if registries is not None else None) or TaskConfig
