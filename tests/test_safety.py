"""Run-directory integrity and clear errors, through the real CLI (`pwemoe.cli.main`) in temp dirs.

One test per class of defect: stale results, writing over what pwemoe did not write, concurrent
writers, resume semantics, provenance, garbage input, and failures that must be messages.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pwemoe.cli import main
from tests.fixtures import write_short_run_config


def _cfg(text_setup, tmp_path: Path, name: str = "run", **train) -> Path:
    return write_short_run_config(text_setup[1], tmp_path / f"{name}.yaml", tmp_path / name, **train)


def _rows(run: Path) -> list[dict]:
    return json.loads((run / "results.json").read_text())


def test_results_are_never_stale_or_mixed(text_setup, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(_cfg(text_setup, tmp_path))]) == 0
    assert main(["evaluate", str(run), "--grid", "2", "--no-baselines", "--max-test-samples", "4"]) == 0
    small = {r["method"]: r for r in _rows(run) if r["preference"] == [1.0, 0.0]}
    # full test set: nothing computed on 4 examples may be reused (nor the experts that normalise)
    assert main(["evaluate", str(run), "--grid", "2", "--no-baselines"]) == 0
    out = capsys.readouterr().out
    assert "4 computed, 0 reused" in out and "4 stale rows replaced" in out
    full = {r["method"]: r for r in _rows(run) if r["preference"] == [1.0, 0.0]}
    assert full["pwemoe"]["inputs"] != small["pwemoe"]["inputs"]
    assert len(_rows(run)) == 4  # replaced, not mixed: 2 PWEMoE + 2 experts
    # the same evaluation again reuses everything
    assert main(["evaluate", str(run), "--grid", "2", "--no-baselines"]) == 0
    assert "0 computed, 4 reused" in capsys.readouterr().out
    # routers trained further: PWEMoE rows are recomputed, the experts' rows are still valid
    assert main(["train", "--resume", str(run), "train.steps=9"]) == 0
    assert main(["evaluate", str(run), "--grid", "2", "--no-baselines"]) == 0
    out = capsys.readouterr().out
    assert "2 computed, 2 reused" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rows_reused"] == 2 and summary["rows_computed"] == 2
    assert summary["precision"] == "fp32" and summary["device"] == "cpu"
    # another precision scores differently: nothing is reused, and the summary says how it was computed
    assert main(["evaluate", str(run), "--grid", "2", "--no-baselines", "--precision", "bf16"]) == 0
    assert "4 computed, 0 reused" in capsys.readouterr().out
    assert json.loads((run / "summary.json").read_text())["precision"] == "bf16"


def test_never_deletes_or_overwrites_what_pwemoe_did_not_write(text_setup, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", str(_cfg(text_setup, tmp_path))]) == 0
    # export into a non-empty directory: refused; with --overwrite the user's file stays
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(run), "--preference", "0.5,0.5", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(run), "--preference", "0.5,0.5", "--out", str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "polarity" / "config.json").is_file()
    assert main(["export", str(run), "--preference", "0.2,0.8", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "pwemoe.json").read_text())["preference"]["color"] == pytest.approx(0.8)
    # a user's file where the export would write is refused even with --overwrite
    clash = tmp_path / "clash"
    (clash / "polarity").mkdir(parents=True)
    (clash / "polarity" / "config.json").write_text("{}")
    assert main(["export", str(run), "--preference", "0.5,0.5", "--out", str(clash), "--overwrite"]) == 2
    assert "did not write" in capsys.readouterr().err and (clash / "polarity" / "config.json").read_text() == "{}"
    # finetune into an existing directory: refused, nothing deleted
    ft = tmp_path / "expert"
    ft.mkdir()
    (ft / "keep.txt").write_text("keep")
    cfg = _cfg(text_setup, tmp_path, "ft")
    assert main(["finetune", str(cfg), "--task", "polarity", "--out", str(ft), "--epochs", "0.1"]) == 2
    assert (ft / "keep.txt").read_text() == "keep"
    # a new run into the working directory, or into a user's non-empty directory: refused
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("the user's own file")
    assert main(["train", str(cfg), "run_dir=."]) == 2
    assert "run_dir" in capsys.readouterr().err
    assert main(["train", str(cfg), f"run_dir={out}", "--overwrite"]) == 2
    assert "not a pwemoe run" in capsys.readouterr().err
    assert (tmp_path / "config.yaml").read_text() == "the user's own file"
    # --overwrite on a pwemoe run replaces only its own files, also inside its plots/ directory
    (run / "mine.txt").write_text("mine")
    assert main(["evaluate", str(run), "--grid", "2", "--no-baselines", "--max-test-samples", "4"]) == 0
    assert (run / "plots" / "front_accuracy.png").is_file()
    (run / "plots" / "my_annotated_figure.png").write_text("mine")
    assert main(["train", str(_cfg(text_setup, tmp_path)), "--overwrite"]) == 0
    assert (run / "mine.txt").read_text() == "mine"
    assert [p.name for p in (run / "plots").iterdir()] == ["my_annotated_figure.png"]
    # an output's manifest is trusted only for files inside it: a listed ../ path is never deleted
    victim = tmp_path / "victim.txt"
    victim.write_text("not pwemoe's")
    listed = json.loads((out / ".pwemoe_files.json").read_text())["files"]
    (out / ".pwemoe_files.json").write_text(json.dumps({"files": [*listed, "../victim.txt", str(victim)]}))
    assert main(["export", str(run), "--preference", "0.5,0.5", "--out", str(out), "--overwrite"]) == 0
    assert victim.read_text() == "not pwemoe's"
    # task names are plain names: no path escapes on export
    bad = yaml.safe_load(cfg.read_text())
    bad["tasks"][0]["name"] = "../x"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert main(["train", str(tmp_path / "bad.yaml")]) == 2
    assert "tasks[0].name: must be a plain name" in capsys.readouterr().err


def test_one_writer_per_run_directory(text_setup, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(_cfg(text_setup, tmp_path))]) == 0
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import time\nfrom pwemoe.files import RunLock\nwith RunLock({str(run)!r}, 'holder'):\n"
            "    print('held', flush=True)\n    time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["train", "--resume", str(run), "train.steps=8"]) == 2
        err = capsys.readouterr().err
        assert f"in use by pid {holder.pid}" in err and "holder" in err
        assert main(["evaluate", str(run), "--grid", "2", "--no-baselines"]) == 2
        assert "in use by" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert not (run / "results.json").exists()
    assert main(["evaluate", str(run), "--grid", "2", "--no-baselines"]) == 0  # released when the holder died


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_means_what_the_user_said(text_setup, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(_cfg(text_setup, tmp_path))]) == 0
    # overrides after --resume are applied (not taken for a config path); lr keeps decaying
    assert main(["train", "--resume", str(run), "train.steps=10"]) == 0
    m = _metrics(run)
    assert [r["step"] for r in m] == list(range(1, 11))
    lrs = [r["lr"] for r in m]
    assert all(b <= a + 1e-12 for a, b in zip(lrs, lrs[1:])), lrs
    # a lower lr on resume is the lr used from then on (not the optimizer state's)
    assert main(["train", "--resume", str(run), "train.steps=12", "train.lr=0.001"]) == 0
    assert _metrics(run)[10]["lr"] == pytest.approx(0.001)
    # settings that define the run cannot change
    assert main(["train", "--resume", str(run), "train.steps=14", "model.init_lambda=0.5"]) == 2
    err = capsys.readouterr().err
    assert "model.init_lambda: run has 0.3, now 0.5" in err and "cannot change on --resume" in err
    # a damaged router file of a finished run is rewritten from the trainer state
    from pwemoe.checkpoint import load_routers

    want_state, want_meta = load_routers(run / "routers.safetensors")
    good = (run / "routers.safetensors").read_bytes()
    (run / "routers.safetensors").write_bytes(good[: len(good) // 2])
    assert main(["evaluate", str(run), "--grid", "2"]) == 2
    assert "damaged" in capsys.readouterr().err
    assert main(["train", "--resume", str(run)]) == 0
    state, meta = load_routers(run / "routers.safetensors")
    assert meta == want_meta and all(torch.equal(state[k], want_state[k]) for k in want_state)
    # routers without a trainer state: neither trained over nor resumed
    (run / "trainer_state.pt").unlink()
    assert main(["train", "--resume", str(run)]) == 2
    assert "cannot be resumed" in capsys.readouterr().err
    assert main(["train", str(_cfg(text_setup, tmp_path))]) == 2
    assert "already holds a run" in capsys.readouterr().err
    # a truncated trainer state is a message, not a traceback
    assert main(["train", str(_cfg(text_setup, tmp_path, "r2"))]) == 0
    st = tmp_path / "r2" / "trainer_state.pt"
    st.write_bytes(st.read_bytes()[:100])
    assert main(["train", "--resume", str(tmp_path / "r2"), "train.steps=8"]) == 2
    assert "trainer state" in capsys.readouterr().err


def test_provenance_covers_task_heads(text_setup, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    root, base = text_setup
    expert = tmp_path / "expert_color"
    shutil.copytree(base["tasks"][1]["expert"], expert)
    cfg = _cfg(text_setup, tmp_path)
    data = yaml.safe_load(cfg.read_text())
    data["tasks"][1]["expert"] = str(expert)
    cfg.write_text(yaml.safe_dump(data))
    assert main(["train", str(cfg)]) == 0
    m = AutoModelForSequenceClassification.from_pretrained(expert)
    with torch.no_grad():
        m.classifier.weight.add_(0.1)  # only the head changes; the backbone is identical
    m.save_pretrained(expert)
    assert main(["evaluate", str(tmp_path / "run"), "--grid", "2"]) == 2
    assert "color:head" in capsys.readouterr().err


def test_input_that_would_train_on_garbage_is_refused(text_setup, tmp_path, capsys):
    root, base = text_setup
    # a base directory without a tokenizer
    bare = tmp_path / "bare"
    shutil.copytree(base["model"]["base"], bare)
    for f in bare.iterdir():
        if "token" in f.name or f.name in ("vocab.txt", "special_tokens_map.json"):
            f.unlink()
    cfg = yaml.safe_load(_cfg(text_setup, tmp_path).read_text())
    cfg["model"]["base"] = str(bare)
    (tmp_path / "bare.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "bare.yaml")]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
    # blank text cells
    blank = tmp_path / "blank.csv"
    blank.write_text("text,label\ngood movie,1\n,0\n   ,1\n")
    cfg = yaml.safe_load(_cfg(text_setup, tmp_path).read_text())
    cfg["tasks"][0]["data"]["files"]["train"] = str(blank)
    (tmp_path / "blank.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "blank.yaml")]) == 2
    assert "2 empty cell(s) in column 'text'" in capsys.readouterr().err
    # non-finite and out-of-range numbers, in config and on the command line
    p = _cfg(text_setup, tmp_path)
    assert main(["train", str(p), "model.init_lambda=.nan", "train.lr=-1", "train.steps=0"]) == 2
    err = capsys.readouterr().err
    assert "model.init_lambda" in err and "train.lr" in err and "train.steps" in err and "3 config error" in err
    assert main(["train", str(p)]) == 0
    assert main(["evaluate", str(tmp_path / "run"), "--batch-size", "-3"]) == 2
    assert "--batch-size must be an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "run" / "results.json").exists()


def test_every_failure_is_a_one_line_message(text_setup, tmp_path, capsys):
    p = _cfg(text_setup, tmp_path)
    cases = [
        (["model.targets=['re:(unclosed']"], "invalid target regex"),
        (["tasks.0.max_length=1000"], "beyond the model's 64 positions"),
        (["train.objective=tchebycheff", "train.objective_args={ideal: [0, 0, 0]}"], "one value per task (k=2)"),
        (["model.base=/nonexistent/base"], "local model directory /nonexistent/base does not exist"),
        ([f"tasks.0.data.files.train={tmp_path / 'missing.csv'}"], "missing.csv for split 'train' does not exist"),
        (["tasks.0.data={source: hub, path: nobody/no-such-dataset}"], "could not load split"),
    ]
    for overrides, want in cases:
        code = main(["train", str(p), *overrides])
        err = capsys.readouterr().err
        assert code == 2 and want in err, (overrides, err)
        assert "Traceback" not in err
    bin_csv = tmp_path / "binary.csv"
    bin_csv.write_bytes(b"\x00\xff\xfe" * 100)
    code = main(["train", str(p), f"tasks.0.data.files.train={bin_csv}"])
    assert code == 2 and "tasks[0].data" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    assert main(["train", str(tmp_path / "broken.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    # results.json damaged outside pwemoe
    assert main(["train", str(p)]) == 0
    (tmp_path / "run" / "results.json").write_text("[{")
    assert main(["evaluate", str(tmp_path / "run"), "--grid", "2"]) == 2
    assert "results.json (evaluation results) is not valid JSON" in capsys.readouterr().err
    # -v shows the traceback
    with pytest.raises(ValueError):
        main(["-v", "evaluate", str(tmp_path / "run"), "--grid", "2"])


def _random_value(rng: random.Random):
    return rng.choice(
        [
            0,
            -1,
            1.5,
            float("nan"),
            float("inf"),
            "x",
            "",
            None,
            True,
            [],
            [1, "a"],
            {},
            {"a": 1},
            "re:(",
            10**9,
            -(10**9),
            [0.5, 0.5],
        ]
    )


def test_fuzz_config_and_preference_parsers():
    """Random keys, types and values: success, ConfigError or ValueError/TypeError, never anything else."""
    from pwemoe.config import ConfigError
    from pwemoe.configfile import build_config
    from pwemoe.core.preference import normalize_preference, parse_preference

    rng = random.Random(0)
    keys = [
        "model",
        "model.base",
        "model.init_lambda",
        "model.targets",
        "model.router_hidden_layers",
        "tasks",
        "tasks.0",
        "tasks.0.name",
        "tasks.0.data",
        "tasks.0.data.source",
        "tasks.0.max_length",
        "train",
        "train.steps",
        "train.lr",
        "train.objective",
        "train.objective_args",
        "train.rays_per_step",
        "eval.grid",
        "eval.ta_scales",
        "run_dir",
        "bogus",
        "train.bogus",
    ]
    good = {
        "model": {"base": "b"},
        "tasks": [
            {"name": "a", "expert": "e", "data": {"path": "p"}},
            {"name": "b", "expert": "e", "data": {"path": "p"}},
        ],
    }
    outcomes = {"ok": 0, "error": 0}
    for _ in range(300):
        data = copy.deepcopy(good)
        for _ in range(rng.randint(1, 4)):
            node = data
            parts = rng.choice(keys).split(".")
            for part in parts[:-1]:
                if isinstance(node, list):
                    node = node[int(part)] if part.isdigit() and int(part) < len(node) else None
                elif isinstance(node, dict):
                    node = node.setdefault(part, {})
                if not isinstance(node, (dict, list)):
                    break
            else:
                if isinstance(node, dict):
                    node[parts[-1]] = _random_value(rng)
        try:
            build_config(data)
            outcomes["ok"] += 1
        except ConfigError:
            outcomes["error"] += 1
    assert outcomes["ok"] > 0 and outcomes["error"] > 0
    for _ in range(300):
        text = "".join(rng.choice("0123456789.,- eE+nanif") for _ in range(rng.randint(0, 12)))
        try:
            normalize_preference(parse_preference(text), 2)
        except (ValueError, TypeError):
            pass
        v = [_random_value(rng) for _ in range(rng.randint(0, 3))]
        try:
            normalize_preference(v, 2)
        except (ValueError, TypeError):
            pass


def test_killed_evaluate_leaves_results_readable(text_setup, tmp_path):
    """results.json is rewritten atomically after each row: a kill mid-evaluation leaves valid JSON."""
    run = tmp_path / "run"
    assert main(["train", str(_cfg(text_setup, tmp_path))]) == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "pwemoe.cli", "evaluate", str(run), "--grid", "5"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "results.json").exists():
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    rows = _rows(run)
    assert isinstance(rows, list)
    assert main(["evaluate", str(run), "--grid", "5"]) == 0
