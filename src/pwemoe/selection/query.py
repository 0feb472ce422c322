"""The query language of `pwemoe select`: an objective and constraints over a run's tasks, and the statistics they
constrain (computed from task means, or from resampled means for the bootstrap)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import Config
from ..tasks import TASK_TYPES

MEAN = "mean"  # the mean share of the experts (each task's metric normalised by its expert's; 1 = every expert)
QUERY_FORMS = (
    "TASK >= 0.8 (absolute; 80% too), TASK >= 0.95 expert (a share of the task's expert), TASK >= expert - 0.02 "
    "(within 0.02 of the expert), mean >= 0.9 (the mean share of the experts); lower-is-better tasks "
    "(a causal LM's loss) take <=, e.g. lm <= 1.1 expert"
)


@dataclass(frozen=True)
class Metric:
    """What a task measures, read from its type before any model loads."""

    name: str  # e.g. "accuracy", "loss"
    higher_is_better: bool


@dataclass(frozen=True)
class Constraint:
    """One requirement: statistic `op` value, where the statistic is (kind) the task's metric ("absolute"),
    metric / expert's ("share"), metric - expert's ("difference"), or the mean share of the experts ("mean")."""

    text: str
    task: str  # a task name, or MEAN
    op: str  # ">=" or "<="
    kind: str
    value: float
    binary: bool  # the metric is 0/1 per example (accuracy): an absolute threshold gets the exact binomial bound

    @property
    def side(self) -> str:
        return "lower" if self.op == ">=" else "upper"

    def met(self, x: float) -> bool:
        return bool(x >= self.value) if self.op == ">=" else bool(x <= self.value)

    def shortfall(self, x: float) -> float:
        """How far x is from meeting the constraint (0 when it does), in the statistic's units."""
        return max(0.0, self.value - x if self.op == ">=" else x - self.value)


@dataclass(frozen=True)
class Query:
    """An objective ("max" or "min" of a task's metric, or "max" of MEAN) and constraints over a run's tasks."""

    sense: str
    target: str
    constraints: tuple[Constraint, ...]
    metrics: dict[str, Metric] = field(hash=False)

    @property
    def experts(self) -> list[str]:
        """Tasks whose expert's values the query needs (shares, differences, the mean), in task order."""
        need = {c.task for c in self.constraints if c.kind in ("share", "difference")}
        if MEAN in {self.target} | {c.task for c in self.constraints}:
            need = set(self.metrics)
        return [t for t in self.metrics if t in need]

    def tasks_of(self, c: Constraint) -> list[str]:
        """The tasks a constraint's statistic reads (every task for the mean share)."""
        return list(self.metrics) if c.kind == "mean" else [c.task]

    def describe(self) -> str:
        goal = f"{'maximize' if self.sense == 'max' else 'minimize'} {self.target}"
        return goal + (" subject to " + ", ".join(c.text for c in self.constraints) if self.constraints else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "objective": f"{'maximize' if self.sense == 'max' else 'minimize'} {self.target}",
            "require": [c.text for c in self.constraints],
            "constraints": [
                {"task": c.task, "op": c.op, "kind": c.kind, "value": c.value, "text": c.text} for c in self.constraints
            ],
            "metrics": {t: {"metric": m.name, "higher_is_better": m.higher_is_better} for t, m in self.metrics.items()},
        }


def task_metrics(cfg: Config) -> dict[str, Metric]:
    """{task: Metric} of a run's config, from the task types (no model is loaded)."""
    return {t.name: Metric(TASK_TYPES[t.type].metric, TASK_TYPES[t.type].higher_is_better) for t in cfg.tasks}


_OPS = {">=": ">=", "<=": "<=", "≥": ">=", "≤": "<=", "=>": ">=", "=<": "<="}
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?%?"
_CONSTRAINT = re.compile(r"^\s*(?P<task>[^<>=≥≤\s]+)\s*(?P<op>[<>=≥≤]{1,2})\s*(?P<rhs>.*?)\s*$")
_ABSOLUTE = re.compile(rf"^(?P<num>{_NUM})$")
_SHARE = re.compile(rf"^(?:(?P<num>{_NUM})\s*(?:x|\*|×|of)?\s*)?expert$", re.IGNORECASE)
_DIFFERENCE = re.compile(rf"^expert\s*(?P<sign>[-+])\s*(?P<num>{_NUM})$", re.IGNORECASE)


def _number(text: str) -> float:
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)


def parse_query(
    metrics: dict[str, Metric],
    maximize: str | None = None,
    minimize: str | None = None,
    require: Sequence[str] = (),
) -> Query:
    """Parse a selection query against a run's tasks ({task: Metric}, see `task_metrics`).

    Exactly one of `maximize` (a task, or "mean": the mean share of the experts) and `minimize` (a
    lower-is-better task); `require`: constraints in the forms of QUERY_FORMS. Every problem (unknown task,
    'expert' where there is none, a threshold outside the metric's range, a direction against the metric,
    an empty query) is reported at once in one ValueError, before any model loads.
    """
    errors: list[str] = []
    tasks = list(metrics)
    if isinstance(require, str):
        require = [require]
    if maximize is None and minimize is None:
        errors.append(
            "empty query: give an objective, --maximize TASK (or mean) or --minimize TASK, "
            f"with any --require constraints; tasks: {tasks}"
        )
    elif maximize is not None and minimize is not None:
        errors.append(f"give one objective, --maximize or --minimize, not both (got {maximize!r} and {minimize!r})")
    sense, target = ("max", maximize) if maximize is not None else ("min", minimize or "")
    if target and target != MEAN and target not in metrics:
        errors.append(f"objective: unknown task {target!r}; this run's tasks are {tasks} (or {MEAN!r})")
    elif target == MEAN and sense == "min":
        errors.append(f"objective: {MEAN!r} (the mean share of the experts) is maximised: use --maximize mean")
    elif target in metrics and metrics[target].higher_is_better != (sense == "max"):
        m = metrics[target]
        right = "--maximize" if m.higher_is_better else "--minimize"
        errors.append(
            f"objective: {target!r} measures {m.name}, {'higher' if m.higher_is_better else 'lower'} is better; "
            f"use {right} {target}"
        )
    constraints = []
    for text in require:
        c = _parse_constraint(text, metrics, errors)
        if c is not None:
            constraints.append(c)
    if errors:
        raise ValueError("invalid selection query: " + "; ".join(errors))
    return Query(sense, target, tuple(constraints), dict(metrics))


def _parse_constraint(text: str, metrics: dict[str, Metric], errors: list[str]) -> Constraint | None:
    if not isinstance(text, str) or not text.strip():
        errors.append(f"empty constraint {text!r}; write e.g. 'TASK >= 0.95 expert'")
        return None
    m = _CONSTRAINT.match(text)
    if m is None:
        errors.append(f"constraint {text!r} is not of the form TASK >= VALUE; forms: {QUERY_FORMS}")
        return None
    task, op, rhs = m["task"], m["op"], m["rhs"]
    if op not in _OPS:
        errors.append(f"constraint {text!r}: comparison {op!r}; use >= (a minimum) or <= (a maximum)")
        return None
    op = _OPS[op]
    if task != MEAN and task not in metrics:
        errors.append(f"constraint {text!r}: unknown task {task!r}; this run's tasks are {list(metrics)} (or {MEAN!r})")
        return None
    metric = metrics[task] if task != MEAN else Metric("mean share of the experts", True)
    higher = metric.higher_is_better
    want = ">=" if higher else "<="
    if op != want:
        errors.append(
            f"constraint {text!r}: {task!r} measures {metric.name}, {'higher' if higher else 'lower'} is better, "
            f"so a requirement is {'a minimum' if higher else 'a maximum'}: write {task} {want} ..."
        )
        return None
    binary = metric.name == "accuracy"
    shown = f"{task} {op} {rhs}"
    try:
        if (a := _ABSOLUTE.match(rhs)) is not None:
            kind, value = ("mean" if task == MEAN else "absolute"), _number(a["num"])
        elif (s := _SHARE.match(rhs)) is not None:
            kind, value = "share", _number(s["num"]) if s["num"] else 1.0
        elif (d := _DIFFERENCE.match(rhs)) is not None:
            kind, value = "difference", _number(d["num"]) * (-1 if d["sign"] == "-" else 1)
        else:
            errors.append(f"constraint {text!r}: cannot read {rhs!r}; forms: {QUERY_FORMS}")
            return None
    except ValueError:
        errors.append(f"constraint {text!r}: {rhs!r} is not a number")
        return None
    if task == MEAN and kind != "mean":
        errors.append(
            f"constraint {text!r}: 'expert' needs a task with an expert; {MEAN!r} is already the mean share of "
            f"the experts (write e.g. {MEAN} >= 0.9)"
        )
        return None
    if not math.isfinite(value):
        errors.append(f"constraint {text!r}: the threshold must be finite, got {value}")
        return None
    if kind == "absolute" and binary and not 0 <= value <= 1:
        errors.append(f"constraint {text!r}: an accuracy threshold must be in [0, 1] (or 0%-100%), got {value:g}")
    elif kind == "absolute" and not binary and value <= 0 and not higher:
        errors.append(f"constraint {text!r}: a {metric.name} threshold must be > 0, got {value:g}")
    elif kind in ("share", "mean") and value <= 0:
        errors.append(f"constraint {text!r}: a share of the expert must be > 0, got {value:g}")
    elif kind == "difference" and binary and not -1 <= value <= 1:
        errors.append(f"constraint {text!r}: a difference of accuracies must be in [-1, 1], got {value:g}")
    else:
        return Constraint(shown, task, op, kind, float(value), binary and kind == "absolute")
    return None


# --- the statistics a query constrains ---------------------------------------------------------------
def normalized(m: Any, e: Any, higher: bool) -> Any:
    """A metric as a share of its expert's, larger is better (accuracy / expert's; loss: expert's / loss)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.divide(m, e) if higher else np.divide(e, m)


def statistic(c: Constraint, q: Query, m: dict[str, Any], e: dict[str, Any]) -> Any:
    """The constrained statistic from task means m and expert means e (floats, or arrays of resamples)."""
    if c.kind == "absolute":
        return m[c.task]
    if c.kind == "share":
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.divide(m[c.task], e[c.task])
    if c.kind == "difference":
        return np.subtract(m[c.task], e[c.task])
    return np.mean([normalized(m[t], e[t], q.metrics[t].higher_is_better) for t in q.metrics], axis=0)


def objective(q: Query, m: dict[str, float], e: dict[str, float]) -> float:
    if q.target == MEAN:
        return float(np.mean([normalized(m[t], e[t], q.metrics[t].higher_is_better) for t in q.metrics]))
    return float(m[q.target])


__all__ = [
    "MEAN",
    "QUERY_FORMS",
    "Constraint",
    "Metric",
    "Query",
    "objective",
    "parse_query",
    "statistic",
    "task_metrics",
]
