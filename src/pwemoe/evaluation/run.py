"""`pwemoe evaluate RUN` and `pwemoe export RUN`."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import ROUTERS, atomic_write_text, check_hashes, load_routers
from ..config import load_config
from ..core.preference import normalize_preference, parse_preference, simplex_grid
from ..pipeline import Workbench
from ..tasks import Task
from ..upscale import load_router_state_dict, merge_and_unload, merge_into, routing_weights, set_preference
from .pareto import hypervolume, non_dominated

log = logging.getLogger(__name__)


def open_run(run: str | Path, load_test: bool = True, max_test_samples: int | None = None) -> tuple[Workbench, dict]:
    """Rebuild a run's upcycled model with its trained routers; refuse different base/expert weights."""
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} is not a run directory (no config.yaml)")
    cfg = load_config(run / "config.yaml")
    state, meta = load_routers(run / ROUTERS)
    wb = Workbench(cfg, load_train=False, load_test=load_test, max_test_samples=max_test_samples)
    check_hashes(meta.get("hashes", {}), wb.info.hashes, f"the checkpoint in {run}")
    load_router_state_dict(wb.model, state)
    return wb, meta


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Index batches in order of length, so each batch pads to a similar length (less wasted compute)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def eval_batches(task: Task, batch_size: int) -> list[list[int]]:
    """The test split's index batches: by encoded length for text, in order for images (cached)."""
    key = ("_eval_batches", batch_size, len(task.test_data))
    cached = getattr(task, "_eval_cache", None)
    if cached is None or cached[0] != key:
        if task.modality == "text":
            lengths = [len(f["input_ids"]) for f in task.encode(task.test_data[:])]
        else:
            lengths = [0] * len(task.test_data)
        cached = (key, length_sorted_batches(lengths, batch_size))
        task._eval_cache = cached
    return cached[1]


@torch.no_grad()
def accuracy(wb: Workbench, task: Task, batch_size: int, backbone: nn.Module | None = None) -> float:
    """Top-1 accuracy of `task` on its test split through `backbone` (default: the upcycled one)."""
    ds = task.test_data
    correct = 0
    for idx in eval_batches(task, batch_size):
        rows = ds[idx]
        logits = wb.logits([(task, rows)], backbone=backbone)[0]
        correct += int((logits.argmax(-1) == task.labels(rows)).sum())
    return correct / len(ds)


def preference_key(r: torch.Tensor | list[float], k: int) -> list[float]:
    """The normalised preference as stored in results rows (6 decimals): one key for lookups."""
    return [round(x, 6) for x in normalize_preference(r, k).tolist()]


def _key(method: str, pref: list[float] | None, param: float | None) -> str:
    p = "" if pref is None else ",".join(f"{x:.6f}" for x in pref)
    return f"{method}|{p}|{'' if param is None else f'{param:.6f}'}"


class ResultStore:
    """results.json rows, re-read on start and rewritten atomically after every new row."""

    def __init__(self, run: Path) -> None:
        self.path = run / "results.json"
        self.rows: list[dict[str, Any]] = json.loads(self.path.read_text()) if self.path.exists() else []
        self.index = {_key(r["method"], r["preference"], r["param"]): r for r in self.rows}

    def get(self, method: str, pref: list[float] | None, param: float | None) -> dict | None:
        return self.index.get(_key(method, pref, param))

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.index[_key(row["method"], row["preference"], row["param"])] = row
        atomic_write_text(self.path, json.dumps(self.rows, indent=1))


def read_preferences(path: str | Path, k: int) -> torch.Tensor:
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                rows.append(normalize_preference(parse_preference(line), k))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}, line {i}: {e}") from None
    if not rows:
        raise ValueError(f"{path} holds no preferences; write one per line, e.g. 0.2,0.8")
    return torch.stack(rows)


def evaluate_run(run: str | Path, grid: int | None = None, preferences_file: str | None = None,
                 baselines: bool = True, batch_size: int | None = None, max_test_samples: int | None = None,
                 verbose: int = 0) -> dict[str, Any]:
    """Evaluate PWEMoE on preferences, plus baselines; write results, hypervolumes, plots and a report."""
    run = Path(run)
    cfg = load_config(run / "config.yaml")
    k = len(cfg.tasks)
    m = grid if grid is not None else cfg.eval.grid
    prefs = read_preferences(preferences_file, k) if preferences_file else simplex_grid(k, m)
    bs = batch_size or cfg.eval.batch_size
    wb, meta = open_run(run, load_test=True, max_test_samples=max_test_samples)
    names = [t.name for t in wb.tasks]
    store = ResultStore(run)
    from tqdm.auto import tqdm

    def record(method: str, pref: list[float] | None, param: float | None, fn) -> dict:
        row = store.get(method, pref, param)
        if row is None:
            acc = {t.name: fn(t) for t in wb.tasks}
            row = {"method": method, "preference": pref, "param": param, "accuracy": acc}
            store.add(row)
        return row

    # PWEMoE: merge once per preference into one plain copy of the backbone, then run every
    # task's test split through that plain model (no functional_call per batch).
    plain = None
    pref_keys = [preference_key(r, k) for r in prefs]
    for key in tqdm(pref_keys, desc="pwemoe", unit="pref", disable=verbose < 0):
        if store.get("pwemoe", key, None) is None:
            plain = merge_and_unload(wb.backbone, key).eval() if plain is None else merge_into(wb.backbone, plain, key)
        record("pwemoe", key, None, lambda t: accuracy(wb, t, bs, backbone=plain))
    del plain
    # Experts are always evaluated: their own accuracy normalises everything else.
    bank = None

    def merged(weights: list[float]) -> nn.Module:
        nonlocal bank
        if bank is None:
            from .baselines import TaskVectorBank

            base = _fresh_backbone(wb)
            bank = TaskVectorBank(base, {t.name: (lambda t=t: t.load_expert_backbone(wb.resolve(t.cfg.expert)))
                                         for t in wb.tasks})
        return bank.model(weights)

    def baseline(method: str, pref: list[float] | None, param: float | None, weights: list[float]) -> dict:
        if store.get(method, pref, param) is None:
            bb = merged(weights)
        return record(method, pref, param, lambda t: accuracy(wb, t, bs, backbone=bb))

    c = cfg.eval.pwta_scale if cfg.eval.pwta_scale is not None else cfg.model.init_lambda * k
    eye = np.eye(k)
    for i, n in enumerate(tqdm(names, desc="experts", disable=verbose < 0)):
        baseline(f"expert:{n}", eye[i].tolist(), None, eye[i].tolist())
    if baselines:
        baseline("average", None, None, [1.0 / k] * k)
        for lam in cfg.eval.ta_scales:
            baseline("task_arithmetic", None, float(lam), [float(lam)] * k)
        for key in tqdm(pref_keys, desc="pref-weighted TA", disable=verbose < 0):
            baseline("pref_task_arithmetic", key, float(c), [c * x for x in key])
    # The summary and report cover this invocation's preferences and baselines only;
    # results.json/csv keep every row ever evaluated in this run directory.
    keys = {tuple(key) for key in pref_keys}
    scales = {round(float(x), 6) for x in cfg.eval.ta_scales}

    def current(row: dict) -> bool:
        meth = row["method"]
        if meth.startswith("expert:"):
            return True
        if meth == "pwemoe":
            return tuple(row["preference"]) in keys
        if not baselines:
            return False
        if meth == "pref_task_arithmetic":
            return tuple(row["preference"]) in keys and row["param"] == float(c)
        if meth == "task_arithmetic":
            return round(row["param"], 6) in scales
        return meth == "average"

    rows = [r for r in store.rows if current(r)]
    summary = summarize(rows, names, cfg.eval.reference_point)
    _normalised(store.rows, names)  # results.json/csv carry normalised accuracy for every stored row
    summary["grid"] = m if not preferences_file else None
    summary["preferences"] = len(prefs)
    summary["run"] = str(run)
    _write_tables(run, store.rows, names, summary)
    from ..report import write_report

    write_report(run, rows, names, summary)
    return summary


def _fresh_backbone(wb: Workbench) -> nn.Module:
    """A plain copy of the base backbone (the upcycled one has its non-targets merged already)."""
    if wb.modality == "text":
        from transformers import AutoModel

        return AutoModel.from_pretrained(wb.resolve(wb.cfg.model.base))
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(wb.resolve(wb.cfg.model.base)).vision_model


def _normalised(rows: list[dict], names: list[str]) -> None:
    own = {n: r["accuracy"][n] for r in rows for n in names if r["method"] == f"expert:{n}"}
    for r in rows:
        r["normalized"] = {n: (r["accuracy"][n] / own[n] if own.get(n) else None) for n in names}


def summarize(rows: list[dict], names: list[str], reference: float = 0.0) -> dict[str, Any]:
    """Hypervolume (raw and normalised) and non-dominated points per method group."""
    _normalised(rows, names)
    groups: dict[str, list[dict]] = {}
    for r in rows:
        g = "experts" if r["method"].startswith("expert:") else r["method"]
        groups.setdefault(g, []).append(r)
    out: dict[str, Any] = {"reference_point": {"accuracy": [reference] * len(names),
                                               "normalized": [reference] * len(names)},
                           "tasks": names, "methods": {}}
    ideal = None
    if "experts" in groups and all(r["normalized"][n] is not None for r in groups["experts"] for n in names):
        own = [next(r["accuracy"][n] for r in groups["experts"] if r["method"] == f"expert:{n}") for n in names]
        ideal = own
        out["ideal_point"] = {"accuracy": own, "hypervolume": hypervolume(np.array([own]), reference),
                              "hypervolume_normalized": hypervolume(np.ones((1, len(names))), reference)}
    for g, rs in groups.items():
        acc = np.array([[r["accuracy"][n] for n in names] for r in rs])
        nd = non_dominated(acc)
        entry = {"points": len(rs), "hypervolume": hypervolume(acc, reference),
                 "non_dominated": [rs[i]["preference"] if rs[i]["preference"] is not None else rs[i]["param"]
                                   for i in np.flatnonzero(nd)]}
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


def _write_tables(run: Path, rows: list[dict], names: list[str], summary: dict) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "param"] + [f"r_{n}" for n in names] + [f"acc_{n}" for n in names]
               + [f"norm_{n}" for n in names])
    for r in rows:
        pref = r["preference"] or [""] * len(names)
        w.writerow([r["method"], "" if r["param"] is None else r["param"]] + list(pref)
                   + [r["accuracy"][n] for n in names] + [r["normalized"][n] for n in names])
    atomic_write_text(run / "results.csv", buf.getvalue())
    atomic_write_text(run / "results.json", json.dumps(rows, indent=1))
    atomic_write_text(run / "summary.json", json.dumps(summary, indent=1))


def export_run(run: str | Path, preference: str | list[float], out: str | Path) -> Path:
    """Write plain Hugging Face model directories for one preference, plus pwemoe.json."""
    run, out = Path(run), Path(out)
    wb, meta = open_run(run, load_test=False)
    k = len(wb.tasks)
    r = normalize_preference(parse_preference(preference) if isinstance(preference, str) else preference, k)
    set_preference(wb.model, r)
    lam = {n: v.tolist() for n, v in routing_weights(wb.model).items()}
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    if wb.modality == "text":
        plain = merge_and_unload(wb.backbone, r)
        for t in wb.tasks:
            import copy

            m = t.export_model(copy.deepcopy(plain))
            m.save_pretrained(out / t.name)
            wb.tokenizer.save_pretrained(out / t.name)
            written[t.name] = str(out / t.name)
    else:
        clip = merge_and_unload(wb.model, r)
        clip.save_pretrained(out)
        wb.processor.save_pretrained(out)
        wb.tokenizer.save_pretrained(out)
        written = {t.name: str(out) for t in wb.tasks}
    info = {
        "preference": dict(zip([t.name for t in wb.tasks], r.tolist())),
        "run": str(run.resolve()),
        "step": meta.get("step"),
        "base": meta.get("base"),
        "experts": meta.get("experts"),
        "hashes": meta.get("hashes"),
        "routing_weights": lam,
        "models": written,
        "class_names": {t.name: t.class_names for t in wb.tasks},
    }
    atomic_write_text(out / "pwemoe.json", json.dumps(info, indent=1))
    print(f"exported preference {r.tolist()} to {out}")
    return out
