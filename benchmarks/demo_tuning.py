"""Choose the demo's router-training settings WITHOUT the test split.

Each variant trains on the demo's training split and is scored on a slice of that same
training split (test_split=train): hypervolume of PWEMoE vs preference-weighted task
arithmetic on the M=4 grid. The test split is never read. Needs the demo experts
(run `make demo` once).

    .venv/bin/python benchmarks/demo_tuning.py name key=value ... [-- name key=value ...]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import yaml


def run_variant(name: str, overrides: dict, root: Path) -> dict:
    from pwemoe.demo.offline import demo_config
    from pwemoe.recipes.evaluate import evaluate_run
    from pwemoe.recipes.train import train

    cfg = demo_config(Path("demo_runs").resolve(), overrides)
    for t in cfg["tasks"]:
        t["data"]["test_split"] = "train"  # selection on training data only
        t["data"]["max_test_samples"] = 150
    cfg["run_dir"] = str(root / name)
    cfg["eval"]["ta_scales"] = []
    p = root / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    run = train(p, [], overwrite=True, verbose=-1)  # replaces only this variant's earlier run files
    s = evaluate_run(run, grid=4, verbose=-1)
    m = s["methods"]
    return {
        "variant": name,
        **overrides,
        "train_s": round(time.perf_counter() - t0, 1),
        "hv_pwemoe": round(m["pwemoe"]["hypervolume"], 4),
        "hv_pwta": round(m["pref_task_arithmetic"]["hypervolume"], 4),
    }


def main() -> None:
    root = Path("demo_runs/tuning")
    root.mkdir(parents=True, exist_ok=True)
    args = sys.argv[1:]
    groups, cur = [], []
    for a in args + ["--"]:
        if a == "--":
            if cur:
                groups.append(cur)
            cur = []
        else:
            cur.append(a)
    for g in groups:
        ov = {k: yaml.safe_load(v) for k, v in (x.split("=", 1) for x in g[1:])}
        print(json.dumps(run_variant(g[0], ov, root)), flush=True)


if __name__ == "__main__":
    main()
