"""Task data through `datasets`: hub ids, local files, or adapters addressed by import path; seeded streams."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import DataConfig

# An adapter is a function(cache_dir: Path) -> {split: datasets.Dataset}, addressed in a config as
# `data: {source: adapter, path: "package.module:function"}`, or by a short name that a package
# declares in the entry-point group below (pwemoe's own demo adapters are declared there).
ADAPTER_GROUP = "pwemoe.data_adapters"
Adapter = Callable[[Path], dict[str, Any]]


def resolve_adapter(spec: str) -> Adapter:
    """The adapter function for 'module:function' or an entry-point name; a clear error otherwise."""
    if ":" in spec:
        mod_name, _, fn_name = spec.partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"data adapter {spec!r}: cannot import module {mod_name!r} ({e})") from None
        fn = getattr(mod, fn_name, None)
        if not callable(fn):
            raise ValueError(f"data adapter {spec!r}: module {mod_name!r} has no function {fn_name!r}")
        return fn
    from importlib.metadata import entry_points

    eps = {ep.name: ep for ep in entry_points(group=ADAPTER_GROUP)}
    if spec not in eps:
        raise ValueError(
            f"unknown data adapter {spec!r}; give 'module:function', or one of the installed names {sorted(eps)}"
        )
    return eps[spec].load()


def cache_root() -> Path:
    return Path(os.environ.get("PWEMOE_CACHE", Path.cwd() / ".pwemoe_cache"))


def load_split(data: DataConfig, split: str, path_map: dict[str, str] | None = None) -> Any:
    """Return a `datasets.Dataset` for one split of a task's data; one-line errors for what fails.

    Missing local files, unreadable files, unknown or unreachable hub datasets (offline) become a
    FileNotFoundError or ValueError that names the dataset, the split and the fix.
    """
    if data.source in ("csv", "json", "parquet"):
        files = data.files or {split: data.path}
        f = files.get(split)
        if f is not None and not any(c in f for c in "*?[") and not Path(f).exists():
            raise FileNotFoundError(f"{data.source} file {f} for split {split!r} does not exist")
    try:
        return _load_split(data, split, path_map)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types (hub, offline, parser errors)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        hint = (
            "the hub is not reachable: map the id to a local copy with model.path_map, or use a local source "
            "(csv, json, parquet, imagefolder)"
            if data.source == "hub"
            else "check the file's format and encoding"
        )
        raise ValueError(
            f"could not load split {split!r} of {data.source} data {data.path or data.files!r}: "
            f"{type(e).__name__}: {first}; {hint}"
        ) from e


def _load_split(data: DataConfig, split: str, path_map: dict[str, str] | None = None) -> Any:
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
        splits = resolve_adapter(data.path)(cache_root())
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
