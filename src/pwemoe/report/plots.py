"""Pareto-front plots (matplotlib, Agg): PNG and SVG, axes named after the tasks, always a legend."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..baselines import METHODS, group_rows, param_order, with_role
from ..files import atomic_write, plot_file_name, subdir


def _style(name: str) -> dict:
    m = METHODS.get(name)
    return dict(m.style, label=m.label) if m else dict(label=name)


def _groups(rows: list[dict], names: list[str], key: str) -> dict[str, tuple[np.ndarray, list]]:
    out = {}
    for m, rs in group_rows(rows).items():
        order = METHODS[m].order if m in METHODS else None
        if order == "preference":  # join in preference order
            rs = sorted(rs, key=lambda r: tuple(r["preference"]))
        elif order == "param":
            rs = sorted(rs, key=lambda r: param_order(r["param"]))
        out[m] = (np.array([[r[key][n] for n in names] for r in rs], dtype=float), rs)
    return out


def axis_label(name: str, key: str, directions: dict[str, str] | None) -> str:
    """'<task> accuracy', '<task> loss (lower is better)' or '<task> (normalised)'."""
    if key == "normalized":
        return f"{name} (normalised, 1 = expert)"
    return f"{name} loss (lower is better)" if (directions or {}).get(name) == "min" else f"{name} accuracy"


def _plane(ax, groups, i: int, j: int, names: list[str], key: str = "accuracy", directions: dict | None = None) -> None:
    for m, (pts, _) in groups.items():
        st = _style(m)
        line = m in METHODS and METHODS[m].order is not None and len(names) == 2
        ax.plot(
            pts[:, i],
            pts[:, j],
            linestyle="-" if line else "none",
            markersize=9 if m == with_role("normaliser").name else 5,
            alpha=0.85,
            **st,
        )
    ax.set_xlabel(axis_label(names[i], key, directions))
    ax.set_ylabel(axis_label(names[j], key, directions))
    if key != "normalized":  # better is always up and to the right: loss axes run from high to low
        if (directions or {}).get(names[i]) == "min":
            ax.invert_xaxis()
        if (directions or {}).get(names[j]) == "min":
            ax.invert_yaxis()
    ax.grid(alpha=0.3)


def _simplex_xy(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cartesian coordinates of preferences r [n, 3] in an equilateral triangle (task i at vertex i)."""
    corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])
    xy = r @ corners
    return xy[:, 0], xy[:, 1]


def _ternary(plt, groups: dict, names: list[str], key: str):
    """k = 3: each task's value over the preference simplex, PWEMoE and preference-weighted TA side by
    side (rows: methods; columns: tasks; one colour scale per task), interpolated between grid points."""
    import matplotlib.tri as mtri

    roles = (with_role("subject").name, with_role("reference").name)
    methods = [m for m in roles if m in groups and len(groups[m][1]) >= 3]
    if not methods:
        return None
    fig, axes = plt.subplots(len(methods), 3, figsize=(13, 4.1 * len(methods)), squeeze=False)
    for j, task in enumerate(names):
        vals = np.concatenate([groups[m][0][:, j] for m in methods])
        lo, hi = float(np.nanmin(vals)), float(np.nanmax(vals))
        for i, m in enumerate(methods):
            pts, rs = groups[m]
            x, y = _simplex_xy(np.array([r["preference"] for r in rs], dtype=float))
            ax = axes[i][j]
            tri = mtri.Triangulation(x, y)
            im = ax.tripcolor(tri, pts[:, j], shading="gouraud", cmap="viridis", vmin=lo, vmax=hi)
            ax.scatter(x, y, c=pts[:, j], cmap="viridis", vmin=lo, vmax=hi, s=18, edgecolors="k", linewidths=0.4)
            ax.plot([0, 1, 0.5, 0], [0, 0, np.sqrt(3) / 2, 0], color="k", linewidth=0.8)
            for (vx, vy), n, ha in zip([(0, 0), (1, 0), (0.5, np.sqrt(3) / 2)], names, ["right", "left", "center"]):
                ax.annotate(
                    f"r={n}", (vx, vy), xytext=(0, -12 if vy == 0 else 6), textcoords="offset points", ha=ha, fontsize=8
                )
            ax.set_aspect("equal")
            ax.axis("off")
            ax.set_title(f"{_style(m)['label']}\n{task} {key}", fontsize=9, pad=14)
            fig.colorbar(im, ax=ax, shrink=0.75, pad=0.12)
    fig.suptitle(f"Each task's {key} over the preference simplex (vertex = all weight on that task)")
    return fig


def plot_fronts(
    rows: list[dict], names: list[str], out_dir: Path, key: str = "accuracy", directions: dict[str, str] | None = None
) -> list[Path]:
    """Write the plots for k tasks; returns the paths written (PNG and SVG of each figure).

    directions: {task: "max" | "min"}; lower-is-better axes are labelled so and reversed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(names)
    groups = _groups(rows, names, key)
    out_dir = subdir(out_dir.parent, out_dir.name)  # plots/: a link planted there is refused
    figs = {}
    if k == 2:
        fig, ax = plt.subplots(figsize=(5.5, 5))
        _plane(ax, groups, 0, 1, names, key, directions)
        ax.legend(fontsize=8)
        ax.set_title(f"Pareto fronts ({key})")
        figs["front"] = fig
    elif k == 3:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
        for ax, (i, j) in zip(axes, [(0, 1), (0, 2), (1, 2)]):
            _plane(ax, groups, i, j, names, key, directions)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"Pairwise planes ({key})")
        figs["planes"] = fig
        fig = plt.figure(figsize=(6, 5.5))
        ax = fig.add_subplot(projection="3d")
        for m, (pts, rs) in groups.items():
            st = _style(m)
            if m == with_role("subject").name:
                cols = np.array([r["preference"] for r in rs])
                st.pop("color")
                ax.scatter(pts[:, 0], pts[:, 1], pts[:, 2], c=np.clip(cols, 0, 1), s=30, **st)
            else:
                ax.scatter(pts[:, 0], pts[:, 1], pts[:, 2], s=60 if m == with_role("normaliser").name else 15, **st)
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
        ax.set_zlabel(names[2])
        ax.legend(fontsize=7)
        ax.set_title("3-D view; PWEMoE coloured by preference (RGB = r)")
        figs["front3d"] = fig
        tern = _ternary(plt, groups, names, key)
        if tern is not None:
            figs["ternary"] = tern
    else:
        fig, ax = plt.subplots(figsize=(max(6, 1.3 * k), 4.8))
        x = np.arange(k)
        for m, (pts, _) in groups.items():
            st = _style(m)
            label = st.pop("label")
            for n, p in enumerate(pts):
                ax.plot(
                    x,
                    p,
                    alpha=0.5 if m != with_role("normaliser").name else 0.9,
                    linewidth=1,
                    label=label if n == 0 else None,
                    **{kk: v for kk, v in st.items() if kk != "zorder"},
                )
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_ylabel(key)
        ax.legend(fontsize=8)
        ax.set_title(f"Parallel coordinates ({key}); one line per preference")
        ax.grid(alpha=0.3)
        figs["parallel"] = fig
    paths = []
    for name, fig in figs.items():
        fig.tight_layout()
        for ext in ("png", "svg"):
            p = out_dir / plot_file_name(name, key, ext)
            atomic_write(p, lambda tmp, ext=ext, fig=fig: fig.savefig(tmp, dpi=110, format=ext))  # never half-written
            paths.append(p)
        plt.close(fig)
    return paths
