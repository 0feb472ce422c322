"""The LLM demo's lm-eval step: its three tasks written as lm-eval task YAMLs over the demo's own test examples, scored
in process (lm-eval's HFLM over the merged copy) at the vertices and the centre, printed beside pwemoe's own
accuracy on the same examples.

Each document is pwemoe's prompt as `causal_lm_choice` builds it (the template over the truncated text) with the
label words as choices: lm-eval puts its `target_delimiter` (the words' common leading space) between prompt and
choice and sums the choice's token log-probabilities, as pwemoe does. The two agree example for example when both
tokenise prompt + word into the prompt's tokens followed by the word's; in bf16 the batches differ (lm-eval groups
requests by length, pwemoe its own way), so a near tie may flip.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

LMEVAL_DIR = "lm_eval_tasks"
PREFIX = "pwemoe_demo_"
# Documents scored per task and point: the first 40 of the demo's 150 test examples (4 points x 3 tasks x 40 = 480
# prompts, one forward each: about 20 s at the ~29 examples/s of `pwemoe evaluate` on 2 idle cores in bf16, plus
# loading the run and 4 merges; docs/benchmarks.md has the measured step). The YAMLs hold all 150.
EXAMPLES = 40


def write_demo_tasks(wb: Any, folder: Path) -> dict[str, str]:
    """Each task's test examples as a multiple-choice lm-eval task in `folder`: {pwemoe task: lm-eval task name}."""
    from ..lmeval import write_task

    names = {}
    for t in wb.tasks:
        rows = t.test_data[:]
        words = t.label_words
        space = all(w.startswith(" ") for w in words)  # lm-eval's target_delimiter: the words' shared space
        choices = [w[1:] if space else w for w in words]
        docs = [
            {"prompt": p, "choices": choices, "label": int(y)} for p, y in zip(t.prompts(rows), t.labels(rows).tolist())
        ]
        names[t.name] = PREFIX + t.name
        write_task(folder, names[t.name], docs, target_delimiter=" " if space else "")
    return names


def lmeval_beside_own(
    run: Path, workdir: Path, batch_size: int = 16, examples: int | None = EXAMPLES
) -> dict[str, Any] | None:
    """lm-eval's accuracy (in process) and pwemoe's own on the same test examples (the first `examples` of each task;
    None: all), at each vertex and the centre.

    pwemoe's own per-example values come from the run's stored rows (`pwemoe evaluate` just wrote them) where the
    grid has the point, else they are computed here. Returns {"lm_eval": version, "seconds", "rows": [...]}, or
    None (one line printed) when lm-eval is not installed.
    """
    from ..lmeval import require

    try:
        lm_eval = require()
    except RuntimeError as e:
        print(f"      lm-eval step skipped: {e}")
        return None
    from ..baselines import Point
    from ..config import LMEvalConfig
    from ..evaluation import MergedCopy, PointEvaluator
    from ..lmeval_scoring import LMEvalScorer
    from ..results import ResultStore, preference_key
    from ..runs import open_run

    t0 = time.perf_counter()
    wb, _ = open_run(run, True)
    folder = workdir / LMEVAL_DIR
    names = write_demo_tasks(wb, folder)
    scorers = {
        t.name: LMEvalScorer(
            wb,
            SimpleNamespace(
                name=t.name,
                cfg=SimpleNamespace(lm_eval=LMEvalConfig(task=names[t.name], include_path=str(folder), limit=examples)),
            ),
            batch_size,
        )
        for t in wb.tasks
    }
    k = len(wb.tasks)
    prefs = [preference_key([1.0 if i == j else 0.0 for j in range(k)], k) for i in range(k)]
    prefs.append(preference_key([1.0 / k] * k, k))
    t_own = time.perf_counter()
    own = _own_values(wb, ResultStore(run), prefs, PointEvaluator(wb, None, batch_size))
    t_own = time.perf_counter() - t_own  # 0 where evaluate stored every point (the demo's grid has them)
    source, rows = MergedCopy(wb), []
    try:
        for r in prefs:
            with source.model(Point.at(r)) as backbone:
                for t in wb.tasks:
                    got = scorers[t.name](backbone)
                    mine = own[tuple(r)][t.name][: len(got)]  # lm-eval's limit: the first documents
                    rows.append(
                        {
                            "preference": r,
                            "task": t.name,
                            "lm_eval": float(got.double().mean()),
                            "pwemoe": float(mine.double().mean()),
                            "examples": len(got),
                            "same_examples": int((got == mine).sum()) if len(got) == len(mine) else None,
                        }
                    )
    finally:
        source.release()
    seconds = time.perf_counter() - t0
    out = {
        "lm_eval": lm_eval.__version__,
        "seconds": seconds,
        "seconds_without_own_scoring": seconds - t_own,
        "tasks": str(folder),
        "rows": rows,
    }
    _print(out, [t.name for t in wb.tasks])
    return out


def _own_values(wb: Any, store: Any, prefs: list[list[float]], evaluator: Any) -> dict[tuple, dict[str, Any]]:
    """{preference: {task: per-example values}} of PWEMoE: stored by evaluate where it has the point, else computed."""
    import torch

    from ..baselines import Point, with_role

    names = [t.name for t in wb.tasks]
    subject = with_role("subject").name
    out: dict[tuple, dict[str, Any]] = {}
    for r in prefs:
        row = next((x for x in store.rows if x["method"] == subject and x["preference"] == r), None)
        found = store.correctness([row], names) if row is not None else None
        if found is not None:
            out[tuple(r)] = {n: torch.as_tensor(found[n][0]) for n in names}
        else:
            out[tuple(r)] = evaluator.values(Point.at(r))
    return out


def _print(out: dict[str, Any], names: list[str]) -> None:
    rows = out["rows"]
    n = rows[0]["examples"] if rows else 0
    print(
        f"      lm-eval {out['lm_eval']} in process (its task YAMLs: {out['tasks']}), acc beside pwemoe's own "
        f"accuracy on the same first {n} test examples per task ({out['seconds']:.0f} s):"
    )
    for r in dict.fromkeys(tuple(x["preference"]) for x in rows):
        cells = []
        for x in (x for x in rows if tuple(x["preference"]) == r):
            cells.append(f"{x['task']} {x['lm_eval']:.3f} | {x['pwemoe']:.3f}")
        print(f"        r = ({', '.join(f'{v:.2f}' for v in r)}): " + ", ".join(cells))
    same = sum(x["same_examples"] or 0 for x in rows)
    total = sum(x["examples"] for x in rows)
    print(
        f"      the same answer on {same} of {total} examples: lm-eval's acc scores each label word as the "
        "continuation of the prompt after its target_delimiter ' ' and sums the word's token log-probabilities "
        "(unnormalised; acc_norm divides by the word's length), as pwemoe does"
        + ("" if same == total else "; in bf16 the two batch and pad differently, which can flip a near tie")
    )


__all__ = ["LMEVAL_DIR", "lmeval_beside_own", "write_demo_tasks"]
