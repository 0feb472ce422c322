"""Images: a CLIPModel whose vision tower is upcycled; zero-shot heads come from its text tower."""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import Modality
from .text import load_tokenizer


class ImageModality(Modality):
    name = "image"
    input_kind = "image"

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

    def request_rows(self, task: Any, inputs: Sequence[Any]) -> dict[str, list]:
        """{image column: PIL images} from PIL images, raw bytes or base64 strings (data URLs too)."""
        return {task.input_columns()[0]: [decode_image(x, j) for j, x in enumerate(inputs)]}


def decode_image(x: Any, j: int) -> Any:
    """A PIL image from a PIL image, raw bytes, or a base64 string (a data URL too); `j` names the input."""
    from PIL import Image

    if isinstance(x, Image.Image):
        return x
    if isinstance(x, str):
        s = x.split(",", 1)[1] if x.startswith("data:") else x
        try:
            x = base64.b64decode(s, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"input {j} is not valid base64 (give an image file's bytes base64-encoded)") from None
    if not isinstance(x, (bytes, bytearray)):
        raise TypeError(f"input {j}: expected an image (PIL image, bytes or base64 string), got {type(x).__name__}")
    try:
        im = Image.open(io.BytesIO(x))
        im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise ValueError(f"input {j} is not an image PIL can read ({type(e).__name__}: {e})") from None
    return im
