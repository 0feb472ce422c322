"""Step time of each objective against LS on the demo's experts, interleaved in one process.

Every variant is the training loop's own step (`TrainRecipe.step`: merge, forwards, router
gradients, the LP for EPO, Adam) with the demo's settings (4 preferences per step, batch 16 per
task, the CPU's forward chunking). Inputs are encoded before timing, so the figures are the
step alone. The variants alternate in blocks of `--block` consecutive steps (LS x4, EPO x4, LS x4,
...), so the machine's drift hits them alike, as it does within one run; the first step of each
block re-warms caches and the allocator after the switch and is not timed. Reported: the median
timed step and its ratio to the first variant's median.
Needs the demo experts (`make demo` once).

    .venv/bin/python benchmarks/objective_step.py [--rounds 4] [--block 4] [--variants ls epo epo_forwards]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

VARIANTS = {
    "ls": {"train.objective": "ls"},
    "epo": {"train.objective": "epo"},  # task_gradients: the default
    "epo_segments": {"train.objective": "epo", "train.task_gradients": "segments"},
    "epo_forwards": {"train.objective": "epo", "train.task_gradients": "forwards"},
    "tchebycheff": {"train.objective": "tchebycheff"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--block", type=int, default=4, help="consecutive steps of one variant (the first is not timed)")
    ap.add_argument("--variants", nargs="+", default=["ls", "epo_segments", "epo_forwards"])
    ap.add_argument("--json", default="demo_runs/objective_step.json")
    args = ap.parse_args()
    import torch
    import yaml

    from pwemoe.configfile import read_config
    from pwemoe.demo.offline import demo_config
    from pwemoe.recipes.train import TrainRecipe

    root = Path("demo_runs/objective_step").resolve()
    root.mkdir(parents=True, exist_ok=True)
    recipes = {}
    for name in args.variants:
        cfg = demo_config(Path("demo_runs").resolve(), VARIANTS[name])
        cfg["run_dir"] = str(root / name)  # never written: steps are driven by hand
        p = root / f"{name}.yaml"
        p.write_text(yaml.safe_dump(cfg))
        rec = TrainRecipe(read_config(p), root / name)
        rec.setup()
        encoder, sampler = rec._pipeline()
        it = iter(sampler)
        data = [encoder[next(it)] for _ in range(args.rounds * args.block + 1)]
        rec.step(data[0])  # warm-up
        recipes[name] = (rec, data[1:])
    times: dict[str, list[float]] = {n: [] for n in recipes}
    for j in range(args.rounds):
        for name, (rec, data) in recipes.items():
            for b in range(args.block):
                t0 = time.perf_counter()
                rec.step(data[j * args.block + b])
                if b or args.block == 1:
                    times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times[args.variants[0]])
    out = {
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "block": args.block,
        **{
            n: {
                "median_s": round(statistics.median(t), 4),
                "vs_" + args.variants[0]: round(statistics.median(t) / ref, 3),
                "steps_s": [round(x, 3) for x in t],
            }
            for n, t in times.items()
        },
    }
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
