"""The certificate of `pwemoe select`: the seeded, stratified search/certification split of the validation data,
and a model's query values on one part with one-sided confidence bounds (exact binomial for an accuracy
threshold, the paired bootstrap otherwise)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..intervals import accuracy_samples, binomial_bound, one_sided
from .query import Query, objective, statistic
from .search import best


def assess(
    q: Query,
    values: dict[str, np.ndarray],
    experts: dict[str, np.ndarray],
    part: dict[str, np.ndarray],
    confidence: float,
    resamples: int,
    seed: int,
    margin: float = 0.0,
) -> dict[str, Any]:
    """One model's query values on one part of the validation data: task means, the objective, and for
    every constraint its estimate, one-sided bound at `confidence`, and whether (and by how much) the
    bound misses it.

    margin > 0 (the search): a constraint is judged on `planned` = the estimate moved (1 + margin) times the
    bound's distance from it (the width of this part's bound, plus `margin` times it for the certification
    part's bound still to come), so that a point judged feasible here is likely to be certified on fresh data.

    values / experts: per-example metric {task: Array[n_task]} of the model and of each task's expert
    (bool for accuracy, float for a loss); part: {task: indices into those arrays}. Bounds: exact binomial
    (Clopper-Pearson) for an absolute accuracy threshold, else the paired percentile bootstrap (the same
    resampled examples score the model and the expert), seeded.
    """
    m = {t: float(np.asarray(values[t])[part[t]].astype(np.float64).mean()) for t in q.metrics}
    e = {t: float(np.asarray(experts[t])[part[t]].astype(np.float64).mean()) for t in experts}
    rows = []
    for c in q.constraints:
        est = float(statistic(c, q, m, e))
        if c.binary:
            v = np.asarray(values[c.task])[part[c.task]]
            bound = binomial_bound(int(v.sum()), len(v), confidence, c.side)
            method = "exact binomial (Clopper-Pearson)"
        else:
            method = "paired percentile bootstrap"
            tasks = q.tasks_of(c)
            data = {
                t: np.stack([np.asarray(values[t])[part[t]]] + ([np.asarray(experts[t])[part[t]]] if t in e else []))
                for t in tasks
            }
            s = accuracy_samples(data, resamples, seed)
            ms = {t: s[t][:, 0] for t in tasks}
            es = {t: s[t][:, 1] for t in tasks if t in e}
            stat = np.asarray(statistic(c, q, ms, es), dtype=float)
            stat = np.where(np.isnan(stat), -np.inf if c.side == "lower" else np.inf, stat)  # undefined: fails
            bound = one_sided(stat, confidence, c.side)
        judged = est + (1 + margin) * (bound - est) if margin else bound
        scale = abs(c.value if c.kind != "difference" else e[c.task] + c.value) or 1.0
        rows.append(
            {
                "constraint": c.text,
                "estimate": est,
                "bound": bound,
                "method": method,
                **({"planned": judged} if margin else {}),
                "threshold": c.value,
                "met": c.met(judged),
                "shortfall": c.shortfall(judged),
                "relative_shortfall": c.shortfall(judged) / scale,
            }
        )
    return {
        "values": m,
        "experts": e,
        "objective": objective(q, m, e),
        "constraints": rows,
        "met": all(r["met"] for r in rows),
    }


def certification_split(
    labels: dict[str, Sequence[Any]], fraction: float, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(search part, certification part): {task: sorted indices} of each task's validation examples.

    labels: {task: one label per validation example} (a task without labels: any constant). Per class,
    a seeded random share `fraction` goes to certification (`carve_validation`, stratified); both parts
    must be non-empty.
    """
    from ..tasks.data import carve_validation

    search, cert = {}, {}
    for t, y in labels.items():
        s, c = carve_validation(list(y), fraction, seed)
        if not s or not c:
            raise ValueError(
                f"task {t!r} has {len(y)} validation examples: too few to split into a search and a certification "
                "part; give it more validation data (data.validation_split or data.validation_fraction)"
            )
        search[t], cert[t] = np.asarray(s), np.asarray(c)
    return search, cert


def fallback(
    q: Query,
    cands: list[dict[str, Any]],
    values: dict[tuple[float, ...], dict[str, np.ndarray]],
    experts: dict[str, np.ndarray],
    cert_part: dict[str, np.ndarray],
    confidence: float,
    resamples: int,
    seed: int,
) -> dict[str, Any] | None:
    """The best search-feasible candidate (by the search objective) whose bounds on the certification part
    meet every constraint at the Bonferroni level 1 - (1 - confidence) / n over the n feasible candidates,
    so that all n bounds hold together with the requested confidence; None if there is none."""
    feasible = [c for c in cands if c["search"]["met"]]
    level = 1 - (1 - confidence) / len(feasible)
    ok = []
    for c in feasible:
        a = assess(q, values[tuple(c["preference"])], experts, cert_part, level, resamples, seed)
        if a["met"]:
            ok.append({**c, "certification": a})
    if not ok:
        return None
    top = best(q, ok)
    return {
        "preference": top["preference"],
        "level": level,
        "tested": len(feasible),
        "certification": top["certification"],
    }
