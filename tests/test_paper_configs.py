"""Every ready config runs end to end on local tiny replicas (hub ids mapped to local paths)."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from pwemoe.core import simplex_grid_size
from tests.replicas import clip_replicas, gpt2_replicas

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["clip-vit-b32_2tasks", "clip-vit-b32_3tasks", "clip-vit-b32_TA8", "gpt2_glue"])
def test_config_end_to_end_on_replicas(name, tmp_path):
    from pwemoe.recipes.evaluate import evaluate_run
    from pwemoe.recipes.train import train
    from pwemoe.runs import export_run

    cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    k = len(cfg["tasks"])
    path_map = (clip_replicas if name.startswith("clip") else gpt2_replicas)(cfg, tmp_path)
    cfg["model"]["path_map"] = path_map
    cfg["run_dir"] = str(tmp_path / "run")
    cfg["train"].update(steps=2, save_interval=1)
    cfg["eval"].update(ta_scales=[0.5])
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    run = train(p, [])
    summary = evaluate_run(run, grid=2)
    assert summary["preferences"] == simplex_grid_size(k, 2) == k
    rows = json.loads((run / "results.json").read_text())
    assert {r["method"] for r in rows} >= {"pwemoe", "average", "task_arithmetic", "pref_task_arithmetic"}
    pref = [1.0] + [0.0] * (k - 1)
    out = export_run(run, pref, tmp_path / "export")
    want = next(r["accuracy"] for r in rows if r["method"] == "pwemoe" and r["preference"] == pref)
    first = cfg["tasks"][0]
    if name.startswith("clip"):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(out).eval()
        import datasets

        ds = datasets.load_from_disk(
            path_map[first["data"]["path"] + (f":{first['data']['name']}" if first["data"].get("name") else "")]
        )["test"]
        proc, tok = AutoImageProcessor.from_pretrained(out), AutoTokenizer.from_pretrained(out)
        names = ds.features["label"].names
        with torch.no_grad():
            txt = []
            for c in names:
                e = model.get_text_features(
                    **tok([t.format(c) for t in first["templates"]], padding=True, return_tensors="pt")
                )
                e = e.pooler_output if hasattr(e, "pooler_output") else e
                e = (e / e.norm(dim=-1, keepdim=True)).mean(0)
                txt.append(e / e.norm())
            img = model.get_image_features(
                **proc(images=[im.convert("RGB") for im in ds["image"]], return_tensors="pt")
            )
            img = img.pooler_output if hasattr(img, "pooler_output") else img
            pred = (img / img.norm(dim=-1, keepdim=True) @ torch.stack(txt).T).argmax(-1)
        acc = (pred == torch.tensor(list(ds["label"]))).float().mean().item()
    else:
        import datasets
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(out / first["name"]).eval()
        tok = AutoTokenizer.from_pretrained(out / first["name"])
        ds = datasets.load_from_disk(path_map[f"{first['data']['path']}:{first['data']['name']}"])[
            first["data"]["test_split"]
        ]
        enc = tok(
            list(ds[first["data"]["text_column"]]),
            truncation=True,
            max_length=first["max_length"],
            padding=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            pred = model(**enc).logits.argmax(-1)
        acc = (pred == torch.tensor(list(ds["label"]))).float().mean().item()
    assert acc == pytest.approx(want[first["name"]], abs=1e-6)

    # the serving API answers the same for that preference: images as base64 PNGs, texts, pairs
    from pwemoe import PreferenceModel

    pm = PreferenceModel(run)
    n = 4
    if name.startswith("clip"):
        import base64
        import io

        def b64(im):
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="PNG")
            return base64.b64encode(buf.getvalue()).decode()

        inputs = [b64(im) for im in ds["image"][:n]]
    else:
        inputs = list(ds[first["data"]["text_column"]][:n])
    out = pm.predict(pref, first["name"], inputs)
    assert [p["index"] for p in out["predictions"]] == pred[:n].tolist()
    pair = next((t for t in cfg["tasks"] if t["data"].get("text_pair_column")), None)
    if pair is not None:
        res = pm.predict(pref, pair["name"], [["a premise here", "a hypothesis"]])
        assert res["predictions"][0]["label"] in pm.wb.tasks[pm.task_names.index(pair["name"])].class_names
        with pytest.raises(ValueError, match="sentence pairs"):
            pm.predict(pref, pair["name"], ["not a pair"])
