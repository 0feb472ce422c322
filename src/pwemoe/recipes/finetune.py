"""`pwemoe finetune`: make an expert by fine-tuning the base on one task.

The task says what an expert is (`Task.finetuning`): a full fine-tune saved as a *ForSequenceClassification
folder for sequence classification, a PEFT LoRA adapter (peft, extra "llm") for causal-LM tasks. One loop
trains either: AdamW with warm-up and linear decay, gradient clipping at 1, loss scaling for fp16.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from ..configfile import read_config
from ..core.checks import positive_int_problem
from ..devices import autocast, grad_scaler, resolve_device
from ..files import atomic_write_json, prepare_output, staged_dir
from ..tasks import TASK_TYPES

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
    the hyperparameters, and what the task adds (`Task.expert_provenance`: a causal LM's prompt, answers
    and LoRA settings). `data`: the loaded training data (loaded here when None)."""
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
    if cfg.precision != "fp32":  # an expert trained under autocast is another expert (fp32 keys stay as they were)
        out["precision"] = cfg.precision
    out.update(TASK_TYPES[tcfg.type](tcfg).expert_provenance({"lora": lora}))
    return out


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
    """Fine-tune `model.base` on the named task of a config and save the expert the task makes.

    Runs on the config's `device` in its `precision` (fp16 with dynamic loss scaling). `lora`: the LoRA
    settings of causal-LM experts ({"r", "alpha", "targets"}).

    `out` must be new or empty, unless `overwrite`: then a previous finetune's output there is replaced as a
    whole (files of others in it are kept). The expert is written to a temporary sibling first and swapped
    in, so `out` holds the complete previous expert or the complete new one, never a mix.
    """
    from tqdm.auto import tqdm

    from ..tasks.data import TaskStream, load_task_data

    errors = [
        f"{name} must be > 0, got {v!r}"
        for name, v in (("--epochs", epochs), ("--lr", lr))
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v != v or v == float("inf")
    ]
    problem = positive_int_problem("--batch-size", batch_size)
    if problem:
        errors.append(problem)
    if errors:
        raise ConfigError(errors)
    out = prepare_output(out, overwrite, "finetune")  # refuse before any work is done
    cfg = read_config(config, [f"{k}={v}" for k, v in (("device", device), ("precision", precision)) if v])
    try:
        device = resolve_device(cfg.device)
    except ValueError as e:
        raise ConfigError([str(e)]) from None
    tcfg = next((t for t in cfg.tasks if t.name == task), None)
    if tcfg is None:
        raise ConfigError([f"--task: no task named {task!r}; tasks are {cfg.task_names}"])
    base = cfg.model.path_map.get(cfg.model.base, cfg.model.base)
    data = load_task_data(tcfg.data, "train", cfg.model.path_map)  # never the validation carve
    ft = TASK_TYPES[tcfg.type](tcfg).finetuning(base, data, seed, {"lora": lora, "base_name": cfg.model.base})
    model, params = ft.model, ft.params
    model.to(device)
    scaler = grad_scaler(device, cfg.precision)
    steps = max(1, math.ceil(epochs * len(data) / batch_size))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=ft.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * max(0.0, 1 - s / steps)
    )
    stream = TaskStream(len(data), batch_size, seed)
    model.train()
    bar = tqdm(range(steps), desc=ft.description, unit="step")
    for _ in bar:
        rows = data[stream.next_indices()]
        with autocast(device, cfg.precision):
            loss = ft.loss(rows, device)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # clip the true gradients
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        sched.step()
        if bar.n % 10 == 0:  # a device sync: not every step
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    with staged_dir(out, overwrite, "finetune") as tmp:  # a cached expert is either complete or absent
        ft.save(tmp)
        provenance = finetune_provenance(cfg, task, epochs, lr, batch_size, seed, data, lora)
        atomic_write_json(tmp / FINETUNE_INFO, provenance)
    return out
