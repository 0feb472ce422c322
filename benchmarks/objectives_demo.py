"""LS, EPO and Tchebycheff side by side on the demo's experts and test split, in one run.

Each objective trains the demo's routers with the demo's settings (the same steps, lr, rays and
batches), then its PWEMoE front is evaluated on the M = 6 grid of the test split (the LS run also
evaluates the baselines). Reported: training time and its ratio to LS, hypervolume with its 95%
paired-bootstrap interval, the hypervolume difference to LS with its interval (paired: the same
resampled test examples score both fronts), and EPO's LP modes and fallbacks from metrics.jsonl.
Each variant is paired with LS (`ls`), or with the LS run of the same router init (`REFERENCE`).
Needs the demo experts (`make demo` once).

    .venv/bin/python benchmarks/objectives_demo.py [--steps 100] [--only ls,epo_norm] [--reuse ls,ls_pref]
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
    # routers that start at preference-weighted task arithmetic, lambda(r) = init_lambda * k * r = r
    "ls_pref": {"train.objective": "ls", "model.router_init": "preference", "model.init_lambda": 1 / 3},
    "epo_pref": {"train.objective": "epo", "model.router_init": "preference", "model.init_lambda": 1 / 3},
}
# epo_pref given LS's wall-clock: 100 / 1.37 steps (EPO's step / LS's, benchmarks/objective_step.py)
VARIANTS["epo_pref_73"] = {**VARIANTS["epo_pref"], "train.steps": 73}
# the run each variant's hypervolume difference is paired with (default: ls)
REFERENCE = {"epo_pref": "ls_pref", "epo_pref_73": "ls_pref"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="router steps (default: the demo's)")
    ap.add_argument("--only", default=",".join(VARIANTS))
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--json", default="demo_runs/objectives/objectives.json")
    ap.add_argument("--ls-run", help="take LS from this evaluated run (e.g. demo_runs/run, the demo's own LS run)")
    ap.add_argument(
        "--reuse",
        default="",
        help="variants trained and evaluated earlier in demo_runs/objectives (times from --json), e.g. ls,ls_pref",
    )
    args = ap.parse_args()
    from pwemoe.demo.offline import demo_config
    from pwemoe.intervals import accuracy_samples, interval
    from pwemoe.pareto import hypervolume
    from pwemoe.recipes.evaluate import evaluate_run
    from pwemoe.recipes.train import train
    from pwemoe.results import ResultStore

    root = Path("demo_runs/objectives").resolve()
    root.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.only.split(",") if n]
    out, fronts = {}, {}
    reused = {"ls": Path(args.ls_run)} if args.ls_run else {}  # the demo run is LS with the demo's settings
    for n in filter(None, args.reuse.split(",")):  # variants trained and evaluated by an earlier invocation
        reused[n] = root / n
    earlier = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
    for name, run in reused.items():
        s = json.loads((run / "summary.json").read_text())
        store = ResultStore(run)
        rows = [r for r in store.rows if r["method"] == "pwemoe" and r.get("accuracy_ci")]
        fronts[name] = (rows, store.correctness(rows, s["tasks"]))
        was = earlier.get(name, {}) if run == root / name else {}
        out[name] = {
            "options": {"from": str(run), **was.get("options", {})},
            "train_s": was.get("train_s"),
            "steps": was.get("steps"),
            "hv": s["methods"]["pwemoe"]["hypervolume"],
            "hv_ci": s["methods"]["pwemoe"].get("hypervolume_ci"),
            "epo": was.get("epo", {}),
        }
    names = [n for n in names if n not in reused]
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
    if "ls" in fronts:  # paired bootstrap of each front's HV difference to its reference's: one draw scores all
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
            ref = REFERENCE.get(n, "ls")
            if n != "ls" and ref in hv:
                d = hv[n] - hv[ref]
                out[n]["reference"] = ref
                out[n]["hv_minus_ref"] = out[n]["hv"] - out[ref]["hv"]
                out[n]["hv_minus_ref_ci"] = [float(x) for x in interval(d, 0.95)]
                if out[ref]["train_s"]:
                    out[n]["train_time_vs_ref"] = round(out[n]["train_s"] / out[ref]["train_s"], 2)
    Path(args.json).write_text(json.dumps(out, indent=1))
    head = f"{'HV':>9}{'95% CI':>20}{'HV - ref':>10}{'95% CI':>22}  ref  LP"
    print(f"\n{'objective':<18}{'train s':>9}{'vs ref':>7}{head}")
    for n, e in out.items():
        if n == "pref_task_arithmetic":
            continue
        ci = f"[{e['hv_ci'][0]:.4f}, {e['hv_ci'][1]:.4f}]" if e.get("hv_ci") else ""
        d = e.get("hv_minus_ref")
        dci = f"[{e['hv_minus_ref_ci'][0]:+.4f}, {e['hv_minus_ref_ci'][1]:+.4f}]" if d is not None else ""
        print(
            f"{n:<18}{e['train_s'] or '':>9}{e.get('train_time_vs_ref', ''):>7}{e['hv']:>9.4f}{ci:>20}"
            f"{(f'{d:+.4f}' if d is not None else ''):>10}{dci:>22}  {e.get('reference', '')}  {e['epo'] or ''}"
        )
    if "pref_task_arithmetic" in out:
        print(f"pref.-weighted TA: HV {out['pref_task_arithmetic']['hv']:.4f} {out['pref_task_arithmetic']['hv_ci']}")


if __name__ == "__main__":
    main()
