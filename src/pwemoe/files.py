"""Files a run owns: atomic writes, the run-directory lock, and content hashes of inputs.

Every file pwemoe writes goes through `atomic_write`: a reader (or a resumed run after SIGKILL)
sees either the old file or the new one, never half of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


def cache_dir() -> Path:
    """Where pwemoe caches what it can make again (data adapters' splits, converted models): $PWEMOE_CACHE,
    else ~/.cache/pwemoe."""
    return Path(os.environ.get("PWEMOE_CACHE") or Path.home() / ".cache" / "pwemoe")


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) then rename onto `path`: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, w)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def read_json(path: str | Path, what: str) -> Any:
    """json.load with a one-line error naming the file and the fix (a truncated file, for instance)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} ({what}) is not valid JSON ({e.msg} at line {e.lineno}); it was damaged "
            f"outside pwemoe. Move it away and run the command again to rebuild it."
        ) from None


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

        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / LOCK
        self._lock = FileLock(str(path) + ".flock")
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            holder = "another process"
            try:
                h = json.loads(path.read_text())
                holder = f"pid {h['pid']} on {h['host']} ({h['command']}, since {h['since']})"
            except (OSError, ValueError, KeyError):
                pass
            raise RunDirInUse(
                f"{self.dir} is in use by {holder}; wait for it to finish, or stop it, then run this command again"
            ) from None
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


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


# --- directories pwemoe writes: never delete or overwrite what it did not write ----------------------
RUN_MARKER = "pwemoe_run.json"
MANIFEST = ".pwemoe_files.json"
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


def append_line(path: str | Path, line: str) -> None:
    """Append one line (a metrics.jsonl record), flushed to disk. A kill mid-write can leave only a cut last
    line, which readers skip (the step is redone on resume)."""
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


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
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and "pwemoe_selection" in obj


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
            p.unlink()
            removed.append(name)
        elif p.is_dir():
            files = [f for f in p.rglob("*") if (f.is_file() or f.is_symlink())]
            ours = [f for f in files if _written_by_pwemoe(path, f.relative_to(path).parts)]
            for f in ours:
                f.unlink()
            for d in sorted((d for d in p.rglob("*") if d.is_dir() and not d.is_symlink()), reverse=True) + [p]:
                if not any(d.iterdir()):
                    d.rmdir()
            if ours or not p.exists():
                removed.append(name)
    return removed


@contextlib.contextmanager
def staged_dir(out: str | Path, overwrite: bool, what: str) -> Iterator[Path]:
    """Build an output directory in a temporary sibling, then publish it as `out` (`publish_dir`) when the
    block ends without an error, so `out` is never half-written. The sibling `.<name>.pwemoe-tmp` is pwemoe's
    own: a leftover of a killed run is removed first, and a failed block removes it."""
    import shutil

    out = Path(out)
    tmp = out.parent / f".{out.name}.pwemoe-tmp"
    if tmp.exists():
        shutil.rmtree(tmp)  # our own leftover from a killed run
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, out, overwrite, what)


def publish_dir(tmp: Path, out: Path, overwrite: bool, what: str) -> list[str]:
    """Move the files of a finished temporary directory `tmp` into `out`, safely.

    `out` must be absent or empty, unless `overwrite`; then only files that pwemoe wrote there
    before (listed in its manifest) are replaced, and a file of anyone else in the way is refused
    before anything moves. Returns the relative paths written (also stored in the manifest).
    """
    import shutil

    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    if not out.exists():  # the common case: one atomic rename, so `out` is complete or absent
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(tmp / MANIFEST, {"files": files})
        os.replace(tmp, out)
        return files
    existing = [p for p in out.iterdir()] if out.is_dir() else []
    if out.exists() and not out.is_dir():
        raise ValueError(f"{what}: {out} is a file; give a directory")
    if existing and not overwrite:
        raise ValueError(
            f"{what}: {out} is not empty; choose a new directory, or pass --overwrite to replace "
            "what pwemoe wrote there before (other files are kept)"
        )
    ours: set[str] = set()
    if (out / MANIFEST).is_file():
        try:
            ours = set(json.loads((out / MANIFEST).read_text())["files"])
        except (ValueError, KeyError, TypeError):
            ours = set()
    # a manifest is only trusted for plain files inside `out` (one from elsewhere may list ../ or /paths)
    root = out.resolve()
    ours = {
        f
        for f in ours
        if isinstance(f, str)
        and not Path(f).is_absolute()
        and ".." not in Path(f).parts
        and not (out / f).is_symlink()
        and (out / f).resolve().is_relative_to(root)
    }
    clash = [f for f in files if (out / f).exists() and f not in ours]
    if clash:
        raise ValueError(
            f"{what}: {out} holds files pwemoe did not write that the output would replace: "
            f"{clash[:5]}; choose a new directory"
        )
    for f in sorted(ours - set(files)):  # our stale files from the previous output
        p = out / f
        if p.is_file():
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / f, out / f)
    shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_json(out / MANIFEST, {"files": files})
    return files
