"""Router-only checkpoints (safetensors + metadata) and the trainer state, written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .files import ROUTERS, STATE, atomic_write

__all__ = ["ROUTERS", "STATE", "check_hashes", "load_routers", "load_state", "save_routers", "save_state"]


def save_routers(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Router weights as safetensors; metadata values are JSON-encoded strings."""
    from safetensors.torch import save_file

    meta = {k: json.dumps(v) for k, v in metadata.items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_routers(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no router checkpoint at {path}; has the run saved its first checkpoint?")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            state = {k: f.get_tensor(k).clone() for k in f.keys()}  # never backed by the file
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, JSON errors: all mean a damaged file
        raise ValueError(
            f"router checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:200]}); it is "
            "damaged. If the run's trainer_state.pt is intact, `pwemoe train --resume` rewrites it"
        ) from None
    return state, meta


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict[str, Any]:
    # weights_only: the trainer state holds tensors, numbers and dicts only; never unpickle objects
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, unpickling refused, ...
        raise ValueError(
            f"trainer state {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "it is damaged or not pwemoe's. Start a new run (or `train --overwrite`)"
        ) from None


def check_hashes(expected: dict[str, str], actual: dict[str, str], what: str) -> None:
    """Raise ValueError naming every model whose content hash differs from the checkpoint's."""
    bad = [
        f"{k}: checkpoint {expected.get(k, '<none>')[:12]} vs loaded {actual.get(k, '<none>')[:12]}"
        for k in sorted(set(expected) | set(actual))
        if expected.get(k) != actual.get(k)
    ]
    if bad:
        raise ValueError(
            f"{what} was trained on different models than the ones loaded now: "
            + "; ".join(bad)
            + ". Point the config at the exact base and expert weights of the run."
        )
