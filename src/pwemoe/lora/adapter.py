"""PEFT LoRA adapter folders, read and written with json + safetensors (peft itself is not needed).

A folder holds `adapter_config.json` and `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight` (Tensor[r, in]) and `...lora_B.weight` (Tensor[out, r]).
The layer computes W_0 x + s B (A x), with s = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)), where r
and lora_alpha may be overridden per module by `rank_pattern` / `alpha_pattern` (regexes matched as
peft matches them). What pwemoe does not implement (DoRA, trained biases, extra trainable modules, ...)
is refused by name, never silently dropped.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.checks import positive_int_problem
from ..files import MAX_SMALL_FILE, read_bounded

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."

# peft (0.21) reads transformers' deprecated `is_gradient_checkpointing` each time it wraps a model, and transformers
# 5 answers with a FutureWarning: harmless (peft only asks whether to prepare checkpointing) and not pwemoe's call to
# change. Filtered where pwemoe wraps a model with peft, nowhere else (docs/guides/language-models.md).
PEFT_WRAP_WARNING = r"`is_gradient_checkpointing` is deprecated"


@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """Wrap a model with peft (`get_peft_model`, `PeftModel.from_pretrained`) without PEFT_WRAP_WARNING."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_WRAP_WARNING, category=FutureWarning)
        yield


# Config fields that change what the adapted layer computes, and the value pwemoe implements.
_UNSUPPORTED: dict[str, tuple[object, str]] = {
    "use_dora": (False, "DoRA (weight-decomposed LoRA) rescales W_0 per column, which is not a sum of low-rank terms"),
    "lora_bias": (False, "a trained LoRA bias"),
    "bias": ("none", "trained biases (bias='all' / 'lora_only')"),
    "modules_to_save": (None, "fully trained extra modules (modules_to_save)"),
    "layer_replication": (None, "layer replication"),
    "use_qalora": (False, "QA-LoRA"),
    "alora_invocation_tokens": (None, "activated LoRA (aLoRA)"),
    "trainable_token_indices": (None, "trainable tokens"),
    "target_parameters": (None, "LoRA on parameters (target_parameters)"),
}


@dataclass
class LoraLayer:
    """One adapted linear layer: delta(x) = scaling * B (A x). A: Tensor[r, in]; B: Tensor[out, r]."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter: module name (as in the model the adapter was made for) -> LoraLayer."""

    path: str
    base_model_name_or_path: str | None
    layers: dict[str, LoraLayer] = field(default_factory=dict)
    fan_in_fan_out: bool = False

    @property
    def ranks(self) -> dict[str, int]:
        return {n: layer.rank for n, layer in self.layers.items()}

    def num_parameters(self) -> int:
        return sum(layer.A.numel() + layer.B.numel() for layer in self.layers.values())


def is_lora_adapter(path: object) -> bool:
    """True for a local folder with a PEFT adapter_config.json."""
    return isinstance(path, (str, Path)) and (Path(str(path)) / ADAPTER_CONFIG).is_file()


def _pattern_value(patterns: dict[str, object], module: str, default: object) -> object:
    """peft's rule (`get_pattern_key`): the first pattern p with re.match(rf'(.*\\.)?({p})$', module) (kept as
    peft writes it, `$` included: module names hold no newline)."""
    for p, v in patterns.items():
        if re.match(rf"(.*\.)?({p})$", module):
            return v
    return default


def _config_errors(cfg: object) -> list[str]:
    """What in adapter_config.json does not have the type peft gives it (checked before any value is used)."""
    if not isinstance(cfg, dict):
        return [f"expected a JSON object, got {type(cfg).__name__}"]

    def number(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    errors = []
    if why := positive_int_problem("r", cfg.get("r", 8)):
        errors.append(why)
    if not number(cfg.get("lora_alpha", 8)):
        errors.append(f"lora_alpha must be a finite number, got {cfg.get('lora_alpha')!r}")
    for key in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(cfg.get(key, False), bool):
            errors.append(f"{key} must be true or false, got {cfg.get(key)!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        pat = cfg.get(key) or {}
        if not isinstance(pat, dict):
            errors.append(f"{key} must map module patterns to values, got {pat!r}")
            continue
        if key == "rank_pattern":
            errors += [why for k, v in pat.items() if (why := positive_int_problem(f"{key}[{k!r}]", v))]
        else:
            errors += [f"{key}[{k!r}] must be a finite number, got {v!r}" for k, v in pat.items() if not number(v)]
        errors += [f"{key}: {k!r} is not a valid regex ({why})" for k in pat if (why := _regex_error(k))]
    tm = cfg.get("target_modules")
    if isinstance(tm, str) and tm != "all-linear" and (why := _regex_error(tm)):
        errors.append(f"target_modules {tm!r} is not a valid regex ({why})")
    elif (
        tm is not None
        and not isinstance(tm, str)
        and not (isinstance(tm, list) and all(isinstance(t, str) for t in tm))
    ):
        errors.append(f"target_modules must be a regex or a list of module names, got {tm!r}")
    return errors


def _regex_error(pattern: str) -> str | None:
    try:
        re.compile(pattern)
    except re.error as e:
        return str(e)
    return None


def _targets(target_modules: object, module: str) -> bool:
    """peft's rule (`check_target_module_exists`): a str is a regex matched against the whole module name;
    a list holds names, each matching the module of that name or ending in '.<name>'."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith(f".{t}") for t in target_modules)  # type: ignore[union-attr]


def _target_disagreements(target_modules: object, modules: list[str]) -> list[str]:
    """Where adapter_config.json's target_modules and the modules with weights disagree: peft would drop
    the weights of a module it does not target, and give a listed target no trained weights."""
    if target_modules in (None, "all-linear") or not modules:  # "all-linear" depends on the model: not checkable
        return []
    out = [
        f"module {m!r} has LoRA weights but target_modules {target_modules!r} does not name it (peft would drop "
        "them); save the adapter again, or correct target_modules in adapter_config.json"
        for m in modules
        if not _targets(target_modules, m)
    ]
    if isinstance(target_modules, list):
        out += [
            f"target_modules names {t!r} but no module with that name has LoRA weights; save the adapter again, "
            "or correct target_modules in adapter_config.json"
            for t in target_modules
            if not any(_targets([t], m) for m in modules)
        ]
    return out


def read_lora_adapter(path: str | Path, name: str = "adapter") -> LoraAdapter:
    """Read and check a PEFT LoRA folder; errors name the adapter (`name`), the module and the fix."""
    from safetensors.torch import load_file

    p = Path(path)
    cfg_path, w_path = p / ADAPTER_CONFIG, p / ADAPTER_WEIGHTS
    if not cfg_path.is_file():
        raise ValueError(f"{name}: {p} has no {ADAPTER_CONFIG}; is it a PEFT adapter folder (save_pretrained)?")
    if not w_path.is_file():
        bin_hint = (
            " (only adapter_model.bin was found; re-save with safe_serialization=True)"
            if (p / "adapter_model.bin").is_file()
            else ""
        )
        raise ValueError(f"{name}: {p} has no {ADAPTER_WEIGHTS}{bin_hint}")
    text = read_bounded(cfg_path, MAX_SMALL_FILE, f"{name}: the adapter config", "a LoRA adapter's config is a few kB")
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name}: {cfg_path} is not valid JSON ({e})") from None
    errors = _config_errors(cfg)
    if errors:  # the values below are read with these types
        raise ValueError(f"{name}: {cfg_path} cannot be used: " + "; ".join(errors))
    if cfg.get("peft_type", "LORA") != "LORA":
        errors.append(f"peft_type is {cfg.get('peft_type')!r}; pwemoe reads LoRA adapters (peft_type 'LORA')")
    for key, (ok, what) in _UNSUPPORTED.items():
        v = cfg.get(key, ok)
        if v not in (ok, None, False, [], {}):
            errors.append(f"{key}={v!r}: {what} is not implemented by pwemoe; train the adapter without it")
    try:
        state = load_file(str(w_path))
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: a damaged or foreign file
        raise ValueError(
            f"{name}: {w_path} cannot be read as safetensors ({type(e).__name__}: {str(e)[:120]}); it is "
            "truncated, or not a safetensors file (a pickle saved under this name?): save the adapter again "
            "with save_pretrained(safe_serialization=True)"
        ) from None
    r0, alpha0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rslora = bool(cfg.get("use_rslora", False))
    rank_pat, alpha_pat = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        if m is None:
            kind = (
                "DoRA magnitude"
                if "lora_magnitude_vector" in key
                else ("LoRA embedding" if "lora_embedding" in key else "unrecognised")
            )
            errors.append(f"tensor {key!r} ({kind}) is not a LoRA A/B weight of a linear layer; pwemoe cannot use it")
            continue
        modules.setdefault(m.group(1), {})[m.group(2)] = t
    layers = {}
    for mod, ab in modules.items():
        if set(ab) != {"lora_A", "lora_B"}:
            errors.append(f"module {mod!r} has only {sorted(ab)}; a LoRA layer needs lora_A and lora_B")
            continue
        A, B = ab["lora_A"], ab["lora_B"]
        if not (A.is_floating_point() and B.is_floating_point()):
            errors.append(f"module {mod!r}: lora_A is {A.dtype} and lora_B {B.dtype}; LoRA weights are floating point")
            continue
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            errors.append(f"module {mod!r}: its LoRA weights hold NaN or infinite values (a diverged training?)")
            continue
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            errors.append(
                f"module {mod!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} are not the factors of a "
                "linear layer (conv LoRA is not supported)"
            )
            continue
        r = int(_pattern_value(rank_pat, mod, r0))
        alpha = float(_pattern_value(alpha_pat, mod, alpha0))
        if r != A.shape[0]:
            errors.append(f"module {mod!r}: the config says rank {r} but lora_A has {A.shape[0]} rows")
            continue
        layers[mod] = LoraLayer(A, B, alpha / math.sqrt(r) if rslora else alpha / r)
    if not layers and not errors:
        errors.append("it holds no LoRA layer")
    errors += _target_disagreements(cfg.get("target_modules"), sorted(modules))
    if errors:
        raise ValueError(f"{name}: LoRA adapter {p} cannot be used: " + "; ".join(errors))
    return LoraAdapter(str(p), cfg.get("base_model_name_or_path"), layers, bool(cfg.get("fan_in_fan_out", False)))


def write_lora_adapter(
    out: str | Path,
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]],
    base_model_name_or_path: str | None,
    task_type: str | None = "CAUSAL_LM",
    fan_in_fan_out: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write {module: (A Tensor[r, in], B Tensor[out, r])} as a PEFT folder with scaling 1 (alpha = r per module).

    Ranks may differ per module (rank_pattern / alpha_pattern, with regex-escaped module names).
    Written into a temporary sibling and published in one step (`files.staged_dir`): `out` must be new or
    empty, unless `overwrite`, which replaces a previous adapter there as a whole (files of others are kept).
    """
    from safetensors.torch import save_file

    from ..files import atomic_write, atomic_write_json, prepare_output, staged_dir

    final = prepare_output(out, overwrite, "LoRA adapter", "overwrite=True")  # refused before any work
    ranks = {m: int(a.shape[0]) for m, (a, _) in layers.items()}
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(m): r for m, r in ranks.items() if r != r0}
    cfg = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r0,
        "lora_alpha": r0,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(layers),
        "lora_dropout": 0.0,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    tensors = {}
    for m, (a, b) in layers.items():
        tensors[f"{_PREFIX}{m}.lora_A.weight"] = a.detach().contiguous().cpu()
        tensors[f"{_PREFIX}{m}.lora_B.weight"] = b.detach().contiguous().cpu()
    with staged_dir(final, overwrite, "LoRA adapter", "overwrite=True") as out:
        atomic_write(out / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        atomic_write_json(out / ADAPTER_CONFIG, cfg)
    return final
