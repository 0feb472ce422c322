"""`pwemoe select` on a run: the settings, the record (RUN/selections/<name>.json), the evaluation of candidates
through the cached path of `pwemoe evaluate --split validation`, the test values reported afterwards, the summary."""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..baselines import METHODS, EvalSettings, Point
from ..config import Config
from ..configfile import read_config
from ..files import (
    CONFIG,
    SELECTIONS,
    RunLock,
    atomic_write_json,
    is_selection_record,
    make_dirs,
    prepare_output,
    require_run_dir,
)
from ..recipes.evaluate import PointRows
from ..results import ResultStore, digest, row_inputs
from ..routing import routing_weights
from ..runs import open_run, with_placement, write_export
from ..workbench import Workbench
from .certificate import assess, certification_split, fallback
from .query import Query, objective, parse_query, statistic, task_metrics
from .search import best, binding, initial_grid, search

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class Settings:
    """How a selection is made: the confidence of every one-sided bound; the budget (preferences evaluated
    at most, the starting grid included); the starting grid's levels (None: from the budget); the seed of
    the search/certification split and of the bootstrap; the share of validation examples held out for
    certification; the bootstrap's resamples."""

    confidence: float = 0.95
    budget: int = 24
    grid: int | None = None
    seed: int = 0
    certify_fraction: float = 0.5
    resamples: int = 1000


def check_request(
    cfg: Config, maximize: str | None, minimize: str | None, require: Sequence[str], s: Settings
) -> tuple[Query, int]:
    """The parsed query and the starting grid's levels; every problem with the query and the settings at
    once, in one ValueError, before any model loads."""
    errors = []

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(s.confidence, (int, float)) or not 0.5 <= s.confidence < 1:
        errors.append(f"--confidence must be in [0.5, 1), e.g. 0.95; got {s.confidence!r}")
    if not is_int(s.budget) or s.budget < 2:
        errors.append(f"--budget (preferences evaluated at most) must be an integer >= 2, got {s.budget!r}")
    if s.grid is not None and (not is_int(s.grid) or s.grid < 2):
        errors.append(f"--grid must be an integer >= 2, got {s.grid!r}")
    if not is_int(s.seed):
        errors.append(f"--seed must be an integer, got {s.seed!r}")
    if not isinstance(s.certify_fraction, (int, float)) or not 0 < s.certify_fraction < 1:
        errors.append(f"--certify-fraction must be in (0, 1), e.g. 0.5; got {s.certify_fraction!r}")
    if not is_int(s.resamples) or s.resamples < 100:
        errors.append(f"resamples must be an integer >= 100, got {s.resamples!r}")
    no_val = [t.name for t in cfg.tasks if not t.data.has_validation]
    if no_val:
        errors.append(
            f"the search and its certificate need validation data; tasks {no_val} have none: set "
            "data.validation_split or data.validation_fraction in the run's config (before training)"
        )
    q, m = None, 2
    try:
        q = parse_query(task_metrics(cfg), maximize, minimize, require)
    except ValueError as e:
        errors.append(str(e))
    if not errors:
        try:
            m = initial_grid(len(cfg.tasks), s.budget, s.grid, cfg.eval.grid)
        except ValueError as e:
            errors.append(str(e))
    if errors or q is None:
        raise ValueError("; ".join(errors))
    return q, m


def record_path(run: Path, name: str) -> Path:
    """RUN/selections/<name>.json; refuses a bad name, or a file there that pwemoe did not write."""
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(
            f"selection name must be 1-100 letters, digits, '.', '_' or '-', not starting with '.' or '-', got {name!r}"
        )
    path = run / SELECTIONS / f"{name}.json"
    if path.exists() and not is_selection_record(path):
        raise ValueError(f"{path} exists and is not a pwemoe selection record; choose another --name or move it")
    return path


def default_name(q: Query, s: Settings) -> str:
    """A name that is the same for the same query and settings (the record of a repeated query is replaced)."""
    return f"{q.sense}-{q.target}-{digest([q.to_dict(), vars(s)])[:8]}"


def select_open(
    wb: Workbench,
    meta: dict,
    run: str | Path,
    maximize: str | None = None,
    minimize: str | None = None,
    require: Sequence[str] = (),
    settings: Settings | None = None,
    name: str | None = None,
    batch_size: int | None = None,
    report_test: bool = True,
    test_samples: int | None = None,
    export: str | Path | None = None,
    overwrite: bool = False,
    lock: Any = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Choose a preference on an open run (`open_run`); returns the selection record, also written to
    RUN/selections/<name>.json. The caller holds the run lock.

    Searches and certifies on the validation data; then, with `report_test`, evaluates the chosen r on the
    test split (its first `test_samples` per task) and adds those values to the record; exports a
    certified r to `export`. `lock` / `workers`: see `recipes.evaluate.PointRows` (a server passes its own).
    The workbench's evaluation split is restored on return.
    """
    run = Path(run)
    s = settings or Settings()
    q, m = check_request(wb.cfg, maximize, minimize, require, s)
    path = record_path(run, name or default_name(q, s))
    if export is not None:
        prepare_output(export, overwrite, "export")
    before = (wb.eval_split, wb.max_test_samples)
    try:
        record = _choose(wb, meta, run, q, s, m, batch_size or wb.cfg.eval.batch_size, lock, workers)
        record["name"] = path.stem
        make_dirs(path.parent)  # selections/, its entry synced: a power loss keeps the record
        atomic_write_json(path, record)  # the choice is on disk before the test split is read
        if report_test and record["chosen"] is not None:
            record["test"] = _test_values(wb, meta, run, q, record, batch_size, test_samples, lock, workers)
        if export is not None and record["status"] == "certified":
            with lock or contextlib.nullcontext():
                r = torch.tensor(record["chosen"]["preference"])
                record["export"] = str(write_export(wb, meta, run, r, Path(export), overwrite))
        atomic_write_json(path, record)
    finally:
        wb.set_eval_split(*before)
    record["path"] = str(path)
    return record


def _choose(
    wb: Workbench, meta: dict, run: Path, q: Query, s: Settings, m: int, bs: int, lock: Any, workers: int | None
) -> dict[str, Any]:
    """Search on the search part, certify on the certification part; the record without test values."""
    wb.set_eval_split("validation")
    names = [t.name for t in wb.tasks]
    k = len(names)
    labels = {
        t.name: t.test_data[t.cfg.data.label_column] if t.has_labels else [0] * len(t.test_data) for t in wb.tasks
    }
    search_part, cert_part = certification_split(labels, s.certify_fraction, s.seed)
    make_dirs(run / "validation")
    store = ResultStore(run / "validation")
    inputs = row_inputs(meta, wb.tasks, wb.precision, wb.device.type)
    rows = PointRows(wb, store, inputs, bs, lock, workers)
    # the certification bound still to come is wider than the search part's by about sqrt(n_search / n_cert)
    margin = math.sqrt((1 - s.certify_fraction) / s.certify_fraction)
    try:
        experts = _expert_values(rows, store, names, q.experts)
        values: dict[tuple[float, ...], dict[str, np.ndarray]] = {}

        def score(prefs: list[list[float]]) -> list[dict[str, Any]]:
            got = rows([Point("pwemoe", p, None, None) for p in prefs])
            c = store.correctness(got, names)
            out = []
            for i, p in enumerate(prefs):
                values[tuple(p)] = {t: c[t][i] for t in names}
                out.append(assess(q, values[tuple(p)], experts, search_part, s.confidence, s.resamples, s.seed, margin))
            return out

        cands = search(q, k, m, s.budget, score)
    finally:
        rows.release()
    chosen = best(q, cands)
    record: dict[str, Any] = {
        "pwemoe_selection": 1,
        "run": str(run.resolve()),
        "query": q.to_dict(),
        "confidence": s.confidence,
        "budget": s.budget,
        "grid": m,
        "seeds": {"split": s.seed, "bootstrap": s.seed},
        "resamples": s.resamples,
        "search_margin": margin,
        "split": {
            "certify_fraction": s.certify_fraction,
            "stratified_by": {t.name: t.cfg.data.label_column if t.has_labels else None for t in wb.tasks},
            "sizes": {t: {"search": len(search_part[t]), "certification": len(cert_part[t])} for t in names},
            "certification_indices": {t: cert_part[t].tolist() for t in names},
        },
        "evaluation": {
            "split": "validation",
            "candidates": len(cands),
            "computed": store.computed,
            "reused": store.reused,
            "experts": q.experts,
            "routers_sha256": meta.get("routers_sha256"),
            "inputs": inputs["pwemoe"],
        },
        "candidates": [
            {
                "preference": c["preference"],
                "round": c["round"],
                "objective": c["search"]["objective"],
                "feasible": c["search"]["met"],
                "constraints": [_short(r) for r in c["search"]["constraints"]],
            }
            for c in cands
        ],
    }
    if not chosen["search"]["met"]:
        record.update(status="infeasible", chosen=None, closest=_point(wb, chosen, lock), fallback=None)
        record["binding"] = binding(q, cands, chosen)
        return record
    cert = assess(q, values[tuple(chosen["preference"])], experts, cert_part, s.confidence, s.resamples, s.seed)
    record.update(status="certified" if cert["met"] else "not_certified", chosen=_point(wb, chosen, lock))
    record["certification"] = cert
    record["fallback"] = (
        None if cert["met"] else fallback(q, cands, values, experts, cert_part, s.confidence, s.resamples, s.seed)
    )
    return record


def _expert_values(rows: PointRows, store: ResultStore, names: list[str], need: list[str]) -> dict[str, np.ndarray]:
    """{task: per-example values of the task's own expert} for the tasks in `need` (rows as `pwemoe evaluate`'s)."""
    if not need:
        return {}
    points = [p for p in METHODS["experts"].points(EvalSettings(names, [], [], 0.0)) if p.method[7:] in need]
    got = rows(points)
    c = store.correctness(got, names)
    return {p.method[7:]: c[p.method[7:]][i] for i, p in enumerate(points)}


def _short(a: dict[str, Any]) -> dict[str, Any]:
    return {k: a[k] for k in ("constraint", "estimate", "bound", "met")}


def _point(wb: Workbench, cand: dict[str, Any], lock: Any) -> dict[str, Any]:
    """A candidate's preference, its search-part assessment and a summary of its routing weights."""
    with lock or contextlib.nullcontext():
        lam = torch.stack(list(routing_weights(wb.model, cand["preference"]).values())).float()  # [modules, k]
    names = [t.name for t in wb.tasks]
    return {
        "preference": cand["preference"],
        "search": cand["search"],
        "routing_weights": {
            "modules": int(lam.shape[0]),
            **{s: dict(zip(names, getattr(lam, s)(0).values.tolist())) for s in ("min", "max")},
            "mean": dict(zip(names, lam.mean(0).tolist())),
        },
    }


def _test_values(
    wb: Workbench,
    meta: dict,
    run: Path,
    q: Query,
    record: dict[str, Any],
    bs: int | None,
    test_samples: int | None,
    lock: Any,
    workers: int | None,
) -> dict[str, Any]:
    """The chosen point's values on the test split (after the choice is recorded): rows in RUN/results.json."""
    wb.set_eval_split("test", test_samples)
    names = [t.name for t in wb.tasks]
    store = ResultStore(run)
    rows = PointRows(
        wb, store, row_inputs(meta, wb.tasks, wb.precision, wb.device.type), bs or wb.cfg.eval.batch_size, lock, workers
    )
    try:
        experts = _expert_values(rows, store, names, q.experts)
        row = rows([Point("pwemoe", record["chosen"]["preference"], None, None)])[0]
    finally:
        rows.release()
    m = {t: float(row["accuracy"][t]) for t in names}
    e = {t: float(np.asarray(v, dtype=np.float64).mean()) for t, v in experts.items()}
    return {
        "note": "not used for the choice: read after the choice was recorded",
        "values": m,
        "experts": e,
        "objective": objective(q, m, e),
        "constraints": [
            {"constraint": c.text, "value": float(x), "met": c.met(float(x))}
            for c in q.constraints
            for x in [statistic(c, q, m, e)]
        ],
        "examples": {t.name: len(t.test_data) for t in wb.tasks},
    }


def select_run(
    run: str | Path,
    maximize: str | None = None,
    minimize: str | None = None,
    require: Sequence[str] = (),
    settings: Settings | None = None,
    name: str | None = None,
    export: str | Path | None = None,
    overwrite: bool = False,
    report_test: bool = True,
    batch_size: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    print_summary: bool = True,
) -> dict[str, Any]:
    """`pwemoe select`: every query and setting error before any model loads, then `select_open` under the
    run lock, and a short summary printed (`summary_lines`). Returns the record; its `status` is "certified",
    "not_certified" or "infeasible" (only a certified point is exported)."""
    run = require_run_dir(run)
    cfg = with_placement(read_config(run / CONFIG), device, precision)
    s = settings or Settings()
    q, _ = check_request(cfg, maximize, minimize, require, s)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    record_path(run, name or default_name(q, s))
    if export is not None:
        prepare_output(export, overwrite, "export")
    with RunLock(run, "pwemoe select"):
        wb, meta = open_run(run, True, None, device=device, precision=precision, eval_split="validation")
        record = select_open(
            wb,
            meta,
            run,
            maximize,
            minimize,
            require,
            s,
            name,
            batch_size,
            report_test,
            export=export,
            overwrite=overwrite,
        )
    if print_summary:
        print("\n".join(summary_lines(record)))
    return record


def summary_lines(record: dict[str, Any]) -> list[str]:
    """A short human summary of a selection record."""

    def r(p: Sequence[float]) -> str:
        return "(" + ", ".join(f"{x:.3f}" for x in p) + ")"

    q, ev = record["query"], record["evaluation"]
    conf = f"{100 * record['confidence']:g}%"
    out = [
        f"pwemoe select: {q['objective']}" + (f" subject to {', '.join(q['require'])}" if q["require"] else ""),
        f"  {ev['candidates']} preferences evaluated on validation data ({ev['computed']} models computed, "
        f"{ev['reused']} reused); search part {_sizes(record, 'search')}, "
        f"certification part {_sizes(record, 'certification')}",
    ]
    if record["status"] == "infeasible":
        b, c = record["binding"], record["closest"]
        out += [
            "  INFEASIBLE: no evaluated preference meets every constraint on the search part (its estimate "
            f"must clear the constraint by the widths of both {conf} bounds, the search part's and the "
            "certification part's)",
            f"  closest: r = {r(c['preference'])}; binding: {b['constraint']}: at best {b['best']:.4f} "
            f"(estimate {b['estimate']:.4f}, bound {b['bound']:.4f}) at r = {r(b['at'])}",
        ]
    else:
        ch, cert = record["chosen"], record["certification"]
        out.append(
            f"  chosen r = {r(ch['preference'])}: objective {ch['search']['objective']:.4f} on the search part, "
            f"{cert['objective']:.4f} on the certification part"
        )
        verdict = "CERTIFIED" if record["status"] == "certified" else "NOT CERTIFIED"
        out.append(f"  {verdict} at {conf} on the certification part (one-sided bounds):")
        for x in cert["constraints"]:
            miss = "" if x["met"] else f", misses by {x['shortfall']:.4f}"
            out.append(
                f"    {x['constraint']}: {x['estimate']:.4f}, bound {x['bound']:.4f} "
                f"{'meets' if x['met'] else 'fails'} {x['threshold']:g}{miss}"
            )
        fb = record.get("fallback")
        if record["status"] != "certified":
            out.append(
                f"  best certified point (all {fb['tested']} feasible candidates tested together at {conf}): "
                f"r = {r(fb['preference'])}, objective {fb['certification']['objective']:.4f}"
                if fb
                else "  no evaluated preference is certified: loosen the constraints, raise --budget, or add "
                "validation data"
            )
    t = record.get("test")
    if t:
        parts = [f"{x['constraint']}: {x['value']:.4f} {'met' if x['met'] else 'NOT met'}" for x in t["constraints"]]
        out.append(
            f"  test split (not used for the choice): objective {t['objective']:.4f}"
            + ("; " if parts else "")
            + "; ".join(parts)
        )
    if record.get("export"):
        out.append(f"  exported to {record['export']}")
    out.append(f"  record: {record['path']}")
    return out


def _sizes(record: dict[str, Any], part: str) -> str:
    sizes = record["split"]["sizes"]
    return "/".join(str(v[part]) for v in sizes.values()) + " examples"


__all__ = ["SELECTIONS", "Settings", "select_open", "select_run", "summary_lines"]
