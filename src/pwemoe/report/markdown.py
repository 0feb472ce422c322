"""report.md: the hypervolume table with intervals, the verdict against the reference baseline, plots and rows."""

from __future__ import annotations

from pathlib import Path

from ..baselines import METHODS, describe_param, with_role
from ..files import atomic_write_text
from .plots import plot_fronts


def with_ci(x: float, ci: list[float] | None, digits: int = 4) -> str:
    """'0.4411 [0.4102, 0.4700]', or the number alone without an interval."""
    return f"{x:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def comparison_sentence(summary: dict, baseline: str) -> str:
    """The bootstrap verdict on PWEMoE's hypervolume against `baseline` (empty without intervals)."""
    c = (summary.get("comparisons") or {}).get(baseline, {}).get("hypervolume")
    boot = summary.get("bootstrap")
    if not c or not boot:
        return ""
    lvl = round(100 * boot["level"])
    lo, hi = c["difference_ci"]
    ratio = f"ratio {c['ratio']:.3f}" + (
        f" [{c['ratio_ci'][0]:.3f}, {c['ratio_ci'][1]:.3f}]" if c.get("ratio_ci") else ""
    )
    verdict = (
        f"the {lvl}% interval of the difference excludes zero: the gain is not explained by test-set noise"
        if lo > 0
        else f"the {lvl}% interval of the difference excludes zero, in the baseline's favour"
        if hi < 0
        else f"the {lvl}% interval of the difference includes zero: the difference is within test-set noise"
    )
    return (
        f"Difference {c['difference']:+.4f} [{lo:+.4f}, {hi:+.4f}], {ratio} ({lvl}% paired bootstrap CIs); {verdict}. "
    )


def write_report(run: Path, rows: list[dict], names: list[str], summary: dict) -> Path:
    """report.md beside results.csv: the hypervolume table, the verdict, the plots and the rows."""
    dirs = summary.get("directions")
    plots = plot_fronts(rows, names, run / "plots", "accuracy", dirs) + plot_fronts(
        rows, names, run / "plots", "normalized", dirs
    )
    ref = summary["reference_point"]["accuracy"]
    boot = summary.get("bootstrap")
    ci_head = f" [{round(100 * boot['level'])}% CI]" if boot else ""
    lines = [
        f"# PWEMoE report: {', '.join(names)}",
        "",
        f"Run: `{summary.get('run', run)}`; {summary.get('preferences')} preferences"
        + (f" (simplex grid, M = {summary['grid']})" if summary.get("grid") else "")
        + ".",
        _reference_sentence(ref, names, dirs),
        (
            f"Intervals: {boot['method']}; {boot['resamples']} resamples, {round(100 * boot['level'])}% "
            f"percentile intervals (seed {boot['seed']}), over the {summary.get('split', 'test')} split."
            if boot
            else "No intervals (eval.bootstrap_resamples = 0, or rows without stored per-example correctness)."
        ),
        "",
        f"| method | points | hypervolume{ci_head} | normalised hypervolume{ci_head} | best mean normalised acc. |",
        "|---|---|---|---|---|",
    ]
    meth = summary["methods"]
    for name, method in METHODS.items():
        if name in meth:
            e = meth[name]
            lines.append(
                f"| {method.label} | {e['points']} | {with_ci(e['hypervolume'], e.get('hypervolume_ci'))} | "
                f"{with_ci(e.get('hypervolume_normalized', float('nan')), e.get('hypervolume_normalized_ci'))} | "
                f"{e.get('mean_normalized_accuracy', float('nan')):.4f} |"
            )
    if "ideal_point" in summary:
        ip = summary["ideal_point"]
        lines.append(
            f"| experts' ideal point | 1 | {ip['hypervolume']:.4f} | {ip['hypervolume_normalized']:.4f} | 1.0000 |"
        )
    lines.append("")
    subject, reference = with_role("subject"), with_role("reference")
    if subject.name in meth and reference.name in meth:
        a, b = meth[subject.name]["hypervolume"], meth[reference.name]["hypervolume"]
        verdict = "larger than" if a > b else "not larger than"
        pt = meth[reference.name]
        lines += [
            f"**{subject.label} vs {reference.label}:** hypervolume {a:.4f} vs {b:.4f}, "
            f"{verdict} the training-free baseline ({100 * (a - b) / max(b, 1e-12):+.1f}%). "
            + comparison_sentence(summary, reference.name)
            + f"{pt.get('dominated_by_pwemoe', 0)} of its {pt['points']} points are dominated by a {subject.label} "
            f"point; {pt.get('dominating_pwemoe', 0)} of {subject.label}'s {meth[subject.name]['points']} points are "
            "dominated by one of its points."
        ]
        if "ideal_point" in summary:
            ip = summary["ideal_point"]["hypervolume"]
            lines.append(f"PWEMoE reaches {100 * a / ip:.1f}% of the experts' ideal-point hypervolume.")
        lines.append("")
    lines += ["## Plots", ""]
    for p in plots:
        if p.suffix == ".png":
            lines.append(f"![{p.stem}](plots/{p.name})")
    lines += [
        "",
        "## All results",
        "",
        "| method | preference / parameters | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for r in rows:
        tag = r["preference"] if r["preference"] is not None else describe_param(r["param"])
        ci = r.get("accuracy_ci") or {}
        lines.append(
            f"| {r['method']} | {tag} | " + " | ".join(with_ci(r["accuracy"][n], ci.get(n)) for n in names) + " |"
        )
    path = run / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _reference_sentence(ref: list[float], names: list[str], dirs: dict[str, str] | None) -> str:
    lower = [n for n in names if (dirs or {}).get(n) == "min"]
    if not lower:
        return (
            f"Hypervolume reference point: {ref} (raw accuracy) and the same for accuracy normalised by each "
            "task's own expert. Larger is better."
        )
    parts = ", ".join(f"{n}: {'loss' if n in lower else 'accuracy'} {v:.4g}" for n, v in zip(names, ref))
    return (
        f"Hypervolume reference point, in each task's own metric: {parts}. Loss tasks ({', '.join(lower)}) are "
        "lower-is-better: the hypervolume counts the region between each front and the reference point in that "
        "direction. Normalised values are the expert's loss / the loss (and accuracy / the expert's accuracy), "
        "so 1 means as good as the expert and larger is better everywhere, with reference 0."
    )


__all__ = ["comparison_sentence", "with_ci", "write_report"]
