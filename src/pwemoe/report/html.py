"""report.html: the report as one self-contained interactive page (Plotly's JavaScript inlined, no network)."""

from __future__ import annotations

import html
from pathlib import Path

from ..baselines import METHODS, with_role
from ..files import atomic_write_text
from .interactive import figure_json, front_figures, plotly_js_path
from .markdown import comparison_sentence, with_ci


def _table(summary: dict) -> str:
    ci = f" [{round(100 * summary['bootstrap']['level'])}% CI]" if summary.get("bootstrap") else ""
    cols = ["method", "points", f"hypervolume{ci}", f"normalised hypervolume{ci}", "best mean normalised acc."]
    head = "<tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"
    body = []
    for name, method in METHODS.items():
        e = summary["methods"].get(name)
        if e:
            body.append(
                f"<tr><td>{html.escape(method.label)}</td><td>{e['points']}</td>"
                f"<td>{with_ci(e['hypervolume'], e.get('hypervolume_ci'))}</td>"
                f"<td>{with_ci(e.get('hypervolume_normalized', float('nan')), e.get('hypervolume_normalized_ci'))}</td>"
                f"<td>{e.get('mean_normalized_accuracy', float('nan')):.4f}</td></tr>"
            )
    if "ideal_point" in summary:
        ip = summary["ideal_point"]
        body.append(
            f"<tr><td>experts' ideal point</td><td>1</td><td>{ip['hypervolume']:.4f}</td>"
            f"<td>{ip['hypervolume_normalized']:.4f}</td><td>1.0000</td></tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"


def _verdict(summary: dict) -> str:
    m = summary["methods"]
    subject, reference = with_role("subject"), with_role("reference")
    if subject.name not in m or reference.name not in m:
        return ""
    a, b = m[subject.name]["hypervolume"], m[reference.name]["hypervolume"]
    return f"{subject.label} vs {reference.label}: hypervolume {a:.4f} vs {b:.4f}. " + comparison_sentence(
        summary, reference.name
    )


def write_report_html(run: Path, rows: list[dict], names: list[str], summary: dict) -> Path:
    """report.html beside report.md: hypervolume table and interactive fronts (raw and normalised)."""
    figs = front_figures(rows, names, "accuracy", summary.get("directions"))
    if "ideal_point" in summary:
        figs += front_figures(rows, names, "normalized", summary.get("directions"))
    divs, scripts = [], []
    for i, f in enumerate(figs):
        divs.append(f"<h2>{html.escape(f['title'])}</h2><div id='fig{i}' class='fig'></div>")
        fig = f["figure"]
        scripts.append(
            f"Plotly.newPlot('fig{i}', {figure_json(fig['data'])}, {figure_json(fig['layout'])}, {{responsive: true}});"
        )
    ref = summary["reference_point"]["accuracy"]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>PWEMoE report: {html.escape(", ".join(names))}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}.fig{{height:520px}}</style>
<script>{plotly_js_path().read_text()}</script></head><body>
<h1>PWEMoE report: {html.escape(", ".join(names))}</h1>
<p>Run: <code>{html.escape(str(summary.get("run", run)))}</code>; {summary.get("preferences")} preferences.
Hypervolume reference point: {ref} (larger is better). Hover any point for its preference and every task's value;
the static report is <a href="report.md">report.md</a>.</p>
{_table(summary)}
<p>{html.escape(_verdict(summary))}</p>
{"".join(divs)}
<script>{"".join(scripts)}</script>
</body></html>
"""
    path = run / "report.html"
    atomic_write_text(path, page)
    return path


__all__ = ["write_report_html"]
