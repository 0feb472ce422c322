"""Files pwemoe writes and reads one at a time: atomic writes, appended lines, links refused, content hashes.

Every file pwemoe writes goes through `atomic_write` (a reader, or a resumed run after SIGKILL, sees either the
old file or the new one, never half of it) or `append_line`. Neither writes through or replaces a symbolic link,
and files get the modes the umask gives, as files written by `save_pretrained` do.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
MiB = 1 << 20
# The most pwemoe reads of a file it reads whole (`read_bounded`): files a user names or receives (a preferences
# file, an adapter's config, a selection record), and the results files pwemoe keeps in a run directory.
MAX_SMALL_FILE = 16 * MiB
MAX_RESULTS_FILE = 256 * MiB

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
    make_dirs(p)
    return p


# --- durability: what a power loss or a kernel crash keeps --------------------------------------------------
# A rename is a change to the directory, which the kernel may write back before or after the renamed file's data:
# so the data is synced before the rename that publishes it, and the directory after it (as git and SQLite do).


def sync_file(path: str | Path) -> None:
    """fsync a written file: its data is on the disk before a rename publishes it."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(path: str | Path) -> None:
    """fsync a directory: the entries made in it (a rename, a new file or directory) survive a power loss."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # a filesystem that cannot sync a directory (some network ones): nothing more to do
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def make_dirs(path: str | Path) -> Path:
    """mkdir -p whose new directories survive a power loss: the parent of each one made is synced."""
    path = Path(path)
    new = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    for p in reversed(new):
        sync_dir(p.parent)
    return path


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

    Durable: the file is synced before the rename and its directory after it, so once this returns a power
    loss keeps the new file. The file gets the mode the umask gives (0644 under umask 022); a symbolic link at
    `path` is refused.
    """
    path = refuse_link(path)
    make_dirs(path.parent)
    tmp, mode = _new_temp(path)
    try:
        write(str(tmp))
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:  # a writer that makes its own file (safetensors: 0600)
            os.chmod(tmp, mode)
        sync_file(tmp)
        _step("replace", path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, w)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def read_bounded(path: str | Path, limit: int, what: str, more: str) -> str:
    """The text of a file pwemoe reads whole, if it holds at most `limit` bytes; else a one-line ValueError
    naming the file, the limit and `more` (how to do with less, or the option that allows more).

    No more than limit + 1 bytes are ever read, so an endless file (/dev/zero, a pipe that never ends) stops at
    once; a named pipe without a writer reads as empty instead of blocking. Unreadable files and text that is
    not UTF-8 are one-line ValueErrors too.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO without a writer: no wait here
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ValueError(f"{what} {path} is a directory; give a file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)  # a pipe with a writer: wait for its data
        big = stat.S_ISREG(st.st_mode) and st.st_size > limit  # known without reading it
        try:
            data = b"" if big else f.read(limit + 1)
        except OSError as e:
            raise ValueError(f"cannot read {what} {path}: {e.strerror}") from None
    if big or len(data) > limit:
        size = f"{limit / MiB:g} MiB" if limit >= MiB else f"{limit} bytes"
        raise ValueError(f"{what} {path} holds more than {size}, the most pwemoe reads of it; {more}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_json(path: str | Path, what: str, limit: int = MAX_RESULTS_FILE) -> Any:
    """json.load with a one-line error naming the file and the fix (a truncated file, for instance); a file
    over `limit` bytes (`read_bounded`) is one too."""
    path = Path(path)
    more = "it was not written by pwemoe: move it away and run the command again to rebuild it"
    try:
        return json.loads(read_bounded(path, limit, what, more))
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} ({what}) is not valid JSON ({e.msg} at line {e.lineno}); it was damaged "
            f"outside pwemoe. Move it away and run the command again to rebuild it."
        ) from None


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def append_line(path: str | Path, line: str) -> None:
    """Append one line (a metrics.jsonl record), flushed to disk. A kill mid-write can leave only a cut last
    line, which readers skip (the step is redone on resume). A symbolic link at `path` is refused."""
    path = refuse_link(path)
    _step("append", path)
    new = not path.exists()
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o666), "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
    if new:  # the file's entry in its directory, too
        sync_dir(path.parent)
