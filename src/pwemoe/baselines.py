"""PWEMoE and the baselines it is measured against: the registry of everything drawn on a front.

A method says how it is named, labelled and drawn, which points it contributes for a preference grid
(each point has the merge weights w of theta_0 + sum_i w_i tau_i over the whole backbone, or None for
PWEMoE: the upcycled model's routers decide; or a mergekit merge, `merges.MergeSpec`) and its role: the
subject (PWEMoE), the reference it is compared with (preference-weighted task arithmetic) and the normaliser
(the experts). Reports, plots, summaries, the explorer and the evaluate recipe read the registry and the
roles; a new baseline is one entry here. Also the baselines' model banks (theta_0 + T).

The standard merges (TIES, DARE, breadcrumbs, model stock, SLERP and preference-weighted TIES and DARE) are
computed by mergekit (`merges.py`); they are evaluated when `eval.baselines` names them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .core.merge import merge_weights
from .core.task_vector import check_compatible
from .merges import MERGES, MergeSpec, StandardMerge, check_merge_settings, merge_specs

# A results row's parameter: a float (task arithmetic's lambda, the scale c), or a merge's grid point by name.
Param = float | dict[str, float] | None


@dataclass(frozen=True)
class Point:
    """One evaluated model: results row `method` (e.g. 'expert:rt'), its preference or parameter, weights.

    weights: theta_0 + sum_i w_i tau_i; None with `merge` None: the PWEMoE model at `preference`.
    merge: a merge computed by mergekit (weights is None then).
    """

    method: str
    preference: list[float] | None
    param: Param
    weights: list[float] | None
    merge: MergeSpec | None = None

    @property
    def kind(self) -> str:
        """What makes the point's model: "preference" (PWEMoE's routers at `preference`), "weights" (theta_0 +
        sum_i w_i tau_i) or "merge" (mergekit); `evaluation.SOURCES` holds a model source per kind."""
        if self.merge is not None:
            return "merge"
        return "preference" if self.weights is None else "weights"

    @classmethod
    def at(cls, preference: list[float]) -> Point:
        """The subject (PWEMoE) at a preference (a results key, `results.preference_key`)."""
        return cls(with_role("subject").name, preference, None, None)


def describe_param(param: Param) -> str:
    """A row's parameter as reports show it: 'λ = 0.3', 'density = 0.5, lambda = 1', or ''."""
    if param is None:
        return ""
    if isinstance(param, dict):
        return ", ".join(f"{k} = {v:g}" for k, v in param.items())
    return f"λ = {param:g}"


def param_order(param: Param) -> tuple[float, ...]:
    """A sort key of row parameters (a line through a method's points in parameter order)."""
    if param is None:
        return ()
    return tuple(param.values()) if isinstance(param, dict) else (float(param),)


@dataclass(frozen=True)
class EvalSettings:
    """What the methods need to list their points."""

    task_names: list[str]
    preferences: list[list[float]]  # normalised, rounded keys (see results.preference_key)
    ta_scales: list[float]
    pwta_scale: float
    merge_grids: dict[str, dict[str, list[float]]] | None = None  # eval.merge_grids (defaults: merges.MERGES)
    merge_seed: int = 0  # eval.merge_seed: the seed of every stochastic merge (DARE)


@dataclass(frozen=True)
class Method:
    """One curve or point set on the front.

    name: the group key in summaries (rows of `expert:<task>` all belong to 'experts').
    order: how a 2-D plot joins the points into a line ('preference', 'param') or None (no line).
    baseline: evaluated only when baselines are requested (experts always are: they normalise).
    default: a baseline evaluated with `eval.baselines: true` (the others only when eval.baselines names them).
    role: "subject" (the method evaluated), "reference" (the baseline it is compared with first),
    "normaliser" (each task's own model, which normalised values divide by), or None.
    """

    name: str
    label: str
    style: dict[str, Any]
    points: Callable[[EvalSettings], list[Point]]
    order: str | None = None
    baseline: bool = True
    short: str = ""
    role: str | None = None
    default: bool = True
    per_task: str | None = None  # rows named "<per_task>:<task>", one model per task (the experts: "expert")

    def owns(self, row_method: str) -> bool:
        return row_method == self.name or self.task_of(row_method) is not None

    def row_name(self, task: str | None = None) -> str:
        """The results rows' method name: the method's own, or "<per_task>:<task>" for a per-task method."""
        if self.per_task is None:
            return self.name
        if task is None:
            raise ValueError(f"method {self.name!r} has one row per task; name the task")
        return f"{self.per_task}:{task}"

    def task_of(self, row_method: str) -> str | None:
        """The task of one of this per-task method's rows ("expert:rt" -> "rt"), else None."""
        if self.per_task is None or not row_method.startswith(self.per_task + ":"):
            return None
        return row_method[len(self.per_task) + 1 :]


def _pwemoe(s: EvalSettings) -> list[Point]:
    return [Point.at(p) for p in s.preferences]


def _pwta(s: EvalSettings) -> list[Point]:
    c = float(s.pwta_scale)
    return [Point("pref_task_arithmetic", p, c, [c * x for x in p]) for p in s.preferences]


def _ta(s: EvalSettings) -> list[Point]:
    k = len(s.task_names)
    return [Point("task_arithmetic", None, float(lam), [float(lam)] * k) for lam in s.ta_scales]


def _average(s: EvalSettings) -> list[Point]:
    k = len(s.task_names)
    return [Point("average", None, None, [1.0 / k] * k)]


def _experts(s: EvalSettings) -> list[Point]:
    k = len(s.task_names)
    eye = [[1.0 if i == j else 0.0 for j in range(k)] for i in range(k)]
    experts = METHODS["experts"]
    return [Point(experts.row_name(n), eye[i], None, eye[i]) for i, n in enumerate(s.task_names)]


def _merge(name: str) -> Callable[[EvalSettings], list[Point]]:
    def points(s: EvalSettings) -> list[Point]:
        specs = merge_specs(name, len(s.task_names), s.preferences, s.merge_grids, s.pwta_scale, s.merge_seed)
        return [Point(name, pref, param, None, spec) for pref, param, spec in specs]

    return points


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "pwemoe",
            "PWEMoE",
            dict(color="C3", marker="o", zorder=5),
            _pwemoe,
            order="preference",
            baseline=False,
            short="PWEMoE",
            role="subject",
        ),
        Method(
            "pref_task_arithmetic",
            "preference-weighted task arithmetic",
            dict(color="C0", marker="s", zorder=4),
            _pwta,
            order="preference",
            short="pref.-weighted TA",
            role="reference",
        ),
        Method(
            "task_arithmetic",
            "task arithmetic (λ grid)",
            dict(color="C2", marker="^", zorder=3),
            _ta,
            order="param",
            short="task arithmetic",
        ),
        Method("average", "simple averaging", dict(color="C4", marker="D", zorder=3), _average, short="simple average"),
        Method(
            "experts",
            "individual experts",
            dict(color="k", marker="*", zorder=6),
            _experts,
            baseline=False,
            short="experts (each)",
            role="normaliser",
            per_task="expert",
        ),
    )
}


def _add_merge(m: StandardMerge) -> None:
    """A standard merge (an entry of `merges.MERGES`) as a baseline of the fronts, evaluated when eval.baselines
    names it."""
    METHODS[m.name] = Method(
        m.name,
        m.label + " (mergekit)",
        dict(m.style, zorder=3),
        _merge(m.name),
        order="preference" if m.preference else "param" if len(m.grid) == 1 else None,
        short=m.short,
        default=False,
    )


for _m in MERGES.values():
    _add_merge(_m)
MERGES.hooks.append(_add_merge)  # a merge added later is a method too: one entry in MERGES is the whole of it


def selected(method: Method, baselines: bool | Sequence[str]) -> bool:
    """Whether `eval.baselines` (true, false, or a list of names) asks for `method`; the subject and the
    normaliser are always evaluated."""
    if not method.baseline:
        return True
    if isinstance(baselines, bool):
        return baselines and method.default
    return method.name in baselines


def baseline_names() -> list[str]:
    """The names `eval.baselines` may list."""
    return [m.name for m in METHODS.values() if m.baseline]


def check_baselines(baselines: bool | Sequence[str], grids: Any, k: int) -> list[str]:
    """Every problem with eval.baselines and eval.merge_grids for k tasks (see `merges.check_merge_settings`)."""
    names = [] if isinstance(baselines, bool) else list(baselines)
    known = baseline_names()
    errors = [f"eval.baselines: unknown baseline {n!r}; known: {known}" for n in names if n not in known]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        errors.append(f"eval.baselines: {dup} listed more than once")
    return errors + check_merge_settings(names, grids if grids is not None else {}, k)


ROLES = ("subject", "reference", "normaliser")


def with_role(role: str) -> Method:
    """The registered method that plays `role` (one of ROLES)."""
    found = [m for m in METHODS.values() if m.role == role]
    if len(found) != 1:
        raise ValueError(f"exactly one method must have the role {role!r}; found {[m.name for m in found]}")
    return found[0]


def describe_methods() -> dict[str, dict[str, Any]]:
    """{name: {label, short, role}} of every method: what reports and the explorer show."""
    return {m.name: {"label": m.label, "short": m.short or m.label, "role": m.role} for m in METHODS.values()}


def method_of(row_method: str) -> Method | None:
    """The registered method a results row belongs to."""
    return next((m for m in METHODS.values() if m.owns(row_method)), None)


def group_rows(rows: Sequence[dict]) -> dict[str, list[dict]]:
    """Rows by method name, in registry order (unknown methods last, under their own name)."""
    out: dict[str, list[dict]] = {name: [] for name in METHODS}
    for r in rows:
        m = method_of(r["method"])
        out.setdefault(m.name if m else r["method"], []).append(r)
    return {k: v for k, v in out.items() if v}


class TaskVectorBank:
    """theta_0 and the stacked task vectors T (Tensor[k, *shape]) of all floating parameters of a backbone.

    The upcycled model keeps theta_0 and tau only for its targets (the rest is already merged),
    so the baselines hold their own stack, built streamed, one expert at a time.
    """

    def __init__(self, base: nn.Module, experts: Mapping[str, Callable[[], nn.Module]]) -> None:
        self.template = copy.deepcopy(base).eval().requires_grad_(False)
        params = {n: p for n, p in self.template.named_parameters() if p.is_floating_point()}
        self.names = list(experts)
        self.theta0 = {n: p.detach().clone() for n, p in params.items()}
        self.T = {
            n: torch.empty((len(self.names), *p.shape), dtype=p.dtype, device=p.device) for n, p in params.items()
        }
        for i, name in enumerate(self.names):
            e = experts[name]()
            ep = dict(e.named_parameters())
            check_compatible(self.theta0, {n: v for n, v in ep.items() if v.is_floating_point()}, f"expert {name!r}")
            with torch.no_grad():
                for n in self.theta0:
                    self.T[n][i].copy_(ep[n].to(self.T[n].device) - self.theta0[n])
            del e, ep

    @torch.no_grad()
    def model(self, weights: Sequence[float]) -> nn.Module:
        """The backbone with theta_0 + sum_i w_i tau_i loaded (reuses one template module)."""
        w = torch.as_tensor(list(weights), dtype=torch.float32)
        for n, p in self.template.named_parameters():
            if n in self.T:
                p.copy_(merge_weights(w.to(p.device), self.theta0[n], self.T[n]))
        return self.template


class UpcycledBank:
    """The baselines' theta_0 + sum_i w_i tau_i when every change of every expert lives in the upcycled
    modules (LoRA experts: the rest of the model is theta_0 for all of them): the upcycled model with
    lambda fixed to w, merged into one reused plain copy. Exact, and no expert is loaded again."""

    def __init__(self, upcycled: nn.Module) -> None:
        from .export import PlainCopy

        self.copy = PlainCopy(upcycled)

    def model(self, weights: Sequence[float]) -> nn.Module:
        return self.copy.fixed(weights)
