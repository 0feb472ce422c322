"""Interactive Pareto-front figures (Plotly), shared by report.html and the `pwemoe serve` explorer.

k = 2: the front in the plane. k = 3: PWEMoE over the preference simplex (a ternary plot coloured
by mean normalised accuracy) and the three pairwise planes. k > 3: parallel coordinates, one axis
per task. Every point's hover text names the method, its preference (or lambda) and every task's
value. Figures are returned as plain JSON-ready dicts, so the server sends them as they are.
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path
from typing import Any

from ..baselines import METHODS, describe_param, group_rows, param_order, with_role

# matplotlib's default cycle and markers (the static plots' style) in Plotly's terms; "#rrggbb" passes through
_COLORS = {
    "C0": "#1f77b4",
    "C1": "#ff7f0e",
    "C2": "#2ca02c",
    "C3": "#d62728",
    "C4": "#9467bd",
    "C5": "#8c564b",
    "C6": "#e377c2",
    "C7": "#7f7f7f",
    "C8": "#bcbd22",
    "C9": "#17becf",
    "k": "#000000",
}
_SYMBOLS = {
    "o": "circle",
    "s": "square",
    "^": "triangle-up",
    "D": "diamond",
    "*": "star",
    "v": "triangle-down",
    "<": "triangle-left",
    ">": "triangle-right",
    "P": "cross",
    "X": "x",
    "h": "hexagon",
    "p": "pentagon",
    "d": "diamond-tall",
    "8": "octagon",
}


def plotly_js_path() -> Path:
    """plotly.min.js as shipped inside the plotly Python package (served and inlined offline)."""
    import plotly

    p = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not p.is_file():
        raise FileNotFoundError(f"plotly.min.js not found in the plotly package ({p}); reinstall plotly")
    return p


def _style(method: str) -> dict[str, Any]:
    m = METHODS.get(method)
    st = m.style if m else {}
    return {
        "label": m.label if m else method,
        "color": _COLORS.get(
            st.get("color", ""), st.get("color", "") if str(st.get("color", "")).startswith("#") else "#7f7f7f"
        ),
        "symbol": _SYMBOLS.get(st.get("marker", "o"), "circle"),
        "line": bool(m and m.order is not None),
    }


def _ordered(method: str, rows: list[dict]) -> list[dict]:
    order = METHODS[method].order if method in METHODS else None
    if order == "preference":
        return sorted(rows, key=lambda r: tuple(r["preference"]))
    if order == "param":
        return sorted(rows, key=lambda r: param_order(r["param"]))
    return rows


def hover_text(row: dict, names: list[str], label: str) -> str:
    if row.get("preference") is not None:
        where = "r = (" + ", ".join(f"{x:.3g}" for x in row["preference"]) + ")"
    elif row.get("param") is not None:
        where = describe_param(row["param"])
    else:
        where = ""
    vals = []
    for n in names:
        norm = (row.get("normalized") or {}).get(n)
        ci = (row.get("accuracy_ci") or {}).get(n)
        vals.append(
            f"{n}: {row['accuracy'][n]:.4f}"
            + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
            + (f" (normalised {norm:.3f})" if norm is not None else "")
        )
    return "<br>".join(
        [f"<b>{label}</b>" + (f" {row['method'].split(':', 1)[1]}" if ":" in row["method"] else "")]
        + ([where] if where else [])
        + vals
    )


def _plane_traces(groups: dict[str, list[dict]], names: list[str], i: int, j: int, key: str, legend: bool) -> list:
    out, big = [], with_role("normaliser").name  # each task's own model: drawn larger
    for m, rs in groups.items():
        st, rs = _style(m), _ordered(m, rs)
        out.append(
            {
                "type": "scatter",
                "x": [r[key][names[i]] for r in rs],
                "y": [r[key][names[j]] for r in rs],
                "mode": "lines+markers" if st["line"] and len(names) == 2 else "markers",
                "name": st["label"],
                "legendgroup": m,
                "showlegend": legend,
                "marker": {"color": st["color"], "symbol": st["symbol"], "size": 12 if m == big else 8},
                "line": {"color": st["color"]},
                "text": [hover_text(r, names, st["label"]) for r in rs],
                "hoverinfo": "text",
            }
        )
    return out


def _axis(name: str, key: str, directions: dict[str, str] | None) -> dict[str, Any]:
    """A plotly axis titled after the task's metric; lower-is-better axes run from high to low."""
    from .plots import axis_label

    ax: dict[str, Any] = {"title": {"text": axis_label(name, key, directions)}}
    if key != "normalized" and (directions or {}).get(name) == "min":
        ax["autorange"] = "reversed"
    return ax


def front_figures(
    rows: list[dict], names: list[str], key: str = "accuracy", directions: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """[{"name", "title", "figure"}] for the rows of one evaluation (`normalized` must be set to use it).

    directions: {task: "max" | "min"} (see `results.summarize`); loss axes are labelled and reversed."""
    k = len(names)
    groups = group_rows(rows)
    lower = any(v == "min" for v in (directions or {}).values())
    what = ("metrics" if lower else "accuracy") if key == "accuracy" else "normalised"
    figs: list[dict[str, Any]] = []
    if k == 2:
        figs.append(
            {
                "name": "plane",
                "title": f"Pareto fronts ({what})",
                "figure": {
                    "data": _plane_traces(groups, names, 0, 1, key, True),
                    "layout": {
                        "xaxis": _axis(names[0], key, directions),
                        "yaxis": _axis(names[1], key, directions),
                        "hovermode": "closest",
                        "margin": {"t": 30},
                    },
                },
            }
        )
    subject = with_role("subject").name
    if k == 3 and subject in groups:
        pw = groups[subject]
        color_key = (
            "normalized"
            if all(r.get("normalized") and None not in r["normalized"].values() for r in pw)
            else "accuracy"
        )
        mean = [sum(r[color_key][n] for n in names) / k for r in pw]
        colour = "mean normalised accuracy" if color_key == "normalized" else "mean accuracy"
        figs.append(
            {
                "name": "ternary",
                "title": f"PWEMoE over the preference simplex (colour: {colour})",
                "figure": {
                    "data": [
                        {
                            "type": "scatterternary",
                            "a": [r["preference"][0] for r in pw],
                            "b": [r["preference"][1] for r in pw],
                            "c": [r["preference"][2] for r in pw],
                            "mode": "markers",
                            "name": "PWEMoE (evaluated)",
                            "marker": {
                                "color": mean,
                                "colorscale": "Viridis",
                                "size": 14,
                                "showscale": True,
                                "colorbar": {"title": {"text": "mean"}},
                                "line": {"width": 1, "color": "#333"},
                            },
                            "text": [hover_text(r, names, "PWEMoE") for r in pw],
                            "hoverinfo": "text",
                        }
                    ],
                    "layout": {
                        "ternary": {
                            "aaxis": {"title": {"text": f"r {names[0]}"}, "min": 0},
                            "baxis": {"title": {"text": f"r {names[1]}"}, "min": 0},
                            "caxis": {"title": {"text": f"r {names[2]}"}, "min": 0},
                        },
                        "showlegend": False,
                        "margin": {"t": 40},
                    },
                },
            }
        )
    if k == 3:
        data, layout = [], {"hovermode": "closest", "margin": {"t": 30}, "legend": {"orientation": "h", "y": -0.25}}
        for p, (i, j) in enumerate(combinations(range(k), 2), start=1):
            for t in _plane_traces(groups, names, i, j, key, p == 1):
                t["xaxis"], t["yaxis"] = f"x{p}", f"y{p}"
                data.append(t)
            lo, hi = (p - 1) / 3 + 0.04, p / 3 - 0.04
            layout[f"xaxis{p}"] = {"domain": [lo, hi], "anchor": f"y{p}", **_axis(names[i], key, directions)}
            layout[f"yaxis{p}"] = {"anchor": f"x{p}", **_axis(names[j], key, directions)}
        figs.append(
            {"name": "planes", "title": f"Pairwise planes ({what})", "figure": {"data": data, "layout": layout}}
        )
    if k > 3:
        order = list(groups)
        flat = [(m, r) for m in order for r in groups[m]]
        colors = [_style(m)["color"] for m in order]
        n = max(len(order) - 1, 1)
        figs.append(
            {
                "name": "parcoords",
                "title": f"Every evaluated model, one axis per task ({what}); colour: method",
                "figure": {
                    "data": [
                        {
                            "type": "parcoords",
                            "line": {
                                "color": [order.index(m) for m, _ in flat],
                                "colorscale": [[i / n, c] for i, c in enumerate(colors)]
                                if len(order) > 1
                                else [[0, colors[0]], [1, colors[0]]],
                                "cmin": 0,
                                "cmax": n,
                            },
                            "dimensions": [{"label": nm, "values": [r[key][nm] for _, r in flat]} for nm in names],
                        }
                    ],
                    "layout": {
                        "margin": {"t": 60},
                        "annotations": [
                            {
                                "text": " · ".join(
                                    f"<span style='color:{c}'>■</span> {_style(m)['label']}"
                                    for m, c in zip(order, colors)
                                ),
                                "showarrow": False,
                                "xref": "paper",
                                "yref": "paper",
                                "x": 0,
                                "y": -0.12,
                                "xanchor": "left",
                            }
                        ],
                    },
                },
            }
        )
    return figs


def figure_json(fig: dict[str, Any]) -> str:
    """JSON of a figure dict (numpy-free, so the standard encoder suffices)."""
    return json.dumps(fig, separators=(",", ":"))


__all__ = ["front_figures", "hover_text", "plotly_js_path"]
