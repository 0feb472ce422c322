"""`pwemoe finetune`: make an expert by fine-tuning the base on one task.

Sequence classification: a full fine-tune, saved as a *ForSequenceClassification folder. Causal-LM
tasks: a PEFT LoRA adapter on the base (peft, extra "llm"), trained on the task's own loss.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from ..devices import autocast, grad_scaler, move, resolve_device
from ..io import atomic_write_json, publish_dir
from ..modalities.text import load_tokenizer
from ..workbench import read_config

log = logging.getLogger(__name__)

FINETUNE_INFO = "pwemoe_finetune.json"  # what an expert was trained on and how: a cache key for the demo


def finetune_provenance(
    cfg: Any,
    task: str,
    epochs: float,
    lr: float,
    batch_size: int,
    seed: int,
    data: Any = None,
    lora: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What determines a finetuned expert: base, task data as trained on (after the validation carve),
    and the hyperparameters. `data`: the loaded training data (loaded here when None)."""
    from ..tasks.data import dataset_fingerprint, load_task_data

    tcfg = next(t for t in cfg.tasks if t.name == task)
    d = tcfg.data
    if data is None:
        data = load_task_data(d, "train", cfg.model.path_map)
    cols = [d.text_column] + ([d.text_pair_column] if d.text_pair_column else [])
    cols += [c for c in (d.prompt_column, d.label_column) if c and c in data.column_names]
    out = {
        "task": task,
        "base": cfg.model.base,
        "train_examples": len(data),
        "train_data": dataset_fingerprint(data, cols),
        "max_length": tcfg.max_length,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
    }
    if tcfg.type.startswith("causal_lm"):  # the prompt and answers are part of what the adapter learned
        out["task_format"] = {
            "type": tcfg.type,
            "prompt_template": tcfg.prompt_template,
            "label_words": tcfg.label_words,
            "chat_template": tcfg.chat_template,
            "lora": lora,
        }
    return out


LORA_DEFAULTS: dict[str, Any] = {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}


def finetune_from_config(
    config: str | Path,
    task: str,
    out: str | Path,
    epochs: float = 1.0,
    lr: float = 5e-5,
    batch_size: int = 32,
    seed: int = 0,
    overwrite: bool = False,
    device: str | None = None,
    precision: str | None = None,
    lora: dict[str, Any] | None = None,
) -> Path:
    """Fine-tune `model.base` on the named task of a config; save a *ForSequenceClassification dir.

    Runs on the config's `device` in its `precision` (fp16 with dynamic loss scaling).

    `out` must be new or empty, unless `overwrite`: then only what a previous finetune wrote there
    is replaced. The model is written to a temporary sibling first, so `out` is never half-written.
    """
    from transformers import AutoModelForSequenceClassification

    from ..tasks.data import TaskStream, load_task_data

    errors = [
        f"{name} must be > 0, got {v!r}"
        for name, v in (("--epochs", epochs), ("--lr", lr))
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v != v or v == float("inf")
    ]
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        errors.append(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    if errors:
        raise ConfigError(errors)
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:  # refuse before any work is done
        raise ValueError(
            f"finetune: {out} is not empty; choose a new directory, or pass --overwrite to replace "
            "what pwemoe wrote there before (other files are kept)"
        )
    cfg = read_config(config, [f"{k}={v}" for k, v in (("device", device), ("precision", precision)) if v])
    try:
        device = resolve_device(cfg.device)
    except ValueError as e:
        raise ConfigError([str(e)]) from None
    tcfg = next((t for t in cfg.tasks if t.name == task), None)
    if tcfg is None:
        raise ConfigError([f"--task: no task named {task!r}; tasks are {cfg.task_names}"])
    if tcfg.type.startswith("causal_lm"):
        lora = {**LORA_DEFAULTS, **(lora or {})}
        return _finetune_lora(cfg, tcfg, out, epochs, lr, batch_size, seed, overwrite, device, lora)
    if tcfg.type != "sequence_classification":
        raise ValueError(
            f"pwemoe finetune makes sequence-classification and causal-LM (LoRA) experts; task {task!r} is {tcfg.type}"
        )
    base = cfg.model.path_map.get(cfg.model.base, cfg.model.base)
    data = load_task_data(tcfg.data, "train", cfg.model.path_map)  # never the validation carve
    names = tcfg.class_names or getattr(data.features[tcfg.data.label_column], "names", None)
    if not names:
        raise ValueError(f"task {task!r}: give class_names (the label column has no names)")
    torch.manual_seed(seed)
    tok = load_tokenizer(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    model.to(device)
    scaler = grad_scaler(device, cfg.precision)
    steps = max(1, math.ceil(epochs * len(data) / batch_size))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * max(0.0, 1 - s / steps)
    )
    stream = TaskStream(len(data), batch_size, seed)
    model.train()
    from tqdm.auto import tqdm

    bar = tqdm(range(steps), desc=f"finetune {task}", unit="step")
    d = tcfg.data
    for _ in bar:
        rows = data[stream.next_indices()]
        pairs = rows[d.text_pair_column] if d.text_pair_column else None
        enc = tok(
            list(rows[d.text_column]),
            pairs,
            truncation=True,
            max_length=tcfg.max_length,
            padding=True,
            return_tensors="pt",
        )
        with autocast(device, cfg.precision):
            loss = model(**move(dict(enc), device), labels=torch.as_tensor(rows[d.label_column]).to(device)).loss
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # clip the true gradients
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        sched.step()
        if bar.n % 10 == 0:  # a device sync: not every step
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    tmp = out.parent / f".{out.name}.pwemoe-tmp"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)  # our own leftover from a killed finetune
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    atomic_write_json(tmp / FINETUNE_INFO, finetune_provenance(cfg, task, epochs, lr, batch_size, seed, data))
    publish_dir(tmp, out, overwrite, "finetune")  # a cached expert is either complete or absent
    return out


def _finetune_lora(
    cfg: Any,
    tcfg: Any,
    out: Path,
    epochs: float,
    lr: float,
    batch_size: int,
    seed: int,
    overwrite: bool,
    device: torch.device,
    lora: dict[str, Any],
) -> Path:
    """A LoRA adapter (peft) on the base, trained with the task's own encode / head / loss; published atomically."""
    try:
        import peft
    except ImportError:
        raise ValueError("LoRA experts are trained with peft: pip install 'pwemoe[llm]'") from None
    from tqdm.auto import tqdm

    from ..modalities import MODALITIES
    from ..modalities.causal_lm import HEAD_ONLY_PREFIX
    from ..tasks import TASK_TYPES
    from ..tasks.data import TaskStream, load_task_data

    base = cfg.model.path_map.get(cfg.model.base, cfg.model.base)
    task = TASK_TYPES[tcfg.type](tcfg)
    modality = MODALITIES[task.modality](base)
    modality.load()
    data = load_task_data(tcfg.data, "train", cfg.model.path_map)  # never the validation carve
    task.train_data = data
    if not task.class_names and task.has_labels:
        task.class_names = list(getattr(data.features[tcfg.data.label_column], "names", None) or [])
    errors: list[str] = []
    task.validate_data(errors, 0)
    if errors:
        raise ConfigError(errors)
    task.attach(modality)
    torch.manual_seed(seed)
    pcfg = peft.LoraConfig(
        r=int(lora["r"]),
        lora_alpha=float(lora["alpha"]),
        target_modules=list(lora["targets"]),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(modality.model, pcfg)  # LoRA layers are injected into modality.backbone too
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    steps = max(1, math.ceil(epochs * len(data) / batch_size))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * max(0.0, 1 - s / steps)
    )
    scaler = grad_scaler(device, cfg.precision)
    stream = TaskStream(len(data), batch_size, seed)
    model.train()
    bar = tqdm(range(steps), desc=f"finetune {task.name} (LoRA r={lora['r']})", unit="step")
    for _ in bar:
        rows = data[stream.next_indices()]
        inputs = move(modality.collate(task.encode(rows)), device)
        with autocast(device, cfg.precision):
            outputs = modality.backbone(**{k: v for k, v in inputs.items() if not k.startswith(HEAD_ONLY_PREFIX)})
            loss = task.loss(task.head(outputs, inputs), task.labels(rows).to(device))
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        sched.step()
        if bar.n % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    # the adapter names the base as the config does, so that upcycling can check it
    model.peft_config["default"].base_model_name_or_path = cfg.model.base
    tmp = out.parent / f".{out.name}.pwemoe-tmp"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)  # our own leftover from a killed finetune
    model.save_pretrained(tmp)
    atomic_write_json(
        tmp / FINETUNE_INFO, finetune_provenance(cfg, tcfg.name, epochs, lr, batch_size, seed, data, lora)
    )
    publish_dir(tmp, out, overwrite, "finetune")
    return out
