"""A task is one objective of the Pareto problem: data, a frozen head on the shared backbone, a metric."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import TaskConfig

if TYPE_CHECKING:  # annotations only: tasks never import the modality layer at run time
    from ..modalities import Modality


def max_positions(model: nn.Module | None) -> int | None:
    """The positions a model's config declares (max_position_embeddings or n_positions), as usable."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            # BERT-style position ids start at 0; RoBERTa reserves padding_idx + 1 of them
            return v - 2 if getattr(cfg, "model_type", "") in ("roberta", "xlm-roberta", "camembert") else v
    return None


@dataclass
class Finetuning:
    """What `pwemoe finetune` trains for one task, made by the task (`Task.finetuning`); the recipe runs one loop
    for every kind of expert (AdamW, warm-up and linear decay, gradient clipping, loss scaling).

    model: moved to the device, switched to train / eval mode. params: the trained ones.
    loss(rows, device): the loss of a batch of rows (a column dict), under the recipe's autocast.
    save(dir): write the expert (a model folder, or a PEFT adapter folder).
    """

    model: nn.Module
    params: list[nn.Parameter]
    loss: Callable[[dict[str, list], torch.device], torch.Tensor]
    save: Callable[[Path], None]
    weight_decay: float = 0.0
    description: str = ""


class Task(ABC):
    """One objective. A subclass is registered in `pwemoe.tasks.TASK_TYPES` under its `type` name.

    Life cycle, driven by the workbench: data is loaded and checked (`validate_data`), then
    `check_before_load` checks the task against its data and the modality's tokenizer and config,
    all before any weights load; then `load_expert_backbone` (once per expert, while the experts
    stream into the upcycled model), then `attach` gives the task the modality's tokenizer /
    processor and model (heads that need them are built there). After that `encode`, `head`,
    `loss` and `labels` are used by training and evaluation.
    """

    modality: str = "text"  # the key of the modality in `pwemoe.modalities.MODALITIES`
    metric: str = "accuracy"  # what `example_scores` measures per example
    higher_is_better: bool = True  # the metric's direction (hypervolume, dominance and plots follow it)
    has_labels: bool = True  # False: no label column, no class names (a causal LM's next-token loss)
    config_class: type[TaskConfig] = TaskConfig  # the task's entry in a config: TaskConfig plus its own options

    def __init__(self, cfg: TaskConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.train_data: Any = None
        self.test_data: Any = None
        self.class_names: list[str] = list(cfg.class_names or [])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @abstractmethod
    def load_expert_backbone(self, path: str) -> nn.Module:
        """Load this task's expert; keep what is task-specific (a head) and return the shared backbone."""

    @abstractmethod
    def attach(self, modality: Modality) -> None:
        """Take the tokenizer / processor and, if needed, build the head from the loaded model."""

    @abstractmethod
    def encode(self, rows: dict[str, list]) -> list[dict[str, Any]]:
        """Backbone inputs per example (unpadded); rows is a column dict `dataset[indices]`."""

    @abstractmethod
    def head(self, outputs: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits Tensor[n, C] from the backbone outputs of this task's n examples."""

    @abstractmethod
    def export_model(self, plain: nn.Module) -> nn.Module:
        """The plain model of the original class for this task, given the merged plain backbone/model."""

    @abstractmethod
    def head_fingerprint(self) -> str:
        """sha256 of everything the head computes with (weights, class embeddings): run provenance."""

    @property
    def rows_per_example(self) -> int:
        """Model rows each example takes in a forward (a causal-LM choice task may score each label on its own)."""
        return 1

    def example_scores(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The metric per example, Tensor[n] (accuracy: 1.0 where the top class is the label)."""
        return (logits.argmax(-1) == labels.to(logits.device)).float()

    def labels(self, rows: dict[str, list]) -> torch.Tensor:
        return torch.as_tensor(rows[self.cfg.data.label_column], dtype=torch.long)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return nn.functional.cross_entropy(logits, labels.to(logits.device), reduction=reduction)

    def to(self, device: torch.device) -> None:
        """Move what the head computes with to `device` (called once, after `attach`): its modules here."""
        for v in vars(self).values():
            if isinstance(v, nn.Module):
                v.to(device)

    def input_columns(self) -> list[str]:
        """Columns `encode` reads, checked when the data is loaded."""
        return [self.cfg.data.text_column] + (
            [self.cfg.data.text_pair_column] if self.cfg.data.text_pair_column else []
        )

    def data_columns(self) -> list[str]:
        """Columns an example is read from: its inputs, and its label where the task has one."""
        return self.input_columns() + ([self.cfg.data.label_column] if self.has_labels else [])

    def finetuning(self, base: str, data: Any, seed: int, options: dict[str, Any]) -> Finetuning:
        """The expert `pwemoe finetune` makes for this task from the base (a local directory or hub id), trained
        on `data`; `options` are the command's expert options (e.g. LoRA rank). Seeds torch with `seed`
        before the trained parameters are initialised. Task types without a way to make experts refuse."""
        raise ValueError(
            f"pwemoe finetune cannot make experts for {self.cfg.type} tasks (task {self.name!r}); fine-tune "
            "the expert elsewhere and give its directory as tasks[].expert"
        )

    def expert_provenance(self, options: dict[str, Any]) -> dict[str, Any]:
        """What a fine-tuned expert depends on besides the base, its data and the hyper-parameters (its cache key
        in `pwemoe_finetune.json`); `options` as for `finetuning`."""
        return {}

    def check_max_length(self, limit: int | None) -> None:
        """Refuse a max_length beyond the model's `limit` positions (None: the model has no such limit)."""
        if limit is not None and self.cfg.max_length > limit:
            raise ValueError(
                f"task {self.name!r}: max_length {self.cfg.max_length} is beyond the model's "
                f"{limit} positions; set tasks[].max_length <= {limit}"
            )

    def check_before_load(self, modality: Modality, errors: list[str], index: int) -> None:
        """Append to `errors` what contradicts itself in this task's options, its data and what the modality
        knows before the weights load (`Modality.load_preprocessing`: a tokenizer, the model's config).
        Called after `validate_data`; nothing to check by default."""
        return None

    def validate_data(self, errors: list[str], index: int) -> None:
        """Append every problem with this task's data (columns, empty cells, label range) to `errors`."""
        d = self.cfg.data
        for split, ds in (("train", self.train_data), ("test", self.test_data)):
            if ds is None:
                continue
            if len(ds) == 0:
                errors.append(f"tasks[{index}].data: the {split} split of task {self.name!r} is empty")
                continue
            cols = set(ds.column_names)
            for c in self.data_columns():
                if c not in cols:
                    errors.append(
                        f"tasks[{index}].data: {split} split of task {self.name!r} has no column {c!r}; "
                        f"columns are {sorted(cols)}"
                    )
            for c in self.input_columns():
                if c in cols:
                    blank = [i for i, v in enumerate(ds[c]) if v is None or (isinstance(v, str) and not v.strip())]
                    if blank:
                        errors.append(
                            f"tasks[{index}].data.{_col_key(self, c)}: {split} split of task {self.name!r} "
                            f"has {len(blank)} empty cell(s) in column {c!r} (rows {blank[:5]}); "
                            "drop or fill them"
                        )
            if d.label_column in cols and self.num_classes:
                labels = ds[d.label_column]
                bad = sorted(
                    {int(v) for v in labels if not (isinstance(v, int) and 0 <= v < self.num_classes)}
                    if all(isinstance(v, int) for v in labels)
                    else {str(v) for v in labels if not isinstance(v, int)}
                )
                if bad:
                    errors.append(
                        f"tasks[{index}].data.label_column: {split} labels of task {self.name!r} must be "
                        f"integers in [0, {self.num_classes}), found {bad[:5]}"
                    )


def _col_key(task: Task, column: str) -> str:
    d = task.cfg.data
    for key in ("text_column", "text_pair_column", "image_column", "prompt_column"):
        if getattr(d, key) == column:
            return key
    return "text_column"
