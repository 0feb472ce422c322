"""Text: a tokenizer and an AutoModel backbone; each task exports its own *ForSequenceClassification."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import Modality


class TextModality(Modality):
    name = "text"

    def load(self) -> None:
        from transformers import AutoModel

        self.tokenizer = load_tokenizer(self.base)
        self.model = AutoModel.from_pretrained(self.base).eval()
        self.backbone = self.model

    def fresh_backbone(self) -> nn.Module:
        from transformers import AutoModel

        return AutoModel.from_pretrained(self.base).eval()

    def collate(self, feats: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer.pad(list(feats), return_tensors="pt"))

    def lengths(self, task: Any, dataset: Any) -> list[int]:
        return [len(f["input_ids"]) for f in task.encode(dataset[:])]

    def plain_model(self, merge: Any) -> nn.Module:
        return merge(self.backbone)

    def save_export(self, plain: nn.Module, tasks: Sequence[Any], out: Path) -> dict[str, str]:
        written = {}
        for t in tasks:
            m = t.export_model(copy.deepcopy(plain))
            m.save_pretrained(out / t.name)
            self.tokenizer.save_pretrained(out / t.name)
            written[t.name] = str(out / t.name)
        return written


def load_tokenizer(base: str) -> Any:
    """The base's tokenizer; refused when the directory has none (transformers would silently build a tiny one)."""
    from transformers import AutoTokenizer

    p = Path(base)
    if p.is_dir() and not any(
        (p / f).exists()
        for f in (
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.txt",
            "vocab.json",
            "tokenizer.model",
            "spiece.model",
        )
    ):
        raise FileNotFoundError(
            f"model directory {base} has no tokenizer (tokenizer.json, tokenizer_config.json, "
            "vocab.txt, ...); save the tokenizer beside the weights (tokenizer.save_pretrained)"
        )
    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token is None:  # GPT-2 and Llama ship without a pad token
        tok.pad_token = tok.eos_token
    return tok
