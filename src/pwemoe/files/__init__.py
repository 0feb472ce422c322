"""Files a run owns: atomic writes, the run-directory lock, output directories replaced whole, content hashes.

Every file pwemoe writes goes through `atomic_write` (a reader, or a resumed run after SIGKILL, sees either the
old file or the new one, never half of it) or `append_line`; every output directory through `staged_dir` (a
reader sees the complete previous output or the complete new one, never a mix). None of them writes through or
replaces a symbolic link inside a run or an output directory, and files get the modes the umask gives, as files
written by `save_pretrained` do.

    writes   one file: atomic_write*, append_line, read_bounded, read_json, refuse_link, subdir, the fsyncs
    rundir   the run directory: its file names, RunLock, clear_run_dir, remove_leftovers
    outputs  output directories: staged_dir, publish_dir, prepare_output, recover_output
"""

from __future__ import annotations

from .outputs import MANIFEST, STAGED, prepare_output, publish_dir, recover_output, staged_dir
from .rundir import (
    BEST_ROUTERS,
    CONFIG,
    CORRECT,
    LOCK,
    METRICS,
    PLOT_KINDS,
    RESULTS,
    ROUTERS,
    RUN_FILES,
    RUN_MARKER,
    SELECTIONS,
    STATE,
    RunDirInUse,
    RunLock,
    clear_run_dir,
    is_run_dir,
    is_selection_record,
    plot_file_name,
    remove_leftovers,
    require_run_dir,
)
from .writes import (
    MAX_RESULTS_FILE,
    MAX_SMALL_FILE,
    append_line,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    cache_dir,
    file_sha256,
    make_dirs,
    read_bounded,
    read_json,
    refuse_link,
    subdir,
    sync_dir,
    sync_file,
)

__all__ = [
    "BEST_ROUTERS",
    "CONFIG",
    "CORRECT",
    "LOCK",
    "MAX_RESULTS_FILE",
    "MAX_SMALL_FILE",
    "MANIFEST",
    "METRICS",
    "PLOT_KINDS",
    "RESULTS",
    "ROUTERS",
    "RUN_FILES",
    "RUN_MARKER",
    "SELECTIONS",
    "STAGED",
    "STATE",
    "RunDirInUse",
    "RunLock",
    "append_line",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "cache_dir",
    "clear_run_dir",
    "file_sha256",
    "is_run_dir",
    "is_selection_record",
    "make_dirs",
    "plot_file_name",
    "prepare_output",
    "publish_dir",
    "read_bounded",
    "read_json",
    "recover_output",
    "refuse_link",
    "remove_leftovers",
    "require_run_dir",
    "staged_dir",
    "subdir",
    "sync_dir",
    "sync_file",
]
