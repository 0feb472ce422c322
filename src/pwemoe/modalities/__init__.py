"""Modalities: one object per input kind owning loading, batching, fresh backbones and export.

A new modality is one class added to MODALITIES; tasks name theirs in `Task.modality`.
"""

from .base import Modality
from .causal_lm import CausalLMModality
from .image import ImageModality
from .text import TextModality

MODALITIES: dict[str, type[Modality]] = {"text": TextModality, "image": ImageModality, "causal_lm": CausalLMModality}

__all__ = ["MODALITIES", "CausalLMModality", "ImageModality", "Modality", "TextModality"]
