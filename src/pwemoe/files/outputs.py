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

from .writes import (
    _NOFOLLOW,
    _new_temp,
    _step,
    atomic_write_json,
    make_dirs,
    read_bounded,
    refuse_link,
    sync_dir,
    sync_file,
)

log = logging.getLogger(__name__)


# --- output directories (export, finetune, LoRA adapters): built beside, then swapped in whole -------------
MANIFEST = ".pwemoe_files.json"  # in a published output: the files pwemoe wrote there
MAX_MANIFEST = 64 << 20  # a manifest lists file names: 64 MiB is hundreds of thousands of them
# The ownership marker: {"pwemoe_output": NAME, "role": "new" | "previous"}, in a directory beside the output NAME
# that pwemoe builds ("new") or that holds the previous output while it is replaced ("previous"). Only a directory
# whose marker names NAME is recovered or removed; a folder of someone else's at that name is left alone.
STAGED = ".pwemoe_staged"


def _beside(out: Path) -> tuple[Path, Path]:
    """(where the new output is built, where the previous output waits while it is replaced)."""
    return out.parent / f".{out.name}.pwemoe-tmp", out.parent / f".{out.name}.pwemoe-old"


def _mark(d: Path, out: Path, role: str) -> None:
    """Write the ownership marker into `d` in one create-and-write (never over an existing file), synced."""
    data = json.dumps({"pwemoe_output": out.name, "role": role}).encode()
    _step("create", d / STAGED)
    fd = os.open(d / STAGED, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    sync_dir(d)


def _role(d: Path, out: Path) -> str | None:
    """What the directory `d` beside `out` is to pwemoe: "new" (a build of `out`), "previous" (the previous
    output, displaced), "empty" (a build a kill cut before its marker had content), or None: not pwemoe's."""
    marker = d / STAGED
    if not marker.is_file() or marker.is_symlink():
        return "empty" if d.is_dir() and not any(d.iterdir()) else None
    try:
        text = read_bounded(marker, 4096, "marker", "")
        info = json.loads(text) if text else None
    except ValueError:
        return None
    if info is None:  # created, not yet written: a kill between the two (then the build holds nothing else)
        return "empty" if [p.name for p in d.iterdir()] == [STAGED] else None
    if isinstance(info, dict) and info.get("pwemoe_output") == out.name and info.get("role") in ("new", "previous"):
        return info["role"]
    return None


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

    The sibling `.<name>.pwemoe-tmp` is pwemoe's own: its first file is the ownership marker naming `out`. A
    build that a kill left unpublished is removed first, and a failed block removes it.
    """
    import shutil

    out = prepare_output(out, overwrite, what, flag)  # also cleans what a killed run left beside `out`
    tmp, _ = _beside(out)
    _step("mkdir", tmp)
    tmp.mkdir(parents=True)
    _mark(tmp, out, "new")
    try:
        yield tmp
        publish_dir(tmp, out, overwrite, what, flag)
    except BaseException:
        if not tmp.is_symlink() and _role(tmp, out) == "new":  # still our unpublished build
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_dir(tmp: Path, out: Path, overwrite: bool, what: str, flag: str = "--overwrite") -> list[str]:
    """Publish the finished build `tmp` as `out`; returns the relative paths of its files (its manifest).

    Durable: every file and directory of the build is synced before it is published, and the directory holding
    `out` after, so once this returns a power loss keeps the new output. `out` absent: one rename. `out`
    present (needs `overwrite`): the directories are swapped, with one atomic exchange where the filesystem has
    it (Linux renameat2), else two renames that a next run completes if a kill falls between them. The previous
    output first gets an ownership marker ("previous"), so a next run knows it from a folder of someone else's.
    Its files that pwemoe did not write (not in its manifest) are then moved into the new output; one where the
    new output has a file of the same name is refused before the swap. Its own files are removed.
    """
    files = sorted(
        p.relative_to(tmp).as_posix()
        for p in tmp.rglob("*")
        if p.is_file() and not p.is_symlink() and p.relative_to(tmp).as_posix() not in (STAGED, MANIFEST)
    )
    _umask_modes(tmp, files)
    atomic_write_json(tmp / MANIFEST, {"files": files})
    _sync_tree(tmp)
    _check_target(out, overwrite, what, flag)  # again: the build took a while
    if not out.exists():  # the common case: one rename, so `out` is complete or absent
        make_dirs(out.parent)
        _step("rename", out)
        os.rename(tmp, out)
        sync_dir(out.parent)
        _unmark(out)
        return files
    clash = _move_others(out, tmp, apply=False)
    if clash:
        raise ValueError(
            f"{what}: {out} holds files pwemoe did not write where the new output has files of the same "
            f"name: {clash[:5]}; move them, or choose a new directory"
        )
    _, old = _beside(out)
    _unmark(out)  # a marker a kill left in the published output
    _mark(out, out, "previous")
    _swap(tmp, out, old)
    left = _move_others(old, out, apply=True)
    if left:  # only when someone wrote into `out` meanwhile
        log.warning("%s: %s keeps %s (in the way in %s); move them", what, old, left[:5], out)
    return files


def _sync_tree(d: Path) -> None:
    """fsync every regular file and directory under `d` (links are not followed), `d` last."""
    for root, _, names in os.walk(d, topdown=False):
        for n in names:
            p = Path(root) / n
            if p.is_file() and not p.is_symlink():
                sync_file(p)
        sync_dir(root)


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

    Only directories whose ownership marker names `out` are pwemoe's: anything else at `.<name>.pwemoe-tmp` or
    `.<name>.pwemoe-old` is left where it is, with a one-line ValueError. An unpublished build ("new") is
    removed. A previous output that a swap displaced ("previous") is put back if `out` is missing, unless the new
    output there is complete (then the swap is finished); otherwise the files of others in it move into `out`
    and pwemoe's own are removed. Links in these places are refused.
    """
    import shutil

    out = Path(out)
    tmp, old = _beside(out)
    for p in (out, tmp, old):
        refuse_link(p)
    for p in (tmp, old):
        if p.exists() and not p.is_dir():
            raise ValueError(f"{what}: {p} is a file, where pwemoe keeps a directory while it writes {out}; move it")
    roles = {p: _role(p, out) for p in (tmp, old) if p.exists()}
    strangers = [p for p, r in roles.items() if r is None or (p == old and r == "new")]
    if strangers:
        raise ValueError(
            f"{what}: {strangers[0]} was not made by pwemoe for {out} (no {STAGED} marker naming it), so pwemoe "
            f"leaves it alone; it needs that name while it writes {out}: rename or move that folder"
        )
    for p in (tmp, old):
        if roles.get(p) == "empty":  # cut before its marker had content, or after it went: nothing is lost
            _step("remove", p)
            shutil.rmtree(p)
            roles.pop(p)
    if roles.get(tmp) == "previous":  # the previous output, after an exchange whose cleanup a kill cut short
        if old.exists():
            raise ValueError(f"{what}: both {tmp} and {old} hold an earlier output of {out}; move them away")
        _step("rename", old)
        os.rename(tmp, old)
        sync_dir(out.parent)
    staged = roles.get(tmp) == "new"
    if old.is_dir():
        if not out.exists():  # killed between the two renames of a swap
            if staged and (tmp / MANIFEST).is_file():  # the new output is complete: finish the swap
                _step("rename", out)
                os.rename(tmp, out)
                staged = False
            else:  # put the previous output back
                _step("rename", out)
                os.rename(old, out)
            sync_dir(out.parent)
        if old.exists():
            left = _move_others(old, out, apply=True)
            if left:
                log.warning("%s: %s keeps %s (in the way in %s); move them", what, old, left[:5], out)
    if staged:
        _step("remove", tmp)
        shutil.rmtree(tmp)
    _unmark(out)


def _unmark(out: Path) -> None:
    """The published output keeps no ownership marker (one naming it, or one a kill left empty)."""
    marker = out / STAGED
    if out.is_dir() and not out.is_symlink() and marker.is_file() and not marker.is_symlink():
        if _role(out, out) in ("new", "previous") or marker.stat().st_size == 0:
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
    """Put the build `tmp` at `out` and the previous output (marked "previous") at `old`; synced."""
    _step("rename", out)
    if _exchange(tmp, out):
        _step("rename", old)
        os.rename(tmp, old)  # `tmp` holds the previous output now, marked as such
    else:
        os.rename(out, old)
        _step("rename", out)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
    sync_dir(out.parent)
    _unmark(out)


def _manifest(d: Path) -> set[str]:
    """The relative paths pwemoe listed as its own files in the output `d` (empty if none or unreadable)."""
    try:
        files = json.loads(read_bounded(d / MANIFEST, MAX_MANIFEST, "manifest", ""))["files"]
    except (ValueError, KeyError, TypeError):
        return set()
    return {f for f in files if isinstance(f, str)} if isinstance(files, list) else set()


def _move_others(prev: Path, new: Path, apply: bool) -> list[str]:
    """Files of others in the previous output `prev` move into the new output `new`; pwemoe's own go.

    pwemoe's own: the regular files its manifest lists (and the manifest and the marker, removed last, after
    the moves are synced). Anything else (files, links, directories of others) moves to the same place in
    `new`, as it is: a link is moved, never followed. A directory is entered when pwemoe wrote into it or `new`
    has one of that name. Returns the paths of others that cannot move because `new` has something there.
    `apply=False` only finds those.
    """
    last = (MANIFEST, STAGED)  # a run cut short before these go can read them again
    ours = _manifest(prev) | set(last)
    ours_dirs = {Path(f).parent.as_posix() for f in ours}
    ours_dirs = {a.as_posix() for d in ours_dirs for a in (Path(d), *Path(d).parents)} - {"."}
    blocked: list[str] = []
    moved_into: set[Path] = set()

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
                if apply and r not in last:
                    _step("remove", Path(e.path))
                    os.unlink(e.path)
            elif dst.exists() or dst.is_symlink():
                blocked.append(r)
            elif apply:
                make_dirs(dst.parent)
                _step("rename", dst)
                os.rename(e.path, dst)
                moved_into.add(dst.parent)

    walk("")
    if not apply:
        return blocked
    for d in moved_into:
        sync_dir(d)
    for name in last:
        if (prev / name).is_file() and not (prev / name).is_symlink():
            _step("remove", prev / name)
            (prev / name).unlink()
    if not any(prev.iterdir()):
        prev.rmdir()
        sync_dir(prev.parent)
    return blocked
