"""Task data through `datasets`: hub ids, local files, or adapters (registered names, or trusted import
paths); seeded streams."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import DataConfig
from ..files import cache_dir

# An adapter is a function(cache_dir: Path) -> {split: datasets.Dataset}, addressed in a config as
# `data: {source: adapter, path: NAME}`, a short name that a package declares in the entry-point group below
# (pwemoe's own demo adapters are declared there), or as "package.module:function". The latter runs whatever
# code it names, so, as with transformers' trust_remote_code, it needs `data.trust_remote_code: true` unless
# an installed package registered that function as an adapter.
ADAPTER_GROUP = "pwemoe.data_adapters"
Adapter = Callable[[Path], dict[str, Any]]


def registered_adapters() -> dict[str, str]:
    """The installed data adapters: entry-point name -> 'module:function'."""
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=ADAPTER_GROUP)}


def adapter_problem(spec: str, trust_remote_code: bool = False) -> str | None:
    """Why the adapter `spec` may not be used (None: it may): an unknown name, or a 'module:function' that is
    not a registered adapter, given without trust_remote_code."""
    registered = registered_adapters()
    if ":" not in spec:
        if spec in registered:
            return None
        return f"unknown data adapter {spec!r}; installed adapters are {sorted(registered)} (or 'module:function')"
    if trust_remote_code or spec.strip() in registered.values():
        return None
    return (
        f"{spec!r} names Python code that pwemoe would import and run; if you trust it, set "
        "trust_remote_code: true beside this path (tasks[i].data.trust_remote_code), or use a registered "
        f"adapter: {sorted(registered)}"
    )


def resolve_adapter(spec: str, trust_remote_code: bool = False) -> Adapter:
    """The adapter function for an entry-point name or 'module:function' (the latter only when registered by
    a package or trusted, `adapter_problem`); a clear error otherwise."""
    why = adapter_problem(spec, trust_remote_code)
    if why:
        raise ValueError(why)
    if ":" in spec:
        mod_name, _, fn_name = spec.strip().partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"data adapter {spec!r}: cannot import module {mod_name!r} ({e})") from None
        fn = getattr(mod, fn_name, None)
        if not callable(fn):
            raise ValueError(f"data adapter {spec!r}: module {mod_name!r} has no function {fn_name!r}")
        return fn
    from importlib.metadata import entry_points

    return next(ep for ep in entry_points(group=ADAPTER_GROUP) if ep.name == spec).load()


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
        splits = resolve_adapter(data.path, data.trust_remote_code)(cache_dir())
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
    try:
        return datasets.load_dataset(data.source, data_files={split: files[split]}, split=split)
    except ValueError as e:
        if "corresponds to no data" not in str(e):  # datasets' words for a split without examples
            raise
        raise ValueError(
            f"{data.source} file {files[split]} for split {split!r} has no examples"
            + (" (only a header line)" if data.source == "csv" else "")
            + "; give a file with at least one row"
        ) from None


ROLES = ("train", "validation", "test")


def load_task_data(data: DataConfig, role: str, path_map: dict[str, str] | None = None) -> Any:
    """A task's examples for one role, the only way pwemoe reads task data.

    train: what experts (`pwemoe finetune`) and routers train on; validation: what settings and
    checkpoints are chosen on (`data.validation_split`, or a seeded stratified share of the training
    split carved by `data.validation_fraction` and removed from train); test: what is reported.
    `max_*_samples` take the first N of each after carving.
    """
    if role not in ROLES:
        raise ValueError(f"data role must be one of {ROLES}, got {role!r}")
    if role == "test":
        return first_n(load_split(data, data.test_split, path_map), data.max_test_samples)
    if role == "validation":
        if data.validation_split:
            ds = load_split(data, data.validation_split, path_map)
        elif data.validation_fraction:
            train = load_split(data, data.train_split, path_map)
            ds = train.select(
                carve_validation(train[data.label_column], data.validation_fraction, data.validation_seed)[1]
            )
        else:
            raise ValueError(
                "no validation data: set data.validation_split (a split of the dataset) or "
                "data.validation_fraction (a share of the training split, e.g. 0.1)"
            )
        return first_n(ds, data.max_validation_samples)
    train = load_split(data, data.train_split, path_map)
    if data.validation_fraction and not data.validation_split:
        train = train.select(
            carve_validation(train[data.label_column], data.validation_fraction, data.validation_seed)[0]
        )
    return first_n(train, data.max_train_samples)


def carve_validation(labels: list[Any], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, validation indices) of a split: per class, a seeded random share `fraction`
    (rounded, at least one example of every class with two or more) goes to validation.

    Deterministic for the same labels, fraction and seed; both index lists sorted and disjoint.
    """
    import numpy as np

    if not 0 < fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {fraction!r}")
    y = np.asarray([str(v) for v in labels])
    rng = np.random.default_rng(seed)
    val: list[int] = []
    for c in sorted(set(y.tolist())):
        idx = np.flatnonzero(y == c)
        n = int(round(fraction * len(idx)))
        n = min(max(n, 1), len(idx) - 1) if len(idx) >= 2 else 0
        val.extend(rng.permutation(idx)[:n].tolist())
    chosen = set(val)
    return [i for i in range(len(y)) if i not in chosen], sorted(val)


def dataset_fingerprint(ds: Any, columns: list[str]) -> str:
    """sha256 of a dataset as used: its size and the given columns' values (images: datasets' fingerprint)."""
    import hashlib

    h = hashlib.sha256(f"{len(ds)}|".encode())
    for c in columns:
        feat = ds.features.get(c)
        if type(feat).__name__ == "Image":  # image bytes are big: datasets' own fingerprint stands for them
            h.update(f"{c}|{getattr(ds, '_fingerprint', '')}|".encode())
        else:
            h.update(f"{c}|".encode())
            for v in ds[c]:
                h.update(repr(v).encode())
    return h.hexdigest()


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
