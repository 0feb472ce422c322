"""`pwemoe finetune`: make an expert by fine-tuning the base on one task (sequence classification)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from .config import ConfigError, load_config

log = logging.getLogger(__name__)


def finetune_from_config(config: str | Path, task: str, out: str | Path, epochs: float = 1.0, lr: float = 5e-5,
                         batch_size: int = 32, seed: int = 0) -> Path:
    """Fine-tune `model.base` on the named task of a config; save a *ForSequenceClassification dir."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .tasks.data import TaskStream, first_n, load_split

    cfg = load_config(config)
    tcfg = next((t for t in cfg.tasks if t.name == task), None)
    if tcfg is None:
        raise ConfigError([f"--task: no task named {task!r}; tasks are {cfg.task_names}"])
    if tcfg.type != "sequence_classification":
        raise ValueError(f"pwemoe finetune makes sequence-classification experts; task {task!r} is {tcfg.type}")
    base = cfg.model.path_map.get(cfg.model.base, cfg.model.base)
    data = first_n(load_split(tcfg.data, tcfg.data.train_split, cfg.model.path_map), tcfg.data.max_train_samples)
    names = tcfg.class_names or getattr(data.features[tcfg.data.label_column], "names", None)
    if not names:
        raise ValueError(f"task {task!r}: give class_names (the label column has no names)")
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    steps = max(1, math.ceil(epochs * len(data) / batch_size))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * max(0.0, 1 - s / steps))
    stream = TaskStream(len(data), batch_size, seed)
    model.train()
    from tqdm.auto import tqdm

    bar = tqdm(range(steps), desc=f"finetune {task}", unit="step")
    d = tcfg.data
    for _ in bar:
        rows = data[stream.next_indices()]
        pairs = rows[d.text_pair_column] if d.text_pair_column else None
        enc = tok(list(rows[d.text_column]), pairs, truncation=True, max_length=tcfg.max_length, padding=True,
                  return_tensors="pt")
        loss = model(**enc, labels=torch.as_tensor(rows[d.label_column])).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)  # a cached expert is either complete or absent
    return out
