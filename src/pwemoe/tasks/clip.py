"""CLIP zero-shot image classification: the head is built once from the text tower."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from ..config import TaskConfig
from .base import Task

DEFAULT_TEMPLATES = ["a photo of a {}."]


class CLIPZeroShotConfig(TaskConfig):
    """A CLIP zero-shot task's options: the prompt templates its class embeddings are built from."""

    templates: list[str] | None = Field(
        None, description="prompt templates with {} for the class name, e.g. 'a photo of a {}.' (the default)"
    )


class CLIPZeroShotTask(Task):
    modality = "image"
    config_class = CLIPZeroShotConfig

    def __init__(self, cfg: CLIPZeroShotConfig) -> None:
        super().__init__(cfg)
        self.processor: Any = None
        self.text_embeds: torch.Tensor | None = None  # [C, D], unit norm
        self.clip: nn.Module | None = None  # the (upcycled) CLIPModel, for projection and logit scale

    def load_expert_backbone(self, path: str) -> nn.Module:
        from transformers import CLIPVisionModel

        return CLIPVisionModel.from_pretrained(path)

    def attach(self, modality: Any) -> None:
        self.processor = modality.processor
        self.build_head(modality.model, modality.tokenizer)

    def input_columns(self) -> list[str]:
        return [self.cfg.data.image_column]

    @torch.no_grad()
    def build_head(self, clip: nn.Module, tokenizer: Any) -> None:
        """Class embeddings Tensor[C, D]: mean over templates of normalised text features, renormalised."""
        self.clip = clip
        templates = self.cfg.templates or DEFAULT_TEMPLATES
        embeds = []
        for name in self.class_names:
            tok = tokenizer([t.format(name) for t in templates], padding=True, return_tensors="pt").to(clip.device)
            e = clip.get_text_features(**tok)
            e = e.pooler_output if hasattr(e, "pooler_output") else e
            e = e / e.norm(dim=-1, keepdim=True)
            e = e.mean(0)
            embeds.append(e / e.norm())
        self.text_embeds = torch.stack(embeds)

    def to(self, device: torch.device) -> None:
        super().to(device)
        self.text_embeds = self.text_embeds.to(device)

    def head_fingerprint(self) -> str:
        """What the head is computed from (text tower, projections, prompts), not its float output,
        which differs in the last bits between devices."""
        from ..models import fingerprint_tensors

        c = self.clip
        named = {
            "logit_scale": c.logit_scale,
            **{f"text.{n}": p for n, p in c.text_model.named_parameters()},
            **{f"text_proj.{n}": p for n, p in c.text_projection.named_parameters()},
            **{f"proj.{n}": p for n, p in c.visual_projection.named_parameters()},
        }
        prompts = repr((self.class_names, self.cfg.templates or DEFAULT_TEMPLATES)).encode()
        named["prompts"] = torch.frombuffer(bytearray(prompts), dtype=torch.uint8)
        return fingerprint_tensors(named)

    def encode(self, rows: dict[str, list]) -> list[dict[str, torch.Tensor]]:
        images = [im.convert("RGB") if hasattr(im, "convert") else im for im in rows[self.cfg.data.image_column]]
        px = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return [{"pixel_values": p} for p in px]

    def head(self, outputs: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        img = self.clip.visual_projection(outputs.pooler_output)
        img = img / img.norm(dim=-1, keepdim=True)
        return self.clip.logit_scale.exp() * img @ self.text_embeds.to(img).T

    def export_model(self, plain_clip: nn.Module) -> nn.Module:
        return plain_clip
