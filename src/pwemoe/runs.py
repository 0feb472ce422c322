"""Opening a trained run (the upcycled model with its routers) and exporting plain models from it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .checkpoint import check_hashes, load_routers
from .config import Config
from .configfile import build_config, read_config
from .core.checks import positive_int
from .core.preference import Preference, PreferenceLike, parse_preference
from .export import merge_and_unload
from .files import (
    BEST_ROUTERS,
    CONFIG,
    ROUTERS,
    atomic_write_json,
    file_sha256,
    prepare_output,
    require_run_dir,
    staged_dir,
)
from .routing import load_router_state_dict, routing_weights, set_preference
from .workbench import Workbench

log = logging.getLogger(__name__)


def open_run(
    run: str | Path,
    load_test: bool = True,
    max_test_samples: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    eval_split: str = "test",
) -> tuple[Workbench, dict]:
    """Rebuild a run's upcycled model with its trained routers; refuse different base/expert/head weights.

    `device` / `precision` replace the run's own settings (e.g. evaluate a CPU-trained run on a GPU).
    The routers are the run's selected ones (`train.select`: the last checkpoint, or the one with the
    best validation hypervolume); `eval_split` says which data `test_data` holds (test or validation).

    Returns the workbench and the checkpoint metadata, plus `routers_sha256` (the router file's hash,
    part of the provenance of every PWEMoE result).
    """
    run = require_run_dir(run)
    cfg = with_placement(read_config(run / CONFIG), device, precision)
    path = routers_path(run, cfg)
    state, meta = load_routers(path)
    wb = Workbench(cfg, load_train=False, load_test=load_test, max_test_samples=max_test_samples, eval_split=eval_split)
    check_hashes(meta.get("hashes", {}), wb.info.hashes, f"the checkpoint in {run}")
    load_router_state_dict(wb.model, state)
    meta["routers_sha256"] = file_sha256(path)
    meta["routers_file"] = path.name
    return wb, meta


def routers_path(run: Path, cfg: Config) -> Path:
    """The router file a run's results come from: the best-validation checkpoint with
    train.select=best_val_hv (once one was validated), else the last checkpoint."""
    if cfg.train.select == "best_val_hv" and (run / BEST_ROUTERS).is_file():
        return run / BEST_ROUTERS
    return run / ROUTERS


def with_placement(cfg: Config, device: str | None, precision: str | None) -> Config:
    """The config with `device` / `precision` replaced where given (validated like any config value)."""
    extra = {k: v for k, v in (("device", device), ("precision", precision)) if v is not None}
    return build_config({**cfg.to_dict(), **extra}) if extra else cfg


def parse_preference_arg(preference: str | PreferenceLike, k: int) -> Preference:
    """The validated preference of '0.2,0.8' (a command-line argument), a sequence or a `Preference`."""
    return Preference.of(parse_preference(preference) if isinstance(preference, str) else preference, k)


def export_run(
    run: str | Path,
    preference: str | PreferenceLike,
    out: str | Path,
    overwrite: bool = False,
    device: str | None = None,
    adapter_rank: int | None = None,
) -> Path:
    """Write plain Hugging Face model directories for one preference, plus pwemoe.json.

    `out` must be new or empty unless `overwrite`, which replaces a previous export as a whole (files of
    others in it are kept: `files.publish_dir`).
    adapter_rank: runs over LoRA experts: the exported adapter has this one rank in every layer (each layer's
    best approximation; the errors are recorded in pwemoe.json).
    """
    run = Path(run)
    out = prepare_output(out, overwrite, "export")  # refuse before loading any model
    require_run_dir(run)
    cfg = with_placement(read_config(run / CONFIG), device, None)  # checked before models load
    r = parse_preference_arg(preference, len(cfg.tasks))
    if adapter_rank is not None:
        positive_int("--adapter-rank", adapter_rank)
    wb, meta = open_run(run, load_test=False, device=device)
    out = write_export(wb, meta, run, r, out, overwrite, adapter_rank)
    print(f"exported preference {r.tolist()} to {out}")
    return out


def write_export(
    wb: Workbench,
    meta: dict,
    run: str | Path,
    r: PreferenceLike,
    out: str | Path,
    overwrite: bool = False,
    adapter_rank: int | None = None,
) -> Path:
    """Write the plain models of an open run (`open_run`) for the preference r (a `Preference`, or its weights).

    Built in a temporary sibling directory and published in one step, with pwemoe.json (the
    preference, routing weights and provenance). Sets the model's preference to r.
    """
    run, out = Path(run), Path(out)
    r = Preference.of(r, len(wb.tasks))
    prepare_output(out, overwrite, "export")
    set_preference(wb.model, r)  # set once; routing weights and the merge below read it from the model
    lam = {n: v.tolist() for n, v in routing_weights(wb.model).items()}
    with staged_dir(out, overwrite, "export") as tmp:
        plain = wb.modality.plain_model(merge_and_unload)
        options = {"adapter_rank": adapter_rank} if adapter_rank is not None else {}
        written = wb.modality.save_export(plain, wb.tasks, tmp, **options)
        written = {n: str(out / Path(p).relative_to(tmp)) if Path(p) != tmp else str(out) for n, p in written.items()}
        info: dict[str, Any] = {
            "preference": dict(zip([t.name for t in wb.tasks], r.tolist())),
            "run": str(run.resolve()),
            "step": meta.get("step"),
            "routers_sha256": meta.get("routers_sha256"),
            "base": meta.get("base"),
            "experts": meta.get("experts"),
            "hashes": meta.get("hashes"),
            "routing_weights": lam,
            "models": written,
            "class_names": {t.name: t.class_names for t in wb.tasks},
            **wb.modality.export_info,
        }
        atomic_write_json(tmp / "pwemoe.json", info)
    return out


__all__ = ["export_run", "open_run", "parse_preference_arg", "write_export"]
