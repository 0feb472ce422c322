"""`pwemoe config --explain`: every config key with its type, default and help text.

A field whose values come from a registry of the layers above (task types, objectives) names it in its
`json_schema_extra` ({"registry": "task_types"}); its line lists the registry's names as they are when it is shown.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from .schema import Config, Registries, TaskConfig, submodel


def explain(model: type[BaseModel] = Config, prefix: str = "", registries: Registries | None = None) -> list[str]:
    """Every config key with its type, default and help text (for `pwemoe config --explain`); with registries,
    each task type's own options too, marked with the types that have them."""
    lines = []
    for name, f in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = submodel(f.annotation)
        if sub is not None:
            lines.append(f"{key}{'[i]' if 'list' in str(f.annotation) else ''}: {f.description or ''}")
            lines += explain(sub, f"{key}{'[i]' if 'list' in str(f.annotation) else ''}.", registries)
            if sub is TaskConfig and registries is not None:
                lines += _task_options(f"{key}[i].", registries)
            continue
        lines.append(_key_line(key, f, registries=registries))
    return lines


def _key_line(key: str, f: Any, types: str = "", registries: Registries | None = None) -> str:
    description = f.description or ""
    registry = (f.json_schema_extra or {}).get("registry") if isinstance(f.json_schema_extra, dict) else None
    if registry and registries is not None:
        description += f"; one of {' | '.join(getattr(registries, registry))}"
    if f.is_required():
        default = "required"
    else:
        d = f.get_default(call_default_factory=True)
        default = f"default {d!r}"
    tp = getattr(f.annotation, "__name__", None) if isinstance(f.annotation, type) else None
    tp = tp or str(f.annotation).replace("typing.", "")
    return f"{key} ({tp}; {default}{'; ' + types if types else ''}): {description}"


def _task_options(prefix: str, registries: Registries) -> list[str]:
    """The options task types add to TaskConfig, each once, with the types that have it."""
    owners: dict[str, list[str]] = {}
    fields: dict[str, Any] = {}
    for t, c in registries.task_configs.items():
        for name, f in c.model_fields.items():
            if name not in TaskConfig.model_fields:
                owners.setdefault(name, []).append(t)
                fields.setdefault(name, f)
    lines = []
    for n in owners:
        types = "type " + " | ".join(owners[n])
        sub = submodel(fields[n].annotation)
        if sub is None:
            lines.append(_key_line(f"{prefix}{n}", fields[n], types))
            continue
        lines.append(f"{prefix}{n} ({types}): {fields[n].description or ''}")  # a block: its keys one by one
        lines += [_key_line(f"{prefix}{n}.{k}", f, registries=registries) for k, f in sub.model_fields.items()]
    return lines
