"""The search of `pwemoe select`: a simplex grid, then a compass search around the best candidate, on the search
part of the validation data, within a budget of candidates."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..core.preference import simplex_grid, simplex_grid_size
from ..results import preference_key
from .query import Query

MIN_STEP = 1e-3  # the compass search stops refining below this step on the simplex


def _utility(q: Query, a: dict[str, Any]) -> float:
    return a["objective"] if q.sense == "max" else -a["objective"]


def best(q: Query, candidates: list[dict[str, Any]], part: str = "search") -> dict[str, Any]:
    """The best candidate by its assessment on `part`: feasible before infeasible; feasible ones by the
    objective; infeasible ones by the largest relative shortfall of a bound (the closest first), then
    the objective; the first evaluated on ties."""

    def key(ic: tuple[int, dict]) -> tuple:
        i, c = ic
        a = c[part]
        worst = max((r["relative_shortfall"] for r in a["constraints"]), default=0.0)
        return (a["met"], -worst if not a["met"] else 0.0, _utility(q, a), -i)

    return max(enumerate(candidates), key=key)[1]


def initial_grid(k: int, budget: int, grid: int | None, run_grid: int) -> int:
    """Levels M of the starting simplex grid: `grid` if given (its points must fit the budget), else the
    largest M <= the run's eval.grid whose points take at most half the budget (at least the k vertices),
    so that the rest refines."""
    if grid is not None:
        if simplex_grid_size(k, grid) > budget:
            raise ValueError(
                f"--grid {grid} has {simplex_grid_size(k, grid)} points for k={k} tasks, more than --budget {budget}; "
                "raise the budget or lower the grid"
            )
        return grid
    if budget < k:
        raise ValueError(f"--budget must be at least k={k} (the simplex's vertices), got {budget}")
    m = 2
    while m < max(2, run_grid) and simplex_grid_size(k, m + 1) <= max(k, budget // 2):
        m += 1
    return m


def neighbours(center: Sequence[float], step: float, first: int | None = None) -> list[list[float]]:
    """The compass directions on the simplex from `center`: r + step (e_i - e_j) for every i != j, kept
    where every weight stays >= 0 (preference keys). Those that move weight to task `first` (the objective's)
    come first, since a small budget may evaluate only some of them; then (i, j) order."""
    k = len(center)
    out = []
    for i in sorted(range(k), key=lambda i: i != first):
        for j in range(k):
            if i == j or center[j] < step - 1e-9:
                continue
            r = list(center)
            r[i] += step
            r[j] = max(0.0, r[j] - step)
            out.append(preference_key(r, k))
    return out


def search(
    q: Query, k: int, m: int, budget: int, score: Callable[[list[list[float]]], list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """Candidates in evaluation order, each {"preference", "round", "search": assessment}: the M-level
    simplex grid (round 0), then a compass search from the best candidate (`best`): evaluate its
    neighbours at the current step, move to a better one, else halve the step; until `budget`
    candidates are evaluated or the step is below MIN_STEP. score(preferences) -> assessments."""
    cands: list[dict[str, Any]] = []
    seen: set[tuple[float, ...]] = set()

    def add(prefs: list[list[float]], rnd: int) -> int:
        new = []
        for p in prefs:
            if tuple(p) not in seen and len(cands) + len(new) < budget:
                seen.add(tuple(p))
                new.append(p)
        for p, a in zip(new, score(new) if new else []):
            cands.append({"preference": p, "round": rnd, "search": a})
        return len(new)

    add([preference_key(r, k) for r in simplex_grid(k, m)], 0)
    center, step, rnd = best(q, cands), 1.0 / (m - 1) / 2, 1
    first = list(q.metrics).index(q.target) if q.target in q.metrics else None
    while len(cands) < budget and step >= MIN_STEP:
        if add(neighbours(center["preference"], step, first), rnd):
            rnd += 1
            now = best(q, cands)
            if now is not center:
                center = now
                continue
        step /= 2
    return cands


def binding(q: Query, cands: list[dict[str, Any]], closest: dict[str, Any]) -> dict[str, Any]:
    """The constraint that binds at the closest point (its largest relative shortfall), with the best value
    any candidate reached for it on the search part (the value feasibility is judged on: `planned`, else
    the bound), its estimate and bound there, and where."""
    rows = closest["search"]["constraints"]
    j = max(range(len(rows)), key=lambda i: rows[i]["relative_shortfall"])
    c = q.constraints[j]
    sign = 1 if c.op == ">=" else -1

    def judged(x: dict[str, Any]) -> float:
        row = x["search"]["constraints"][j]
        return row.get("planned", row["bound"])

    top = max(cands, key=lambda x: sign * judged(x))
    r = top["search"]["constraints"][j]
    return {
        "constraint": c.text,
        "threshold": c.value,
        "best": judged(top),
        "estimate": r["estimate"],
        "bound": r["bound"],
        "at": top["preference"],
    }
