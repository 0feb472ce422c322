"""LS, EPO and Tchebycheff side by side on the demo's experts and test split, in one run.

Each objective trains the demo's routers with the demo's settings (the same steps, lr, rays and
batches), then its PWEMoE front is evaluated on the M = 6 grid of the test split (the LS run also
evaluates the baselines). Reported: training time and its ratio to LS, hypervolume with its 95%
paired-bootstrap interval, the hypervolume difference to LS with its interval (paired: the same
resampled test examples score both fronts), and EPO's LP modes and fallbacks from metrics.jsonl.
Needs the demo experts (`make demo` once).

    .venv/bin/python benchmarks/objectives_demo.py [--steps 100] [--only ls,epo_norm]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import yaml

VARIANTS = {
    "ls": {"train.objective": "ls"},
    "epo": {"train.objective": "epo"},
    "epo_norm": {"train.objective": "epo", "train.objective_args": {"normalize": "initial", "floor": 0.05}},
    "tchebycheff": {"train.objective": "tchebycheff"},
    # EPO that descends once the losses are near the ray (KL eps 0.1) and asks for at most 8:1 ratios
    "epo_relaxed": {"train.objective": "epo", "train.objective_args": {"eps": 0.1, "floor": 0.1}},
    "epo_relaxed_norm": {
        "train.objective": "epo",
        "train.objective_args": {"eps": 0.1, "floor": 0.1, "normalize": "initial"},
    },
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="router steps (default: the demo's)")
    ap.add_argument("--only", default=",".join(VARIANTS))
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--json", default="demo_runs/objectives/objectives.json")
    ap.add_argument("--ls-run", help="take LS from this evaluated run (e.g. demo_runs/run, the demo's own LS run)")
    args = ap.parse_args()
    from pwemoe.bootstrap import accuracy_samples, interval
    from pwemoe.demo.offline import demo_config
    from pwemoe.pareto import hypervolume
    from pwemoe.recipes.evaluate import evaluate_run
    from pwemoe.recipes.train import train
    from pwemoe.results import ResultStore

    root = Path("demo_runs/objectives").resolve()
    root.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.only.split(",") if n]
    out, fronts = {}, {}
    if args.ls_run:  # the demo run is the LS variant with the demo's settings
        run = Path(args.ls_run)
        s = json.loads((run / "summary.json").read_text())
        store = ResultStore(run)
        rows = [r for r in store.rows if r["method"] == "pwemoe" and r.get("accuracy_ci")]
        fronts["ls"] = (rows, store.correctness(rows, s["tasks"]))
        out["ls"] = {
            "options": {"from": str(run)},
            "train_s": None,
            "steps": None,
            "hv": s["methods"]["pwemoe"]["hypervolume"],
            "hv_ci": s["methods"]["pwemoe"].get("hypervolume_ci"),
            "epo": {},
        }
        names = [n for n in names if n != "ls"]
    for name in names:
        ov = dict(VARIANTS[name])
        if args.steps:
            ov["train.steps"] = args.steps
        cfg = demo_config(Path("demo_runs").resolve(), ov)
        cfg["run_dir"] = str(root / name)
        p = root / f"{name}.yaml"
        p.write_text(yaml.safe_dump(cfg))
        t0 = time.perf_counter()
        run = train(p, [], overwrite=True, verbose=-1)
        train_s = time.perf_counter() - t0
        s = evaluate_run(run, grid=6, baselines=name == "ls", verbose=-1)
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        last = next((x for x in reversed(lines) if "loss" in x), {})
        store = ResultStore(run)
        rows = [r for r in store.rows if r["method"] == "pwemoe"]
        fronts[name] = (rows, store.correctness(rows, s["tasks"]))
        out[name] = {
            "options": ov,
            "train_s": round(train_s, 1),
            "steps": cfg["train"]["steps"],
            "hv": s["methods"]["pwemoe"]["hypervolume"],
            "hv_ci": s["methods"]["pwemoe"].get("hypervolume_ci"),
            "epo": {k: last[k] for k in ("epo_bal", "epo_dom", "epo_fallbacks", "epo_calls") if k in last},
        }
        if name == "ls":
            pt = s["methods"]["pref_task_arithmetic"]
            out["pref_task_arithmetic"] = {"hv": pt["hypervolume"], "hv_ci": pt.get("hypervolume_ci")}
        print(json.dumps({name: out[name]}), flush=True)
    if "ls" in fronts:  # paired bootstrap of each front's HV difference to LS's: one draw scores all fronts
        tasks = list(next(iter(fronts.values()))[1])
        order = list(fronts)
        stacked = {t: np.concatenate([fronts[n][1][t] for n in order]) for t in tasks}
        samples = accuracy_samples(stacked, args.resamples, seed=0)
        acc = np.stack([samples[t] for t in tasks], axis=-1)  # [B, rows, k]
        spans, start = {}, 0
        for n in order:
            spans[n] = slice(start, start + len(fronts[n][0]))
            start += len(fronts[n][0])
        hv = {n: np.array([hypervolume(a[spans[n]], 0.0) for a in acc]) for n in order}
        for n in order:
            if n != "ls":
                d = hv[n] - hv["ls"]
                out[n]["hv_minus_ls"] = out[n]["hv"] - out["ls"]["hv"]
                out[n]["hv_minus_ls_ci"] = [float(x) for x in interval(d, 0.95)]
                if out["ls"]["train_s"]:
                    out[n]["train_time_vs_ls"] = round(out[n]["train_s"] / out["ls"]["train_s"], 2)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"\n{'objective':<14}{'train s':>9}{'vs LS':>7}{'HV':>9}{'95% CI':>20}{'HV - LS':>10}{'95% CI':>22}  LP")
    for n, e in out.items():
        if n == "pref_task_arithmetic":
            continue
        ci = f"[{e['hv_ci'][0]:.4f}, {e['hv_ci'][1]:.4f}]" if e.get("hv_ci") else ""
        d = e.get("hv_minus_ls")
        dci = f"[{e['hv_minus_ls_ci'][0]:+.4f}, {e['hv_minus_ls_ci'][1]:+.4f}]" if d is not None else ""
        print(
            f"{n:<14}{e['train_s'] or '':>9}{e.get('train_time_vs_ls', ''):>7}{e['hv']:>9.4f}{ci:>20}"
            f"{(f'{d:+.4f}' if d is not None else ''):>10}{dci:>22}  {e['epo'] or ''}"
        )
    if "pref_task_arithmetic" in out:
        print(f"pref.-weighted TA: HV {out['pref_task_arithmetic']['hv']:.4f} {out['pref_task_arithmetic']['hv_ci']}")


if __name__ == "__main__":
    main()
