"""CONTRIBUTING.md's examples work as written: each is put in a temporary module, imported (which registers it),
and run through training and `pwemoe evaluate` on tiny models; the registries are restored afterwards."""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def examples() -> list[str]:
    text = (ROOT / "CONTRIBUTING.md").read_text()
    return re.findall(r"```python\n(.*?)\n```", text, re.S)


@pytest.fixture
def registered(tmp_path, monkeypatch):
    """Import every example as one temporary module; the registries are restored when the test ends."""
    from pwemoe.baselines import METHODS
    from pwemoe.merges import MERGES
    from pwemoe.modalities import MODALITIES
    from pwemoe.objectives import OBJECTIVES
    from pwemoe.tasks import TASK_TYPES

    saved = [(reg, dict(reg)) for reg in (METHODS, MERGES, MODALITIES, OBJECTIVES, TASK_TYPES)]
    code = examples()
    assert len(code) == 6, "CONTRIBUTING.md shows a baseline, a role, a merge, a task type, a modality, an objective"
    (tmp_path / "contrib_examples.py").write_text("\n\n".join(code))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("contrib_examples")
    try:
        yield
    finally:
        for reg, before in saved:
            reg.clear()
            reg.update(before)
        sys.modules.pop("contrib_examples", None)


def _run(text_setup, tmp_path, name: str, task_type: str, objective: str = "ls", **evals) -> Path:
    from pwemoe.recipes.train import train

    _, base = text_setup
    tasks = [{**t, "type": task_type} for t in base["tasks"]]
    cfg = {
        **base,
        "tasks": tasks,
        "run_dir": str(tmp_path / name),
        "train": {**base["train"], "steps": 3, "objective": objective},
        "eval": {**base["eval"], "ta_scales": [0.5], "bootstrap_resamples": 20, **evals},
    }
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return Path(train(tmp_path / f"{name}.yaml", []))


def test_contributing_examples_run_through_training_and_evaluate(registered, text_setup, tmp_path):
    from pwemoe.configfile import read_config
    from pwemoe.recipes.evaluate import evaluate_run
    from pwemoe.workbench import Workbench

    # the task type and the objective train; the baseline is evaluated beside PWEMoE
    run = _run(text_setup, tmp_path, "multi", "multi_label", objective="product")
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    summary = evaluate_run(run, grid=2)
    rows = json.loads((run / "results.json").read_text())
    half = [r for r in rows if r["method"] == "half_sum"]
    assert len(half) == 1 and half[0]["param"] == 0.5 and "half_sum" in summary["methods"]
    assert "task arithmetic, λ = 0.5" in (run / "report.md").read_text()
    # the role moved: PWEMoE is compared with task arithmetic, in the summary and the report
    assert summary["roles"]["reference"] == "task_arithmetic"
    assert "**PWEMoE vs task arithmetic (λ grid):**" in (run / "report.md").read_text()

    # the modality: its batches are padded to a multiple of 8 tokens, and the run evaluates
    run = _run(text_setup, tmp_path, "pad8", "sequence_classification_pad8")
    wb = Workbench(read_config(run / "config.yaml"), load_train=False)
    t = wb.tasks[0]
    batch = wb.encode([(0, t.test_data[:5])])
    assert batch.inputs["input_ids"].shape[1] % 8 == 0 and type(wb.modality).__name__ == "PaddedTextModality"
    summary = evaluate_run(run, grid=2, baselines=False)
    assert summary["methods"]["pwemoe"]["points"] == 2


def test_a_merge_added_in_one_place_is_a_baseline(registered, text_setup, tmp_path):
    """CONTRIBUTING's merge: one MERGES entry, named by eval.baselines, is computed by mergekit and reported."""
    pytest.importorskip("mergekit")
    from pwemoe.baselines import METHODS
    from pwemoe.recipes.evaluate import evaluate_run

    assert METHODS["ties_dense"].short == "TIES 0.9" and not METHODS["ties_dense"].default
    task_type = text_setup[1]["tasks"][0].get("type", "sequence_classification")
    run = _run(text_setup, tmp_path, "merge", task_type, baselines=["ties_dense"])
    summary = evaluate_run(run, grid=2)
    rows = [r for r in json.loads((run / "results.json").read_text()) if r["method"] == "ties_dense"]
    assert [r["param"] for r in rows] == [{"density": 0.9, "lambda": 0.5}] and "ties_dense" in summary["methods"]
    assert "TIES, density 0.9 (mergekit)" in (run / "report.md").read_text()
