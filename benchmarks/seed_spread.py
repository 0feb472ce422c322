"""The spread of the demos' headline result over the routers' training seed, the experts fixed.

For each demo (`minilm`: `pwemoe demo`; `llm`: `pwemoe demo --llm`) and each seed, the routers are trained with the
demo's own config and `train.seed` = seed (the preferences drawn, the batches, the routers' initial weights), then
evaluated on the test split on the demo's grid: PWEMoE's hypervolume, its ratio to the training-free
preference-weighted baseline's with the 95% paired-bootstrap interval, and whether the interval of the difference
excludes zero. Then the median and range over the seeds.

The experts are the demo's own, read from its work directory (run the demo once first: `make demo`, `make
demo-llm`). Seed 0 is the demo's config as it is, so the demo's own run is reused for it when it holds a finished
training of that config. The baselines do not depend on the seed: their rows are computed once, in the first seed's
run, and copied into the others' results (evaluate reuses a row only when its inputs digest matches).

Each seed's row is written to the output file as soon as it is done, so an interrupted run keeps what it finished;
a rerun with the same --out skips the seeds already there.

    .venv/bin/python benchmarks/seed_spread.py [--demo minilm|llm|both] [--seeds 0,1,2,3,4] [--out FILE]

`--workdir DIR` reads the experts of a demo run elsewhere (one demo at a time) and `--set key=value` overrides the
demo's config (both for a quick check of this script on small slices, e.g. a `run_demo` with overrides).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORKDIRS = {"minilm": Path("demo_runs"), "llm": Path("demo_runs_llm")}


def demo_cfg(demo: str, overrides: dict) -> tuple[dict, int]:
    """The demo's config (its experts, data and settings; run_dir left to the caller) and its grid."""
    if demo == "llm":
        from pwemoe.configfile import build_config
        from pwemoe.demo.llm import converted_base, demo_precision, llm_demo_config

        cfg = llm_demo_config(WORKDIRS[demo].resolve(), converted_base(), overrides)
        cfg.setdefault("precision", demo_precision(build_config(cfg)))  # as the demo trains and evaluates
    else:
        from pwemoe.demo.offline import demo_config

        cfg = demo_config(WORKDIRS[demo].resolve(), overrides)
    return cfg, int(cfg["eval"]["grid"])


def copy_baseline_rows(src: Path, dst: Path) -> None:
    """The baselines' rows (and their per-example correctness) of one run's results into another run of the same
    experts, data and precision: evaluate reuses them there (their inputs digests match) instead of computing them."""
    from pwemoe.files import CORRECT, RESULTS, atomic_write_json

    rows = [r for r in json.loads((src / RESULTS).read_text()) if r["method"] != "pwemoe"]
    correct = json.loads((src / CORRECT).read_text()) if (src / CORRECT).is_file() else {}
    atomic_write_json(dst / RESULTS, rows)
    digests = {r["inputs"] for r in rows}
    atomic_write_json(dst / CORRECT, {k: v for k, v in correct.items() if v.get("inputs") in digests})


def one_seed(demo: str, seed: int, root: Path, baseline_run: Path | None, overrides: dict) -> tuple[dict, Path]:
    from pwemoe.demo.offline import finished_run
    from pwemoe.recipes.evaluate import evaluate_run
    from pwemoe.recipes.train import train

    cfg, grid = demo_cfg(demo, overrides)
    cfg["train"]["seed"] = seed
    demo_run = Path(cfg["run_dir"])
    run = root / f"seed{seed}"
    cfg["run_dir"] = str(run)
    path = root / f"seed{seed}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.perf_counter()
    as_demo = root / "seed0-as-demo.yaml"  # seed 0's config in the demo's own run directory
    if seed == 0:
        as_demo.write_text(yaml.safe_dump(dict(cfg, run_dir=str(demo_run)), sort_keys=False))
    if seed == 0 and finished_run(demo_run, as_demo):
        run, reused = demo_run, True  # the demo's own run is this seed's (the same config, trained to its end)
    else:
        reused = False
        if not finished_run(run, path):
            train(path, [], overwrite=True, verbose=-1)  # replaces only this script's earlier run of the seed
            if baseline_run is not None:
                copy_baseline_rows(baseline_run, run)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    s = evaluate_run(run, grid=grid, verbose=-1)
    c = s["comparisons"]["pref_task_arithmetic"]["hypervolume"]
    row = {
        "demo": demo,
        "seed": seed,
        "run": str(run) + (" (the demo's own)" if reused else ""),
        "hv_pwemoe": round(s["methods"]["pwemoe"]["hypervolume"], 4),
        "hv_baseline": round(s["methods"]["pref_task_arithmetic"]["hypervolume"], 4),
        "ratio": round(c["ratio"], 4),
        "ratio_ci": [round(x, 4) for x in c["ratio_ci"]],
        "difference_ci": [round(x, 4) for x in c["difference_ci"]],
        "excludes_zero": c["interval_excludes_zero"],
        "train_s": round(train_s, 1),
        "eval_s": round(time.perf_counter() - t0, 1),
    }
    return row, run


def spread(rows: list[dict]) -> dict:
    r = [x["ratio"] for x in rows]
    return {
        "seeds": len(r),
        "median_ratio": round(statistics.median(r), 4),
        "range": [min(r), max(r)],
        "intervals_excluding_zero": sum(x["excludes_zero"] for x in rows),
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| demo | seed | PWEMoE HV | baseline HV | ratio [95% CI] | difference [95% CI] | excludes zero |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in rows:
        lo, hi = x["ratio_ci"]
        dlo, dhi = x["difference_ci"]
        lines.append(
            f"| {x['demo']} | {x['seed']} | {x['hv_pwemoe']:.4f} | {x['hv_baseline']:.4f} | {x['ratio']:.3f} "
            f"[{lo:.3f}, {hi:.3f}] | [{dlo:+.4f}, {dhi:+.4f}] | {'yes' if x['excludes_zero'] else 'no'} |"
        )
    for demo in dict.fromkeys(x["demo"] for x in rows):
        s = spread([x for x in rows if x["demo"] == demo])
        lines.append(
            f"\n{demo}: median ratio {s['median_ratio']:.3f} over {s['seeds']} seeds, range {s['range'][0]:.3f}–"
            f"{s['range'][1]:.3f}; the interval of the difference excludes zero for {s['intervals_excluding_zero']} "
            f"of {s['seeds']}"
        )
    return "\n".join(lines)


def main() -> None:
    from pwemoe.devices import numerics_description
    from pwemoe.files import atomic_write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", choices=["minilm", "llm", "both"], default="both")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated router-training seeds")
    ap.add_argument("--out", default="seed_spread.json")
    ap.add_argument("--workdir", help="the demo's work directory (default demo_runs or demo_runs_llm)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the demo's config")
    a = ap.parse_args()
    if a.workdir:
        if a.demo == "both":
            raise SystemExit("--workdir needs one --demo (minilm or llm)")
        WORKDIRS[a.demo] = Path(a.workdir)
    overrides = {k: yaml.safe_load(v) for k, v in (x.split("=", 1) for x in a.set)}
    import torch

    seeds = [int(x) for x in a.seeds.split(",")]
    out = Path(a.out)
    done = json.loads(out.read_text())["rows"] if out.is_file() else []
    machine = numerics_description(torch.device("cpu"))
    for demo in ["minilm", "llm"] if a.demo == "both" else [a.demo]:
        root = WORKDIRS[demo].resolve() / "seeds"
        root.mkdir(parents=True, exist_ok=True)
        baseline_run = None
        for seed in seeds:
            if any(x["demo"] == demo and x["seed"] == seed for x in done):
                continue
            row, run = one_seed(demo, seed, root, baseline_run, overrides)
            baseline_run = baseline_run or run
            done.append(row)
            print(json.dumps(row), flush=True)
            summary = {d: spread([x for x in done if x["demo"] == d]) for d in dict.fromkeys(x["demo"] for x in done)}
            atomic_write_json(out, {"machine": machine, "rows": done, "spread": summary})
    print(f"\n{machine}\n")
    print(markdown(done))


if __name__ == "__main__":
    main()
