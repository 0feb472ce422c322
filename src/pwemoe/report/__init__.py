"""Plots, the markdown report and its interactive HTML twin."""

from __future__ import annotations

from pathlib import Path

from ..io import atomic_write_text
from ..methods import METHODS
from .html import write_report_html
from .plots import plot_fronts


def write_report(run: Path, rows: list[dict], names: list[str], summary: dict) -> Path:
    """report.md beside results.csv: the hypervolume table, the verdict, the plots and the rows."""
    plots = plot_fronts(rows, names, run / "plots", "accuracy") + plot_fronts(rows, names, run / "plots", "normalized")
    ref = summary["reference_point"]["accuracy"]
    lines = [
        f"# PWEMoE report: {', '.join(names)}",
        "",
        f"Run: `{summary.get('run', run)}`; {summary.get('preferences')} preferences"
        + (f" (simplex grid, M = {summary['grid']})" if summary.get("grid") else "")
        + ".",
        f"Hypervolume reference point: {ref} (raw accuracy) and the same for accuracy normalised by each "
        "task's own expert. Larger is better.",
        "",
        "| method | points | hypervolume | normalised hypervolume | best mean normalised acc. |",
        "|---|---|---|---|---|",
    ]
    meth = summary["methods"]
    for name, method in METHODS.items():
        if name in meth:
            e = meth[name]
            lines.append(
                f"| {method.label} | {e['points']} | {e['hypervolume']:.4f} | "
                f"{e.get('hypervolume_normalized', float('nan')):.4f} | "
                f"{e.get('mean_normalized_accuracy', float('nan')):.4f} |"
            )
    if "ideal_point" in summary:
        ip = summary["ideal_point"]
        lines.append(
            f"| experts' ideal point | 1 | {ip['hypervolume']:.4f} | {ip['hypervolume_normalized']:.4f} | 1.0000 |"
        )
    lines.append("")
    if "pwemoe" in meth and "pref_task_arithmetic" in meth:
        a, b = meth["pwemoe"]["hypervolume"], meth["pref_task_arithmetic"]["hypervolume"]
        verdict = "larger than" if a > b else "not larger than"
        pt = meth["pref_task_arithmetic"]
        lines += [
            f"**PWEMoE vs preference-weighted task arithmetic:** hypervolume {a:.4f} vs {b:.4f}, "
            f"{verdict} the training-free baseline ({100 * (a - b) / max(b, 1e-12):+.1f}%). "
            f"{pt.get('dominated_by_pwemoe', 0)} of its {pt['points']} points are dominated by a PWEMoE point; "
            f"{pt.get('dominating_pwemoe', 0)} of PWEMoE's {meth['pwemoe']['points']} points are dominated by one "
            "of its points."
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
        "| method | preference / λ | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for r in rows:
        tag = r["preference"] if r["preference"] is not None else r["param"]
        if r["method"] == "task_arithmetic":
            tag = f"λ={r['param']}"
        lines.append(f"| {r['method']} | {tag} | " + " | ".join(f"{r['accuracy'][n]:.4f}" for n in names) + " |")
    path = run / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


__all__ = ["write_report", "write_report_html"]
