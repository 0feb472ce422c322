"""`pwemoe evaluate RUN`: PWEMoE on a preference grid and every registered baseline, then summary and report."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch

from ..baselines import METHODS, EvalSettings, selected
from ..configfile import read_config
from ..core.checks import positive_int
from ..core.preference import Preference, parse_preference, simplex_grid
from ..devices import join_launch, rank_and_world, wait_for_everyone
from ..evaluation import PointEvaluator, eval_settings
from ..files import CONFIG, MAX_SMALL_FILE, RunLock, read_bounded, require_run_dir, subdir
from ..merges import MERGES, require_mergekit
from ..results import ResultStore, row_inputs, summarize, write_tables
from ..runs import open_run, with_placement
from ..workbench import Workbench

log = logging.getLogger(__name__)


def read_preferences(path: str | Path, k: int) -> list[Preference]:
    """The preferences of a file with one per line ('0.2,0.8' or '0.2 0.8'; '#' comments), validated once each.

    Lines that normalise to a preference already read (e.g. '1,1' after '0.5,0.5') are dropped with a
    warning: one results row per preference, not the same row computed twice and reported stale.
    """
    rows, seen, dropped = [], {}, []
    text = read_bounded(path, MAX_SMALL_FILE, "the preferences file", "evaluate the preferences in several files")
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                r = Preference.of(parse_preference(line), k)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}, line {i}: {e}") from None
            key = r.key
            if key in seen:
                dropped.append(f"line {i} repeats line {seen[key]}")
                continue
            seen[key] = i
            rows.append(r)
    if not rows:
        raise ValueError(f"{path} holds no preferences; write one per line, e.g. 0.2,0.8")
    if dropped:
        log.warning("%s: %d repeated preferences skipped (%s)", path, len(dropped), "; ".join(dropped))
    return rows


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
    for name, value, minimum in (
        ("--grid", grid, 2),
        ("--batch-size", batch_size, 1),
        ("--max-test-samples", max_test_samples, 1),
    ):
        if value is not None:
            positive_int(name, value, minimum)
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
    if split == "test" and any(getattr(t, "lm_eval", None) is not None for t in cfg.tasks):
        from ..lmeval import require

        require()  # tasks scored by lm-eval: one line naming the extra, before anything is loaded or written
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
        settings = eval_settings(cfg, names, prefs)
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
    evaluator = PointEvaluator(wb, inputs, bs, store, write=rank == 0)
    try:
        for method in METHODS.values():
            if selected(method, baselines):
                rows.extend(_evaluate_method(method, evaluator, s, verbose, rank, world))
                if method.role == "subject":
                    evaluator.release("preference")  # free the merged copy before the baselines' bank is built
    finally:
        evaluator.close()  # the mergekit bank's temporary model folders
    return rows


def _evaluate_method(
    method: Any, evaluator: PointEvaluator, s: EvalSettings, verbose: int, rank: int, world: int
) -> list[dict]:
    """The rows of one method's points: stored ones reused, the others computed and dealt to the ranks."""
    from tqdm.auto import tqdm

    points = method.points(s)
    found = [evaluator.lookup(p) for p in points]
    todo = [j for j, row in enumerate(found) if row is None]
    bar = tqdm(
        total=len(todo),
        desc=method.short or method.name,
        unit="model",
        disable=rank != 0 or verbose < 0 or len(todo) < 2,
    )
    for start in range(0, len(todo), world):
        mine = todo[start + rank] if start + rank < len(todo) else None
        computed = None if mine is None else evaluator.compute(points[mine])  # (row, packed values)
        got = [computed]
        if world > 1:
            got = [None] * world
            torch.distributed.all_gather_object(got, computed)
        for j, (row, packed) in zip(todo[start : start + world], got):
            found[j] = row
            evaluator.keep(points[j], row, packed)  # stored by rank 0
        bar.update(len(todo[start : start + world]))
    bar.close()
    return found
