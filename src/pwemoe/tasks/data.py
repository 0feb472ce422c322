"""Task data through `datasets`: hub ids, local files, or registered local adapters; seeded streams."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import DataConfig

# name -> function(cache_dir) returning {split: datasets.Dataset}
ADAPTERS: dict[str, Callable[[Path], dict[str, Any]]] = {}


def register_adapter(name: str) -> Callable:
    """Decorator: make a local data builder addressable as `data: {source: adapter, path: NAME}`."""

    def deco(fn: Callable[[Path], dict[str, Any]]) -> Callable[[Path], dict[str, Any]]:
        ADAPTERS[name] = fn
        return fn

    return deco


def cache_root() -> Path:
    return Path(os.environ.get("PWEMOE_CACHE", Path.cwd() / ".pwemoe_cache"))


def load_split(data: DataConfig, split: str, path_map: dict[str, str] | None = None) -> Any:
    """Return a `datasets.Dataset` for one split of a task's data.

    `path_map` maps hub dataset ids (`id` or `id:config`) to local copies: a directory written
    by `DatasetDict.save_to_disk`, or anything `datasets.load_dataset` reads.
    """
    import datasets

    path_map = path_map or {}
    local = path_map.get(f"{data.path}:{data.name}") if data.name else None
    local = local or path_map.get(data.path)
    if data.source == "hub" and local:
        if (Path(local) / "dataset_dict.json").exists():
            dd = datasets.load_from_disk(local)
            if split not in dd:
                raise ValueError(f"local copy {local} of {data.path!r} has splits {sorted(dd)}, not {split!r}")
            return dd[split]
        return datasets.load_dataset(local, data.name, split=split)

    if data.source == "adapter":
        from ..demo import adapters  # noqa: F401 - registers the built-in adapters

        if data.path not in ADAPTERS:
            raise ValueError(f"unknown data adapter {data.path!r}; registered: {sorted(ADAPTERS)}")
        splits = ADAPTERS[data.path](cache_root())
        if split not in splits:
            raise ValueError(f"adapter {data.path!r} has splits {sorted(splits)}, not {split!r}")
        return splits[split]
    if data.source == "hub":
        return datasets.load_dataset(data.path, data.name, split=split)
    if data.source == "imagefolder":
        return datasets.load_dataset("imagefolder", data_dir=data.path, split=split)
    files = data.files or {split: data.path}
    if split not in files:
        raise ValueError(f"no file for split {split!r}; data.files has {sorted(files)}")
    return datasets.load_dataset(data.source, data_files={split: files[split]}, split=split)


def first_n(ds: Any, n: int | None) -> Any:
    """The first n rows of a dataset (all of them when n is None or larger)."""
    return ds.select(range(min(n, len(ds)))) if n else ds


class TaskStream:
    """Endless batches of indices, reshuffled every epoch from (seed, epoch); exact to resume.

    Holds only the current epoch's permutation, never a cache of batches.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n < 1:
            raise ValueError("a task needs at least one training example")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._perm: torch.Tensor | None = None

    def _permutation(self) -> torch.Tensor:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm = torch.randperm(self.n, generator=g)
        return self._perm

    def next_indices(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.batch_size:
            perm = self._permutation()
            take = min(self.batch_size - len(out), self.n - self.pos)
            out.extend(perm[self.pos : self.pos + take].tolist())
            self.pos += take
            if self.pos == self.n:
                self.epoch, self.pos, self._perm = self.epoch + 1, 0, None
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s: dict[str, int]) -> None:
        self.epoch, self.pos, self._perm = int(s["epoch"]), int(s["pos"]), None
