"""lm-evaluation-harness (lm-eval), the LLM field's yardstick, as an optional extra: imported lazily, and local tasks.

`require()` imports lm-eval or raises one line naming the extra (`pip install 'pwemoe[lmeval]'`), which the
command line prints with exit status 2. `write_task` writes an lm-eval task over local data: a JSON-lines file and
a task YAML beside it (`dataset_path: json`, `data_files` pointing at the file), which lm-eval's `TaskManager
(include_path=folder)` finds by name, with no network (set HF_DATASETS_OFFLINE=1).
"""

from __future__ import annotations

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
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
        }
    else:
        task |= {
            "doc_to_target": "answer",
            "generation_kwargs": {"until": list(until), "max_gen_toks": max_gen_toks, "do_sample": False},
            "metric_list": [{"metric": "exact_match"}],
        }
    out = folder / f"{name}.yaml"
    atomic_write_text(out, json.dumps(task, indent=2) + "\n")  # JSON is YAML
    return out


__all__ = ["EXTRA", "KINDS", "require", "write_task"]
