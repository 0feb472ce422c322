"""`key=value` overrides of a config's mapping (the command line's `pwemoe train CONFIG train.steps=100`)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError
from .safe_yaml import load_yaml


def apply_overrides(data: dict[str, Any], overrides: list[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Apply 'a.b.c=value' overrides (value parsed as YAML; a mapping gives values as they are).

    'tasks.0.name=x' indexes lists. Returns a new dict; `data` is left unchanged.
    """
    data = copy.deepcopy(data)
    items: list[tuple[str, str, Any]] = []
    errors = []
    if isinstance(overrides, Mapping):
        items = [(str(k), f"{k}={v!r}", v) for k, v in overrides.items()]
    else:
        for o in overrides:
            if "=" not in o:
                errors.append(f"override {o!r}: expected key=value, e.g. train.steps=100")
                continue
            key, raw = o.split("=", 1)
            try:
                val = load_yaml(raw, f"override {o!r}")
            except ConfigError as e:
                errors += e.errors
                continue
            items.append((key, o, val))
    for key, o, val in items:
        node: Any = data
        parts = key.split(".")
        if not all(parts):
            errors.append(f"override {o!r}: empty key part in {key!r}")
            continue
        for part in parts[:-1]:
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict):
                nxt = node.setdefault(part, {})
                if not isinstance(nxt, (dict, list)):
                    errors.append(f"override {o!r}: {part!r} holds a {type(nxt).__name__}, not a mapping")
                    break
                node = nxt
            else:
                errors.append(f"override {o!r}: cannot descend into {part!r}")
                break
        else:
            last = parts[-1]
            if isinstance(node, list) and last.isdigit() and int(last) < len(node):
                node[int(last)] = val
            elif isinstance(node, dict):
                node[last] = val
            else:
                errors.append(f"override {o!r}: cannot set {last!r}")
    if errors:
        raise ConfigError(errors)
    return data
