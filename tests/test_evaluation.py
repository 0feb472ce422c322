import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from pwemoe.pareto import hypervolume, non_dominated
from pwemoe.report.plots import plot_fronts


def test_hypervolume_hand_computed():
    # 2-D: union of boxes [0,.8]x[0,.5] and [0,.5]x[0,.9] = .4 + .45 - .25 = .6
    assert hypervolume(np.array([[0.8, 0.5], [0.5, 0.9]])) == pytest.approx(0.6)
    assert hypervolume(np.array([[0.8, 0.5], [0.5, 0.9], [0.4, 0.4]])) == pytest.approx(0.6)  # dominated point
    assert hypervolume(np.array([[0.8, 0.5]]), reference=[0.5, 0.0]) == pytest.approx(0.15)
    # 3-D: two boxes 1x1x.5 and .5x.5x1 overlap in .5x.5x.5: .5 + .25 - .125
    assert hypervolume(np.array([[1, 1, 0.5], [0.5, 0.5, 1.0]])) == pytest.approx(0.625)
    assert hypervolume(np.array([[-0.1, 0.5]])) == 0.0


def test_non_dominated_filter():
    p = np.array([[0.8, 0.5], [0.5, 0.9], [0.4, 0.4], [0.8, 0.5], [0.8, 0.4]])
    assert non_dominated(p).tolist() == [True, True, False, True, False]


def _fake_rows(k, rng):
    names = [f"task{i}" for i in range(k)]
    rows = []
    from pwemoe.core import simplex_grid

    for r in simplex_grid(k, 3).tolist():
        for m in ("pwemoe", "pref_task_arithmetic"):
            acc = {n: float(0.5 + 0.4 * r[i] + 0.05 * rng.random()) for i, n in enumerate(names)}
            rows.append({"method": m, "preference": r, "param": None, "accuracy": acc, "normalized": acc})
    for i, n in enumerate(names):
        acc = {m: (0.95 if m == n else 0.3) for m in names}
        rows.append(
            {
                "method": f"expert:{n}",
                "preference": np.eye(k)[i].tolist(),
                "param": None,
                "accuracy": acc,
                "normalized": acc,
            }
        )
    for lam in (0.3, 0.6):
        acc = {n: 0.6 + 0.1 * lam for n in names}
        rows.append({"method": "task_arithmetic", "preference": None, "param": lam, "accuracy": acc, "normalized": acc})
    return names, rows


@pytest.mark.parametrize("k,expected", [(2, ["front"]), (3, ["planes", "front3d", "ternary"]), (5, ["parallel"])])
def test_plots_for_k_2_3_5(tmp_path, k, expected):
    names, rows = _fake_rows(k, np.random.default_rng(0))
    paths = plot_fronts(rows, names, tmp_path, "accuracy")
    assert sorted(p.name for p in paths) == sorted(f"{e}_accuracy.{x}" for e in expected for x in ("png", "svg"))
    for p in paths:
        data = p.read_bytes()
        assert len(data) > 2000
        if p.suffix == ".png":
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
        else:
            assert b"<svg" in data[:2000] and names[0].encode() in data  # axis labels name the tasks


@pytest.fixture(scope="module")
def trained_run(text_setup, tmp_path_factory):
    from pwemoe.recipes.train import train

    root, base_cfg = text_setup
    tmp = tmp_path_factory.mktemp("evalrun")
    cfg = {**base_cfg, "run_dir": str(tmp / "run"), "train": {**base_cfg["train"], "steps": 20}}
    p = tmp / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return train(p, [])


def test_evaluate_writes_results_hypervolumes_plots_and_report(trained_run):
    from pwemoe.recipes.evaluate import evaluate_run

    summary = evaluate_run(trained_run, grid=3)
    rows = json.loads((trained_run / "results.json").read_text())
    pw = [r for r in rows if r["method"] == "pwemoe"]
    assert sorted(tuple(r["preference"]) for r in pw) == [(0.0, 1.0), (0.5, 0.5), (1.0, 0.0)]
    methods = {r["method"] for r in rows}
    assert {"expert:polarity", "expert:color", "average", "task_arithmetic", "pref_task_arithmetic"} <= methods
    assert len([r for r in rows if r["method"] == "task_arithmetic"]) == 10
    for r in rows:
        assert set(r["accuracy"]) == {"polarity", "color"} and all(0 <= v <= 1 for v in r["accuracy"].values())
    own = next(r for r in rows if r["method"] == "expert:polarity")
    assert own["normalized"]["polarity"] == pytest.approx(1.0)
    hv = summary["methods"]
    for m in ("pwemoe", "pref_task_arithmetic", "task_arithmetic", "average", "experts"):
        assert 0 <= hv[m]["hypervolume"] <= 1 and "hypervolume_normalized" in hv[m]
    pts = np.array([[r["accuracy"]["polarity"], r["accuracy"]["color"]] for r in pw])
    assert hv["pwemoe"]["hypervolume"] == pytest.approx(hypervolume(pts))
    assert summary["reference_point"]["accuracy"] == [0.0, 0.0]
    report = (trained_run / "report.md").read_text()
    assert "PWEMoE vs preference-weighted task arithmetic" in report and "plots/front_accuracy.png" in report
    assert (trained_run / "plots" / "front_accuracy.png").stat().st_size > 2000
    assert (trained_run / "results.csv").read_text().count("\n") == len(rows) + 1


def test_evaluate_resumes_from_results_file(trained_run, monkeypatch):
    from pwemoe.recipes import evaluate as run_mod
    from pwemoe.workbench import Workbench

    run_mod.evaluate_run(trained_run, grid=3, baselines=False)
    rows = json.loads((trained_run / "results.json").read_text())
    kept = [r for r in rows if not (r["method"] == "pwemoe" and r["preference"] == [0.5, 0.5])]
    (trained_run / "results.json").write_text(json.dumps(kept))
    calls = []
    real = Workbench.correct
    monkeypatch.setattr(Workbench, "correct", lambda self, t, *a, **kw: calls.append(t.name) or real(self, t, *a, **kw))
    run_mod.evaluate_run(trained_run, grid=3, baselines=False)
    assert sorted(calls) == ["color", "polarity"]  # only the missing preference, on both tasks
    again = json.loads((trained_run / "results.json").read_text())
    assert any(r["method"] == "pwemoe" and r["preference"] == [0.5, 0.5] for r in again)
    # a row whose per-example correctness is missing (e.g. killed between the two writes) is recomputed
    corr = json.loads((trained_run / "correct.json").read_text())
    del corr["pwemoe|1.000000,0.000000|"]
    (trained_run / "correct.json").write_text(json.dumps(corr))
    calls.clear()
    summary = run_mod.evaluate_run(trained_run, grid=3, baselines=False)
    assert sorted(calls) == ["color", "polarity"] and summary["rows_computed"] == 1
    assert "pwemoe|1.000000,0.000000|" in json.loads((trained_run / "correct.json").read_text())
    assert "hypervolume_ci" in summary["methods"]["pwemoe"]


def test_export_reproduces_evaluated_accuracy(trained_run, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pwemoe.config import load_config
    from pwemoe.recipes.evaluate import evaluate_run
    from pwemoe.runs import export_run

    evaluate_run(trained_run, grid=3, baselines=False)
    rows = json.loads((trained_run / "results.json").read_text())
    want = next(r for r in rows if r["method"] == "pwemoe" and r["preference"] == [0.5, 0.5])["accuracy"]
    out = export_run(trained_run, "1,1", tmp_path / "export")
    info = json.loads((out / "pwemoe.json").read_text())
    assert info["preference"] == {"polarity": 0.5, "color": 0.5}
    cfg = load_config(trained_run / "config.yaml")
    import datasets

    for t in cfg.tasks:
        model = AutoModelForSequenceClassification.from_pretrained(out / t.name).eval()
        tok = AutoTokenizer.from_pretrained(out / t.name)
        ds = datasets.load_dataset("csv", data_files={"test": t.data.files["test"]}, split="test")
        enc = tok(list(ds["text"]), truncation=True, max_length=t.max_length, padding=True, return_tensors="pt")
        with torch.no_grad():
            pred = model(**enc).logits.argmax(-1)
        acc = (pred == torch.tensor(list(ds["label"]))).float().mean().item()
        assert acc == pytest.approx(want[t.name], abs=1e-6), t.name  # 1e-6 << one example (1/60)


def test_bad_inputs(trained_run, text_setup, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from pwemoe.recipes.evaluate import evaluate_run
    from pwemoe.runs import export_run

    with pytest.raises(ValueError, match="length k=2"):
        export_run(trained_run, "0.2,0.3,0.5", tmp_path / "x")
    with pytest.raises(ValueError, match="--grid must be an integer >= 2"):
        evaluate_run(trained_run, grid=1)
    # a checkpoint trained on other expert weights is refused, naming the expert
    root, base_cfg = text_setup
    bad = tmp_path / "bad_run"
    shutil.copytree(trained_run, bad)
    expert = tmp_path / "altered_expert"
    m = AutoModelForSequenceClassification.from_pretrained(base_cfg["tasks"][1]["expert"])
    with torch.no_grad():
        m.bert.encoder.layer[0].intermediate.dense.weight.add_(0.01)
    m.save_pretrained(expert)
    cfg = yaml.safe_load((bad / "config.yaml").read_text())
    cfg["tasks"][1]["expert"] = str(expert)
    (bad / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=r"different models.*color: checkpoint"):
        evaluate_run(bad, grid=2)


def test_summary_counts_pointwise_dominance():
    from pwemoe.results import summarize

    def row(m, acc, pref=None):
        return {"method": m, "preference": pref, "param": None, "accuracy": dict(zip("ab", acc))}

    rows = [
        row("expert:a", [0.9, 0.2], [1, 0]),
        row("expert:b", [0.2, 0.9], [0, 1]),
        row("pwemoe", [0.8, 0.6], [1, 0]),
        row("pwemoe", [0.6, 0.8], [0, 1]),
        row("pref_task_arithmetic", [0.7, 0.5], [1, 0]),
        row("pref_task_arithmetic", [0.95, 0.1], [0, 1]),
    ]
    s = summarize(rows, ["a", "b"])
    pt = s["methods"]["pref_task_arithmetic"]
    assert pt["dominated_by_pwemoe"] == 1 and pt["dominating_pwemoe"] == 0
    assert s["methods"]["experts"]["dominated_by_pwemoe"] == 0


def test_summary_covers_only_the_requested_preferences(trained_run, tmp_path):
    from pwemoe.recipes.evaluate import evaluate_run

    evaluate_run(trained_run, grid=3, baselines=False)
    p = tmp_path / "prefs.txt"
    p.write_text("0.25,0.75\n")
    summary = evaluate_run(trained_run, preferences_file=str(p), baselines=False)
    assert summary["preferences"] == 1 and summary["methods"]["pwemoe"]["points"] == 1
    assert set(summary["methods"]) == {"pwemoe", "experts"}
    rows = json.loads((trained_run / "results.json").read_text())
    assert len([r for r in rows if r["method"] == "pwemoe"]) >= 4  # the store keeps every evaluated row
    assert all("normalized" in r for r in rows)


def test_preference_key_keys_to_itself():
    """A stored key passed back (the explorer sends rows' preferences) must find its row: key(key(r)) ==
    key(r), also where the 6-decimal values do not sum to exactly 1 (about 5% of random preferences)."""
    from pwemoe.results import preference_key

    g = torch.Generator().manual_seed(0)
    for k in (2, 3, 8):
        for _ in range(2000):
            r = torch.rand(k, generator=g) ** 3  # uneven preferences, some near the simplex boundary
            key = preference_key(r, k)
            assert preference_key(key, k) == key and abs(sum(key) - 1) <= k * 1e-6
    assert preference_key([1, 1, 1], 3) == [0.333333] * 3 and preference_key([2, 8], 2) == [0.2, 0.8]


def test_a_model_a_sweep_evaluated_once_is_not_evaluated_again(llm_run, tmp_path):
    """With c = 1, preference-weighted task arithmetic's vertices are the experts themselves (theta_0 + tau_i):
    their rows are computed once, and the experts' rows carry the same accuracy and per-example correctness."""
    import shutil

    from pwemoe.recipes.evaluate import evaluate_run

    run = tmp_path / "run"
    shutil.copytree(llm_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["eval"]["pwta_scale"] = 1.0
    cfg["run_dir"] = str(run)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    for f in ("results.json", "correct.json"):
        (run / f).unlink(missing_ok=True)
    summary = evaluate_run(run, grid=2)
    assert summary["rows_computed"] == 3 + 3 + 1  # PWEMoE, pref.-weighted TA and the average; not the experts
    rows = json.loads((run / "results.json").read_text())
    correct = json.loads((run / "correct.json").read_text())
    pwta = {tuple(r["preference"]): r for r in rows if r["method"] == "pref_task_arithmetic"}
    for i, name in enumerate(cfg["tasks"]):
        expert = next(r for r in rows if r["method"] == f"expert:{name['name']}")
        vertex = pwta[tuple(1.0 if j == i else 0.0 for j in range(3))]
        assert expert["accuracy"] == vertex["accuracy"]
        ek = next(k for k in correct if k.startswith(f"expert:{name['name']}|"))
        vk = next(
            k
            for k in correct
            if k.startswith("pref_task_arithmetic|")
            and k.split("|")[1] == ",".join(f"{x:.6f}" for x in vertex["preference"])
        )
        assert {t: v for t, v in correct[ek].items() if t != "inputs"} == {
            t: v for t, v in correct[vk].items() if t != "inputs"
        }
