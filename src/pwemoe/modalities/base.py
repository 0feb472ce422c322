"""The modality interface: how a base model is loaded, how examples are batched, and how a run is exported."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn


class Modality(ABC):
    """Loads the pretrained model and its pre-processing, and knows how inputs of this kind are batched.

    Attributes, set by `load`:
        model: what holds the upcycled modules (text: the backbone; image: the whole CLIPModel).
        backbone: what the batched inputs go through (text: the backbone; image: `model.vision_model`).
        tokenizer: the tokenizer (text inputs, CLIP prompts).
    """

    name = "modality"

    def __init__(self, base: str) -> None:
        self.base = base  # local directory or hub id, after path_map
        self.model: nn.Module
        self.backbone: nn.Module
        self.tokenizer: Any = None
        self.processor: Any = None

    @abstractmethod
    def load(self) -> None:
        """Load the base model (eval mode: the heads were fit to the experts' dropout-free features)."""

    @abstractmethod
    def fresh_backbone(self) -> nn.Module:
        """A plain copy of the pretrained backbone, as `load` reads it (for the baselines' bank)."""

    @abstractmethod
    def collate(self, feats: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad / stack per-example features (`Task.encode`) into one batch of tensors."""

    def lengths(self, task: Any, dataset: Any) -> list[int]:
        """Per-example cost for length-sorted evaluation batches (0 when all inputs are equal size)."""
        return [0] * len(dataset)

    @abstractmethod
    def plain_model(self, merge: Any) -> nn.Module:
        """`merge(module)` returns a plain merged copy of an upcycled module; pick the one to export."""

    @abstractmethod
    def save_export(self, plain: nn.Module, tasks: Sequence[Any], out: Path) -> dict[str, str]:
        """Write plain Hugging Face directories under `out`; returns task name -> directory."""
