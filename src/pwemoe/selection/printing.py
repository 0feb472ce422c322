"""A selection record as a few lines for a person (what `pwemoe select` and the demo print)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def summary_lines(record: dict[str, Any]) -> list[str]:
    """A short human summary of a selection record."""

    def r(p: Sequence[float]) -> str:
        return "(" + ", ".join(f"{x:.3f}" for x in p) + ")"

    q, ev = record["query"], record["evaluation"]
    conf = f"{100 * record['confidence']:g}%"
    out = [
        f"pwemoe select: {q['objective']}" + (f" subject to {', '.join(q['require'])}" if q["require"] else ""),
        f"  {ev['candidates']} preferences evaluated on validation data ({ev['computed']} models computed, "
        f"{ev['reused']} reused); search part {_sizes(record, 'search')}, "
        f"certification part {_sizes(record, 'certification')}",
    ]
    if record["status"] == "infeasible":
        b, c = record["binding"], record["closest"]
        out += [
            "  INFEASIBLE: no evaluated preference meets every constraint on the search part (its estimate "
            f"must clear the constraint by the widths of both {conf} bounds, the search part's and the "
            "certification part's)",
            f"  closest: r = {r(c['preference'])}; binding: {b['constraint']}: at best {b['best']:.4f} "
            f"(estimate {b['estimate']:.4f}, bound {b['bound']:.4f}) at r = {r(b['at'])}",
        ]
    else:
        ch, cert = record["chosen"], record["certification"]
        out.append(
            f"  chosen r = {r(ch['preference'])}: objective {ch['search']['objective']:.4f} on the search part, "
            f"{cert['objective']:.4f} on the certification part"
        )
        verdict = "CERTIFIED" if record["status"] == "certified" else "NOT CERTIFIED"
        out.append(f"  {verdict} at {conf} on the certification part (one-sided bounds):")
        for x in cert["constraints"]:
            miss = "" if x["met"] else f", misses by {x['shortfall']:.4f}"
            out.append(
                f"    {x['constraint']}: {x['estimate']:.4f}, bound {x['bound']:.4f} "
                f"{'meets' if x['met'] else 'fails'} {x['threshold']:g}{miss}"
            )
        fb = record.get("fallback")
        if record["status"] != "certified":
            out.append(
                f"  best certified point (all {fb['tested']} feasible candidates tested together at {conf}): "
                f"r = {r(fb['preference'])}, objective {fb['certification']['objective']:.4f}"
                if fb
                else "  no evaluated preference is certified: loosen the constraints, raise --budget, or add "
                "validation data"
            )
    t = record.get("test")
    if t:
        parts = [f"{x['constraint']}: {x['value']:.4f} {'met' if x['met'] else 'NOT met'}" for x in t["constraints"]]
        out.append(
            f"  test split (not used for the choice): objective {t['objective']:.4f}"
            + ("; " if parts else "")
            + "; ".join(parts)
        )
    if record.get("export"):
        out.append(f"  exported to {record['export']}")
    out.append(f"  record: {record['path']}")
    return out


def _sizes(record: dict[str, Any], part: str) -> str:
    sizes = record["split"]["sizes"]
    return "/".join(str(v[part]) for v in sizes.values()) + " examples"


__all__ = ["summary_lines"]
