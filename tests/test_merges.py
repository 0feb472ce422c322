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
