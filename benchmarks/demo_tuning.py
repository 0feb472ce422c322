"""Choose the demo's router-training settings on the VALIDATION split, never the test split.

`--llm`: the same for the LLM demo (`pwemoe demo --llm`; needs its LoRA experts: `make demo-llm` once).

Each variant trains on the demo's training data (the training split minus its validation carve,
`data.validation_fraction` in the demo config) and is scored with `pwemoe evaluate --split
validation`: hypervolume of PWEMoE against preference-weighted task arithmetic on the grid, with
paired-bootstrap intervals. The test split is never read. Needs the demo experts (`make demo` once).

    .venv/bin/python benchmarks/demo_tuning.py [--llm] name key=value ... [-- name key=value ...]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import yaml


def run_variant(name: str, overrides: dict, root: Path, grid: int = 6, llm: bool = False) -> dict:
    from pwemoe.recipes.evaluate import evaluate_run
    from pwemoe.recipes.train import train

    if llm:
        from pwemoe.configfile import build_config
        from pwemoe.demo.llm import converted_base, demo_precision, llm_demo_config

        cfg = llm_demo_config(Path("demo_runs_llm").resolve(), converted_base(), overrides)
        cfg.setdefault("precision", demo_precision(build_config(cfg)))  # as the demo trains and evaluates
    else:
        from pwemoe.demo.offline import demo_config

        cfg = demo_config(Path("demo_runs").resolve(), overrides)
    cfg["run_dir"] = str(root / name)
    cfg["eval"]["ta_scales"] = []  # only PWEMoE and the baselines on the same preferences
    p = root / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    run = train(p, [], overwrite=True, verbose=-1)  # replaces only this variant's earlier run files
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    s = evaluate_run(run, grid=grid, verbose=-1, split="validation")
    m, c = s["methods"], s["comparisons"]["pref_task_arithmetic"]["hypervolume"]
    return {
        "variant": name,
        **overrides,
        "train_s": round(train_s, 1),
        "eval_s": round(time.perf_counter() - t0, 1),
        "val_hv_pwemoe": round(m["pwemoe"]["hypervolume"], 4),
        "val_hv_pwta": round(m["pref_task_arithmetic"]["hypervolume"], 4),
        "val_ratio": round(c["ratio"], 4),
        "val_ratio_ci": [round(x, 4) for x in c["ratio_ci"]],
    }


def main() -> None:
    args = sys.argv[1:]
    llm = "--llm" in args
    args = [a for a in args if a != "--llm"]
    root = Path("demo_runs_llm/tuning" if llm else "demo_runs/tuning")
    root.mkdir(parents=True, exist_ok=True)
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
        print(json.dumps(run_variant(g[0], ov, root, grid=4 if llm else 6, llm=llm)), flush=True)


if __name__ == "__main__":
    main()
