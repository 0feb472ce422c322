"""The workbench: base + experts upcycled, tasks with heads and data, and the batched forward.

Shared by training, evaluation, export and serving, so that all of them see exactly the same model.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Config, ConfigError, Registries, config_from_dict, load_config
from .modalities import MODALITIES, Modality
from .models import check_local_sources
from .objectives import OBJECTIVES, check_objective_args
from .tasks import TASK_TYPES, Task
from .upscale import upscale

log = logging.getLogger(__name__)

_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def registries() -> Registries:
    """The names a config may use, checked in the same pass as every other config error."""
    return Registries(task_types=tuple(TASK_TYPES), objectives=tuple(OBJECTIVES), check_objective=check_objective_args)


def read_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a YAML config with `key=value` overrides; all errors (schema and names) at once."""
    return load_config(path, overrides, registries())


def build_config(data: Mapping[str, Any]) -> Config:
    return config_from_dict(dict(data), registries())


class Workbench:
    """Everything a run needs, built from a Config.

    Attributes:
        modality: the Modality object (loading, batching, export) shared by all tasks.
        model: the object holding the upcycled modules (text: the backbone; CLIP: the CLIPModel).
        backbone: what the batched inputs go through (text: the backbone; CLIP: `vision_model`).
        tasks: one Task per expert, in config order.
        info: the `UpscaleInfo` of the upcycled model (None with upcycle=False).
    """

    def __init__(
        self,
        cfg: Config,
        load_train: bool = True,
        load_test: bool = True,
        max_test_samples: int | None = None,
        upcycle: bool = True,
    ) -> None:
        self.cfg = cfg
        errors = check_local_sources(
            {
                "model.base": self.resolve(cfg.model.base),
                **{f"tasks[{i}].expert": self.resolve(t.expert) for i, t in enumerate(cfg.tasks)},
            }
        )
        if errors:  # every missing model at once, before any is loaded
            raise ConfigError(errors)
        self.tasks: list[Task] = [TASK_TYPES[t.type](t) for t in cfg.tasks]
        kinds = {t.modality for t in self.tasks}
        if len(kinds) != 1:
            raise ConfigError([f"tasks: all tasks must share one modality (one backbone), got {sorted(kinds)}"])
        self.modality: Modality = MODALITIES[kinds.pop()](self.resolve(cfg.model.base))
        self.modality.load()
        self.model, self.backbone = self.modality.model, self.modality.backbone
        self.info = None
        self._eval_batches: dict[tuple, list[list[int]]] = {}
        if upcycle:
            self._upcycle()
        self._load_data(load_train, load_test, max_test_samples)
        for t in self.tasks:  # heads that need the class names (which may come from the data) are built here
            t.attach(self.modality)
            if self.info is not None:  # a changed head must change the run's provenance too
                self.info.hashes[f"{t.name}:head"] = t.head_fingerprint()

    def resolve(self, path: str) -> str:
        """Map hub ids to local mirrors (model.path_map), for offline use and tests."""
        return self.cfg.model.path_map.get(path, path)

    def expert_loaders(self) -> dict[str, Any]:
        """Task name -> zero-argument loader of that expert's backbone (streamed one at a time)."""
        return {t.name: functools.partial(t.load_expert_backbone, self.resolve(t.cfg.expert)) for t in self.tasks}

    def _upcycle(self) -> None:
        m = self.cfg.model
        upscale(
            self.backbone,
            self.expert_loaders(),
            targets=m.targets,
            init_lambda=m.init_lambda,
            router_hidden_layers=m.router_hidden_layers,
            include_attention=m.include_attention,
            task_vector_dtype=_DTYPES[m.task_vector_dtype],
        )
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
                    errors.append(
                        f"tasks[{i}].class_names: required for task {t.name!r}; its label column "
                        f"{d.label_column!r} carries no class names"
                    )
                    continue
            t.validate_data(errors, i)
        if errors:
            raise ConfigError(errors)

    # --- batched forward -----------------------------------------------------------------------
    def logits(
        self, parts: list[tuple[Task, dict[str, list]]], backbone: nn.Module | None = None
    ) -> list[torch.Tensor]:
        """One backbone forward on the concatenated examples of several tasks; per-task logits.

        parts: [(task, rows)] where rows is a column dict (`dataset[indices]`). Returns logits
        Tensor[n_t, C_t] per part. `backbone` replaces the upcycled one (baselines, plain copies).
        """
        feats, sizes = [], []
        for t, rows in parts:
            f = t.encode(rows)
            feats.extend(f)
            sizes.append(len(f))
        inputs = self.modality.collate(feats)
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

    def eval_batches(self, task: Task, batch_size: int) -> list[list[int]]:
        """Index batches of the task's test split, sorted by input length (less padding); cached."""
        key = (task.name, batch_size, len(task.test_data))
        if key not in self._eval_batches:
            lengths = self.modality.lengths(task, task.test_data)
            self._eval_batches[key] = length_sorted_batches(lengths, batch_size)
        return self._eval_batches[key]

    @torch.no_grad()
    def accuracy(self, task: Task, batch_size: int, backbone: nn.Module | None = None) -> float:
        """Top-1 accuracy of `task` on its test split through `backbone` (default: the upcycled one)."""
        ds = task.test_data
        correct = 0
        for idx in self.eval_batches(task, batch_size):
            rows = ds[idx]
            logits = self.logits([(task, rows)], backbone=backbone)[0]
            correct += int((logits.argmax(-1).cpu() == task.labels(rows)).sum())
        return correct / len(ds)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Index batches in order of length, so each batch pads to a similar length (less wasted compute)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
