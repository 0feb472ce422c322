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
    from pwemoe.modalities import MODALITIES
    from pwemoe.objectives import OBJECTIVES
    from pwemoe.tasks import TASK_TYPES

    saved = [(reg, dict(reg)) for reg in (METHODS, MODALITIES, OBJECTIVES, TASK_TYPES)]
    code = examples()
    assert len(code) == 4, "CONTRIBUTING.md shows a baseline, a task type, a modality and an objective"
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


def _run(text_setup, tmp_path, name: str, task_type: str, objective: str = "ls") -> Path:
    from pwemoe.recipes.train import train

    _, base = text_setup
    tasks = [{**t, "type": task_type} for t in base["tasks"]]
    cfg = {
        **base,
        "tasks": tasks,
        "run_dir": str(tmp_path / name),
        "train": {**base["train"], "steps": 3, "objective": objective},
        "eval": {**base["eval"], "ta_scales": [0.5], "bootstrap_resamples": 20},
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

    # the modality: its batches are padded to a multiple of 8 tokens, and the run evaluates
    run = _run(text_setup, tmp_path, "pad8", "sequence_classification_pad8")
    wb = Workbench(read_config(run / "config.yaml"), load_train=False)
    t = wb.tasks[0]
    batch = wb.encode([(0, t.test_data[:5])])
    assert batch.inputs["input_ids"].shape[1] % 8 == 0 and type(wb.modality).__name__ == "PaddedTextModality"
    summary = evaluate_run(run, grid=2, baselines=False)
    assert summary["methods"]["pwemoe"]["points"] == 2
