"""lm-evaluation-harness (lm-eval), the LLM field's yardstick, as an optional extra: imported lazily, and local tasks.

`require()` imports lm-eval or raises one line naming the extra (`pip install 'pwemoe[lmeval]'`), which the
command line prints with exit status 2. `write_task` writes an lm-eval task over local data: a JSON-lines file and
a task YAML beside it (`dataset_path: json`, `data_files` pointing at the file), which lm-eval's `TaskManager
(include_path=folder)` finds by name, with no network (set HF_DATASETS_OFFLINE=1). `task_fingerprint` is what a
row scored by an lm-eval task depends on: lm-eval's version, the task's YAML files (with their includes and the
Python files beside them) and its local data files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .files import atomic_write_text

EXTRA = "lmeval"
KINDS = ("multiple_choice", "generate_until")


def require() -> Any:
    """The `lm_eval` module, or RuntimeError: one line naming the extra to install."""
    try:
        import lm_eval
    except ImportError as e:
        raise RuntimeError(
            f"lm-evaluation-harness is not installed; it comes with the {EXTRA} extra: "
            f"pip install 'pwemoe[{EXTRA}]' ({e})"
        ) from None
    return lm_eval


def write_task(
    folder: str | Path,
    name: str,
    docs: Sequence[dict[str, Any]],
    kind: str = "multiple_choice",
    until: Sequence[str] = ("\n",),
    max_gen_toks: int = 16,
    target_delimiter: str = " ",
) -> Path:
    """Write `folder/<name>.jsonl` (the docs) and `folder/<name>.yaml` (the task); returns the YAML's path.

    multiple_choice: each doc has "prompt" (the context), "choices" (the answers; lm-eval puts `target_delimiter`
    between context and answer) and "label" (the right answer's index); the metrics are acc and acc_norm.
    generate_until: each doc has "prompt" and "answer"; greedy generation up to `until` or `max_gen_toks` tokens,
    scored by exact_match.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    need = {"prompt", "choices", "label"} if kind == "multiple_choice" else {"prompt", "answer"}
    bad = [i for i, d in enumerate(docs) if not need <= set(d)]
    if not docs or bad:
        raise ValueError(f"every doc of a {kind} task needs {sorted(need)}; docs {bad[:5]} lack some (or none given)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = (folder / f"{name}.jsonl").resolve()
    atomic_write_text(data, "".join(json.dumps(d) + "\n" for d in docs))
    task: dict[str, Any] = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": kind,
        "doc_to_text": "prompt",
        "target_delimiter": target_delimiter,
    }
    if kind == "multiple_choice":
        task |= {
            "doc_to_choice": "choices",
            "doc_to_target": "label",
            "metric_list": [
                {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")
            ],
        }
    else:
        task |= {
            "doc_to_target": "answer",
            "generation_kwargs": {"until": list(until), "max_gen_toks": max_gen_toks, "do_sample": False},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        }
    out = folder / f"{name}.yaml"
    atomic_write_text(out, json.dumps(task, indent=2) + "\n")  # JSON is YAML
    return out


_DEFAULT_TASKS: Any = None  # lm-eval's own task index: built once per process (seconds)


def _is_yaml(task: str) -> bool:
    return task.endswith((".yaml", ".yml")) and Path(task).expanduser().is_file()


def task_manager(task: str, include_path: str | None = None) -> Any:
    """lm-eval's `TaskManager` that knows `task`: the `include_path` folder alone when it holds the task (no index of
    lm-eval's thousands of tasks), else lm-eval's own tasks too; a task YAML path needs no index."""
    require()
    from lm_eval.tasks import TaskManager

    global _DEFAULT_TASKS
    if include_path:
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        return manager if task in manager.task_index or _is_yaml(task) else TaskManager(include_path=str(include_path))
    if _is_yaml(task):
        return TaskManager(include_defaults=False)
    if _DEFAULT_TASKS is None:
        _DEFAULT_TASKS = TaskManager()
    return _DEFAULT_TASKS


def task_yaml(task: str, manager: Any) -> Path | None:
    """The YAML file of one lm-eval task (None for a task defined in Python only); a ValueError for an unknown name,
    a group or a tag (an objective is one task: give each of a group's tasks its own)."""
    if _is_yaml(task):
        return Path(task).expanduser().resolve()
    entry = manager.task_index.get(task)
    if entry is None:
        raise ValueError(
            f"lm-eval knows no task {task!r}; give a registered task name (lm_eval --tasks list), the path of a task "
            "YAML, or set lm_eval.include_path to the folder that holds it"
        )
    kind = getattr(entry.kind, "name", str(entry.kind)).lower()
    if kind in ("group", "tag"):
        raise ValueError(
            f"lm-eval's {task!r} is a {kind} of several tasks; an objective is one task: name one of its tasks "
            "(each task of the group can be an objective of its own)"
        )
    return entry.yaml_path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    return h.hexdigest()


def _local_paths(value: Any) -> list[Path]:
    """The existing local files and folders among a config value's strings (data_files: a string, list or dict)."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in _local_paths(v)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _local_paths(v)]
    if isinstance(value, str) and value and Path(value).expanduser().exists():
        return [Path(value).expanduser().resolve()]
    return []


def _data_files(cfg: dict[str, Any]) -> dict[str, Any]:
    """{path: sha256} of a task config's local data files; a local folder gives each file's size and mtime."""
    kwargs = cfg.get("dataset_kwargs") or {}
    found = _local_paths([cfg.get("dataset_path"), kwargs.get("data_files"), kwargs.get("data_dir")])
    out: dict[str, Any] = {}
    for p in found:
        if p.is_file():
            out[str(p)] = _sha256(p)
        else:
            files = sorted(f for f in p.rglob("*") if f.is_file())
            out[str(p)] = [[f.relative_to(p).as_posix(), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return out


def task_fingerprint(
    task: str, metric: str = "acc", filter: str = "none", limit: int | None = None, include_path: str | None = None
) -> dict[str, Any]:
    """What an lm-eval task's per-example scores depend on besides the model: lm-eval's version, the task's resolved
    config, the bytes of its YAML files (with their includes and the Python files beside them, for `!function`) and
    of its local data files; with the metric, filter and limit read. Hub data is named by the config only."""
    lm_eval = require()
    from lm_eval.tasks._yaml_loader import load_yaml

    path = task_yaml(task, task_manager(task, include_path))
    files: dict[str, str] = {}
    config: dict[str, Any] = {}

    def add(yaml: Path) -> None:
        if str(yaml) in files:
            return
        files[str(yaml)] = _sha256(yaml)
        for py in sorted(yaml.parent.glob("*.py")):
            files.setdefault(str(py), _sha256(py))
        includes = load_yaml(yaml, resolve_func=False, recursive=False).get("include") or []
        for inc in includes if isinstance(includes, list) else [includes]:
            add((yaml.parent / inc).resolve() if not Path(inc).is_absolute() else Path(inc))

    if path is not None:
        add(path)
        config = load_yaml(path, resolve_func=False)
    return {
        "lm_eval": getattr(lm_eval, "__version__", None) or _version(),
        "task": task,
        "metric": metric,
        "filter": filter,
        "limit": limit,
        "config": json.loads(json.dumps(config, sort_keys=True, default=str)),
        "files": files,
        "data": _data_files(config),
    }


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


__all__ = ["EXTRA", "KINDS", "require", "task_fingerprint", "task_manager", "task_yaml", "write_task"]
