"""`pwemoe select` measured: the demo query's wall time and models evaluated, and how often a certified choice also
meets its constraints on the test split (which the choice never read), over a few queries and split seeds.

Works on a copy of the run without its validation rows and selections (the run itself is never written): the
demo's own query first, cold (nothing cached: its wall time and the models it computes are what `pwemoe demo`
spends), then the other queries, each with a few seeds of the search/certification split (candidates cached
by earlier queries are reused, so only the first row's time is a cold one). Per row: the status, the chosen r,
the objective on the certification part and on the test split, whether every constraint holds on the test
split, the wall time and the models computed. Needs the demo's run (`make demo` once); nothing else should run
meanwhile.

    .venv/bin/python benchmarks/select_table.py [--run demo_runs/run] [--seeds 0 1 2] [--json out.json]
    .venv/bin/python benchmarks/select_table.py --tiny     # a tiny random run (seconds): shows the script works
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

# (maximize, minimize, require, confidence, budget, grid); the first is the demo's own query
DEMO_QUERIES = [
    ("bbc_news", None, ["rt_sentiment >= 0.8 expert", "tweet_sentiment >= 0.8 expert"], 0.9, 8, 3),
    ("rt_sentiment", None, ["bbc_news >= 0.85", "tweet_sentiment >= 0.8 expert"], 0.9, 12, None),
    ("tweet_sentiment", None, ["rt_sentiment >= 0.85 expert", "bbc_news >= 0.8 expert"], 0.95, 12, None),
    ("mean", None, ["bbc_news >= 0.8"], 0.95, 12, None),
    ("bbc_news", None, ["rt_sentiment >= expert - 0.1", "tweet_sentiment >= expert - 0.1"], 0.9, 12, None),
]
TINY_QUERIES = [
    ("color", None, ["polarity >= 0.9 expert"], 0.95, 6, None),
    ("polarity", None, ["color >= 0.5"], 0.9, 6, None),
    ("mean", None, ["polarity >= 0.8"], 0.9, 6, None),
]


def cold_copy(run: Path, dest: Path) -> Path:
    """The run's files without its validation rows, selections, plots and reports (what `select` may write)."""
    skip = {
        "validation",
        "selections",
        "plots",
        "exports",
        "report.html",
        "report.md",
        ".pwemoe.lock",
        ".pwemoe.lock.flock",
    }
    dest.mkdir(parents=True)
    for p in run.iterdir():
        if p.name not in skip and p.is_file():
            shutil.copy2(p, dest / p.name)
    cfg = (dest / "config.yaml").read_text()
    (dest / "config.yaml").write_text(cfg.replace(f"run_dir: {run.resolve()}", f"run_dir: {dest}"))
    return dest


def tiny_run(root: Path) -> Path:
    """A tiny trained run with validation data (the tests' fixture), built under root."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.fixtures
    from tests.fixtures import build_text_setup, train_validation_run

    return train_validation_run(build_text_setup(root / "setup"), root)


def measure(run: Path, queries: list[tuple], seeds: list[int]) -> list[dict]:
    from pwemoe.selection import Settings, select_run

    rows = []
    for i, (maximize, minimize, require, confidence, budget, grid) in enumerate(queries):
        for seed in seeds if i else seeds[:1]:  # the demo's query once, cold
            t0 = time.perf_counter()
            s = Settings(confidence, budget, grid, seed)
            rec = select_run(run, maximize, minimize, require, s, name=f"bench-{i}-{seed}", print_summary=False)
            wall = time.perf_counter() - t0
            point = rec["chosen"] or rec["closest"]
            test = rec.get("test")
            rows.append(
                {
                    "query": rec["query"]["objective"] + " s.t. " + ", ".join(rec["query"]["require"]),
                    "confidence": confidence,
                    "seed": seed,
                    "status": rec["status"],
                    "r": [round(x, 3) for x in point["preference"]],
                    "objective_cert": (rec.get("certification") or {}).get("objective"),
                    "objective_test": test["objective"] if test else None,
                    "test_meets_all": all(c["met"] for c in test["constraints"]) if test else None,
                    "test_values": [round(c["value"], 4) for c in test["constraints"]] if test else None,
                    "candidates": rec["evaluation"]["candidates"],
                    "models_computed": rec["evaluation"]["computed"],
                    "wall_s": round(wall, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    def f(x: float | None) -> str:
        return "" if x is None else f"{x:.3f}"

    head = ["query", "conf.", "seed", "status", "r", "objective (cert.)", "objective (test)", "test meets all"]
    out = ["| " + " | ".join(head + ["models computed", "wall s"]) + " |", "|---" * (len(head) + 2) + "|"]
    for r in rows:
        meets = "" if r["test_meets_all"] is None else ("yes" if r["test_meets_all"] else "no")
        out.append(
            f"| {r['query']} | {r['confidence']} | {r['seed']} | {r['status']} | {tuple(r['r'])} | "
            f"{f(r['objective_cert'])} | {f(r['objective_test'])} | {meets} | {r['models_computed']} | {r['wall_s']} |"
        )
    certified = [r for r in rows if r["status"] == "certified"]
    held = sum(bool(r["test_meets_all"]) for r in certified)
    out.append(
        f"\n{len(certified)} of {len(rows)} choices certified; {held} of those meet every constraint on the test split."
    )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="demo_runs/run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tiny", action="store_true", help="a tiny random run built in a temporary directory")
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args()
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        if args.tiny:
            run, queries = tiny_run(Path(d)), TINY_QUERIES
        else:
            run, queries = cold_copy(Path(args.run), Path(d) / "run"), DEMO_QUERIES
        rows = measure(run, queries, args.seeds)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
