"""Files a run owns: atomic writes, the run-directory lock, output directories replaced whole, content hashes.

Every file pwemoe writes goes through `atomic_write` (a reader, or a resumed run after SIGKILL, sees either the
old file or the new one, never half of it) or `append_line`; every output directory through `staged_dir` (a
reader sees the complete previous output or the complete new one, never a mix). None of them writes through or
replaces a symbolic link inside a run or an output directory, and files get the modes the umask gives, as files
written by `save_pretrained` do.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

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

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)

# Crash-injection tests set this hook: it is called before every step that changes files (a write made
# visible, an append, a rename, a removal), so a test can copy what a kill at that instant would leave.
_before_step: Callable[[str, Path], None] | None = None


def _step(kind: str, path: Path) -> None:
    if _before_step is not None:
        _before_step(kind, path)


def cache_dir() -> Path:
    """Where pwemoe caches what it can make again (data adapters' splits, converted models): $PWEMOE_CACHE,
    else ~/.cache/pwemoe."""
    return Path(os.environ.get("PWEMOE_CACHE") or Path.home() / ".cache" / "pwemoe")


def refuse_link(path: str | Path) -> Path:
    """`path`, if it is not a symbolic link; else a one-line error. pwemoe never writes through a link, nor
    replaces one, inside a run or output directory: a link planted there could lead anywhere."""
    path = Path(path)
    if path.is_symlink():
        raise ValueError(
            f"{path} is a symbolic link (to {os.readlink(path)}); pwemoe does not write through links or "
            "replace them: remove the link, or use another directory"
        )
    return path


def subdir(root: str | Path, name: str) -> Path:
    """root/name, a directory pwemoe writes into (plots/, validation/, exports/), created when missing; a
    link or a file in its place is refused, so nothing is written outside `root` through it."""
    p = refuse_link(Path(root) / name)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{p} is a file; pwemoe writes its {name}/ directory there: move the file away")
    p.mkdir(parents=True, exist_ok=True)
    return p


def _new_temp(path: Path) -> tuple[Path, int]:
    """A new empty file beside `path`, and the mode the umask gave it (tempfile.mkstemp's would be 0600)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666)
        except FileExistsError:
            continue
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        os.close(fd)
        return tmp, mode
    raise FileExistsError(f"could not create a temporary file beside {path}")


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) then rename onto `path`: readers never see a half-written file.

    The file gets the mode the umask gives (0644 under umask 022); a symbolic link at `path` is refused.
    """
    path = refuse_link(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, mode = _new_temp(path)
    try:
        write(str(tmp))
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:  # a writer that makes its own file (safetensors: 0600)
            os.chmod(tmp, mode)
        _step("replace", path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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
        path = refuse_link(self.dir / LOCK)
        self._lock = FileLock(str(refuse_link(str(path) + ".flock")))
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
    line, which readers skip (the step is redone on resume). A symbolic link at `path` is refused."""
    path = refuse_link(path)
    _step("append", path)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o666), "a") as f:
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


# --- output directories (export, finetune, LoRA adapters): built beside, then swapped in whole -------------
STAGED = ".pwemoe_staged"  # inside a directory being built: not published yet


def _beside(out: Path) -> tuple[Path, Path]:
    """(where the new output is built, where the previous output waits while it is replaced)."""
    return out.parent / f".{out.name}.pwemoe-tmp", out.parent / f".{out.name}.pwemoe-old"


def prepare_output(out: str | Path, overwrite: bool, what: str, flag: str = "--overwrite") -> Path:
    """Check an output directory before any work is done; returns it as a Path.

    First finishes or undoes a replacement that a kill interrupted (`recover_output`). Then refuses a file
    or a link at `out`, and a non-empty directory unless `overwrite` (`flag` names that option in the message).
    """
    out = Path(out)
    recover_output(out, what)
    _check_target(out, overwrite, what, flag)
    return out


def _check_target(out: Path, overwrite: bool, what: str, flag: str) -> None:
    refuse_link(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{what}: {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(
            f"{what}: {out} is not empty; choose a new directory, or pass {flag} to replace "
            "what pwemoe wrote there before (other files are kept)"
        )


@contextlib.contextmanager
def staged_dir(out: str | Path, overwrite: bool, what: str, flag: str = "--overwrite") -> Iterator[Path]:
    """Build an output directory in a temporary sibling, then publish it as `out` (`publish_dir`) when the
    block ends without an error, so `out` is never half-written and an existing output is replaced whole.

    The sibling `.<name>.pwemoe-tmp` is pwemoe's own (it holds a `.pwemoe_staged` marker until published): a
    build that a kill left unpublished is removed first, and a failed block removes it.
    """
    import shutil

    out = prepare_output(out, overwrite, what, flag)  # also cleans what a killed run left beside `out`
    tmp, _ = _beside(out)
    _step("mkdir", tmp)
    tmp.mkdir(parents=True)
    _step("create", tmp / STAGED)
    os.close(os.open(tmp / STAGED, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666))  # one step: marked
    try:
        yield tmp
        publish_dir(tmp, out, overwrite, what, flag)
    except BaseException:
        if (tmp / STAGED).is_file() and not tmp.is_symlink():  # still our unpublished build
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_dir(tmp: Path, out: Path, overwrite: bool, what: str, flag: str = "--overwrite") -> list[str]:
    """Publish the finished build `tmp` as `out`; returns the relative paths of its files (its manifest).

    `out` absent: one rename. `out` present (needs `overwrite`): the directories are swapped, with one atomic
    exchange where the filesystem has it (Linux renameat2), else two renames that a next run completes if a
    kill falls between them. The previous output's files that pwemoe did not write (not in its manifest) are
    then moved into the new output; one where the new output has a file of the same name is refused before
    the swap. The previous output's own files are removed.
    """
    files = sorted(
        p.relative_to(tmp).as_posix()
        for p in tmp.rglob("*")
        if p.is_file() and not p.is_symlink() and p.relative_to(tmp).as_posix() not in (STAGED, MANIFEST)
    )
    _umask_modes(tmp, files)
    atomic_write_json(tmp / MANIFEST, {"files": files})
    _check_target(out, overwrite, what, flag)  # again: the build took a while
    if not out.exists():  # the common case: one rename, so `out` is complete or absent
        out.parent.mkdir(parents=True, exist_ok=True)
        _step("rename", out)
        os.rename(tmp, out)
        _unmark(out)
        return files
    clash = _move_others(out, tmp, apply=False)
    if clash:
        raise ValueError(
            f"{what}: {out} holds files pwemoe did not write where the new output has files of the same "
            f"name: {clash[:5]}; move them, or choose a new directory"
        )
    _, old = _beside(out)
    _unmark(out)  # the marker tells a build from a displaced output: never carried into `old`
    _swap(tmp, out, old)
    left = _move_others(old, out, apply=True)
    if left:  # only when someone wrote into `out` meanwhile
        log.warning("%s: %s keeps %s (in the way in %s); move them", what, old, left[:5], out)
    return files


def _umask_modes(d: Path, files: list[str]) -> None:
    """Give the files of a build the mode the umask gives a new file: some writers create theirs 0600
    (safetensors' save_file, and so `save_pretrained`), which other users could not read."""
    probe, mode = _new_temp(d / "mode")
    probe.unlink()
    for f in files:
        if stat.S_IMODE((d / f).stat().st_mode) != mode:
            os.chmod(d / f, mode)


def recover_output(out: str | Path, what: str) -> None:
    """Finish or undo the replacement of `out` that a kill interrupted, from what it left beside `out`.

    An unpublished build (`.<name>.pwemoe-tmp` with the staged marker) is removed. A previous output that a
    swap displaced (`.<name>.pwemoe-old`, or `.<name>.pwemoe-tmp` without the marker) is put back if `out`
    is missing, unless the new output there is complete (then the swap is finished); otherwise the files of
    others in it move into `out` and pwemoe's own are removed. Links in these places are refused.
    """
    import shutil

    out = Path(out)
    tmp, old = _beside(out)
    for p in (out, tmp, old):
        refuse_link(p)
    for p in (tmp, old):
        if p.exists() and not p.is_dir():
            raise ValueError(f"{what}: {p} is a file, where pwemoe keeps a directory while it writes {out}; move it")
    staged = tmp.is_dir() and (tmp / STAGED).is_file()
    if tmp.is_dir() and not staged:
        if not any(tmp.iterdir()):  # killed between creating the build directory and marking it
            tmp.rmdir()
        elif old.exists():
            raise ValueError(f"{what}: both {tmp} and {old} hold an earlier output of {out}; move them away")
        else:  # the previous output, after an exchange whose cleanup a kill cut short
            _step("rename", old)
            os.rename(tmp, old)
    if old.is_dir():
        if not out.exists():  # killed between the two renames of a swap
            if staged and (tmp / MANIFEST).is_file():  # the new output is complete: finish the swap
                _step("rename", out)
                os.rename(tmp, out)
                staged = False
            else:  # put the previous output back
                _step("rename", out)
                os.rename(old, out)
        if old.exists():
            left = _move_others(old, out, apply=True)
            if left:
                log.warning("%s: %s keeps %s (in the way in %s); move them", what, old, left[:5], out)
    if staged:
        _step("remove", tmp)
        shutil.rmtree(tmp)
    _unmark(out)


def _unmark(out: Path) -> None:
    """The published output needs no staged marker."""
    marker = out / STAGED
    if out.is_dir() and not out.is_symlink() and marker.is_file() and not marker.is_symlink():
        _step("remove", marker)
        marker.unlink()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # a libc without it
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # this filesystem (or kernel) cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _swap(tmp: Path, out: Path, old: Path) -> None:
    """Put the build `tmp` at `out` and the previous output at `old`."""
    _step("rename", out)
    if _exchange(tmp, out):
        _step("rename", old)
        os.rename(tmp, old)  # `tmp` holds the previous output now (no staged marker: recognised as such)
    else:
        os.rename(out, old)
        _step("rename", out)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
    _unmark(out)


def _manifest(d: Path) -> set[str]:
    """The relative paths pwemoe listed as its own files in the output `d` (empty if none or unreadable)."""
    try:
        files = json.loads((d / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {f for f in files if isinstance(f, str)} if isinstance(files, list) else set()


def _move_others(prev: Path, new: Path, apply: bool) -> list[str]:
    """Files of others in the previous output `prev` move into the new output `new`; pwemoe's own go.

    pwemoe's own: the regular files its manifest lists (and the manifest). Anything else (files, links,
    directories of others) moves to the same place in `new`, as it is: a link is moved, never followed.
    A directory is entered when pwemoe wrote into it or `new` has one of that name. Returns the paths of
    others that cannot move because `new` has something there. `apply=False` only finds those.
    """
    ours = _manifest(prev) | {MANIFEST, STAGED}
    ours_dirs = {Path(f).parent.as_posix() for f in ours}
    ours_dirs = {a.as_posix() for d in ours_dirs for a in (Path(d), *Path(d).parents)} - {"."}
    blocked: list[str] = []

    def walk(rel: str) -> None:
        with os.scandir(prev / rel) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            r = f"{rel}/{e.name}" if rel else e.name
            dst = new / r
            if e.is_dir(follow_symlinks=False) and (r in ours_dirs or (dst.is_dir() and not dst.is_symlink())):
                walk(r)
                if apply and not any(os.scandir(e.path)):
                    os.rmdir(e.path)
            elif e.is_file(follow_symlinks=False) and r in ours:
                if apply and r != MANIFEST:  # the manifest goes last: a run cut short here can read it again
                    _step("remove", Path(e.path))
                    os.unlink(e.path)
            elif dst.exists() or dst.is_symlink():
                blocked.append(r)
            elif apply:
                dst.parent.mkdir(parents=True, exist_ok=True)
                _step("rename", dst)
                os.rename(e.path, dst)

    walk("")
    if apply and (prev / MANIFEST).is_file() and not (prev / MANIFEST).is_symlink():
        _step("remove", prev / MANIFEST)
        (prev / MANIFEST).unlink()
    if apply and not any(prev.iterdir()):
        prev.rmdir()
    return blocked
