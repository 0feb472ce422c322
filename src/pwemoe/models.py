"""Loading base and expert models: hub id, local directory or model object; safe formats only."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

ModelSource = str | os.PathLike | nn.Module | Callable[[], nn.Module]


def describe(src: ModelSource) -> str:
    """A short id for logs and checkpoint metadata: the path/hub id, or the class of an object."""
    if isinstance(src, nn.Module):
        path = getattr(getattr(src, "config", None), "_name_or_path", "") or ""
        return path or f"<{type(src).__name__} object>"
    return str(src)


def load_model(src: ModelSource, model_class: Any = None, dtype: torch.dtype | None = None, **kwargs: Any) -> nn.Module:
    """Return a model from a hub id, a local directory, or pass a model object through.

    `model_class` is a transformers class with `from_pretrained` (default AutoModel).
    transformers reads safetensors first and loads `.bin` files with `weights_only=True`;
    pwemoe never unpickles arbitrary objects.
    """
    if isinstance(src, nn.Module):
        return src
    if callable(src):  # a lazy loader: lets callers stream models they build themselves
        return src()
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(
            f"a model must be a hub id, a local directory, an nn.Module or a zero-argument loader, "
            f"got {type(src).__name__}"
        )
    if model_class is None:
        from transformers import AutoModel

        model_class = AutoModel
    p = Path(src)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{src} is a file; pass the model directory (with config.json and *.safetensors) or a hub id")
    if dtype is not None:
        kwargs["dtype"] = dtype
    log.info("loading %s from %s", getattr(model_class, "__name__", model_class), src)
    return model_class.from_pretrained(str(src), **kwargs)


def looks_local(src: str) -> bool:
    """True for what can only be a local path: absolute, ./ ../ ~, or more than one '/' (hub ids have one)."""
    return os.path.isabs(src) or src.startswith((".", "~")) or src.count("/") > 1 or "\\" in src


def check_local_sources(sources: dict[str, str]) -> list[str]:
    """Errors for sources (what -> path or hub id) that are local paths but no model directory."""
    errors = []
    for what, src in sources.items():
        p = Path(os.path.expanduser(src))
        if p.exists() and not p.is_dir():
            errors.append(f"{what}: {src} is a file; give the model directory (config.json and *.safetensors)")
        elif looks_local(src) and not p.is_dir():
            errors.append(f"{what}: local model directory {src} does not exist")
        elif p.is_dir() and not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
            errors.append(
                f"{what}: {src} has no config.json (a model) or adapter_config.json (a PEFT adapter); "
                "is it a Hugging Face directory written by save_pretrained?"
            )
    return errors


def fingerprint_tensors(named: dict[str, torch.Tensor] | Any) -> str:
    """sha256 over names, shapes, dtypes and bytes of the tensors (sorted by name)."""
    h = hashlib.sha256()
    items = named.items() if isinstance(named, dict) else named
    for name, t in sorted(items, key=lambda kv: kv[0]):
        t = t.detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        t = t.contiguous().cpu().reshape(-1)
        # bf16 has no numpy view; reinterpret the storage as bytes.
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
