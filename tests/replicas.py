"""Tiny local replicas of hub models and datasets named in a config, and the path_map to them.

Same architectures and formats as the real ones (CLIPModel + CLIPVisionModel experts with zero-shot
heads, GPT-2 + GPT2ForSequenceClassification experts, image and GLUE-style datasets with
ClassLabel features), random weights, a handful of examples.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _perturb(model: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def _save(hub_id: str, root: Path, *objs) -> dict[str, str]:
    """save_pretrained every object into root/models/<hub id>; the path_map entry for that id."""
    d = root / "models" / hub_id.replace("/", "__")
    for o in objs:
        o.save_pretrained(d)
    return {hub_id: str(d)}


def clip_replicas(cfg: dict, root: Path) -> dict[str, str]:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizerFast

    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    tok = CLIPTokenizerFast(vocab=vocab, merges=[])
    torch.manual_seed(0)
    conf = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=len(vocab),
            max_position_embeddings=77,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    base = CLIPModel(conf).eval()
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    m = _save(cfg["model"]["base"], root, base, tok, proc)
    for i, t in enumerate(cfg["tasks"]):
        m |= _save(t["expert"], root, _perturb(copy.deepcopy(base.vision_model), seed=i + 1))
        m |= _image_dataset(t["data"], root, n_classes=3 + i % 3, seed=i)
    return m


def _image_dataset(data: dict, root: Path, n_classes: int, seed: int) -> dict[str, str]:
    import datasets

    rng = np.random.default_rng(seed)
    feats = datasets.Features(
        {
            data.get("image_column", "image"): datasets.Image(),
            data.get("label_column", "label"): datasets.ClassLabel(names=[f"class {c}" for c in range(n_classes)]),
        }
    )
    splits = {}
    for split in {data.get("train_split", "train"), data.get("test_split", "test")}:
        n = 12
        imgs = [rng.integers(0, 255, (40, 40, 3), dtype=np.uint8) for _ in range(n)]
        from PIL import Image

        splits[split] = datasets.Dataset.from_dict(
            {
                data.get("image_column", "image"): [Image.fromarray(x) for x in imgs],
                data.get("label_column", "label"): [int(c) for c in rng.integers(0, n_classes, n)],
            },
            features=feats,
        )
    key = f"{data['path']}:{data['name']}" if data.get("name") else data["path"]
    d = root / "data" / key.replace("/", "__").replace(":", "__")
    datasets.DatasetDict(splits).save_to_disk(str(d))
    return {key: str(d)}


def gpt2_replicas(cfg: dict, root: Path) -> dict[str, str]:
    import datasets
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2Model, GPT2TokenizerFast

    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)} | {"<|endoftext|>": 256}
    tok = GPT2TokenizerFast(vocab=vocab, merges=[])
    torch.manual_seed(0)
    conf = GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=257, n_positions=160, bos_token_id=256, eos_token_id=256
    )
    base = GPT2Model(conf).eval()
    m = _save(cfg["model"]["base"], root, base, tok)
    rng = np.random.default_rng(0)
    words = "the a cat dog sat ran on mat big small not very good bad".split()
    for i, t in enumerate(cfg["tasks"]):
        data = t["data"]
        n_labels = 3 if data.get("name") == "mnli" else 2
        c = copy.deepcopy(conf)
        c.num_labels, c.pad_token_id = n_labels, 256
        e = GPT2ForSequenceClassification(c).eval()
        e.transformer.load_state_dict(base.state_dict())
        _perturb(e.transformer, seed=i + 1)
        m |= _save(t["expert"], root, e, tok)
        cols = [data["text_column"]] + ([data["text_pair_column"]] if data.get("text_pair_column") else [])
        feats = datasets.Features(
            {
                **{col: datasets.Value("string") for col in cols},
                data["label_column"]: datasets.ClassLabel(num_classes=n_labels),
            }
        )
        splits = {}
        for split in {data["train_split"], data["test_split"]}:
            n = 12
            rows = {col: [" ".join(rng.choice(words, rng.integers(3, 9))) for _ in range(n)] for col in cols}
            rows[data["label_column"]] = [int(x) for x in rng.integers(0, n_labels, n)]
            splits[split] = datasets.Dataset.from_dict(rows, features=feats)
        key = f"{data['path']}:{data['name']}"
        dd = root / "data" / key.replace("/", "__").replace(":", "__")
        datasets.DatasetDict(splits).save_to_disk(str(dd))
        m[key] = str(dd)
    return m
