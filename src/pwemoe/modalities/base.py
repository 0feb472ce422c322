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
    input_kind = "text"  # what one request input is ("text", or "image"): the explorer's input box
    # serving: whether the model generates text (`pwemoe serve` then speaks the OpenAI API and `generate` works)
    generates = False
    # `pwemoe export --engine mergekit`: whether an export is one model folder in the base's layout (then
    # `mergekit_prefix` names the backbone in it); per-task heads or a separate tower export with the torch engine
    mergekit_export = False

    def __init__(self, base: str) -> None:
        self.base = base  # local directory or hub id, after path_map
        self.model: nn.Module
        self.backbone: nn.Module
        self.tokenizer: Any = None
        self.processor: Any = None
        self.export_info: dict[str, Any] = {}  # set by save_export: recorded in the export's pwemoe.json

    def load_preprocessing(self) -> None:
        """Load what tasks check before any weights load (`Task.check_before_load`): a tokenizer, a config.
        `load` does it too; a modality without such checks needs nothing here."""
        return None

    @abstractmethod
    def load(self) -> None:
        """Load the base model (eval mode: the heads were fit to the experts' dropout-free features)."""

    @abstractmethod
    def fresh_backbone(self) -> nn.Module:
        """A plain copy of the pretrained backbone, as `load` reads it (for the baselines' bank)."""

    @abstractmethod
    def collate(self, feats: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad / stack per-example features (`Task.encode`) into one batch of tensors."""

    def run(self, backbone: nn.Module, model_inputs: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> Any:
        """The backbone's outputs for a collated batch (`inputs`: everything `collate` made, `model_inputs`: what
        the model takes). A modality may compute a batch more cheaply here (a causal LM: a prefix the rows share)."""
        return backbone(**model_inputs)

    def lengths(self, task: Any, dataset: Any) -> list[int]:
        """Per-example cost for length-sorted evaluation batches (0 when all inputs are equal size)."""
        return [0] * len(dataset)

    @abstractmethod
    def plain_model(self, merge: Any) -> nn.Module:
        """`merge(module)` returns a plain merged copy of an upcycled module; pick the one to export."""

    @abstractmethod
    def save_export(self, plain: nn.Module, tasks: Sequence[Any], out: Path) -> dict[str, str]:
        """Write plain Hugging Face directories under `out`; returns task name -> directory. What else the export
        should record in its pwemoe.json goes into `self.export_info` (a dict)."""

    @classmethod
    def mergekit_prefix(cls, base: str) -> str:
        """`pwemoe export --engine mergekit` (`mergekit_export`): the name under which the base's whole model holds
        the backbone (its tensors outside it are the base's), read from the base's config."""
        raise NotImplementedError(f"the {cls.name} modality has no mergekit export")

    def request_rows(self, task: Any, inputs: Sequence[Any]) -> dict[str, list]:
        """The column dict `task.encode` reads, from the inputs of a request (`PreferenceModel.predict`,
        `/api/predict`): texts, or [text, pair] lists where the task reads two columns. Every bad input is
        named at once. `inputs` is a non-empty list (checked by the caller)."""
        cols = task.input_columns()
        if len(cols) == 2:  # sentence pairs (or a causal LM's prompt and response)
            bad = [j for j, x in enumerate(inputs) if not _is_pair(x)]
            if bad:
                raise ValueError(
                    f"task {task.name!r} takes sentence pairs: each input a list of two non-empty strings; "
                    f"inputs {bad[:5]} are not"
                )
            return {cols[0]: [x[0] for x in inputs], cols[1]: [x[1] for x in inputs]}
        bad = [j for j, x in enumerate(inputs) if not isinstance(x, str) or not x.strip()]
        if bad:
            raise ValueError(f"task {task.name!r} takes texts: each input a non-empty string; inputs {bad[:5]} are not")
        return {cols[0]: list(inputs)}


def _is_pair(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(s, str) and s.strip() for s in x)
