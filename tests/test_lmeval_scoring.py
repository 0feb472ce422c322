"""lm-eval tasks as objectives of a run, in process: `pwemoe evaluate` scores a task by its lm-eval task (a task YAML
over a local JSON-lines file) at every preference through lm-eval's HFLM over the merged copy, writes rows,
intervals and the report; a vertex's score equals lm-eval's `hf` model on that expert's export; a changed task YAML
is recomputed, an unchanged one reused; the missing extra is one line and exit 2; and the config block's errors.
"""

from __future__ import annotations

import json
import random
import shutil
import sys

import pytest
import yaml

from tests.llm_fixtures import WORDS


def _docs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"prompt": " ".join(rng.choice(WORDS[4:]) for _ in range(rng.randint(2, 5))) + " answer :", "label": i % 2}
        | {"choices": ["bad", "good"]}
        for i in range(n)
    ]


@pytest.fixture
def lm_run(llm_run, tmp_path):
    """A copy of the causal-LM run whose first task (`polarity`) is scored by the lm-eval task `pw_polarity`
    (multiple choice between ' bad' and ' good', 10 local documents), with bootstrap intervals."""
    pytest.importorskip("lm_eval")
    from pwemoe.lmeval import write_task

    run = tmp_path / "run"
    shutil.copytree(llm_run, run)
    for name in ("results.json", "correct.json"):  # the copy starts with no rows
        (run / name).unlink(missing_ok=True)
    folder = tmp_path / "lm_tasks"
    write_task(folder, "pw_polarity", _docs(10, 1))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["tasks"][0]["lm_eval"] = {"task": "pw_polarity", "include_path": str(folder), "batch_size": 4}
    cfg["eval"]["bootstrap_resamples"] = 20
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run, folder


def test_evaluate_scores_a_task_with_lmeval_and_reuses_or_recomputes(lm_run, tmp_path, monkeypatch):
    """Rows, intervals and the report on lm-eval's acc; the vertex equals lm-eval's hf model on the expert's export,
    document by document; an unchanged task reuses every row, a changed task YAML recomputes them."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pwemoe.baselines import with_role
    from pwemoe.lmeval import write_task
    from pwemoe.recipes.evaluate import evaluate_run
    from pwemoe.results import ResultStore
    from pwemoe.runs import export_run

    run, folder = lm_run
    summary = evaluate_run(run, grid=2, baselines=False, verbose=-1)
    every = json.loads((run / "results.json").read_text())  # PWEMoE's and the experts' rows
    rows = [r for r in every if r["method"] == with_role("subject").name]
    n = len(every)
    assert len(rows) == 3 and summary["rows_computed"] == n
    assert (run / "report.md").is_file() and "polarity" in (run / "report.md").read_text()
    correct = ResultStore(run).correctness(rows, ["polarity", "color", "nature"])
    assert correct["polarity"].shape == (3, 10) and correct["color"].shape == (3, 8)  # lm-eval's 10 docs, own 8
    assert "hypervolume_ci" in json.dumps(summary), summary  # paired-bootstrap intervals over lm-eval's samples
    lo, hi = rows[0]["accuracy_ci"]["polarity"]
    assert lo <= rows[0]["accuracy"]["polarity"] <= hi

    vertex = next(i for i, r in enumerate(rows) if r["preference"] == [1.0, 0.0, 0.0])
    out = export_run(run, [1.0, 0.0, 0.0], tmp_path / "export", overwrite=True)
    plain = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    hf = HFLM(pretrained=plain, tokenizer=AutoTokenizer.from_pretrained(out / "model"), batch_size=4, device="cpu")
    ref = simple_evaluate(
        model=hf,
        tasks=["pw_polarity"],
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
        verbosity="ERROR",
    )
    want = [bool(s["acc"]) for s in sorted(ref["samples"]["pw_polarity"], key=lambda s: s["doc_id"])]
    assert correct["polarity"][vertex].tolist() == want
    assert rows[vertex]["accuracy"]["polarity"] == pytest.approx(ref["results"]["pw_polarity"]["acc,none"], abs=1e-12)

    import pwemoe.report

    for name in ("write_report", "write_report_html"):  # written above; their plots take seconds
        monkeypatch.setattr(pwemoe.report, name, lambda *a, **k: None)
    again = evaluate_run(run, grid=2, baselines=False, verbose=-1)
    assert (again["rows_reused"], again["rows_computed"]) == (n, 0)

    write_task(folder, "pw_polarity", _docs(12, 2))  # a changed task: other documents
    changed = evaluate_run(run, grid=2, baselines=False, verbose=-1)
    assert changed["rows_computed"] == n and changed["rows_reused"] == 0
    correct = ResultStore(run).correctness(json.loads((run / "results.json").read_text()), ["polarity"])
    assert correct["polarity"].shape == (n, 12)


def test_the_lmeval_extra_missing_stops_evaluate_with_one_line(lm_run, monkeypatch, capsys):
    """Without lm-eval, `pwemoe evaluate` of a run with an lm-eval task prints one line naming the extra, exits 2
    and writes nothing."""
    from pwemoe.cli import main

    run, _ = lm_run
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without the package gives
    assert main(["evaluate", str(run), "--grid", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pwemoe[lmeval]" in err[0]
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_lmeval_block_errors_are_collected(tmp_path):
    """Every problem of the lm_eval blocks in one ConfigError, each naming its key; another task type refuses it."""
    from pwemoe.config import ConfigError
    from pwemoe.configfile import build_config

    def task(name: str, **extra) -> dict:
        return {"name": name, "expert": "e", "data": {"source": "csv", "path": "x.csv"}, **extra}

    cfg = {
        "model": {"base": "b"},
        "tasks": [
            task("a", type="causal_lm", lm_eval={"task": str(tmp_path / "missing.yaml"), "limit": 0}),
            task("b", type="causal_lm_choice", lm_eval={"task": "x", "include_path": str(tmp_path / "no"), "k": 1}),
            task("c", type="causal_lm_choice", lm_eval={"metric": "acc norm"}),
            task("d", lm_eval={"task": "arc_easy"}),
        ],
        "run_dir": str(tmp_path / "run"),
    }
    with pytest.raises(ConfigError) as e:
        build_config(cfg)
    msg = str(e.value)
    for key in (
        "tasks[0].lm_eval.task",
        "tasks[0].lm_eval.limit",
        "tasks[1].lm_eval.include_path",
        "tasks[1].lm_eval.k",
        "tasks[2].lm_eval.task",
        "tasks[2].lm_eval.metric",
        "tasks[3].lm_eval",
    ):
        assert key in msg, (key, msg)
    assert "does not exist" in msg and "is not a folder" in msg
    ok = dict(cfg, tasks=[task("a", type="causal_lm", lm_eval={"task": "arc_easy"}), task("b", type="causal_lm")])
    assert build_config(ok).tasks[0].lm_eval.metric == "acc"


def test_per_example_reads_one_filter_in_doc_order_and_names_what_is_there():
    """lm-eval's samples of the configured filter, ordered by doc_id: bool for 0/1 metrics, float otherwise; a
    missing filter or metric, or a metric with several values per document, is a ValueError naming what exists."""
    from pwemoe.lmeval_scoring import per_example

    samples = [
        {"doc_id": 1, "filter": "strict", "exact_match": 1.0, "f1": 0.5, "metrics": ["exact_match", "f1"]},
        {"doc_id": 0, "filter": "strict", "exact_match": 0.0, "f1": 0.25, "metrics": ["exact_match", "f1"]},
        {"doc_id": 0, "filter": "loose", "exact_match": 1.0, "f1": 1.0, "metrics": ["exact_match", "f1"]},
    ]
    got = per_example(samples, "exact_match", "strict", "task 't'")
    assert got.dtype.is_floating_point is False and got.tolist() == [False, True]
    assert per_example(samples, "f1", "strict", "task 't'").tolist() == [0.25, 0.5]
    with pytest.raises(ValueError, match=r"filter 'none'.*\['loose', 'strict'\]"):
        per_example(samples, "exact_match", "none", "task 't'")
    with pytest.raises(ValueError, match=r"no metric 'acc'.*exact_match"):
        per_example(samples, "acc", "strict", "task 't'")
    listed = [{"doc_id": 0, "filter": "none", "inst": [True, False], "metrics": ["inst"]}]
    with pytest.raises(ValueError, match="not one number per document"):
        per_example(listed, "inst", "none", "task 't'")
