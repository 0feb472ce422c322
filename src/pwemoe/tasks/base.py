"""A task is data + a frozen head + a metric (accuracy)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import TaskConfig


class Task:
    """One objective of the Pareto problem.

    Subclasses provide `encode(examples) -> features` (backbone inputs per example, unpadded),
    `head(outputs, inputs) -> logits` on the shared backbone's outputs, and `export_model`.
    """

    modality = "text"

    def __init__(self, cfg: TaskConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.train_data: Any = None
        self.test_data: Any = None
        self.class_names: list[str] = list(cfg.class_names or [])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def labels(self, rows: dict[str, list]) -> torch.Tensor:
        return torch.as_tensor(rows[self.cfg.data.label_column], dtype=torch.long)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, labels)

    def validate_data(self, errors: list[str], index: int) -> None:
        """Append every problem with this task's data (columns, label range) to `errors`."""
        d = self.cfg.data
        for split, ds in (("train", self.train_data), ("test", self.test_data)):
            if ds is None:
                continue
            cols = set(ds.column_names)
            need = [self._input_column(), d.label_column] + ([d.text_pair_column] if d.text_pair_column else [])
            for c in need:
                if c not in cols:
                    errors.append(f"tasks[{index}].data: {split} split of task {self.name!r} has no column {c!r}; "
                                  f"columns are {sorted(cols)}")
            if d.label_column in cols and self.num_classes:
                labels = ds[d.label_column]
                bad = sorted({int(v) for v in labels if not (isinstance(v, int) and 0 <= v < self.num_classes)}
                             if all(isinstance(v, int) for v in labels) else {str(v) for v in labels if not isinstance(v, int)})
                if bad:
                    errors.append(f"tasks[{index}].data.label_column: {split} labels of task {self.name!r} must be "
                                  f"integers in [0, {self.num_classes}), found {bad[:5]}")

    def _input_column(self) -> str:
        return self.cfg.data.text_column
