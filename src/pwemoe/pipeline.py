"""The workbench: base + experts upcycled, tasks with heads and data, and the batched forward.

Shared by training, evaluation and export so that all three see exactly the same model.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

from .config import Config, ConfigError
from .tasks import TASK_TYPES, Task
from .upscale import upscale

log = logging.getLogger(__name__)

_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Workbench:
    """Everything a run needs, built from a Config.

    Attributes:
        model: the object holding the upcycled modules (text: the backbone; CLIP: the CLIPModel).
        backbone: what the batched inputs go through (text: the backbone; CLIP: `vision_model`).
        tasks: one Task per expert, in config order.
    """

    def __init__(self, cfg: Config, load_train: bool = True, load_test: bool = True,
                 max_test_samples: int | None = None, upcycle: bool = True) -> None:
        self.cfg = cfg
        self.tasks: list[Task] = [TASK_TYPES[t.type](t) for t in cfg.tasks]
        kinds = {t.modality for t in self.tasks}
        if len(kinds) != 1:
            raise ConfigError([f"tasks: all tasks must share one modality (one backbone), got {sorted(kinds)}"])
        self.modality = kinds.pop()
        base = self.resolve(cfg.model.base)
        if self.modality == "text":
            from transformers import AutoModel, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(base)
            if self.tokenizer.pad_token is None:  # GPT-2 and Llama ship without a pad token
                self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model = AutoModel.from_pretrained(base)
            self.backbone = self.model
            for t in self.tasks:
                t.set_processor(self.tokenizer)
        else:
            from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

            self.tokenizer = AutoTokenizer.from_pretrained(base)
            self.processor = AutoImageProcessor.from_pretrained(base)
            self.model = CLIPModel.from_pretrained(base)
            self.backbone = self.model.vision_model
            for t in self.tasks:
                t.set_processor(self.processor)
        self.model.eval()  # routers train with dropout off: the heads were fit to the experts' features
        self.info = None
        if upcycle:
            self._upcycle()
        self._load_data(load_train, load_test, max_test_samples)
        if self.modality == "image":  # heads need the class names, which may come from the data
            for t in self.tasks:
                t.build_head(self.model, self.tokenizer)

    def resolve(self, path: str) -> str:
        """Map hub ids to local mirrors (model.path_map), for offline use and tests."""
        return self.cfg.model.path_map.get(path, path)

    def _upcycle(self) -> None:
        m = self.cfg.model
        experts = {t.name: functools.partial(t.load_expert_backbone, self.resolve(t.cfg.expert)) for t in self.tasks}
        upscale(self.backbone, experts, targets=m.targets, init_lambda=m.init_lambda,
                router_hidden_layers=m.router_hidden_layers, include_attention=m.include_attention,
                task_vector_dtype=_DTYPES[m.task_vector_dtype])
        info = self.backbone.pwemoe_info
        info.base_id = m.base
        info.expert_ids = {t.name: t.cfg.expert for t in self.tasks}
        if self.backbone is not self.model:
            self.model.pwemoe_info = info
        self.info = info

    def _load_data(self, load_train: bool, load_test: bool, max_test: int | None) -> None:
        from .tasks.data import first_n, load_split

        errors: list[str] = []
        pm = self.cfg.model.path_map
        for i, t in enumerate(self.tasks):
            d = t.cfg.data
            try:
                if load_train:
                    t.train_data = first_n(load_split(d, d.train_split, pm), d.max_train_samples)
                if load_test:
                    t.test_data = first_n(load_split(d, d.test_split, pm), max_test or d.max_test_samples)
            except (ValueError, FileNotFoundError) as e:
                errors.append(f"tasks[{i}].data: {e}")
                continue
            if not t.class_names:  # e.g. CLIP zero-shot: take the names of a ClassLabel column
                ds = t.train_data if t.train_data is not None else t.test_data
                if ds is None:  # nothing loaded (export): read the features of the test split
                    try:
                        ds = load_split(d, d.test_split, pm)
                    except (ValueError, FileNotFoundError) as e:
                        errors.append(f"tasks[{i}].data: {e}")
                        continue
                feat = ds.features.get(d.label_column)
                if getattr(feat, "names", None):
                    t.class_names = list(feat.names)
                else:
                    errors.append(f"tasks[{i}].class_names: required for task {t.name!r}; its label column "
                                  f"{d.label_column!r} carries no class names")
                    continue
            t.validate_data(errors, i)
        if errors:
            raise ConfigError(errors)

    # --- batched forward -----------------------------------------------------------------------
    def _pad(self, feats: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.modality == "text":
            return dict(self.tokenizer.pad(feats, return_tensors="pt"))
        return {"pixel_values": torch.stack([f["pixel_values"] for f in feats])}

    def logits(self, parts: list[tuple[Task, dict[str, list]]], backbone: nn.Module | None = None) -> list[torch.Tensor]:
        """One backbone forward on the concatenated examples of several tasks; per-task logits.

        parts: [(task, rows)] where rows is a column dict (`dataset[indices]`). Returns logits
        Tensor[n_t, C_t] per part. `backbone` replaces the upcycled one (baselines).
        """
        feats, sizes = [], []
        for t, rows in parts:
            f = t.encode(rows)
            feats.extend(f)
            sizes.append(len(f))
        inputs = self._pad(feats)
        out = (backbone or self.backbone)(**inputs)
        logits, start = [], 0
        for (t, _), n in zip(parts, sizes):
            sl = slice(start, start + n)
            sub = type(out)(**{k: v[sl] for k, v in out.items() if isinstance(v, torch.Tensor)})
            logits.append(t.head(sub, {k: v[sl] for k, v in inputs.items()}))
            start += n
        return logits

    def losses(self, parts: list[tuple[Task, dict[str, list]]]) -> torch.Tensor:
        """Per-task cross-entropy, Tensor[len(parts)], from one concatenated forward."""
        logits = self.logits(parts)
        return torch.stack([t.loss(lg, t.labels(rows)) for (t, rows), lg in zip(parts, logits)])

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]
