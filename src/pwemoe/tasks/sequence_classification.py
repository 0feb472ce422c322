"""Sequence classification (BERT-style, GPT-2, Llama-style): per-task frozen heads of the experts."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import TaskConfig
from .base import Finetuning, Task, max_positions


def _last_token(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # rightmost attended position handles right padding (and equals HF's pad-token rule then)
    idx = (torch.arange(mask.shape[1], device=mask.device) * mask).argmax(-1)
    return logits[torch.arange(logits.shape[0], device=logits.device), idx]


# model_type -> head(shell, backbone_outputs, attention_mask) -> logits. Mirrors each HF
# *ForSequenceClassification.forward after its backbone call (eval mode: dropout is identity).
HEADS: dict[str, Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]] = {
    "bert": lambda s, o, m: s.classifier(s.dropout(o.pooler_output)),
    "roberta": lambda s, o, m: s.classifier(o.last_hidden_state),
    "distilbert": lambda s, o, m: s.classifier(
        s.dropout(nn.functional.relu(s.pre_classifier(o.last_hidden_state[:, 0])))
    ),
    "gpt2": lambda s, o, m: _last_token(s.score(o.last_hidden_state), m),
}
for _t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"):
    HEADS[_t] = HEADS["gpt2"]


def split_task_model(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(shell, backbone): the task model with its backbone detached, and the backbone itself."""
    prefix = model.base_model_prefix
    backbone = getattr(model, prefix)
    shell = model
    setattr(shell, prefix, nn.Module())  # placeholder; the shared upcycled backbone is used instead
    shell.requires_grad_(False).eval()
    return shell, backbone


class SequenceClassificationTask(Task):
    modality = "text"

    def __init__(self, cfg: TaskConfig) -> None:
        super().__init__(cfg)
        self.shell: nn.Module | None = None
        self.tokenizer: Any = None
        self.model_type: str | None = None

    def load_expert_backbone(self, path: str) -> nn.Module:
        """Load the expert task model, keep its head (frozen shell), return its backbone for upcycling."""
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(path)
        self.model_type = model.config.model_type
        if self.model_type not in HEADS:
            raise ValueError(
                f"task {self.name!r}: no sequence-classification head rule for model_type "
                f"{self.model_type!r}; known: {sorted(HEADS)}"
            )
        n = model.config.num_labels
        if not self.class_names:
            id2label = getattr(model.config, "id2label", None) or {}
            self.class_names = [str(id2label.get(i, i)) for i in range(n)]
        elif len(self.class_names) != n:
            raise ValueError(
                f"task {self.name!r}: class_names has {len(self.class_names)} names but the expert "
                f"{path} has num_labels={n}"
            )
        self.shell, backbone = split_task_model(model)
        return backbone

    def attach(self, modality: Any) -> None:
        self.tokenizer = modality.tokenizer
        self.check_max_length(max_positions(self.shell))

    def encode(self, rows: dict[str, list]) -> list[dict[str, list[int]]]:
        d = self.cfg.data
        texts = list(rows[d.text_column])
        pairs = list(rows[d.text_pair_column]) if d.text_pair_column else None
        enc = self.tokenizer(texts, pairs, truncation=True, max_length=self.cfg.max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        return [{k: enc[k][i] for k in keys} for i in range(len(texts))]

    def head_fingerprint(self) -> str:
        from ..models import fingerprint_tensors

        return fingerprint_tensors(dict(self.shell.named_parameters()))

    def head(self, outputs: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return HEADS[self.model_type](self.shell, outputs, inputs["attention_mask"])

    def export_model(self, plain_backbone: nn.Module) -> nn.Module:
        """A plain *ForSequenceClassification: this task's head on the given merged backbone."""
        m = copy.deepcopy(self.shell)
        setattr(m, m.base_model_prefix, plain_backbone)
        m.requires_grad_(True)
        if self.tokenizer is not None and m.config.pad_token_id is None and self.tokenizer.pad_token_id is not None:
            m.config.pad_token_id = self.tokenizer.pad_token_id
        return m

    def finetuning(self, base: str, data: Any, seed: int, options: dict[str, Any]) -> Finetuning:
        """A full fine-tune of the base with a new classification head, saved as a *ForSequenceClassification."""
        from transformers import AutoModelForSequenceClassification

        from ..devices import move
        from ..modalities.text import load_tokenizer

        d = self.cfg.data
        names = self.cfg.class_names or getattr(data.features[d.label_column], "names", None)
        if not names:
            raise ValueError(f"task {self.name!r}: give class_names (the label column has no names)")
        torch.manual_seed(seed)
        tok = load_tokenizer(base)
        model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}
        )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id

        def loss(rows: dict[str, list], device: torch.device) -> torch.Tensor:
            pairs = rows[d.text_pair_column] if d.text_pair_column else None
            enc = tok(
                list(rows[d.text_column]),
                pairs,
                truncation=True,
                max_length=self.cfg.max_length,
                padding=True,
                return_tensors="pt",
            )
            return model(**move(dict(enc), device), labels=torch.as_tensor(rows[d.label_column]).to(device)).loss

        def save(out: Path) -> None:
            model.save_pretrained(out)
            tok.save_pretrained(out)

        return Finetuning(
            model, list(model.parameters()), loss, save, weight_decay=0.01, description=f"finetune {self.name}"
        )
