"""Fronts you can trust: bootstrap intervals against closed forms, the validation carve, checkpoint selection."""

from __future__ import annotations

import json
from collections import Counter
from itertools import product
from math import comb
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pwemoe.intervals import accuracy_samples, interval


def _binom_quantile(n: int, p: float, q: float) -> float:
    """The q-quantile of Binomial(n, p) / n, from its exact CDF."""
    cdf = 0.0
    for k in range(n + 1):
        cdf += comb(n, k) * p**k * (1 - p) ** (n - k)
        if cdf >= q:
            return k / n
    return 1.0


def test_bootstrap_accuracy_interval_equals_the_binomial_quantiles():
    # 10 examples, 5 correct: a resampled accuracy is Binomial(10, 0.5) / 10 exactly. Its 2.5% and 97.5%
    # quantiles (0.2 and 0.8) sit well inside their atoms, so 4,000 resamples find them exactly.
    correct = {"t": np.array([[1, 0] * 5], dtype=bool)}
    s = accuracy_samples(correct, 4000, seed=0)["t"][:, 0]
    lo, hi = interval(s, 0.95)
    assert (lo, hi) == pytest.approx((_binom_quantile(10, 0.5, 0.025), _binom_quantile(10, 0.5, 0.975)))
    assert (lo, hi) == pytest.approx((0.2, 0.8))
    assert s.mean() == pytest.approx(0.5, abs=0.01)
    again = accuracy_samples(correct, 4000, seed=0)["t"]
    assert np.array_equal(again[:, 0], s)  # seeded


def test_bootstrap_differences_are_paired():
    # a and b differ on one example of 10 (a right, b wrong): paired, the difference is
    # Binomial(10, 0.1) / 10, interval [0, 0.3]; unpaired resampling would give a much wider one.
    a = np.array([1, 1, 0, 0, 1, 0, 1, 0, 1, 0], dtype=bool)
    b = a.copy()
    b[0] = False
    s = accuracy_samples({"t": np.stack([a, b])}, 4000, seed=1)["t"]
    d = s[:, 0] - s[:, 1]
    assert (d >= 0).all()  # never negative: the same draw scores both models
    lo, hi = interval(d, 0.95)
    assert (lo, hi) == pytest.approx((0.0, _binom_quantile(10, 0.1, 0.975))) and hi == pytest.approx(0.3)


def test_bootstrap_hypervolume_by_enumeration():
    # k = 2, one model: HV = acc_a * acc_b (reference 0), the tasks resampled independently. With 5
    # examples per task, 4 and 3 correct, acc ~ Binomial(5, p) / 5 per task: enumerate the exact law of
    # the product. Its 5% and 95% quantiles (0.16, 0.8) lie > 0.015 inside their CDF steps.
    from pwemoe.results import summarize

    rows = [{"method": "average", "preference": None, "param": None, "accuracy": {"a": 0.8, "b": 0.6}}]
    correct = {"a": np.array([[1, 1, 1, 1, 0]], bool), "b": np.array([[1, 0, 1, 1, 0]], bool)}
    summary = summarize(rows, ["a", "b"], 0.0, correct, resamples=20000, level=0.9, seed=3)
    law = {}
    for (x, px), (y, py) in product(_binom(5, 0.8).items(), _binom(5, 0.6).items()):
        law[round(x * y, 9)] = law.get(round(x * y, 9), 0.0) + px * py
    cdf, q = 0.0, {}
    for v in sorted(law):
        cdf += law[v]
        for level in (0.05, 0.95):
            if level not in q and cdf >= level:
                q[level] = v
    lo, hi = summary["methods"]["average"]["hypervolume_ci"]
    assert (lo, hi) == pytest.approx((q[0.05], q[0.95])) and (lo, hi) == pytest.approx((0.16, 0.8))
    samples = accuracy_samples(correct, 20000, seed=3)
    mean = sum(v * p for v, p in law.items())  # = 0.8 * 0.6: the tasks are resampled independently
    assert (samples["a"][:, 0] * samples["b"][:, 0]).mean() == pytest.approx(mean, abs=0.005)
    assert rows[0]["accuracy_ci"]["a"] == pytest.approx([_binom_quantile(5, 0.8, 0.05), 1.0])  # = [0.4, 1]


def _binom(n: int, p: float) -> dict[float, float]:
    return {k / n: comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)}


def test_carve_is_stratified_seeded_and_disjoint():
    from pwemoe.tasks.data import carve_validation

    labels = [0] * 80 + [1] * 15 + [2] * 5
    train, val = carve_validation(labels, 0.2, seed=0)
    assert carve_validation(labels, 0.2, seed=0) == (train, val)
    assert carve_validation(labels, 0.2, seed=1)[1] != val
    assert not set(train) & set(val) and sorted(train + val) == list(range(100))
    assert [sum(labels[i] == c for i in val) for c in range(3)] == [16, 3, 1]  # 20% of each class
    with pytest.raises(ValueError, match="validation_fraction"):
        carve_validation(labels, 1.5, seed=0)


def _cfg(text_setup, tmp: Path, **train) -> Path:
    root, base = text_setup
    names = {"polarity": ["class_0", "class_1"], "color": ["class_0", "class_1", "class_2"]}
    tasks = [
        {**t, "class_names": names[t["name"]], "data": {**t["data"], "validation_fraction": 0.2}} for t in base["tasks"]
    ]
    cfg = {**base, "tasks": tasks, "run_dir": str(tmp / "run"), "train": {**base["train"], **train}}
    p = tmp / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_validation_data_is_disjoint_from_what_experts_and_routers_train_on(text_setup, tmp_path):
    from pwemoe.config import load_config
    from pwemoe.recipes.finetune import finetune_from_config
    from pwemoe.tasks.data import dataset_fingerprint, load_task_data

    cfg = load_config(_cfg(text_setup, tmp_path))
    d = cfg.tasks[0].data
    train, val, test = (load_task_data(d, role) for role in ("train", "validation", "test"))
    assert len(train) + len(val) == 200 and len(val) == 40 and len(test) == 60
    full = load_task_data(d.model_copy(update={"validation_fraction": None}), "train")
    rows = lambda ds: Counter(zip(ds["text"], ds["label"]))  # noqa: E731
    assert rows(train) + rows(val) == rows(full)  # a partition: every row in exactly one of them
    assert Counter(val["label"]) == {k: round(0.2 * v) for k, v in Counter(full["label"]).items()}  # stratified
    # the expert finetune sees exactly the carved training data
    out = finetune_from_config(_cfg(text_setup, tmp_path), "polarity", tmp_path / "expert", epochs=0.1, batch_size=8)
    info = json.loads((out / "pwemoe_finetune.json").read_text())
    assert info["train_examples"] == len(train) == 160
    assert info["train_data"] == dataset_fingerprint(train, ["text", "label"])


def test_best_val_hv_selects_the_best_validated_checkpoint(text_setup, tmp_path, monkeypatch):
    from pwemoe import router_state_dict
    from pwemoe.recipes.evaluate import evaluate_run
    from pwemoe.recipes.train import train
    from pwemoe.runs import open_run
    from pwemoe.tasks import data as data_mod

    roles = []
    real = data_mod.load_task_data
    monkeypatch.setattr(data_mod, "load_task_data", lambda d, role, pm=None: roles.append(role) or real(d, role, pm))
    snaps = {}
    p = _cfg(text_setup, tmp_path, steps=12, val_interval=3, select="best_val_hv", save_interval=4, lr=0.2)
    run = train(p, [], on_step=lambda rec, step: snaps.__setitem__(step, router_state_dict(rec.model)))
    assert "test" not in roles and "validation" in roles  # training never reads the test split
    vals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "val_hv" in x]
    assert [v["step"] for v in vals] == [3, 6, 9, 12]
    best = max(vals, key=lambda v: v["val_hv"])  # the first of equal maxima: strictly better replaces
    assert vals[-1]["val_best_step"] == best["step"]
    wb, meta = open_run(run, load_test=False)
    assert (
        meta["step"] == best["step"]
        and meta["selected_by"] == "best_val_hv"
        and meta["routers_file"] != "routers.safetensors"
    )
    for k, v in router_state_dict(wb.model).items():
        assert torch.equal(v, snaps[best["step"]][k])
    marker = json.loads((run / "pwemoe_run.json").read_text())["selection"]
    assert marker["selected_step"] == best["step"] and marker["best_val_hv"] == pytest.approx(best["val_hv"])

    # the validation front can be evaluated like the test front, written apart from it
    s = evaluate_run(run, grid=2, baselines=False, split="validation")
    assert (
        s["split"] == "validation" and s["routers_step"] == best["step"] and s["routers_selected_by"] == "best_val_hv"
    )
    assert (run / "validation" / "results.json").is_file() and not (run / "results.json").exists()
    rows = json.loads((run / "validation" / "results.json").read_text())
    grid3 = {tuple(r["preference"]) for r in rows}
    assert grid3 == {(1.0, 0.0), (0.0, 1.0)}


def test_validation_settings_are_checked_up_front(text_setup, tmp_path):
    from pwemoe.config import ConfigError
    from pwemoe.configfile import read_config

    root, base = text_setup
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(base))
    with pytest.raises(ConfigError) as e:
        read_config(p, ["train.select=best_val_hv"])
    assert "train.select" in str(e.value) and "val_interval" in str(e.value)
    with pytest.raises(ConfigError) as e:
        read_config(p, ["train.val_interval=5"])
    assert "validation data" in str(e.value) and "polarity" in str(e.value)
    with pytest.raises(ConfigError) as e:
        read_config(p, ["tasks.0.data.validation_split=dev", "tasks.0.data.validation_fraction=0.1"])
    assert "not both" in str(e.value)
    with pytest.raises(ConfigError) as e:
        read_config(p, ["tasks.0.data.validation_fraction=1.5", "train.select=best"])
    msg = str(e.value)
    assert "validation_fraction" in msg and "train.select" in msg  # all errors at once


def test_resume_under_another_reference_point_validates_the_best_again(text_setup, tmp_path):
    """eval.* may change on --resume, but a best val_hv under the old reference point compares with
    nothing: the best routers so far are validated again, so the selection equals an uninterrupted
    run's under the new reference (before, the old, larger value kept step 2 as the best forever)."""
    from pwemoe.checkpoint import load_routers
    from pwemoe.recipes.train import train

    class Stop(Exception):
        pass

    def config(name: str, reference: float) -> Path:
        (tmp_path / name).mkdir()
        p = _cfg(text_setup, tmp_path / name, steps=8, save_interval=2, val_interval=2, select="best_val_hv")
        cfg = yaml.safe_load(p.read_text())
        cfg["eval"] = {**cfg.get("eval", {}), "reference_point": reference}
        p.write_text(yaml.safe_dump(cfg))
        return p

    whole = train(config("whole", 0.2), [])

    def stop(recipe, step):
        if step == 2:  # after step 2's validation and checkpoint
            raise Stop

    with pytest.raises(Stop):
        train(config("resumed", 0.0), [], on_step=stop)
    resumed = train(None, ["eval.reference_point=0.2"], resume=tmp_path / "resumed" / "run")
    sel = [json.loads((run / "pwemoe_run.json").read_text())["selection"] for run in (whole, resumed)]
    assert sel[0]["best_val_step"] == sel[1]["best_val_step"] and sel[0]["best_val_hv"] == sel[1]["best_val_hv"]
    a, b = (load_routers(run / "routers_best_val.safetensors") for run in (whole, resumed))
    assert a[1]["val_hv"] == b[1]["val_hv"] and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    hv = [
        [x["val_hv"] for x in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_hv" in x]
        for run in (whole, resumed)
    ]
    assert hv[0][1:] == hv[1][1:] and hv[0][0] != hv[1][0]  # step 2 was validated under the old reference
