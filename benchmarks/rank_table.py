"""Accuracy vs rank vs memory of low-rank task vectors (`model.task_vector_rank`) on the offline text demo.

For each rank (and the dense task vectors, "full"), the demo's routers are trained with the demo's own
settings on its training data and evaluated on the test grid (PWEMoE and the experts, which normalise;
no other baselines). Reported per rank: the bytes of stored task vectors (T, or the A/B factors and
the dense biases / norms that stay uncompressed), the hypervolume with its 95% interval, the mean
normalised accuracy of the best grid point, and the training time. Needs the demo's experts
(`make demo` once). One rank at a time, in this process; nothing else should run meanwhile.

    .venv/bin/python benchmarks/rank_table.py [--ranks 4 16 64 full] [--out demo_runs/rank_table.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml


def stored_mb(run: Path) -> dict[str, float]:
    """MB of task-vector storage of the run's upcycled model, and of the model's targets' weights."""
    from pwemoe.routing import ensembling_modules
    from pwemoe.runs import open_run

    wb, _ = open_run(run, load_test=False)
    mods = [m for _, m in ensembling_modules(wb.backbone)]
    tv = sum(t.numel() * t.element_size() for m in mods for t in m.stored_tensors())
    theta = sum(p.numel() * p.element_size() for m in mods for p in m.base_layer.parameters())
    return {"task_vectors_mb": tv / 2**20, "targets_theta0_mb": theta / 2**20}


def run_rank(rank: str, root: Path, grid: int) -> dict:
    from pwemoe.demo.offline import demo_config
    from pwemoe.recipes.evaluate import evaluate_run
    from pwemoe.recipes.train import train

    overrides = {} if rank == "full" else {"model.task_vector_rank": int(rank)}
    cfg = demo_config(Path("demo_runs").resolve(), overrides)
    cfg["run_dir"] = str(root / f"rank_{rank}")
    p = root / f"rank_{rank}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    run = train(p, [], overwrite=True, verbose=-1)
    train_s = time.perf_counter() - t0
    s = evaluate_run(run, grid=grid, baselines=False, verbose=-1)
    m = s["methods"]["pwemoe"]
    return {
        "rank": rank,
        **{k: round(v, 2) for k, v in stored_mb(run).items()},
        "hypervolume": round(m["hypervolume"], 4),
        "hypervolume_ci": [round(x, 4) for x in m.get("hypervolume_ci", [])],
        "hypervolume_normalized": round(m.get("hypervolume_normalized", float("nan")), 4),
        "best_mean_normalized": round(m.get("mean_normalized_accuracy", float("nan")), 4),
        "train_s": round(train_s, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", nargs="+", default=["4", "16", "64", "full"])
    ap.add_argument("--grid", type=int, default=6)
    ap.add_argument("--out", default="demo_runs/rank_table.json")
    args = ap.parse_args()
    root = Path("demo_runs/rank_table")
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in args.ranks:
        rows.append(run_rank(r, root, args.grid))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| rank | task vectors MB | hypervolume [95% CI] | normalised HV | best mean normalised acc. | train s |")
    print("|---|---|---|---|---|---|")
    for x in rows:
        ci = x["hypervolume_ci"]
        span = f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
        print(
            f"| {x['rank']} | {x['task_vectors_mb']:.1f} | {x['hypervolume']:.4f}{span} | "
            f"{x['hypervolume_normalized']:.4f} | {x['best_mean_normalized']:.4f} | {x['train_s']} |"
        )
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
