"""Output directories (export, finetune, LoRA adapters): built beside, then swapped in whole.

A reader sees the complete previous output or the complete new one, never a mix; what others put in an output
is kept.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

from .writes import _NOFOLLOW, _new_temp, _step, atomic_write_json, refuse_link

log = logging.getLogger(__name__)


# --- output directories (export, finetune, LoRA adapters): built beside, then swapped in whole -------------
MANIFEST = ".pwemoe_files.json"  # in a published output: the files pwemoe wrote there
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
