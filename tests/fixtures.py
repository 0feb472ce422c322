"""A tiny but real pipeline on disk: tokenizer, base, fine-tuned experts and CSV data (seconds to build)."""

from __future__ import annotations

import copy
import csv
import random
from pathlib import Path

import torch
import yaml
from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

WORDS = [
    "good",
    "bad",
    "red",
    "green",
    "blue",
    "movie",
    "the",
    "a",
    "is",
    "was",
    "very",
    "not",
    "news",
    "sport",
    "film",
    "plot",
    "game",
    "team",
    "won",
    "lost",
]


def _tokenizer(d: Path) -> BertTokenizerFast:
    d.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})


def _rows(task: str, n: int, rng: random.Random) -> list[dict]:
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS[5:]) for _ in range(rng.randint(3, 8))]
        if task == "polarity":
            y = rng.randint(0, 1)
            words.insert(rng.randint(0, len(words)), ["bad", "good"][y])
        else:
            y = rng.randint(0, 2)
            words.insert(rng.randint(0, len(words)), ["red", "green", "blue"][y])
        out.append({"text": " ".join(words), "label": y})
    return out


def _finetune(base: BertModel, tok, rows: list[dict], num_labels: int, seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = copy.deepcopy(base.config)
    cfg.num_labels = num_labels
    cfg.id2label = {i: f"class_{i}" for i in range(num_labels)}
    cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    m = BertForSequenceClassification(cfg)
    m.bert.load_state_dict(base.state_dict())
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    m.train()
    for i in range(60):
        b = rows[(i * 16) % len(rows) :][:16]
        enc = tok([r["text"] for r in b], padding=True, return_tensors="pt")
        loss = m(**enc, labels=torch.tensor([r["label"] for r in b])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def write_csv_splits(root: Path, task: str, splits: dict[str, list[dict]]) -> dict:
    """Write root/data/<task>_<split>.csv (columns text, label) and return the task's `data` config."""
    files = {}
    for split, rows in splits.items():
        p = root / "data" / f"{task}_{split}.csv"
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["text", "label"])
            w.writeheader()
            w.writerows(rows)
        files[split] = str(p)
    return {"source": "csv", "files": files}


def build_text_setup(root: Path, n_train: int = 200, n_test: int = 60) -> dict:
    """Write base/, experts/<task>/, data/<task>_{train,test}.csv and return a config dict."""
    rng = random.Random(0)
    tok = _tokenizer(root / "base")
    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=tok.vocab_size,
        max_position_embeddings=64,
    )
    base = BertModel(cfg)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    tasks = []
    for i, (task, nl) in enumerate([("polarity", 2), ("color", 3)]):
        train, test = _rows(task, n_train, rng), _rows(task, n_test, rng)
        data = write_csv_splits(root, task, {"train": train, "test": test})
        expert = _finetune(base, tok, train, nl, seed=i)
        expert.save_pretrained(root / "experts" / task)
        tok.save_pretrained(root / "experts" / task)
        tasks.append(
            {
                "name": task,
                "expert": str(root / "experts" / task),
                "max_length": 16,
                "data": {**data, "path": data["files"]["train"]},
            }
        )
    config = {
        "model": {"base": str(root / "base"), "init_lambda": 0.3},
        "tasks": tasks,
        "train": {"steps": 30, "lr": 0.05, "batch_size": 16, "save_interval": 10, "log_interval": 1, "seed": 0},
        "eval": {"batch_size": 64, "grid": 3},
        "run_dir": str(root / "run"),
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return config


def write_short_run_config(base: dict, path: Path, run_dir: Path, **train) -> Path:
    """Write `build_text_setup`'s config to `path` for a short run in `run_dir`: 6 steps unless `train` says
    otherwise, a checkpoint every 2 steps, a log line every step. Returns `path`."""
    cfg = copy.deepcopy(base)
    cfg["run_dir"] = str(run_dir)
    cfg["train"].update({"steps": 6, "save_interval": 2, "log_interval": 1, **train})
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_validation_run(base: dict, tmp: Path, steps: int = 10) -> Path:
    """Train a tiny run on `build_text_setup`'s config whose tasks have validation data (30% of their training
    data, carved): what `pwemoe select` searches and certifies on. Returns the run directory."""
    from pwemoe.recipes.train import train

    names = {"polarity": ["class_0", "class_1"], "color": ["class_0", "class_1", "class_2"]}
    tasks = [
        {**t, "class_names": names[t["name"]], "data": {**t["data"], "validation_fraction": 0.3}} for t in base["tasks"]
    ]
    cfg = {**base, "tasks": tasks, "run_dir": str(tmp / "run"), "train": {**base["train"], "steps": steps, "lr": 0.2}}
    (tmp / "c.yaml").write_text(yaml.safe_dump(cfg))
    return Path(train(tmp / "c.yaml", [], verbose=-1))
