"""Files pwemoe writes and reads one at a time: atomic writes, appended lines, links refused, content hashes.

Every file pwemoe writes goes through `atomic_write` (a reader, or a resumed run after SIGKILL, sees either the
old file or the new one, never half of it) or `append_line`. Neither writes through or replaces a symbolic link,
and files get the modes the umask gives, as files written by `save_pretrained` do.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o666), "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
