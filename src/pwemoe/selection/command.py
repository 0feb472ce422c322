"""`pwemoe select` on a run: the settings, one check of a request before any model loads (`prepare`), the search
and certificate on validation data, the record written, then the chosen point's test values.

Two doors lead to the same room: `select_run` (the CLI: opens the run under its lock) and `select_open` (a run
already open, e.g. in `pwemoe serve`). Both check the request once with `prepare` and call `_select`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..baselines import EvalSettings, Point, with_role
from ..config import Config
from ..configfile import read_config
from ..core.checks import positive_int, positive_int_problem
from ..evaluation import PointEvaluator
from ..files import CONFIG, SELECTIONS, RunLock, atomic_write_json, make_dirs, prepare_output, require_run_dir
from ..results import ResultStore, row_inputs
from ..runs import open_run, with_placement, write_export
from ..workbench import Workbench
from .certificate import assess, certification_split, fallback
from .printing import summary_lines
from .query import Query, objective, parse_query, statistic, task_metrics
from .record import default_name, point_record, record_path, search_record
from .search import best, binding, initial_grid, search


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


@dataclass(frozen=True)
class Request:
    """A checked selection request: the parsed query, the starting grid's levels, the record's path, the settings,
    the batch size (None: the run's eval.batch_size) and where a certified point is exported (None: nowhere)."""

    query: Query
    grid: int
    path: Path
    settings: Settings
    batch_size: int | None = None
    export: Path | None = None
    overwrite: bool = False


def check_request(
    cfg: Config, maximize: str | None, minimize: str | None, require: Sequence[str], s: Settings
) -> tuple[Query, int]:
    """The parsed query and the starting grid's levels; every problem with the query and the settings at
    once, in one ValueError, before any model loads."""
    errors = [
        p
        for p in (
            positive_int_problem("--budget (preferences evaluated at most)", s.budget, 2),
            None if s.grid is None else positive_int_problem("--grid", s.grid, 2),
            positive_int_problem("resamples", s.resamples, 100),
        )
        if p is not None
    ]
    if not isinstance(s.confidence, (int, float)) or not 0.5 <= s.confidence < 1:
        errors.insert(0, f"--confidence must be in [0.5, 1), e.g. 0.95; got {s.confidence!r}")
    if isinstance(s.seed, bool) or not isinstance(s.seed, int):
        errors.append(f"--seed must be an integer, got {s.seed!r}")
    if not isinstance(s.certify_fraction, (int, float)) or not 0 < s.certify_fraction < 1:
        errors.append(f"--certify-fraction must be in (0, 1), e.g. 0.5; got {s.certify_fraction!r}")
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


def prepare(
    run: Path,
    cfg: Config,
    maximize: str | None = None,
    minimize: str | None = None,
    require: Sequence[str] = (),
    settings: Settings | None = None,
    name: str | None = None,
    batch_size: int | None = None,
    export: str | Path | None = None,
    overwrite: bool = False,
) -> Request:
    """Every check of a selection request, before any model loads: the query and settings (`check_request`),
    the batch size, the record's name (and a file there that pwemoe did not write), the export folder."""
    s = settings or Settings()
    q, m = check_request(cfg, maximize, minimize, require, s)
    if batch_size is not None:
        positive_int("--batch-size", batch_size)
    path = record_path(run, name or default_name(q, s))
    if export is not None:
        prepare_output(export, overwrite, "export")
    return Request(q, m, path, s, batch_size, None if export is None else Path(export), overwrite)


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
    """`pwemoe select`: every query and setting error before any model loads (`prepare`), then the selection under
    the run lock, and a short summary printed (`summary_lines`). Returns the record; its `status` is "certified",
    "not_certified" or "infeasible" (only a certified point is exported)."""
    run = require_run_dir(run)
    cfg = with_placement(read_config(run / CONFIG), device, precision)
    req = prepare(run, cfg, maximize, minimize, require, settings, name, batch_size, export, overwrite)
    with RunLock(run, "pwemoe select"):
        wb, meta = open_run(run, True, None, device=device, precision=precision, eval_split="validation")
        record = _select(wb, meta, run, req, report_test)
    if print_summary:
        print("\n".join(summary_lines(record)))
    return record


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
    RUN/selections/<name>.json. The caller holds the run lock. `lock` / `workers`: see `PointEvaluator` (a server
    passes its own); `test_samples`: the test values use the first N test examples per task."""
    run = Path(run)
    req = prepare(run, wb.cfg, maximize, minimize, require, settings, name, batch_size, export, overwrite)
    return _select(wb, meta, run, req, report_test, test_samples, lock, workers)


def _select(
    wb: Workbench,
    meta: dict,
    run: Path,
    req: Request,
    report_test: bool = True,
    test_samples: int | None = None,
    lock: Any = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Search and certify on the validation data, write the record; then, with `report_test`, the chosen r's
    values on the test split are added to it; a certified r is exported to `req.export`. The workbench's
    evaluation split is restored on return."""
    bs = req.batch_size or wb.cfg.eval.batch_size
    before = (wb.eval_split, wb.max_test_samples)
    try:
        record = _choose(wb, meta, run, req.query, req.settings, req.grid, bs, lock, workers)
        record["name"] = req.path.stem
        make_dirs(req.path.parent)  # selections/, its entry synced: a power loss keeps the record
        atomic_write_json(req.path, record)  # the choice is on disk before the test split is read
        if report_test and record["chosen"] is not None:
            record["test"] = _test_values(wb, meta, run, req.query, record, bs, test_samples, lock, workers)
        if req.export is not None and record["status"] == "certified":
            with lock or contextlib.nullcontext():
                r = torch.tensor(record["chosen"]["preference"])
                record["export"] = str(write_export(wb, meta, run, r, req.export, req.overwrite))
        atomic_write_json(req.path, record)
    finally:
        wb.set_eval_split(*before)
    record["path"] = str(req.path)
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
    evaluator = PointEvaluator(wb, inputs, bs, store, lock=lock, workers=workers)
    # the certification bound still to come is wider than the search part's by about sqrt(n_search / n_cert)
    margin = math.sqrt((1 - s.certify_fraction) / s.certify_fraction)
    try:
        experts = _expert_values(evaluator, store, names, q.experts)
        values: dict[tuple[float, ...], dict[str, np.ndarray]] = {}

        def score(prefs: list[list[float]]) -> list[dict[str, Any]]:
            got = evaluator([Point.at(p) for p in prefs])
            c = store.correctness(got, names)
            out = []
            for i, p in enumerate(prefs):
                values[tuple(p)] = {t: c[t][i] for t in names}
                out.append(assess(q, values[tuple(p)], experts, search_part, s.confidence, s.resamples, s.seed, margin))
            return out

        cands = search(q, k, m, s.budget, score)
    finally:
        evaluator.close()
    chosen = best(q, cands)
    evaluation = {
        "split": "validation",
        "candidates": len(cands),
        "computed": store.computed,
        "reused": store.reused,
        "experts": q.experts,
        "routers_sha256": meta.get("routers_sha256"),
        "inputs": inputs["preference"],
    }
    record = search_record(run, wb, q, s, m, margin, search_part, cert_part, cands, evaluation)
    if not chosen["search"]["met"]:
        record.update(status="infeasible", chosen=None, closest=point_record(wb, chosen, lock), fallback=None)
        record["binding"] = binding(q, cands, chosen)
        return record
    cert = assess(q, values[tuple(chosen["preference"])], experts, cert_part, s.confidence, s.resamples, s.seed)
    record.update(status="certified" if cert["met"] else "not_certified", chosen=point_record(wb, chosen, lock))
    record["certification"] = cert
    record["fallback"] = (
        None if cert["met"] else fallback(q, cands, values, experts, cert_part, s.confidence, s.resamples, s.seed)
    )
    return record


def _expert_values(
    evaluator: PointEvaluator, store: ResultStore, names: list[str], need: list[str]
) -> dict[str, np.ndarray]:
    """{task: per-example values of the task's own model (the normaliser's)} for the tasks in `need`."""
    if not need:
        return {}
    own = with_role("normaliser")
    points = [p for p in own.points(EvalSettings(names, [], [], 0.0)) if own.task_of(p.method) in need]
    c = store.correctness(evaluator(points), names)
    return {own.task_of(p.method): c[own.task_of(p.method)][i] for i, p in enumerate(points)}


def _test_values(
    wb: Workbench,
    meta: dict,
    run: Path,
    q: Query,
    record: dict[str, Any],
    bs: int,
    test_samples: int | None,
    lock: Any,
    workers: int | None,
) -> dict[str, Any]:
    """The chosen point's values on the test split (after the choice is recorded): rows in RUN/results.json."""
    wb.set_eval_split("test", test_samples)
    names = [t.name for t in wb.tasks]
    store = ResultStore(run)
    inputs = row_inputs(meta, wb.tasks, wb.precision, wb.device.type)
    evaluator = PointEvaluator(wb, inputs, bs, store, lock=lock, workers=workers)
    try:
        experts = _expert_values(evaluator, store, names, q.experts)
        row = evaluator([Point.at(record["chosen"]["preference"])])[0]
    finally:
        evaluator.close()
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


__all__ = ["SELECTIONS", "Request", "Settings", "prepare", "select_open", "select_run", "summary_lines"]
