"""What syncing outputs to disk costs: `train`, `evaluate` and two `export --overwrite` of a tiny run, with the
syncs (pwemoe's default: every published file, then its directory, is fsynced) and without them (os.fsync made a
no-op in this process), alternated in one process so both see the same machine. Also the count of fsync calls and
the time spent inside them.

The tiny run (a 2-layer BERT, two experts, 200 training examples per task, the tests' fixture) computes little, so
the syncs weigh more here than in a real run: an upper bound on their share. Results are on the filesystem of
--where (default: a temporary directory).

    .venv/bin/python benchmarks/fsync_cost.py [--repeats 3] [--where DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REAL_FSYNC = os.fsync


class Counting:
    """os.fsync that counts its calls and their time; `sync=False` skips the syscall (the run without syncs)."""

    def __init__(self, sync: bool) -> None:
        self.sync, self.calls, self.seconds = sync, 0, 0.0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.sync:
            t = time.perf_counter()
            REAL_FSYNC(fd)
            self.seconds += time.perf_counter() - t


def one_cycle(cfg: Path, run: Path, out: Path, sync: bool) -> dict:
    from pwemoe.cli import main

    counter = Counting(sync)
    os.fsync = counter
    try:
        times = {}
        t = time.perf_counter()
        assert main(["train", str(cfg), "--overwrite"]) == 0
        times["train"] = time.perf_counter() - t
        t = time.perf_counter()
        assert main(["evaluate", str(run), "--grid", "5"]) == 0
        times["evaluate"] = time.perf_counter() - t
        t = time.perf_counter()
        for pref in ("0.7,0.3", "0.3,0.7"):
            assert main(["export", str(run), "--preference", pref, "--out", str(out), "--overwrite"]) == 0
        times["export x2"] = time.perf_counter() - t
    finally:
        os.fsync = REAL_FSYNC
    times["total"] = sum(times.values())
    return {"sync": sync, "seconds": times, "fsync_calls": counter.calls, "fsync_seconds": counter.seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="cycles with and without syncs, alternated")
    ap.add_argument("--where", type=Path, help="where the run and the export are written (its filesystem counts)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.fixtures
    import torch

    from tests.fixtures import build_text_setup, write_short_run_config

    torch.set_num_threads(2)
    where = Path(tempfile.mkdtemp(prefix="pwemoe-fsync-", dir=args.where))
    try:
        base = build_text_setup(where / "setup")
        run, out = where / "run", where / "export"
        cfg = write_short_run_config(base, where / "run.yaml", run, steps=30, save_interval=10)
        one_cycle(cfg, run, out, True)  # warm-up: imports, the datasets' caches
        cycles = [one_cycle(cfg, run, out, i % 2 == 0) for i in range(2 * args.repeats)]
    finally:
        shutil.rmtree(where, ignore_errors=True)
    summary = {}
    for sync in (True, False):
        mine = [c for c in cycles if c["sync"] == sync]
        summary["with syncs" if sync else "without"] = {
            k: round(statistics.median(c["seconds"][k] for c in mine), 3) for k in mine[0]["seconds"]
        } | {
            "fsync_calls": mine[0]["fsync_calls"],
            "fsync_seconds": round(statistics.median(c["fsync_seconds"] for c in mine), 3),
        }
    on, off = summary["with syncs"], summary["without"]
    report = {
        "repeats": args.repeats,
        "filesystem_of": str(args.where or tempfile.gettempdir()),
        "median_seconds": summary,
        "overhead_total_s": round(on["total"] - off["total"], 3),
        "overhead_ratio": round(on["total"] / off["total"], 3),
        "cycles": cycles,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print("\n| | with syncs | without | |\n|---|---|---|---|")
    for k in on:
        if k not in ("fsync_calls", "fsync_seconds"):
            print(f"| {k} (s, median) | {on[k]:.2f} | {off[k]:.2f} | {on[k] / off[k]:.3f}x |")
    print(f"| fsync calls per cycle | {on['fsync_calls']} | (0 made) | |")
    print(f"| time inside fsync (s, median) | {on['fsync_seconds']:.2f} | - | |")


if __name__ == "__main__":
    main()
