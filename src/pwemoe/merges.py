"""The standard merges computed by mergekit: TIES, DARE, breadcrumbs, model stock, SLERP, and preference-weighted
TIES and DARE, as baselines on the same fronts as PWEMoE.

pwemoe adds no merge logic of its own: every point is a mergekit configuration (`MergeConfiguration`) run by
mergekit's `run_merge`, exactly what `mergekit-yaml` runs. mergekit merges model folders, and pwemoe's baselines
run on each task's backbone (the heads stay per task), so `MergekitBank` writes the base's and the experts'
backbones once as temporary safetensors folders (one expert in memory at a time), has mergekit merge them into
a temporary folder per point, and loads the result into one reused backbone module.

The registry `MERGES` holds each merge's mergekit method, its documented hyper-parameter grid (configurable as
`eval.merge_grids.<name>`) and whether it is preference-weighted (per-model weight c * r_i on PWEMoE's grid).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .core.task_vector import check_compatible

log = logging.getLogger(__name__)

EXTRA = "mergekit"
MISSING_MESSAGE = f"the standard merges and --engine mergekit need mergekit: pip install 'pwemoe[{EXTRA}]'"


class MissingExtra(RuntimeError):
    """An optional extra is not installed; the message names it (the CLI prints it as one line, exit code 2)."""


def require_mergekit() -> str:
    """mergekit's version, or MissingExtra naming the extra to install."""
    from importlib.metadata import version

    try:
        import mergekit.merge  # noqa: F401 - the API pwemoe uses
    except ImportError:
        raise MissingExtra(MISSING_MESSAGE) from None
    return version("mergekit")


@dataclass(frozen=True)
class StandardMerge:
    """One merge method of mergekit, as a baseline.

    method: mergekit's `merge_method`. grid: parameter -> default values (names as mergekit spells them;
    `lambda` scales the merged task vector); every combination is one point. shared: parameters fixed for
    every point. preference: preference-weighted (each expert's `weight` is c * r_i, one point per preference
    of PWEMoE's grid; its grid takes one value per parameter). stochastic: seeded (eval.merge_seed).
    tasks: (min, max) number of experts the method takes (None: no maximum). short, style: how reports and plots
    name and draw it. One entry here is the whole merge: `baselines.METHODS` lists every entry as a baseline.
    """

    name: str
    method: str
    label: str
    grid: dict[str, tuple[float, ...]]
    shared: dict[str, Any] = field(default_factory=dict)
    preference: bool = False
    stochastic: bool = False
    tasks: tuple[int, int | None] = (2, None)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)  # allowed [lo, hi] per parameter
    short: str = ""  # the name in tables and legends (default: `label`)
    style: dict[str, Any] = field(default_factory=lambda: {"color": "C7", "marker": "x"})  # matplotlib's point style


_TA_GRID = {"density": (0.2, 0.5, 0.8), "lambda": (0.3, 0.6, 1.0)}
_RANGES = {"density": (0.0, 1.0), "lambda": (0.0, 10.0), "gamma": (0.0, 1.0), "t": (0.0, 1.0)}


class MergeRegistry(dict):
    """The registry of standard merges, {name: StandardMerge}. Adding an entry is the whole of adding a merge: every
    function in `hooks` is called with the new entry (`baselines` lists it as a method on the fronts)."""

    def __init__(self, entries: Mapping[str, StandardMerge]) -> None:
        super().__init__(entries)
        self.hooks: list[Callable[[StandardMerge], None]] = []

    def __setitem__(self, name: str, merge: StandardMerge) -> None:
        if not isinstance(merge, StandardMerge) or merge.name != name:
            raise ValueError(f"MERGES[{name!r}] must be a StandardMerge named {name!r}, got {merge!r}")
        super().__setitem__(name, merge)
        for hook in self.hooks:
            hook(merge)


MERGES: MergeRegistry = MergeRegistry(
    {
        m.name: m
        for m in (
            StandardMerge(
                "ties",
                "ties",
                "TIES (density × λ grid)",
                dict(_TA_GRID),
                short="TIES",
                style=dict(color="C1", marker="v"),
            ),
            StandardMerge(
                "dare_ties",
                "dare_ties",
                "DARE-TIES (density × λ grid)",
                dict(_TA_GRID),
                stochastic=True,
                short="DARE-TIES",
                style=dict(color="C5", marker="<"),
            ),
            StandardMerge(
                "dare_linear",
                "dare_linear",
                "DARE linear (density × λ grid)",
                dict(_TA_GRID),
                stochastic=True,
                short="DARE linear",
                style=dict(color="C6", marker=">"),
            ),
            StandardMerge(
                "breadcrumbs_ties",
                "breadcrumbs_ties",
                "breadcrumbs-TIES (density × λ grid)",
                {**_TA_GRID, "gamma": (0.01,)},
                short="breadcrumbs-TIES",
                style=dict(color="C7", marker="P"),
            ),
            StandardMerge(
                "model_stock", "model_stock", "model stock", {}, short="model stock", style=dict(color="C8", marker="X")
            ),
            StandardMerge(
                "slerp",
                "slerp",
                "SLERP of the two experts (t grid)",
                {"t": (0.1, 0.3, 0.5, 0.7, 0.9)},
                tasks=(2, 2),
                short="SLERP",
                style=dict(color="C9", marker="h"),
            ),
            StandardMerge(
                "pref_ties",
                "ties",
                "preference-weighted TIES",
                {"density": (0.5,)},
                {"normalize": False},
                preference=True,
                short="pref.-weighted TIES",
                style=dict(color="#8c564b", marker="p"),
            ),
            StandardMerge(
                "pref_dare_ties",
                "dare_ties",
                "preference-weighted DARE-TIES",
                {"density": (0.5,)},
                preference=True,
                stochastic=True,
                short="pref.-weighted DARE-TIES",
                style=dict(color="#e377c2", marker="d"),
            ),
            StandardMerge(
                "pref_dare_linear",
                "dare_linear",
                "preference-weighted DARE linear",
                {"density": (0.5,)},
                preference=True,
                stochastic=True,
                short="pref.-weighted DARE lin.",
                style=dict(color="#17becf", marker="8"),
            ),
        )
    }
)


def check_merge_settings(names: Sequence[str], grids: Mapping[str, Any], k: int) -> list[str]:
    """Every problem with the selected merges and their grids (config keys eval.baselines, eval.merge_grids),
    for k tasks; [] when all is well. Checked with the config, before any model loads (mergekit need not be
    installed for this)."""
    errors = []
    for n in names:
        m = MERGES.get(n)
        if m is None:
            continue  # not a merge: the caller checks the other names
        lo, hi = m.tasks
        if k < lo or (hi is not None and k > hi):
            want = f"exactly {lo}" if lo == hi else f"at least {lo}"
            errors.append(f"eval.baselines: {n} merges {want} experts; this run has {k}; drop it from the list")
    if not isinstance(grids, Mapping):
        return errors + [f"eval.merge_grids: expected a mapping merge -> {{parameter: [values]}}, got {grids!r}"]
    for n, grid in grids.items():
        m = MERGES.get(n)
        if m is None:
            errors.append(f"eval.merge_grids.{n}: unknown merge; known: {sorted(MERGES)}")
            continue
        if not isinstance(grid, Mapping):
            errors.append(f"eval.merge_grids.{n}: expected a mapping parameter -> [values], got {grid!r}")
            continue
        for p, values in grid.items():
            key = f"eval.merge_grids.{n}.{p}"
            if p not in m.grid:
                errors.append(f"{key}: {n} has no parameter {p!r}; its grid has {sorted(m.grid) or 'none'}")
                continue
            if not isinstance(values, list) or not values:
                errors.append(f"{key}: expected a non-empty list of numbers, got {values!r}")
                continue
            lo, hi = _RANGES[p]
            bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi]
            if bad:
                errors.append(f"{key}: values must be numbers in [{lo}, {hi}], got {bad}")
            elif len(set(values)) != len(values):
                errors.append(f"{key}: values repeat: {values}")
            elif m.preference and len(values) != 1:
                errors.append(f"{key}: a preference-weighted merge takes one value (its curve runs over preferences)")
    return errors


def grid_of(name: str, overrides: Mapping[str, Mapping[str, Sequence[float]]] | None = None) -> dict[str, list[float]]:
    """The merge's grid: its defaults, with the parameters given in `overrides[name]` replaced."""
    m = MERGES[name]
    given = (overrides or {}).get(name, {})
    return {p: [float(v) for v in given.get(p, vals)] for p, vals in m.grid.items()}


@dataclass(frozen=True)
class MergeSpec:
    """One mergekit merge of theta_0 and the k experts: what `MergekitBank.model` runs.

    weights: each expert's `weight` (None: the method takes none); parameters: the grid point's values
    (per-expert ones like density given to every expert, the rest shared); seed: the random seed (stochastic
    merges) or None.
    """

    name: str
    method: str
    parameters: dict[str, float]
    weights: tuple[float, ...] | None = None
    shared: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None

    def describe(self) -> dict[str, Any]:
        """Everything the merged weights depend on besides the models: part of the results rows' inputs."""
        return {
            "merge": self.name,
            "mergekit_method": self.method,
            "parameters": dict(sorted(self.parameters.items())),
            "weights": None if self.weights is None else list(self.weights),
            "shared": dict(sorted(self.shared.items())),
            "seed": self.seed,
        }

    def configuration(self, base: str, experts: Sequence[str], dtype: str = "float32") -> dict[str, Any]:
        """The mergekit configuration (a `MergeConfiguration` mapping) over model folders: base first.

        SLERP interpolates between the two experts (t = 0: the first), the others merge the experts' task
        vectors on the base.
        """
        per_model = {p: v for p, v in self.parameters.items() if p in ("density", "gamma")}
        shared = {**self.shared, **{p: v for p, v in self.parameters.items() if p not in per_model}}
        if self.method == "slerp":
            models = [{"model": e} for e in experts]
            cfg: dict[str, Any] = {"merge_method": "slerp", "base_model": experts[0], "models": models}
        else:
            models = []
            for i, e in enumerate(experts):
                params = dict(per_model)
                if self.weights is not None:
                    params["weight"] = float(self.weights[i])
                models.append({"model": e, "parameters": params} if params else {"model": e})
            cfg = {"merge_method": self.method, "base_model": base, "models": models}
        if shared:
            cfg["parameters"] = shared
        cfg["dtype"] = dtype
        return cfg


def merge_specs(
    name: str,
    k: int,
    preferences: Sequence[Sequence[float]],
    grids: Mapping[str, Mapping[str, Sequence[float]]] | None,
    c: float,
    seed: int,
) -> list[tuple[list[float] | None, dict[str, float], MergeSpec]]:
    """(preference or None, the row's param, spec) of every point of a merge: the grid's combinations, or for a
    preference-weighted merge one point per preference with per-expert weights c * r_i."""
    m = MERGES[name]
    grid = grid_of(name, grids)
    keys = sorted(grid)
    s = seed if m.stochastic else None
    weights_default = None if m.method in ("slerp", "model_stock") else tuple([1.0] * k)
    out: list[tuple[list[float] | None, dict[str, float], MergeSpec]] = []
    for combo in itertools.product(*(grid[p] for p in keys)):
        params = dict(zip(keys, combo))
        if m.preference:
            for p in preferences:
                spec = MergeSpec(name, m.method, params, tuple(c * x for x in p), dict(m.shared), s)
                out.append((list(p), {"c": float(c), **params}, spec))
        else:
            out.append((None, params, MergeSpec(name, m.method, params, weights_default, dict(m.shared), s)))
    return out


# mergekit 0.1.5 cannot plan a merge of its own BertModel definition (bert.json marks embeddings.position_ids
# optional with aliases, and plan.py adds that tuple to a list: TypeError; mergekit-yaml fails the same way).
# For these classes the references name another AutoModel class that has no JSON definition
# (`override_architecture`, mergekit's own switch), so mergekit infers the layout from the tensors, as it does for
# GPT2Model, LlamaModel and CLIPVisionModel backbones; AutoModel builds the class from the config's model_type.
_INFER_LAYOUT = {"BertModel": "BertGenerationEncoder"}


def write_backbone(model: nn.Module, out: Path) -> None:
    """A model folder mergekit reads: config.json and model.safetensors with the floating parameters, by name."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    cfg = model.config.to_dict()
    cfg["architectures"] = [type(model).__name__]
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    tensors = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.is_floating_point()}
    save_file(tensors, str(out / "model.safetensors"))


def read_folder(folder: Path) -> Iterator[tuple[str, Any]]:
    """(name, lazy tensor getter) of every tensor of a folder's *.safetensors shards."""
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for n in h.keys():
                yield n, h.get_tensor(n)


@contextlib.contextmanager
def offline_and_seeded() -> Iterator[None]:
    """Run mergekit offline (its references are local folders: a path never becomes a hub id) and give back
    the global random state it seeds (transformers' set_seed touches Python's, NumPy's and torch's)."""
    import numpy as np

    old_env = os.environ.get("HF_HUB_OFFLINE")
    py, npy = random.getstate(), np.random.get_state()
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def run_mergekit(cfg: Mapping[str, Any], out: Path, seed: int | None = None, **options: Any) -> None:
    """mergekit's `run_merge` of a configuration mapping into `out` (what `mergekit-yaml` does)."""
    require_mergekit()
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    opts = {"quiet": True, "copy_tokenizer": False, "write_model_card": False, "random_seed": seed, **options}
    with offline_and_seeded():
        run_merge(MergeConfiguration.model_validate(dict(cfg)), str(out), options=MergeOptions(**opts))


class MergekitBank:
    """theta_0 and the experts' backbones as temporary folders, merged by mergekit into one reused backbone.

    Built streamed: the base (`base`, a fresh backbone module, kept as the template the merges load into) and
    each expert (`experts`: name -> zero-argument loader) are written once, one expert in memory at a time.
    `workdir`: where the folders go (default: the system's temporary directory); `close()` removes them.
    """

    def __init__(
        self, base: nn.Module, experts: Mapping[str, Callable[[], nn.Module]], workdir: str | Path | None = None
    ) -> None:
        require_mergekit()
        self.template = base.eval().requires_grad_(False)
        self.dir = Path(tempfile.mkdtemp(prefix="pwemoe-mergekit-", dir=workdir)).resolve()
        try:
            params = {n: p for n, p in self.template.named_parameters() if p.is_floating_point()}
            self.names = list(params)
            write_backbone(self.template, self.dir / "base")
            self.experts = []
            for i, name in enumerate(experts):
                e = experts[name]()
                ep = {n: v for n, v in e.named_parameters() if v.is_floating_point()}
                check_compatible(params, ep, f"expert {name!r}")
                write_backbone(e, self.dir / f"expert-{i}")
                self.experts.append(str(self.dir / f"expert-{i}"))
                del e, ep  # streamed: one expert in memory at a time
        except BaseException:
            self.close()
            raise
        self.base = str(self.dir / "base")
        self.override = _INFER_LAYOUT.get(type(self.template).__name__)

    def configuration(self, spec: MergeSpec) -> dict[str, Any]:
        """The mergekit configuration of `spec` over this bank's folders."""
        cfg = spec.configuration(self.base, self.experts)
        if self.override:
            ref = lambda p: {"model": {"path": p}, "override_architecture": self.override}  # noqa: E731
            cfg["base_model"] = ref(cfg["base_model"])
            for m in cfg["models"]:
                m["model"] = ref(m["model"])
        return cfg

    @torch.no_grad()
    def model(self, spec: MergeSpec) -> nn.Module:
        """The backbone holding mergekit's merge `spec` (the reused template module)."""
        out = self.dir / "merged"
        if out.exists():
            shutil.rmtree(out)
        dtype = str(next(iter(self.template.parameters())).dtype).replace("torch.", "")
        run_mergekit({**self.configuration(spec), "out_dtype": dtype}, out, seed=spec.seed)
        own = dict(self.template.named_parameters())
        seen = set()
        for n, t in read_folder(out):
            if n in own:
                own[n].copy_(t.to(own[n].device, own[n].dtype))
                seen.add(n)
        missing = [n for n in self.names if n not in seen]
        shutil.rmtree(out)
        if missing:
            raise ValueError(f"mergekit's {spec.name} merge left out {len(missing)} tensors, e.g. {missing[:3]}")
        return self.template

    def close(self) -> None:
        """Remove the temporary folders."""
        shutil.rmtree(self.dir, ignore_errors=True)


__all__ = [
    "MERGES",
    "MergeRegistry",
    "MergeSpec",
    "MergekitBank",
    "MissingExtra",
    "StandardMerge",
    "check_merge_settings",
    "grid_of",
    "merge_specs",
    "require_mergekit",
    "run_mergekit",
]
