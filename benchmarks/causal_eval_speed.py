"""Examples per second of causal-LM evaluation on a run's test split, in fp32 and bf16, and how often they agree.

The same path `pwemoe evaluate` takes: one plain copy of the upcycled model re-merged per preference, the test
split's length-sorted batches (encoded once and kept for the next model of the sweep), the decoder, then the LM head
at each row's last token. `--models` preferences of the simplex grid are evaluated in a row; examples/s counts every
task's test examples of every model, model loading excluded. Predictions (the arg-max label) of each precision are
kept, and the share of test examples where bf16 predicts what fp32 predicts is reported.

Runs against whatever `pwemoe` is importable, so the code before a change is measured by pointing PYTHONPATH at its
source tree (the script uses only functions both have):

    .venv/bin/python benchmarks/causal_eval_speed.py demo_runs_llm/run --precisions fp32 bf16 --models 4
    PYTHONPATH=/path/to/old/src .venv/bin/python benchmarks/causal_eval_speed.py demo_runs_llm/run --precisions fp32

`--whole-rows` also measures every precision with each row's whole sequence in one forward (no prompt or template
computed once), and `--label-suffix " sentiment"` appends those tokens to every label word of every task, so each
label is several tokens and each example runs one row per label (what a task with multi-token label words does):

    .venv/bin/python benchmarks/causal_eval_speed.py demo_runs_llm/run --precisions bf16 --whole-rows \
        --label-suffix " label"
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _merge_fns():
    try:  # this tree
        from pwemoe.export import merge_and_unload, merge_into
    except ImportError:  # a tree from before pwemoe.export existed
        from pwemoe.upscale import merge_and_unload, merge_into
    return merge_and_unload, merge_into


def measure(
    run: str, precision: str, models: int, batch_size: int | None, whole: bool = False, suffix: str | None = None
) -> dict:
    from pwemoe.core.preference import simplex_grid
    from pwemoe.runs import open_run

    merge_and_unload, merge_into = _merge_fns()
    wb, _ = open_run(run, True, precision=precision)
    if suffix:  # every label word gains these tokens: several tokens per label, one row per label
        for t in wb.tasks:
            extra = t.tokenizer(suffix, add_special_tokens=False)["input_ids"]
            t.label_ids = [ids + extra for ids in t.label_ids]
    if whole:  # each row's whole sequence in one forward: nothing computed once for several rows
        wb.modality.run = lambda backbone, model_inputs, inputs: backbone(**model_inputs)
    bs = batch_size or wb.cfg.eval.batch_size
    prefs = simplex_grid(len(wb.tasks), 4)[:models]
    plain = None
    preds: dict[str, list[list[int]]] = {}
    n_examples = 0
    t0 = time.perf_counter()
    for r in prefs:
        plain = merge_and_unload(wb.backbone, r).eval() if plain is None else merge_into(wb.backbone, plain, r)
        for t in wb.tasks:
            out = torch.empty(len(t.test_data), dtype=torch.long)
            with torch.no_grad():
                for idx, b in zip(wb.eval_batches(t, bs), wb.eval_data(t, bs)):
                    out[torch.as_tensor(idx)] = wb.forward(b, backbone=plain)[0].argmax(-1).cpu()
            preds.setdefault(t.name, []).append(out.tolist())
            n_examples += len(t.test_data)
    seconds = time.perf_counter() - t0
    return {
        "precision": precision,
        "path": "whole rows" if whole else "shared",
        "label_suffix": suffix,
        "models": len(prefs),
        "examples": n_examples,
        "seconds": seconds,
        "examples_per_s": n_examples / seconds,
        "predictions": preds,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--whole-rows", action="store_true", help="also measure whole-row forwards (no shared prompt)")
    ap.add_argument("--label-suffix", help="text appended to every label word (multi-token labels)")
    ap.add_argument("--json", help="write the results (predictions included) to this file")
    args = ap.parse_args()
    out = []
    for p in args.precisions:
        for whole in (False, True) if args.whole_rows else (False,):
            m = measure(args.run, p, args.models, args.batch_size, whole, args.label_suffix)
            out.append(m)
            print(
                f"{m['precision']} ({m['path']}): {m['examples']} examples ({m['models']} models) in "
                f"{m['seconds']:.1f} s = {m['examples_per_s']:.1f} examples/s",
                flush=True,
            )
    if args.whole_rows:
        for a, b in zip(out[::2], out[1::2]):
            pa, pb = a["predictions"], b["predictions"]
            same = sum(x == y for t in pa for ma, mb in zip(pa[t], pb[t]) for x, y in zip(ma, mb))
            total = sum(len(m) for t in pa for m in pa[t])
            print(
                f"{a['precision']}: shared / whole rows = {a['examples_per_s'] / b['examples_per_s']:.2f}x; "
                f"the same prediction on {same} of {total} ({100 * same / total:.2f}%)"
            )
    elif len(out) == 2:
        a, b = out[0]["predictions"], out[1]["predictions"]
        same = sum(x == y for t in a for ma, mb in zip(a[t], b[t]) for x, y in zip(ma, mb))
        total = sum(len(m) for t in a for m in a[t])
        print(
            f"{out[1]['precision']} predicts what {out[0]['precision']} predicts on {same} of {total} test "
            f"examples ({100 * same / total:.2f}%)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
