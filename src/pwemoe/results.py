"""Results of a run's evaluation: the row store, its provenance keys, summaries and tables.

A row is one evaluated model (a method at a preference or parameter) with per-task accuracy.
It is keyed by what determines it: method, preference, parameter and an `inputs` digest of the
models, router checkpoint (PWEMoE rows) and test data it was computed from. A row is reused only
when all of these match, so results are never stale or mixed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .core.preference import normalize_preference
from .io import RESULTS, atomic_write_json, atomic_write_text, read_json
from .methods import group_rows
from .pareto import hypervolume, non_dominated

if TYPE_CHECKING:
    from .tasks import Task


def preference_key(r: torch.Tensor | list[float], k: int) -> list[float]:
    """The normalised preference as stored in results rows (6 decimals): one key for lookups."""
    return [round(x, 6) for x in normalize_preference(r, k).tolist()]


def digest(obj: Any) -> str:
    """A short sha256 of a JSON-serialisable description of inputs."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def split_fingerprint(task: Task) -> str:
    """sha256 of a task's test split as evaluated: its input columns, labels and size."""
    ds = task.test_data
    h = hashlib.sha256(f"{len(ds)}|".encode())
    for c in task.input_columns() + [task.cfg.data.label_column]:
        feat = ds.features.get(c)
        if type(feat).__name__ == "Image":  # image bytes are big: datasets' own fingerprint stands for them
            h.update(f"{c}|{getattr(ds, '_fingerprint', '')}|".encode())
        else:
            h.update(f"{c}|".encode())
            for v in ds[c]:
                h.update(repr(v).encode())
    return h.hexdigest()


def row_inputs(meta: dict, tasks: list[Task]) -> dict[str, str]:
    """The `inputs` digests of a run's rows: what every row depends on, the models (base, experts,
    heads) and the test data as evaluated; PWEMoE rows also on the router checkpoint.

    meta: `open_run`'s checkpoint metadata (hashes, routers_sha256). Returns {"pwemoe", "baseline"}.
    """
    common = {"models": meta.get("hashes", {}), "data": {t.name: split_fingerprint(t) for t in tasks}}
    return {"pwemoe": digest({**common, "routers": meta["routers_sha256"]}), "baseline": digest(common)}


def make_row(
    method: str, preference: list[float] | None, param: float | None, accuracy: dict[str, float], inputs: str
) -> dict[str, Any]:
    """One results.json row: a method at a preference or parameter, its per-task accuracy and inputs digest."""
    return {"method": method, "preference": preference, "param": param, "accuracy": accuracy, "inputs": inputs}


def _key(method: str, pref: list[float] | None, param: float | None) -> str:
    p = "" if pref is None else ",".join(f"{x:.6f}" for x in pref)
    return f"{method}|{p}|{'' if param is None else f'{param:.6f}'}"


class ResultStore:
    """results.json rows, re-read on start and rewritten atomically after every new row.

    `get(..., inputs)` returns a row only if it was computed from the same inputs; `add` replaces
    a row of the same method/preference/parameter computed from other inputs.
    """

    def __init__(self, run: Path) -> None:
        self.path = run / RESULTS
        rows = read_json(self.path, "evaluation results") if self.path.exists() else []
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "method" in r for r in rows):
            raise ValueError(
                f"{self.path} is not a pwemoe results file (a JSON list of rows); move it away and evaluate again"
            )
        self.rows: list[dict[str, Any]] = rows
        self.index = {_key(r["method"], r.get("preference"), r.get("param")): r for r in self.rows}
        self.reused = self.computed = self.replaced = 0

    def get(self, method: str, pref: list[float] | None, param: float | None, inputs: str) -> dict | None:
        row = self.index.get(_key(method, pref, param))
        if row is not None and row.get("inputs") == inputs:
            self.reused += 1
            return row
        return None

    def add(self, row: dict[str, Any]) -> None:
        key = _key(row["method"], row["preference"], row["param"])
        old = self.index.get(key)
        if old is not None:  # computed from other inputs: the new row replaces it
            self.rows.remove(old)
            self.replaced += 1
        self.rows.append(row)
        self.index[key] = row
        self.computed += 1
        atomic_write_json(self.path, self.rows)


def normalise(rows: list[dict], names: list[str]) -> None:
    """Add `normalized` (accuracy / the task's own expert's accuracy) to each row, in place."""
    own = {n: r["accuracy"][n] for r in rows for n in names if r["method"] == f"expert:{n}"}
    for r in rows:
        r["normalized"] = {n: (r["accuracy"][n] / own[n] if own.get(n) else None) for n in names}


def summarize(rows: list[dict], names: list[str], reference: float = 0.0) -> dict[str, Any]:
    """Hypervolume (raw and normalised) and non-dominated points per method (registry order)."""
    normalise(rows, names)
    groups = group_rows(rows)
    out: dict[str, Any] = {
        "reference_point": {"accuracy": [reference] * len(names), "normalized": [reference] * len(names)},
        "tasks": names,
        "methods": {},
    }
    ideal = None
    if "experts" in groups and all(r["normalized"][n] is not None for r in groups["experts"] for n in names):
        own = [next(r["accuracy"][n] for r in groups["experts"] if r["method"] == f"expert:{n}") for n in names]
        ideal = own
        out["ideal_point"] = {
            "accuracy": own,
            "hypervolume": hypervolume(np.array([own]), reference),
            "hypervolume_normalized": hypervolume(np.ones((1, len(names))), reference),
        }
    for g, rs in groups.items():
        acc = np.array([[r["accuracy"][n] for n in names] for r in rs])
        nd = non_dominated(acc)
        entry = {
            "points": len(rs),
            "hypervolume": hypervolume(acc, reference),
            "non_dominated": [
                rs[i]["preference"] if rs[i]["preference"] is not None else rs[i]["param"] for i in np.flatnonzero(nd)
            ],
        }
        if ideal is not None:
            norm = np.array([[r["normalized"][n] for n in names] for r in rs])
            entry["hypervolume_normalized"] = hypervolume(norm, reference)
            entry["mean_normalized_accuracy"] = float(norm.mean(axis=1).max())
        out["methods"][g] = entry
    if "pwemoe" in groups:  # pointwise comparison of each method's points with PWEMoE's front
        pw = np.array([[r["accuracy"][n] for n in names] for r in groups["pwemoe"]])
        for g, rs in groups.items():
            if g == "pwemoe":
                continue
            pts = np.array([[r["accuracy"][n] for n in names] for r in rs])
            out["methods"][g]["dominated_by_pwemoe"] = int(sum(_dominated(p, pw) for p in pts))
            out["methods"][g]["dominating_pwemoe"] = int(sum(_dominated(p, pts) for p in pw))
    return out


def _dominated(p: np.ndarray, others: np.ndarray) -> bool:
    """True when some row of `others` is >= p everywhere and > p somewhere."""
    return bool(((others >= p).all(axis=1) & (others > p).any(axis=1)).any())


def write_tables(run: Path, rows: list[dict], names: list[str], summary: dict) -> None:
    """results.csv, results.json (every stored row, normalised) and summary.json, atomically."""
    normalise(rows, names)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        ["method", "param"] + [f"r_{n}" for n in names] + [f"acc_{n}" for n in names] + [f"norm_{n}" for n in names]
    )
    for r in rows:
        pref = r["preference"] or [""] * len(names)
        w.writerow(
            [r["method"], "" if r["param"] is None else r["param"]]
            + list(pref)
            + [r["accuracy"][n] for n in names]
            + [r["normalized"][n] for n in names]
        )
    atomic_write_text(run / "results.csv", buf.getvalue())
    atomic_write_json(run / RESULTS, rows)
    atomic_write_json(run / "summary.json", summary)
