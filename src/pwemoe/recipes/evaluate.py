"""`pwemoe evaluate RUN`: PWEMoE on a preference grid and every registered baseline, then summary and report."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch

from ..baselines import METHODS, EvalSettings, Point, TaskVectorBank, UpcycledBank, selected
from ..configfile import read_config
from ..core.preference import normalize_preference, parse_preference, simplex_grid
from ..devices import join_launch, rank_and_world, wait_for_everyone
from ..export import PlainCopy
from ..files import CONFIG, MAX_SMALL_FILE, RunLock, read_bounded, require_run_dir, subdir
from ..merges import MERGES, MergekitBank, require_mergekit
from ..results import (
    ResultStore,
    make_row,
    pack_correct,
    point_inputs,
    preference_key,
    row_inputs,
    summarize,
    write_tables,
)
from ..runs import open_run, with_placement
from ..workbench import Workbench

log = logging.getLogger(__name__)


def read_preferences(path: str | Path, k: int) -> torch.Tensor:
    """Preferences Tensor[n, k] from a file with one per line ('0.2,0.8' or '0.2 0.8'; '#' comments).

    Lines that normalise to a preference already read (e.g. '1,1' after '0.5,0.5') are dropped with a
    warning: one results row per preference, not the same row computed twice and reported stale.
    """
    rows, seen, dropped = [], {}, []
    text = read_bounded(path, MAX_SMALL_FILE, "the preferences file", "evaluate the preferences in several files")
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                r = normalize_preference(parse_preference(line), k)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}, line {i}: {e}") from None
            key = tuple(preference_key(r, k))
            if key in seen:
                dropped.append(f"line {i} repeats line {seen[key]}")
                continue
            seen[key] = i
            rows.append(r)
    if not rows:
        raise ValueError(f"{path} holds no preferences; write one per line, e.g. 0.2,0.8")
    if dropped:
        log.warning("%s: %d repeated preferences skipped (%s)", path, len(dropped), "; ".join(dropped))
    return torch.stack(rows)


def _check_int(name: str, value: int | None, minimum: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def evaluate_run(
    run: str | Path,
    grid: int | None = None,
    preferences_file: str | None = None,
    baselines: bool | None = None,
    batch_size: int | None = None,
    max_test_samples: int | None = None,
    verbose: int = 0,
    device: str | None = None,
    precision: str | None = None,
    split: str = "test",
) -> dict[str, Any]:
    """Evaluate PWEMoE on preferences, plus baselines; write results, hypervolumes, plots and a report.

    split: "test" (results in the run directory) or "validation" (the tasks' validation data;
    everything is written under RUN/validation/, apart from the test results).
    baselines: None (the config's eval.baselines: true, false or a list of names) or False (none).
    """
    _check_int("--grid", grid, 2)
    _check_int("--batch-size", batch_size, 1)
    _check_int("--max-test-samples", max_test_samples, 1)
    if split not in ("test", "validation"):
        raise ValueError(f"--split must be test or validation, got {split!r}")
    run = require_run_dir(run)
    cfg = with_placement(read_config(run / CONFIG), device, precision)  # errors before any model loads
    no_val = [t.name for t in cfg.tasks if not t.data.has_validation]
    if split == "validation" and no_val:
        raise ValueError(
            f"--split validation: tasks {no_val} have no validation data; set data.validation_split or "
            "data.validation_fraction in the run's config (before training: the routers must not train on it)"
        )
    out_dir = run if split == "test" else run / split
    wanted = cfg.eval.baselines if baselines is None or baselines else False
    merges = [m.name for m in METHODS.values() if selected(m, wanted) and m.name in MERGES]
    mergekit_version = _check_merges(cfg, merges)  # before any model loads
    k = len(cfg.tasks)
    m = grid if grid is not None else cfg.eval.grid
    prefs = read_preferences(preferences_file, k) if preferences_file else simplex_grid(k, m)
    bs = batch_size or cfg.eval.batch_size
    # under accelerate launch / torchrun: the grid is split across the ranks
    join_launch(cfg.device)
    rank, world = rank_and_world()
    lock = RunLock(run, "pwemoe evaluate") if rank == 0 else contextlib.nullcontext()
    with lock:
        wait_for_everyone()  # no rank starts before rank 0 holds the lock
        if out_dir != run:
            subdir(run, split)  # validation/: a link planted there is refused (before any model loads)
        wb, meta = open_run(run, True, max_test_samples, device=device, precision=precision, eval_split=split)
        names = [t.name for t in wb.tasks]
        store = ResultStore(out_dir)
        settings = EvalSettings(
            task_names=names,
            preferences=[preference_key(r, k) for r in prefs],
            ta_scales=[float(x) for x in cfg.eval.ta_scales],
            pwta_scale=cfg.eval.pwta_scale if cfg.eval.pwta_scale is not None else cfg.model.init_lambda * k,
            merge_grids=cfg.eval.merge_grids,
            merge_seed=cfg.eval.merge_seed,
        )
        inputs = {**row_inputs(meta, wb.tasks, wb.precision, wb.device.type), "mergekit": mergekit_version}
        wait_for_everyone()  # every rank has read results.json before rank 0 adds to it
        current = _evaluate(wb, store, settings, inputs, wanted, bs, verbose, rank, world)
        if rank != 0:  # rank 0 writes the tables and the report
            wait_for_everyone()
            return {}
        e = cfg.eval
        correct = store.correctness(current, names)
        summary = summarize(
            current,
            names,
            e.reference_point,
            correct,
            e.bootstrap_resamples,
            e.confidence,
            e.bootstrap_seed,
            directions=wb.directions(),
            loss_reference=e.loss_reference,
        )
        summary.update(
            {
                "split": split,
                "precision": wb.precision,
                "device": wb.device.type,
                "routers_step": meta.get("step"),
                "routers_selected_by": meta.get("selected_by", "last"),
                "grid": m if not preferences_file else None,
                "preferences": len(prefs),
                "run": str(run),
                "rows_reused": store.reused,
                "rows_computed": store.computed,
                "rows_replaced_stale": store.replaced,
            }
        )
        write_tables(out_dir, store.rows, names, summary)
        from ..report import write_report, write_report_html

        write_report(out_dir, current, names, summary)
        write_report_html(out_dir, current, names, summary)
        wait_for_everyone()
    print(
        f"evaluated {len(current)} models: {store.computed} computed, {store.reused} reused from results.json"
        + (f", {store.replaced} stale rows replaced" if store.replaced else "")
    )
    return summary


def _check_merges(cfg: Any, merges: list[str]) -> str | None:
    """mergekit's version when merges are selected (None when none are); refuses LoRA experts, whose dense
    merges mergekit would only compute after merging each adapter into a full copy of the base."""
    if not merges:
        return None
    from ..lora.adapter import is_lora_adapter

    lora = [t.name for t in cfg.tasks if is_lora_adapter(cfg.model.path_map.get(t.expert, t.expert))]
    if lora:
        raise ValueError(
            f"eval.baselines {merges}: the standard merges need dense experts; the experts of tasks {lora} are LoRA "
            "adapters (mergekit would first merge each one into a full copy of the base). Drop them from "
            "eval.baselines, or give fine-tuned checkpoints"
        )
    return require_mergekit()


def _evaluate(
    wb: Workbench,
    store: ResultStore,
    s: EvalSettings,
    inputs: dict[str, str],
    baselines: bool | list[str],
    bs: int,
    verbose: int,
    rank: int = 0,
    world: int = 1,
) -> list[dict]:
    """Every point of every registered method (in registry order); returns this invocation's rows.

    With several processes the points still to compute are dealt round-robin: in each round every
    rank evaluates one point, and rank 0 gathers the round's rows and stores them (results.json is
    rewritten after each row), so an interrupted multi-rank sweep resumes from the last round.
    """
    rows: list[dict] = []
    # PWEMoE: one plain copy re-merged per preference; baselines: theta_0 + T; "same": the accuracy and packed
    # correctness of the baseline models computed in this sweep, by their merge weights (the experts are
    # preference-weighted task arithmetic's vertices when c = 1, the average its centre: evaluated once)
    state: dict[str, Any] = {"plain": PlainCopy(wb.backbone), "bank": None, "merges": None, "same": {}}
    try:
        for method in METHODS.values():
            if selected(method, baselines):
                rows.extend(_evaluate_method(method, wb, store, s, inputs, state, bs, verbose, rank, world))
    finally:
        if state["merges"] is not None:
            state["merges"].close()  # the temporary model folders
    return rows


def _evaluate_method(
    method: Any,
    wb: Workbench,
    store: ResultStore,
    s: EvalSettings,
    inputs: dict[str, str],
    state: dict[str, Any],
    bs: int,
    verbose: int,
    rank: int,
    world: int,
) -> list[dict]:
    """The rows of one method's points: stored ones reused, the others computed (see `_evaluate`)."""
    from tqdm.auto import tqdm

    points = method.points(s)
    keys = [point_inputs(inputs, p) for p in points]
    found = [store.get(p.method, p.preference, p.param, key) for p, key in zip(points, keys)]
    for j, (p, key) in enumerate(zip(points, keys)):  # a model this sweep has already evaluated: its results again
        same = state["same"].get(_weights_key(p))
        if found[j] is None and same is not None:
            found[j] = make_row(p.method, p.preference, p.param, same[0], key)
            if rank == 0:
                store.add(found[j], same[1], computed=False)
    todo = [j for j, row in enumerate(found) if row is None]
    bar = tqdm(
        total=len(todo),
        desc=method.short or method.name,
        unit="model",
        disable=rank != 0 or verbose < 0 or len(todo) < 2,
    )
    for start in range(0, len(todo), world):
        mine = todo[start + rank] if start + rank < len(todo) else None
        row = None if mine is None else _row(points[mine], keys[mine], wb, state, bs)  # (row, correctness)
        got = [row]
        if world > 1:
            got = [None] * world
            torch.distributed.all_gather_object(got, row)
        for j, (r, c) in zip(todo[start : start + world], got):
            found[j] = r
            if _weights_key(points[j]) is not None:
                state["same"][_weights_key(points[j])] = (r["accuracy"], c)
            if rank == 0:
                store.add(r, c)
        bar.update(len(todo[start : start + world]))
    bar.close()
    if method.name == "pwemoe":
        state["plain"].release()  # free the copy before the baselines' bank is built
    return found


def _weights_key(p: Point) -> tuple | None:
    """What makes a baseline's model: its merge weights (theta_0 + sum_i w_i tau_i); None for PWEMoE and for the
    mergekit merges (their models depend on more than weights)."""
    if p.weights is None or p.merge is not None:
        return None
    return tuple(round(float(w), 12) for w in p.weights)


def _correct(wb: Workbench, p: Point, state: dict[str, Any], bs: int) -> dict[str, torch.Tensor]:
    """Per-task, per-example correctness BoolTensor[n] of one point's model, on the workbench's device.

    state: the plain copy and the baselines' banks, plus optional `lock` (held while a merge changes the
    upcycled model's preference state, which a server's other threads read too) and `workers` (loader
    processes; 0 in a threaded server)."""
    with state.get("lock") or contextlib.nullcontext():
        if p.merge is not None:
            if state["merges"] is None:  # theta_0 and the experts' backbones as folders for mergekit, streamed
                state["merges"] = MergekitBank(wb.modality.fresh_backbone().to(wb.device), wb.expert_loaders())
            model = state["merges"].model(p.merge)
        elif p.weights is None:
            model = state["plain"].at(p.preference)
        else:
            if state["bank"] is None:
                lora = wb.info is not None and wb.info.expert_format == "lora"
                state["bank"] = (
                    UpcycledBank(wb.backbone)
                    if lora
                    else TaskVectorBank(wb.modality.fresh_backbone().to(wb.device), wb.expert_loaders())
                )
            model = state["bank"].model(p.weights)
    workers = state.get("workers")
    return {t.name: wb.correct(t, bs, model, wb.eval_data(t, bs, workers)) for t in wb.tasks}


def _row(p: Point, inputs: str, wb: Workbench, state: dict[str, Any], bs: int) -> tuple[dict, dict]:
    """The results row of one point and its packed per-example correctness {task: bits}."""
    correct = _correct(wb, p, state, bs)
    acc = {n: float(c.double().sum()) / len(c) for n, c in correct.items()}
    return make_row(p.method, p.preference, p.param, acc, inputs), {n: pack_correct(c) for n, c in correct.items()}


class PointRows:
    """Results rows of single points on demand (PWEMoE at a preference, or merge weights such as an expert's),
    through `store`: a row computed from the same `inputs` is reused, any other is computed as `pwemoe
    evaluate` computes it and stored with its per-example correctness. What `pwemoe select` evaluates with.

    inputs: `row_inputs` of the workbench's current evaluation split. lock / workers: see `_correct`.
    """

    def __init__(
        self,
        wb: Workbench,
        store: ResultStore,
        inputs: dict[str, str],
        batch_size: int,
        lock: Any = None,
        workers: int | None = None,
    ) -> None:
        self.wb, self.store, self.inputs, self.batch_size = wb, store, inputs, batch_size
        self.state: dict[str, Any] = {
            "plain": PlainCopy(wb.backbone),
            "bank": None,
            "merges": None,
            "lock": lock,
            "workers": workers,
        }

    def __call__(self, points: list[Point]) -> list[dict]:
        rows = []
        for p in points:
            key = point_inputs(self.inputs, p)
            row = self.store.get(p.method, p.preference, p.param, key)
            if row is None:
                row, correct = _row(p, key, self.wb, self.state, self.batch_size)
                self.store.add(row, correct)
            rows.append(row)
        return rows

    def release(self) -> None:
        """Free the plain copy and the baselines' banks (the mergekit bank's temporary folders too)."""
        self.state["plain"].release()
        self.state["bank"] = None
        if self.state["merges"] is not None:
            self.state["merges"].close()
            self.state["merges"] = None
