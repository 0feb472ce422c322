"""Evaluation of one point into a stored row: PWEMoE at a preference, or a baseline's model, scored on every task.

A point (`baselines.Point`) is one model on a front. `PointEvaluator` turns it into per-example values (what the
paired-bootstrap intervals resample) and a results row, through a `ResultStore`: a row computed from the same inputs
is reused, any other is computed and stored with its per-example values. The model of a point comes from a
`ModelSource` chosen by the point's kind, never by an if-chain at the call site:

    kind          source (default)        the model
    "preference"  `MergedCopy`            PWEMoE's theta(r), one plain copy re-merged per preference
    "weights"     `WeightBank`            theta_0 + sum_i w_i tau_i (dense experts: their own task-vector bank;
                                          LoRA experts: the upcycled modules with lambda fixed to w)
    "merge"       `MergekitSource`        a standard merge computed by mergekit

A caller with its own model for a kind passes it (`sources=`): a server gives the preference kind its cache of
merged copies. The evaluate recipe sweeps a method's points (and deals them to ranks), `pwemoe select` asks for
single points, `PreferenceModel.evaluate` / `results` and training's validation hypervolume use the same evaluator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from .baselines import METHODS, EvalSettings, Point, TaskVectorBank, UpcycledBank
from .export import PlainCopy
from .merges import MERGES, MergekitBank
from .results import ResultStore, make_row, pack_correct, point_inputs, preference_key

if TYPE_CHECKING:
    from .tasks import Task
    from .workbench import Workbench


class ModelSource(Protocol):
    """Gives the model of a point while it is scored, and frees what it holds on `release`."""

    def model(self, point: Point) -> contextlib.AbstractContextManager[nn.Module]: ...

    def release(self) -> None: ...


class MergedCopy:
    """PWEMoE at a preference: one plain copy of the upcycled backbone, re-merged per preference (`PlainCopy`).

    lock: held while the merge reads the upcycled model's preference state (a server's other threads use it too).
    """

    def __init__(self, wb: Workbench, lock: Any = None) -> None:
        self.copy, self.lock = PlainCopy(wb.backbone), lock

    @contextlib.contextmanager
    def model(self, point: Point) -> Iterator[nn.Module]:
        with self.lock or contextlib.nullcontext():
            plain = self.copy.at(point.preference)
        yield plain

    def release(self) -> None:
        self.copy.release()


class WeightBank:
    """The baselines' theta_0 + sum_i w_i tau_i over the whole backbone, built on first use.

    Dense experts: a task-vector bank of the backbone, streamed one expert at a time (the upcycled model keeps tau
    only for its targets). LoRA experts: every change lives in the upcycled modules, so the upcycled model with
    lambda fixed to w is exact and loads no expert again.
    """

    def __init__(self, wb: Workbench, lock: Any = None) -> None:
        self.wb, self.lock = wb, lock
        self.bank: TaskVectorBank | UpcycledBank | None = None

    @contextlib.contextmanager
    def model(self, point: Point) -> Iterator[nn.Module]:
        wb = self.wb
        with self.lock or contextlib.nullcontext():
            if self.bank is None:
                lora = wb.info is not None and wb.info.expert_format == "lora"
                self.bank = (
                    UpcycledBank(wb.backbone)
                    if lora
                    else TaskVectorBank(wb.modality.fresh_backbone().to(wb.device), wb.expert_loaders())
                )
            m = self.bank.model(point.weights)
        yield m

    def release(self) -> None:
        self.bank = None


class MergekitSource:
    """A standard merge (`merges.MergeSpec`) computed by mergekit over temporary folders of the base and the experts'
    backbones, written on first use and removed on `release`."""

    def __init__(self, wb: Workbench, lock: Any = None) -> None:
        self.wb, self.lock = wb, lock
        self.bank: MergekitBank | None = None

    @contextlib.contextmanager
    def model(self, point: Point) -> Iterator[nn.Module]:
        with self.lock or contextlib.nullcontext():
            if self.bank is None:
                self.bank = MergekitBank(self.wb.modality.fresh_backbone().to(self.wb.device), self.wb.expert_loaders())
            m = self.bank.model(point.merge)
        yield m

    def release(self) -> None:
        if self.bank is not None:
            self.bank.close()  # the temporary model folders
            self.bank = None


# The model source of each kind of point (`Point.kind`): a factory (workbench, lock) -> ModelSource.
SOURCES: dict[str, Callable[[Workbench, Any], ModelSource]] = {
    "preference": MergedCopy,
    "weights": WeightBank,
    "merge": MergekitSource,
}

# Per-example values of one task through a model: Tensor[n] (bool for accuracy, float otherwise).
Scorer = Callable[[nn.Module], torch.Tensor]


def weights_key(p: Point) -> tuple[float, ...] | None:
    """What makes a baseline's model: its merge weights (theta_0 + sum_i w_i tau_i); None for PWEMoE and for the
    mergekit merges (their models depend on more than weights). Two points with one key are one model."""
    if p.kind != "weights":
        return None
    return tuple(round(float(w), 12) for w in p.weights)


class PointEvaluator:
    """Points of a front -> per-example values and results rows, stored and reused through `store`.

    Args:
        wb: the workbench (upcycled model, tasks and their evaluation split).
        inputs: `results.row_inputs` of the workbench's evaluation split (plus "mergekit": its version when merges
            are evaluated): the provenance every row is keyed by. May be None when nothing is stored.
        batch_size: examples per forward.
        store: where rows are looked up and kept (None: nothing is stored, e.g. training's validation).
        write: whether computed rows are added to `store` (a multi-rank sweep writes on rank 0 only).
        lock: held while a source reads the upcycled model's preference state (a threaded server passes its own).
        workers: loader processes of the encoded batches (None: the workbench's default; 0 in a threaded server).
        sources: model sources by point kind, replacing the defaults of `SOURCES`.
        on_batch: called after every scored batch (progress).
    """

    def __init__(
        self,
        wb: Workbench,
        inputs: Mapping[str, str] | None,
        batch_size: int,
        store: ResultStore | None = None,
        write: bool = True,
        lock: Any = None,
        workers: int | None = None,
        sources: Mapping[str, ModelSource] | None = None,
        on_batch: Callable[[], None] | None = None,
    ) -> None:
        self.wb, self.inputs, self.batch_size = wb, inputs, batch_size
        self.store, self.write, self.lock, self.workers = store, write, lock, workers
        self.on_batch = on_batch
        self._given = dict(sources or {})
        self._sources: dict[str, ModelSource] = dict(self._given)
        # the models this evaluator has scored, by their merge weights: (per-task metric, packed values)
        self._same: dict[tuple[float, ...], tuple[dict[str, float], dict[str, Any]]] = {}
        self._lmeval: dict[str, Scorer] = {}  # the lm-eval scorers of tasks scored by one, loaded on first use

    # --- models -----------------------------------------------------------------------------------------
    def source(self, kind: str) -> ModelSource:
        """The model source of a kind of point, made on first use."""
        if kind not in self._sources:
            if kind not in SOURCES:
                raise ValueError(f"no model source for points of kind {kind!r}; known kinds: {sorted(SOURCES)}")
            self._sources[kind] = SOURCES[kind](self.wb, self.lock)
        return self._sources[kind]

    def release(self, kind: str | None = None) -> None:
        """Free the models held for one kind of point (None: every kind); a source given by the caller stays."""
        for k in [kind] if kind is not None else list(self._sources):
            src = self._sources.get(k)
            if src is not None and k not in self._given:
                src.release()
                del self._sources[k]

    # --- scoring ----------------------------------------------------------------------------------------
    def scorer(self, task: Task) -> Scorer:
        """How a task is scored: on the test split, by its lm-eval task when its config has one (`tasks[i].lm_eval`,
        loaded once: `lmeval_scoring.LMEvalScorer`); else by its own per-example metric on its evaluation split
        (`Workbench.correct`)."""
        wb, bs = self.wb, self.batch_size
        if wb.scored_by_lmeval(task):
            if task.name not in self._lmeval:
                from .lmeval_scoring import LMEvalScorer

                self._lmeval[task.name] = LMEvalScorer(wb, task, bs)
            return self._lmeval[task.name]
        return lambda model: wb.correct(task, bs, model, wb.eval_data(task, bs, self.workers), self.on_batch)

    def values(self, point: Point) -> dict[str, torch.Tensor]:
        """{task: per-example values Tensor[n_task]} of the point's model (CPU; bool for accuracy tasks)."""
        with self.source(point.kind).model(point) as model:
            return {t.name: self.scorer(t)(model) for t in self.wb.tasks}

    def metrics(self, point: Point) -> dict[str, float]:
        """{task: metric} of the point's model (accuracy, or the mean of another per-example metric)."""
        return {n: float(v.double().sum()) / len(v) for n, v in self.values(point).items()}

    # --- rows ---------------------------------------------------------------------------------------------
    def key(self, point: Point) -> str:
        """The `inputs` digest of the point's row."""
        if self.inputs is None:
            raise ValueError("this evaluator keeps no rows (inputs=None); give the run's row inputs")
        return point_inputs(self.inputs, point)

    def lookup(self, point: Point) -> dict[str, Any] | None:
        """The point's stored row computed from the same inputs, or the row of a model with the same weights that
        this evaluator scored already (the experts are preference-weighted TA's vertices when c = 1), or None."""
        key = self.key(point)
        row = self.store.get(point.method, point.preference, point.param, key) if self.store is not None else None
        if row is None and (same := self._same.get(weights_key(point))) is not None:
            row = make_row(point.method, point.preference, point.param, same[0], key)
            if self.store is not None and self.write:
                self.store.add(row, same[1], computed=False)
        return row

    def compute(self, point: Point) -> tuple[dict[str, Any], dict[str, Any]]:
        """The point's row (computed now, not stored) and its packed per-example values {task: packed}."""
        values = self.values(point)
        metric = {n: float(v.double().sum()) / len(v) for n, v in values.items()}
        row = make_row(point.method, point.preference, point.param, metric, self.key(point))
        return row, {n: pack_correct(v) for n, v in values.items()}

    def keep(self, point: Point, row: dict[str, Any], packed: dict[str, Any]) -> None:
        """Remember a computed row (for points of the same weights) and store it."""
        if (w := weights_key(point)) is not None:
            self._same[w] = (row["accuracy"], packed)
        if self.store is not None and self.write:
            self.store.add(row, packed)

    def row(self, point: Point) -> tuple[dict[str, Any], bool]:
        """The point's row, and whether it was reused (stored from the same inputs) rather than computed."""
        row = self.lookup(point)
        if row is not None:
            return row, True
        row, packed = self.compute(point)
        self.keep(point, row, packed)
        return row, False

    def __call__(self, points: Sequence[Point]) -> list[dict[str, Any]]:
        """The rows of `points`, reused or computed, in order."""
        return [self.row(p)[0] for p in points]

    def close(self) -> None:
        """Free every model this evaluator made (the mergekit folders too)."""
        self.release()


def eval_settings(
    cfg: Any, names: Sequence[str], preferences: torch.Tensor | Sequence[Sequence[float]]
) -> EvalSettings:
    """The methods' settings of a run's config (`eval.*`) over `preferences` (Tensor[n, k] or lists)."""
    k = len(names)
    return EvalSettings(
        task_names=list(names),
        preferences=[preference_key(r, k) for r in preferences],
        ta_scales=[float(x) for x in cfg.eval.ta_scales],
        pwta_scale=cfg.eval.pwta_scale if cfg.eval.pwta_scale is not None else cfg.model.init_lambda * k,
        merge_grids=cfg.eval.merge_grids,
        merge_seed=cfg.eval.merge_seed,
    )


def stored_front(
    store: ResultStore, cfg: Any, names: Sequence[str], inputs: Mapping[str, str | None]
) -> list[dict[str, Any]]:
    """The stored rows that a sweep with these inputs would reuse, for every registered method: PWEMoE at every
    preference stored, the baselines at those preferences and the config's parameters, looked up as the sweep looks
    them up (`point_inputs`). inputs["mergekit"]: mergekit's version (None or absent: merge rows are left out)."""
    prefs = [r["preference"] for r in store.rows if r["method"] == "pwemoe" and r.get("preference")]
    settings = eval_settings(cfg, names, prefs)
    out = []
    for m in METHODS.values():
        if m.name in MERGES and not inputs.get("mergekit"):
            continue  # their rows depend on mergekit's version
        for p in m.points(settings):
            row = store.get(p.method, p.preference, p.param, point_inputs(inputs, p))
            if row is not None:
                out.append(row)
    return out


def task_values(evaluator: PointEvaluator, preferences: torch.Tensor) -> list[list[float]]:
    """[len(preferences)][k] metrics of PWEMoE at each preference, nothing stored (training's validation front)."""
    return [list(evaluator.metrics(Point.at(r.tolist())).values()) for r in preferences]


__all__ = [
    "SOURCES",
    "MergedCopy",
    "MergekitSource",
    "ModelSource",
    "PointEvaluator",
    "WeightBank",
    "eval_settings",
    "stored_front",
    "task_values",
    "weights_key",
]
