"""Images: a CLIPModel whose vision tower is upcycled; zero-shot heads come from its text tower."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import Modality
from .text import load_tokenizer


class ImageModality(Modality):
    name = "image"

    def load(self) -> None:
        from transformers import AutoImageProcessor, CLIPModel

        self.tokenizer = load_tokenizer(self.base)
        self.processor = AutoImageProcessor.from_pretrained(self.base)
        self.model = CLIPModel.from_pretrained(self.base).eval()
        self.backbone = self.model.vision_model

    def fresh_backbone(self) -> nn.Module:
        from transformers import CLIPModel

        return CLIPModel.from_pretrained(self.base).vision_model.eval()

    def collate(self, feats: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.stack([f["pixel_values"] for f in feats])}

    def plain_model(self, merge: Any) -> nn.Module:
        return merge(self.model)  # one CLIPModel serves every task (zero-shot heads)

    def save_export(self, plain: nn.Module, tasks: Sequence[Any], out: Path) -> dict[str, str]:
        plain.save_pretrained(out)
        self.processor.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        return {t.name: str(out) for t in tasks}
