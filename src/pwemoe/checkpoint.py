"""Router-only checkpoints (safetensors + metadata) and atomic file writes."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROUTERS = "routers.safetensors"
STATE = "trainer_state.pt"


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) then rename onto `path`: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, w)


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
    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        state = {k: f.get_tensor(k) for k in f.keys()}
    return state, meta


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict[str, Any]:
    # weights_only: the trainer state holds tensors, numbers and dicts only; never unpickle objects
    return torch.load(path, map_location="cpu", weights_only=True)


def check_hashes(expected: dict[str, str], actual: dict[str, str], what: str) -> None:
    """Raise ValueError naming every model whose content hash differs from the checkpoint's."""
    bad = [f"{k}: checkpoint {expected.get(k, '<none>')[:12]} vs loaded {actual.get(k, '<none>')[:12]}"
           for k in sorted(set(expected) | set(actual)) if expected.get(k) != actual.get(k)]
    if bad:
        raise ValueError(
            f"{what} was trained on different models than the ones loaded now: " + "; ".join(bad)
            + ". Point the config at the exact base and expert weights of the run."
        )
