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

from .baselines import Param, Point, describe_param, group_rows, with_role
from .core.preference import Preference, PreferenceLike
from .files import CORRECT, RESULTS, atomic_write_json, atomic_write_text, read_json
from .pareto import hypervolume, non_dominated

if TYPE_CHECKING:
    from .tasks import Task


def preference_key(r: PreferenceLike, k: int) -> list[float]:
    """The normalised preference as stored in results rows (6 decimals): one key for lookups (`Preference.key`; a
    key keys to itself)."""
    return Preference.of(r, k).tolist()


def digest(obj: Any) -> str:
    """A short sha256 of a JSON-serialisable description of inputs."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def split_fingerprint(task: Task) -> str:
    """sha256 of a task's evaluation split as evaluated: its input columns, labels and size."""
    from .tasks.data import dataset_fingerprint

    return dataset_fingerprint(task.test_data, task.data_columns())  # a causal LM's text has no label


def lmeval_inputs(tasks: list[Task]) -> dict[str, Any]:
    """{task: `lmeval.task_fingerprint`} of the tasks scored by an lm-eval task (`tasks[i].lm_eval`): a changed
    task YAML, data file or lm-eval release recomputes their rows; an unchanged one reuses them."""
    from .lmeval import task_fingerprint

    out = {}
    for t in tasks:
        spec = getattr(t.cfg, "lm_eval", None)
        if spec is not None:
            out[t.name] = task_fingerprint(spec.task, spec.metric, spec.filter, spec.limit, spec.include_path)
    return out


def row_inputs(meta: dict, tasks: list[Task], precision: str, device: str) -> dict[str, str]:
    """The `inputs` digests of a run's rows: what every row depends on, the models (base, experts,
    heads), the test data as evaluated and how it was computed (precision, device type: a bf16 or a
    GPU forward, with TF32 convolutions, scores differently); PWEMoE rows also on the router checkpoint.

    meta: `open_run`'s checkpoint metadata (hashes, routers_sha256). Returns the digest of each kind of point
    (`Point.kind`): {"preference": PWEMoE's rows, "weights": the baselines'}.
    """
    common = {
        "models": meta.get("hashes", {}),
        "data": {t.name: split_fingerprint(t) for t in tasks},
        "computed": {"precision": precision, "device": device},
    }
    scored = lmeval_inputs(tasks)
    if scored:  # only then: the rows of runs without lm-eval tasks keep their digests
        common["lm_eval"] = scored
    return {"preference": digest({**common, "routers": meta["routers_sha256"]}), "weights": digest(common)}


def point_inputs(inputs: dict[str, str], p: Point) -> str:
    """The `inputs` digest of one point's row: `row_inputs`' digest of its kind; a mergekit merge's row also
    depends on its method, every parameter, the seed and mergekit's version (`inputs["mergekit"]`), so a
    changed grid or seed recomputes exactly the rows it changes."""
    if p.kind == "merge":
        return digest({"baseline": inputs["weights"], "merge": p.merge.describe(), "mergekit": inputs.get("mergekit")})
    return inputs[p.kind]


def make_row(
    method: str, preference: list[float] | None, param: Param, accuracy: dict[str, float], inputs: str
) -> dict[str, Any]:
    """One results.json row: a method at a preference or parameter, its per-task accuracy and inputs digest."""
    return {"method": method, "preference": preference, "param": param, "accuracy": accuracy, "inputs": inputs}


def _key(method: str, pref: list[float] | None, param: Param) -> str:
    p = "" if pref is None else ",".join(f"{x:.6f}" for x in pref)
    if isinstance(param, dict):  # a merge's grid point: every parameter by name
        q = ",".join(f"{k}={float(v):.6f}" for k, v in sorted(param.items()))
    else:
        q = "" if param is None else f"{param:.6f}"
    return f"{method}|{p}|{q}"


class ResultStore:
    """results.json rows, re-read on start and rewritten atomically after every new row, and beside them
    correct.json: each row's per-example correctness (the data of the bootstrap intervals).

    `get(..., inputs)` returns a row only if it was computed from the same inputs and its correctness
    is stored too; `add` replaces a row of the same method/preference/parameter computed from other
    inputs. `correct[key]` is {task: packed bits} (see `pack_correct`).
    """

    def __init__(self, run: Path, results: str = RESULTS, correct: str = CORRECT) -> None:
        self.path = run / results
        self.correct_path = run / correct
        rows = read_json(self.path, "evaluation results") if self.path.exists() else []
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "method" in r for r in rows):
            raise ValueError(
                f"{self.path} is not a pwemoe results file (a JSON list of rows); move it away and evaluate again"
            )
        corr = read_json(self.correct_path, "per-example correctness") if self.correct_path.exists() else {}
        if not isinstance(corr, dict):
            raise ValueError(f"{self.correct_path} is not a pwemoe correctness file; move it away and evaluate again")
        self.rows: list[dict[str, Any]] = rows
        self.correct: dict[str, dict[str, Any]] = corr
        self.index = {_key(r["method"], r.get("preference"), r.get("param")): r for r in self.rows}
        self.reused = self.computed = self.replaced = 0

    def get(self, method: str, pref: list[float] | None, param: Param, inputs: str) -> dict | None:
        key = _key(method, pref, param)
        row = self.index.get(key)
        c = self.correct.get(key)
        if row is not None and row.get("inputs") == inputs and c is not None and c.get("inputs") == inputs:
            self.reused += 1
            return row
        return None

    def add(self, row: dict[str, Any], correct: dict[str, str], computed: bool = True) -> None:
        """Store a row and its packed per-example correctness {task: bits}; correctness first, so a
        row in results.json always has it (a kill in between leaves an unused entry, recomputed later).
        computed=False: the row copies another just computed from the same model (counted as reused)."""
        key = _key(row["method"], row["preference"], row["param"])
        self.correct[key] = {"inputs": row["inputs"], "tasks": correct}
        atomic_write_json(self.correct_path, self.correct)
        old = self.index.get(key)
        if old is not None:  # computed from other inputs: the new row replaces it
            self.rows.remove(old)
            self.replaced += 1
        self.rows.append(row)
        self.index[key] = row
        if computed:
            self.computed += 1
        else:
            self.reused += 1
        atomic_write_json(self.path, self.rows)

    def correctness(self, rows: list[dict], names: list[str]) -> dict[str, np.ndarray] | None:
        """{task: bool array [len(rows), n_task]} for `rows`, or None when any row lacks it."""
        out: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for r in rows:
            c = self.correct.get(_key(r["method"], r["preference"], r["param"]))
            if c is None or c.get("inputs") != r.get("inputs"):
                return None
            for n in names:
                out[n].append(unpack_correct(c["tasks"][n]))
        return {n: np.stack(v) for n, v in out.items()}


def pack_correct(correct: torch.Tensor) -> dict[str, Any]:
    """Per-example metric -> JSON. BoolTensor[n] (accuracy): {"n", "bits": base64 of the packed bits};
    a float tensor (e.g. per-example loss): {"n", "values": base64 of float32}."""
    import base64

    if correct.dtype != torch.bool:
        a = correct.detach().cpu().numpy().astype(np.float32)
        return {"n": int(a.size), "values": base64.b64encode(a.tobytes()).decode()}
    a = correct.detach().cpu().numpy().astype(bool)
    return {"n": int(a.size), "bits": base64.b64encode(np.packbits(a).tobytes()).decode()}


def unpack_correct(packed: dict[str, Any]) -> np.ndarray:
    import base64

    if "values" in packed:
        return np.frombuffer(base64.b64decode(packed["values"]), dtype=np.float32)[: int(packed["n"])].copy()
    bits = np.frombuffer(base64.b64decode(packed["bits"]), dtype=np.uint8)
    return np.unpackbits(bits)[: int(packed["n"])].astype(bool)


def _signs(names: list[str], directions: dict[str, str] | None) -> np.ndarray:
    """+1 for higher-is-better tasks, -1 for lower-is-better ones (`directions[task] == "min"`)."""
    d = directions or {}
    bad = {n: v for n, v in d.items() if v not in ("max", "min")}
    if bad:
        raise ValueError(f"metric directions must be 'max' or 'min', got {bad}")
    return np.array([-1.0 if d.get(n) == "min" else 1.0 for n in names])


def normalize(rows: list[dict], names: list[str], directions: dict[str, str] | None = None) -> None:
    """Add `normalized` to each row, in place: the task's metric relative to its own expert's, so that
    1 is "as good as the expert" and larger is better (accuracy / expert's; loss: expert's / loss)."""
    lower = {n for n, s in zip(names, _signs(names, directions)) if s < 0}
    normaliser = with_role("normaliser")
    own = {n: r["accuracy"][n] for r in rows for n in names if normaliser.task_of(r["method"]) == n}

    def rel(n: str, v: float) -> float | None:
        if not own.get(n):
            return None
        if n in lower:
            return own[n] / v if v > 0 else None
        return v / own[n]

    for r in rows:
        r["normalized"] = {n: rel(n, r["accuracy"][n]) for n in names}


def reference_values(
    rows: list[dict],
    names: list[str],
    reference: float,
    directions: dict[str, str] | None,
    loss_reference: float | None,
) -> list[float]:
    """The hypervolume reference point in each task's own metric: `reference` for higher-is-better tasks;
    for lower-is-better ones `loss_reference`, or else 1.1 x the worst value any row reached (the usual
    nadir-based choice, stated in the summary)."""
    out = []
    for n, s in zip(names, _signs(names, directions)):
        if s > 0:
            out.append(float(reference))
        elif loss_reference is not None:
            out.append(float(loss_reference))
        else:
            worst = max((r["accuracy"][n] for r in rows), default=1.0)
            out.append(1.1 * float(worst))
    return out


def summarize(
    rows: list[dict],
    names: list[str],
    reference: float = 0.0,
    correct: dict[str, np.ndarray] | None = None,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    directions: dict[str, str] | None = None,
    loss_reference: float | None = None,
) -> dict[str, Any]:
    """Hypervolume (raw and normalised) and non-dominated points per method (registry order).

    Rows hold each task's metric under "accuracy"; `directions` ({task: "max" | "min"}, default max)
    says which are lower-is-better (a causal LM's loss). Dominance and hypervolume follow each task's
    direction; the reference point is stated per task in the task's own metric (`reference_values`).
    With `correct` ({task: [len(rows), n_task]} per-example metric, see `ResultStore.correctness`) and
    resamples > 0, adds paired-bootstrap percentile intervals: `accuracy_ci` on every row,
    `hypervolume_ci` (and normalised) per method, and `comparisons`: PWEMoE against each method, the
    hypervolume difference and ratio with their intervals.
    """
    sign = _signs(names, directions)
    normalize(rows, names, directions)
    groups = group_rows(rows)
    subject, normaliser = with_role("subject").name, with_role("normaliser").name
    ref_raw = reference_values(rows, names, reference, directions, loss_reference)
    ref_u = sign * np.array(ref_raw)  # in "larger is better" coordinates
    norm_ref = [float(reference) if s > 0 else 0.0 for s in sign]
    out: dict[str, Any] = {
        "reference_point": {"accuracy": ref_raw, "normalized": norm_ref},
        "directions": {n: "max" if s > 0 else "min" for n, s in zip(names, sign)},
        "tasks": names,
        "roles": {role: with_role(role).name for role in ("subject", "reference", "normaliser")},
        "methods": {},
    }
    ideal = None
    if normaliser in groups and all(r["normalized"][n] is not None for r in groups[normaliser] for n in names):
        own_of = with_role("normaliser").task_of
        own = [next(r["accuracy"][n] for r in groups[normaliser] if own_of(r["method"]) == n) for n in names]
        ideal = own
        out["ideal_point"] = {
            "accuracy": own,
            "hypervolume": hypervolume(sign * np.array([own]), ref_u),
            "hypervolume_normalized": hypervolume(np.ones((1, len(names))), norm_ref),
        }
    for g, rs in groups.items():
        acc = np.array([[r["accuracy"][n] for n in names] for r in rs])
        nd = non_dominated(sign * acc)
        entry = {
            "points": len(rs),
            "hypervolume": hypervolume(sign * acc, ref_u),
            "non_dominated": [
                rs[i]["preference"] if rs[i]["preference"] is not None else rs[i]["param"] for i in np.flatnonzero(nd)
            ],
        }
        if ideal is not None:
            norm = np.array([[r["normalized"][n] for n in names] for r in rs])
            entry["hypervolume_normalized"] = hypervolume(norm, norm_ref)
            entry["mean_normalized_accuracy"] = float(norm.mean(axis=1).max())
        out["methods"][g] = entry
    if subject in groups:  # pointwise comparison of each method's points with PWEMoE's front
        pw = np.array([[r["accuracy"][n] for n in names] for r in groups[subject]])
        for g, rs in groups.items():
            if g == subject:
                continue
            pts = np.array([[r["accuracy"][n] for n in names] for r in rs])
            out["methods"][g]["dominated_by_pwemoe"] = int(sum(_dominated(p, sign * pw) for p in sign * pts))
            out["methods"][g]["dominating_pwemoe"] = int(sum(_dominated(p, sign * pts) for p in sign * pw))
    if correct is not None and resamples > 0 and rows:
        _intervals(out, rows, names, groups, (sign, ref_u, np.array(norm_ref)), correct, resamples, level, seed)
    return out


def _intervals(
    out: dict[str, Any],
    rows: list[dict],
    names: list[str],
    groups: dict[str, list[dict]],
    refs: tuple[np.ndarray, np.ndarray, np.ndarray],
    correct: dict[str, np.ndarray],
    resamples: int,
    level: float,
    seed: int,
) -> None:
    """Paired bootstrap intervals (see `summarize`), added to `out` and the rows in place.

    refs: (sign per task, raw reference in larger-is-better coordinates, normalised reference)."""
    from .intervals import accuracy_samples, interval

    sign, ref_u, norm_ref = refs
    subject, normaliser = with_role("subject").name, with_role("normaliser").name
    samples = accuracy_samples({n: correct[n] for n in names}, resamples, seed)
    acc = np.stack([samples[n] for n in names], axis=-1)  # [B, R, k]
    lo, hi = interval(acc, level)
    for i, r in enumerate(rows):
        r["accuracy_ci"] = {n: [float(lo[i, j]), float(hi[i, j])] for j, n in enumerate(names)}
    where = {id(r): i for i, r in enumerate(rows)}
    experts = groups.get(normaliser, [])
    own_of = with_role("normaliser").task_of
    own_idx = [next((where[id(r)] for r in experts if own_of(r["method"]) == n), None) for n in names]
    own = acc[:, own_idx, np.arange(len(names))] if None not in own_idx else None  # [B, k]
    hv: dict[str, dict[str, np.ndarray]] = {}
    for g, rs in groups.items():
        idx = [where[id(r)] for r in rs]
        pts = acc[:, idx, :]  # [B, n_g, k]
        hv[g] = {"raw": np.array([hypervolume(sign * p, ref_u) for p in pts])}
        if own is not None and (own > 0).all() and ((sign > 0) | (pts > 0).all(axis=(0, 1))).all():
            # normalised so that larger is better: accuracy / expert's; loss: expert's / loss
            rel = [np.where(sign > 0, p / o, o / np.where(p > 0, p, 1.0)) for p, o in zip(pts, own)]
            hv[g]["norm"] = np.array([hypervolume(q, norm_ref) for q in rel])
        e = out["methods"][g]
        e["hypervolume_ci"] = [float(x) for x in interval(hv[g]["raw"], level)]
        if "norm" in hv[g]:
            e["hypervolume_normalized_ci"] = [float(x) for x in interval(hv[g]["norm"], level)]
    out["bootstrap"] = {
        "method": "paired percentile bootstrap: each resample redraws every task's test examples with "
        "replacement, the same draw for every model",
        "resamples": resamples,
        "level": level,
        "seed": seed,
    }
    if subject not in hv:
        return
    comp = {}
    for g in hv:
        if g == subject:
            continue
        c: dict[str, Any] = {}
        for kind, key in (("raw", "hypervolume"), ("norm", "hypervolume_normalized")):
            if kind not in hv[g] or kind not in hv[subject]:
                continue
            a, b = hv[subject][kind], hv[g][kind]
            pa, pb = out["methods"][subject][key], out["methods"][g][key]
            d_lo, d_hi = interval(a - b, level)
            c[key] = {
                "difference": pa - pb,
                "difference_ci": [float(d_lo), float(d_hi)],
                "ratio": pa / pb if pb > 0 else None,
                "ratio_ci": [float(x) for x in interval(a / b, level)] if (b > 0).all() else None,
                "interval_excludes_zero": bool(d_lo > 0 or d_hi < 0),
                "share_of_resamples_pwemoe_larger": float((a > b).mean()),
            }
        comp[g] = c
    out["comparisons"] = comp


def _dominated(p: np.ndarray, others: np.ndarray) -> bool:
    """True when some row of `others` is >= p everywhere and > p somewhere."""
    return bool(((others >= p).all(axis=1) & (others > p).any(axis=1)).any())


def write_tables(run: Path, rows: list[dict], names: list[str], summary: dict) -> None:
    """results.csv, results.json (every stored row, normalised) and summary.json, atomically."""
    normalize(rows, names, summary.get("directions"))  # a loss task's normalisation is inverted
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        ["method", "param"] + [f"r_{n}" for n in names] + [f"acc_{n}" for n in names] + [f"norm_{n}" for n in names]
    )
    for r in rows:
        pref = r["preference"] or [""] * len(names)
        w.writerow(
            [r["method"], r["param"] if isinstance(r["param"], (int, float)) else describe_param(r["param"])]
            + list(pref)
            + [r["accuracy"][n] for n in names]
            + [r["normalized"][n] for n in names]
        )
    atomic_write_text(run / "results.csv", buf.getvalue())
    atomic_write_json(run / RESULTS, rows)
    atomic_write_json(run / "summary.json", summary)
