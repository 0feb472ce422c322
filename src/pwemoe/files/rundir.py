"""The run directory: the names of the files a run holds, its lock, and what `train --overwrite` may remove."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from .writes import MAX_SMALL_FILE, _step, atomic_write_json, make_dirs, read_bounded, refuse_link

# Files in a run directory; all written by pwemoe (see `RUN_FILES` for what `--overwrite` may replace).
CONFIG = "config.yaml"
ROUTERS = "routers.safetensors"
STATE = "trainer_state.pt"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
CORRECT = "correct.json"  # per-example correctness of every results row (bootstrap intervals)
BEST_ROUTERS = "routers_best_val.safetensors"  # train.select=best_val_hv: the selected routers
SELECTIONS = "selections"  # `pwemoe select`'s records, <name>.json each
LOCK = ".pwemoe.lock"


class RunDirInUse(RuntimeError):
    """Another pwemoe process holds the run directory's lock (the server answers 409)."""


class RunLock:
    """One writer per run directory: an exclusive lock (filelock) plus a note of who holds it.

    A second `train` or `evaluate` on the same directory fails at once with the holder's pid,
    host and command, instead of interleaving metrics or overwriting checkpoints. The lock is
    released by the OS if the holder dies (flock semantics), so a SIGKILLed run can be resumed.
    """

    def __init__(self, run_dir: str | Path, command: str) -> None:
        self.dir = Path(run_dir)
        self.command = command
        self._lock: Any = None

    def __enter__(self) -> RunLock:
        from filelock import FileLock, Timeout

        make_dirs(self.dir)
        path = refuse_link(self.dir / LOCK)
        self._lock = FileLock(str(refuse_link(str(path) + ".flock")))
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            holder = "another process"
            try:
                h = json.loads(read_bounded(path, MAX_SMALL_FILE, "the run lock's note", ""))
                holder = f"pid {h['pid']} on {h['host']} ({h['command']}, since {h['since']})"
            except (OSError, ValueError, KeyError, TypeError):
                pass
            raise RunDirInUse(
                f"{self.dir} is in use by {holder}; wait for it to finish, or stop it, then run this command again"
            ) from None
        remove_leftovers(self.dir)  # no other pwemoe process writes here now
        atomic_write_json(
            path,
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "command": self.command,
                "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            (self.dir / LOCK).unlink(missing_ok=True)
        finally:
            self._lock.release()


# --- directories pwemoe writes: never delete or overwrite what it did not write ----------------------
RUN_MARKER = "pwemoe_run.json"
# Everything a run directory may hold that pwemoe wrote (replaced by `train --overwrite`).
RUN_FILES = (
    CONFIG,
    ROUTERS,
    STATE,
    METRICS,
    RESULTS,
    CORRECT,
    BEST_ROUTERS,
    "validation",
    SELECTIONS,
    "results.csv",
    "summary.json",
    "report.md",
    "report.html",
    "plots",
    RUN_MARKER,
)


def is_run_dir(path: str | Path) -> bool:
    """A directory pwemoe created as a run (it carries the run marker)."""
    return (Path(path) / RUN_MARKER).is_file()


def require_run_dir(run: str | Path) -> Path:
    """`run` as a Path, if it is a trained run's directory (it holds the run's config.yaml); else a one-line
    error naming it. Checked before any model loads by every command that reads a run."""
    run = Path(run)
    if not (run / CONFIG).is_file():
        what = "does not exist" if not run.exists() else "is a file" if not run.is_dir() else f"has no {CONFIG}"
        raise FileNotFoundError(f"{run} is not a run directory ({what}); give the run_dir of a `pwemoe train` run")
    return run


# Figures `pwemoe.report.plots` writes under plots/: <kind>_<metric key>.<png|svg>
PLOT_KINDS = ("front", "planes", "front3d", "ternary", "parallel")
# What `evaluate --split validation` writes under validation/ (besides its plots/)
_EVAL_OUTPUTS = (RESULTS, CORRECT, "results.csv", "summary.json", "report.md", "report.html")
# The files (not directories) of RUN_FILES, at the top of a run directory
_RUN_OUTPUTS = tuple(n for n in RUN_FILES if n not in ("plots", "validation", SELECTIONS))


def plot_file_name(kind: str, key: str, ext: str) -> str:
    """The name of one of pwemoe's figures, the only names `train --overwrite` removes from plots/."""
    if kind not in PLOT_KINDS or not key.replace("_", "").isalnum() or ext not in ("png", "svg"):
        raise ValueError(f"not a pwemoe figure: kind {kind!r} (one of {PLOT_KINDS}), key {key!r}, ext {ext!r}")
    return f"{kind}_{key}.{ext}"


def _is_plot_file(name: str) -> bool:
    """Whether `name` is one `plot_file_name` gives."""
    stem, _, ext = name.rpartition(".")
    kind, _, key = stem.partition("_")
    try:
        return plot_file_name(kind, key, ext) == name
    except ValueError:
        return False


def _written_by_pwemoe(run: Path, rel: tuple[str, ...]) -> bool:
    """Whether a path inside a run directory (its parts) is one of the files pwemoe writes there."""
    top = _RUN_OUTPUTS
    if rel[0] == SELECTIONS:  # `pwemoe select`'s records (of routers that `train --overwrite` replaces), by content
        return len(rel) == 2 and rel[1].endswith(".json") and is_selection_record(run.joinpath(*rel))
    if rel[0] == "validation":
        rel, top = rel[1:], _EVAL_OUTPUTS
    if len(rel) == 1:
        return rel[0] in top
    return len(rel) == 2 and rel[0] == "plots" and _is_plot_file(rel[1])


def is_selection_record(path: Path) -> bool:
    """A JSON file that `pwemoe select` wrote (it carries the key `pwemoe_selection`)."""
    try:
        obj = json.loads(read_bounded(path, MAX_SMALL_FILE, "selection record", ""))
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and "pwemoe_selection" in obj


_TEMP = re.compile(r"\.(.+)\.[0-9a-f]{8}\.tmp")  # what `atomic_write` writes before the rename


def remove_leftovers(run: str | Path) -> list[str]:
    """Remove the temporary files a killed pwemoe process left in a run directory (the ones `atomic_write`
    makes beside a file pwemoe writes there); called under the run lock. Returns their relative paths."""
    run = Path(run)
    removed = []
    for d in ("", "plots", "validation", "validation/plots"):
        where = run / d
        if where.is_symlink() or not where.is_dir():
            continue
        for f in where.iterdir():
            m = _TEMP.fullmatch(f.name)
            rel = (*Path(d).parts, m[1]) if m else ()
            if m and f.is_file() and not f.is_symlink() and (rel == (LOCK,) or _written_by_pwemoe(run, rel)):
                f.unlink()
                removed.append(f.relative_to(run).as_posix())
    return removed


def clear_run_dir(path: str | Path) -> list[str]:
    """Remove pwemoe's own files from a run directory (train --overwrite); other files stay, also inside
    plots/ and validation/ (a directory goes only when nothing else is left in it). Returns names."""
    path = Path(path)
    if not is_run_dir(path):
        raise ValueError(
            f"{path} is not a pwemoe run directory (no {RUN_MARKER}); pwemoe will not delete "
            "anything in it. Choose another run_dir."
        )
    removed = []
    for name in RUN_FILES:
        p = path / name
        if p.is_symlink() or p.is_file():
            _step("remove", p)
            p.unlink()
            removed.append(name)
        elif p.is_dir():
            files = [f for f in p.rglob("*") if (f.is_file() or f.is_symlink())]
            ours = [f for f in files if _written_by_pwemoe(path, f.relative_to(path).parts)]
            for f in ours:
                _step("remove", f)
                f.unlink()
            for d in sorted((d for d in p.rglob("*") if d.is_dir() and not d.is_symlink()), reverse=True) + [p]:
                if not any(d.iterdir()):
                    d.rmdir()
            if ours or not p.exists():
                removed.append(name)
    return removed
