"""The selection record (RUN/selections/<name>.json): its name and path, and the record of a search and its
certificate, built from the candidates; what a reader of the file finds."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import torch

from ..files import SELECTIONS, is_selection_record
from ..results import digest
from ..routing import routing_weights
from ..workbench import Workbench
from .query import Query

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
FORMAT = 1  # the record's `pwemoe_selection` field


def record_path(run: Path, name: str) -> Path:
    """RUN/selections/<name>.json; refuses a bad name, or a file there that pwemoe did not write."""
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(
            f"selection name must be 1-100 letters, digits, '.', '_' or '-', not starting with '.' or '-', got {name!r}"
        )
    path = run / SELECTIONS / f"{name}.json"
    if path.exists() and not is_selection_record(path):
        raise ValueError(f"{path} exists and is not a pwemoe selection record; choose another --name or move it")
    return path


def default_name(q: Query, settings: Any) -> str:
    """A name that is the same for the same query and settings (the record of a repeated query is replaced)."""
    return f"{q.sense}-{q.target}-{digest([q.to_dict(), vars(settings)])[:8]}"


def search_record(
    run: Path,
    wb: Workbench,
    q: Query,
    s: Any,
    m: int,
    margin: float,
    search_part: dict[str, Any],
    cert_part: dict[str, Any],
    cands: list[dict[str, Any]],
    evaluation: dict[str, Any],
) -> dict[str, Any]:
    """The record of a search, before its outcome (status, chosen point, certificate) is added."""
    names = [t.name for t in wb.tasks]
    return {
        "pwemoe_selection": FORMAT,
        "run": str(run.resolve()),
        "query": q.to_dict(),
        "confidence": s.confidence,
        "budget": s.budget,
        "grid": m,
        "seeds": {"split": s.seed, "bootstrap": s.seed},
        "resamples": s.resamples,
        "search_margin": margin,
        "split": {
            "certify_fraction": s.certify_fraction,
            "stratified_by": {t.name: t.cfg.data.label_column if t.has_labels else None for t in wb.tasks},
            "sizes": {t: {"search": len(search_part[t]), "certification": len(cert_part[t])} for t in names},
            "certification_indices": {t: cert_part[t].tolist() for t in names},
        },
        "evaluation": evaluation,
        "candidates": [
            {
                "preference": c["preference"],
                "round": c["round"],
                "objective": c["search"]["objective"],
                "feasible": c["search"]["met"],
                "constraints": [_short(r) for r in c["search"]["constraints"]],
            }
            for c in cands
        ],
    }


def _short(a: dict[str, Any]) -> dict[str, Any]:
    return {k: a[k] for k in ("constraint", "estimate", "bound", "met")}


def point_record(wb: Workbench, cand: dict[str, Any], lock: Any) -> dict[str, Any]:
    """A candidate's preference, its search-part assessment and a summary of its routing weights."""
    with lock or contextlib.nullcontext():
        lam = torch.stack(list(routing_weights(wb.model, cand["preference"]).values())).float()  # [modules, k]
    names = [t.name for t in wb.tasks]
    return {
        "preference": cand["preference"],
        "search": cand["search"],
        "routing_weights": {
            "modules": int(lam.shape[0]),
            **{s: dict(zip(names, getattr(lam, s)(0).values.tolist())) for s in ("min", "max")},
            "mean": dict(zip(names, lam.mean(0).tolist())),
        },
    }


__all__ = ["FORMAT", "NAME", "default_name", "point_record", "record_path", "search_record"]
