"""`pwemoe train`: the training recipe. Setup, load checkpoint, step, save checkpoint; reads top to bottom.

Runs data-parallel under `accelerate launch` / `torchrun`: each rank samples its own preferences
and batches; router gradients are all-reduced (mean); rank 0 writes the run directory.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..checkpoint import check_hashes, load_routers, load_state, save_routers, save_state
from ..config import RESUMABLE, Config, ConfigError, dump_config, resumable_keys
from ..configfile import build_config, read_config
from ..core.preference import DirichletSampler, simplex_grid
from ..devices import grad_scaler, join_launch, rank_and_world, wait_for_everyone
from ..evaluation import PointEvaluator, task_values
from ..files import (
    BEST_ROUTERS,
    CONFIG,
    MAX_RESULTS_FILE,
    MAX_SMALL_FILE,
    METRICS,
    ROUTERS,
    RUN_FILES,
    RUN_MARKER,
    STATE,
    RunLock,
    append_line,
    atomic_write_json,
    atomic_write_text,
    clear_run_dir,
    is_run_dir,
    make_dirs,
    read_bounded,
    read_json,
    require_run_dir,
)
from ..objectives import Objective, build_objective
from ..pareto import hypervolume
from ..recompute import gradient_checkpointing
from ..routing import load_router_state_dict, router_state_dict
from ..tasks.data import TaskStream
from ..training import (
    NonFiniteLossError,
    StepData,
    StepEncoder,
    StepSampler,
    accumulate_router_gradients,
    default_micro_batch_size,
    flat_to_grads,
    make_optimizer,
)
from ..workbench import Workbench

log = logging.getLogger(__name__)


def checkpoint_metadata(cfg: Config, wb: Workbench, step: int) -> dict[str, Any]:
    info = wb.info
    return {
        "format": "pwemoe-routers-v1",
        "pwemoe_version": __version__,
        "step": step,
        "base": cfg.model.base,
        "experts": info.expert_ids,
        "task_names": info.task_names,
        "hashes": info.hashes,
        "targets": info.targets,
        "init_lambda": info.init_lambda,
        "router_hidden_layers": info.router_hidden_layers,
        "task_vector_dtype": info.task_vector_dtype,
    }


def cosine_lr(step: int, segment: dict[str, float], eta_min: float) -> float:
    """Cosine annealing from segment['lr'] at segment['start'] down to eta_min at segment['end'].

    A resume that changes steps or lr starts a new segment at the current step, so the learning
    rate keeps decaying to the new end instead of jumping back up the old curve.
    """
    s0, lr0, end = int(segment["start"]), float(segment["lr"]), int(segment["end"])
    span = max(end - s0, 1)
    return eta_min + (lr0 - eta_min) * (1 + math.cos(math.pi * min(max(step - s0, 0), span) / span)) / 2


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        out = {}
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: d}


def resume_changes(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """Keys whose value differs between the run's config and the resumed one; refuses what may not change."""
    a, b = _flatten(old.to_dict()), _flatten(new.to_dict())
    diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    bad = [f"{k}: run has {v[0]!r}, now {v[1]!r}" for k, v in diff.items() if not k.startswith(RESUMABLE)]
    if bad:
        raise ConfigError(
            [
                f"{x} (this setting cannot change on --resume; only {resumable_keys()} may; "
                "start a new run_dir to change it)"
                for x in bad
            ]
        )
    return diff


class TrainRecipe:
    """One training run. `run()` = setup -> load_checkpoint -> (step, maybe save_checkpoint)* -> save.

    on_step(recipe, step) is called after every optimizer step (tests use it to kill a run mid-way).
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        resume: bool = False,
        on_step: Callable[[TrainRecipe, int], None] | None = None,
    ) -> None:
        self.cfg, self.run_dir, self.resume, self.on_step = cfg, Path(run_dir), resume, on_step
        self.rank, self.world = rank_and_world()
        self.main = self.rank == 0
        self.step_no = 0
        self.segment = {"start": 0, "lr": cfg.train.lr, "end": cfg.train.steps}
        # {"step", "val_hv", "settings"} of the best validated routers so far (settings: _val_settings)
        self.val_best: dict[str, Any] = {}
        self.saved_step: int | None = None  # the step of the checkpoint on disk (None: none yet)

    # --- setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        tc = self.cfg.train
        torch.manual_seed(tc.seed)  # router init: identical on every rank
        # with validation, the workbench's evaluation data is the validation split: the test split is never read
        validate = tc.val_interval is not None
        self.wb = wb = Workbench(self.cfg, load_train=True, load_test=validate, eval_split="validation")
        self.model, self.tasks, k = wb.model, wb.tasks, len(wb.tasks)
        self.params = wb.trainable_parameters()  # the routers: fp32, on the device
        self.opt = make_optimizer(self.params, tc.lr)
        self.scaler = grad_scaler(wb.device, self.cfg.precision)  # fp16 only
        if tc.gradient_checkpointing:
            scope = "layers" if tc.gradient_checkpointing is True else tc.gradient_checkpointing
            gradient_checkpointing(wb.backbone, scope=scope)
        self.micro_batch_size = tc.micro_batch_size or default_micro_batch_size(wb.device)
        self.objective: Objective = build_objective(tc.objective, **tc.objective_args)
        # Each rank draws its own preferences and batches (docs/guides/gpus.md).
        self.sampler = DirichletSampler(k, tc.alpha, seed=tc.seed + 7919 * self.rank)
        self.streams = [
            TaskStream(len(t.train_data), tc.batch_size, tc.seed + 104729 * self.rank + i)
            for i, t in enumerate(self.tasks)
        ]

    # --- checkpoints ------------------------------------------------------------------------------
    def load_checkpoint(self, changes: dict[str, tuple[Any, Any]]) -> None:
        st = load_state(self.run_dir / STATE)
        check_hashes(st["metadata_hashes"], self.wb.info.hashes, f"run {self.run_dir}")
        if st["world_size"] != self.world:
            raise ValueError(
                f"{self.run_dir} was trained with {st['world_size']} processes; resume it with the "
                f"same number (now {self.world})"
            )
        load_router_state_dict(self.model, st["routers"])
        self.opt.load_state_dict(st["optimizer"])
        mine = st["ranks"][self.rank]
        self.sampler.load_state_dict(mine["sampler"])
        for s, ss in zip(self.streams, mine["streams"]):
            s.load_state_dict(ss)
        self.objective.load_state_dict(mine["objective"])
        if st.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(st["scaler"])
        self.step_no = self.saved_step = int(st["step"])
        self.segment = dict(st["lr_segment"])
        self.val_best = dict(st.get("val_best") or {})
        if (
            self.main
            and self.cfg.train.val_interval
            and self.val_best
            and self.val_best.get("settings") != self._val_settings()
        ):
            self._revalidate_best()  # a best val_hv from another reference or precision compares with nothing
        if any(k in changes for k in ("train.steps", "train.lr", "train.min_lr_ratio")):
            # a new cosine segment from here: the new lr if it changed, else the lr reached so far
            old_min = (
                changes.get("train.lr", (self.cfg.train.lr,))[0]
                * changes.get("train.min_lr_ratio", (self.cfg.train.min_lr_ratio,))[0]
            )
            reached = cosine_lr(self.step_no, self.segment, old_min)
            lr0 = self.cfg.train.lr if "train.lr" in changes else reached
            self.segment = {"start": self.step_no, "lr": lr0, "end": self.cfg.train.steps}
        log.info("resumed %s at step %d", self.run_dir, self.step_no)

    def _lr_at(self, step: int) -> float:
        tc = self.cfg.train
        return cosine_lr(step, self.segment, tc.lr * tc.min_lr_ratio)

    def save_checkpoint(self) -> None:
        ranks = [
            {
                "sampler": self.sampler.state_dict(),
                "streams": [s.state_dict() for s in self.streams],
                # each rank's own: a stateful objective (EPO's warm-up loss scales) learns from its own batches
                "objective": self.objective.state_dict(),
            }
        ]
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(gathered, ranks[0])
            ranks = gathered
        self.saved_step = self.step_no
        if not self.main:
            return
        routers = router_state_dict(self.model)
        save_state(
            self.run_dir / STATE,
            {
                "step": self.step_no,
                "world_size": self.world,
                "routers": routers,
                "optimizer": self.opt.state_dict(),
                "lr_segment": self.segment,
                "ranks": ranks,
                "metadata_hashes": self.wb.info.hashes,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                "val_best": self.val_best,
            },
        )
        save_routers(self.run_dir / ROUTERS, routers, checkpoint_metadata(self.cfg, self.wb, self.step_no))

    # --- validation and checkpoint selection ---------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """The front on the validation data: PWEMoE's accuracies on the train.val_grid preferences and
        their hypervolume (raw accuracy, eval.reference_point). Keeps the best routers so far in
        routers_best_val.safetensors. Rank 0 only; the test split is never read."""
        hv, n = self._val_hv()
        rec = {"step": self.step_no, "val_hv": hv, "val_points": n}
        if not self.val_best or hv > self.val_best["val_hv"]:
            self.val_best = {"step": self.step_no, "val_hv": hv, "settings": self._val_settings()}
            meta = checkpoint_metadata(self.cfg, self.wb, self.step_no)
            meta.update(selected_by="best_val_hv", val_hv=hv, val_grid=self.cfg.train.val_grid)
            save_routers(self.run_dir / BEST_ROUTERS, router_state_dict(self.model), meta)
        rec["val_best_step"] = self.val_best["step"]
        return rec

    def _val_hv(self) -> tuple[float, int]:
        """(hypervolume, points) of the current routers' front on the validation data."""
        wb, tc, bs = self.wb, self.cfg.train, self.cfg.eval.batch_size
        evaluator = PointEvaluator(wb, None, bs)  # nothing stored: the routers change at every step
        try:
            points = task_values(evaluator, simplex_grid(len(wb.tasks), tc.val_grid))
        finally:
            evaluator.close()
        # lower-is-better metrics (losses) enter with their sign flipped, against the fixed eval.loss_reference
        sign = torch.tensor([1.0 if t.higher_is_better else -1.0 for t in wb.tasks], dtype=torch.float64)
        ref = torch.tensor(
            [self.cfg.eval.reference_point if t.higher_is_better else self.cfg.eval.loss_reference for t in wb.tasks],
            dtype=torch.float64,
        )
        hv = hypervolume((sign * torch.tensor(points, dtype=torch.float64)).numpy(), (sign * ref).numpy())
        return hv, len(points)

    def _val_settings(self) -> dict[str, Any]:
        """What a validation hypervolume depends on besides the routers; best-so-far values compare
        only under the same (eval.* and precision may change on --resume)."""
        e = self.cfg.eval
        return {
            "reference_point": e.reference_point,
            "loss_reference": e.loss_reference,
            "val_grid": self.cfg.train.val_grid,
            "precision": self.cfg.precision,
            "device": self.wb.device.type,
        }

    def _revalidate_best(self) -> None:
        """The best routers so far, validated again under the current settings (rank 0, on resume), so
        that later validations are compared with a hypervolume of the same reference and precision."""
        path = self.run_dir / BEST_ROUTERS
        if not path.is_file():
            log.warning("%s is missing: the best validated routers are chosen anew from here", path)
            self.val_best = {}
            return
        best, meta = load_routers(path)
        current = {k: v.detach().clone() for k, v in router_state_dict(self.model).items()}
        load_router_state_dict(self.model, best)
        try:
            hv, _ = self._val_hv()
        finally:
            load_router_state_dict(self.model, current)
        old, now = self.val_best, self._val_settings()
        log.warning(
            "validation settings changed on resume (%s -> %s): the best routers so far (step %s, val_hv %.4f) "
            "validated again: val_hv %.4f",
            old.get("settings", "not recorded"),
            now,
            old["step"],
            old["val_hv"],
            hv,
        )
        self.val_best = {"step": old["step"], "val_hv": hv, "settings": now}
        meta.update(val_hv=hv)
        save_routers(path, best, meta)

    # --- the input pipeline ---------------------------------------------------------------------------
    def batches(self) -> Iterator[StepData]:
        """Encoded batches of the steps from here on, prepared ahead by worker processes.

        The seeded index streams stay the source of truth: the sampler (in this process) draws
        each step's indices from copies of them, and every item carries the streams' state after
        its step, which `step` adopts; so a checkpoint records exactly the batches consumed.
        """
        encoder, sampler = self._pipeline()
        return iter(self.wb.loader(encoder, self.cfg.train.num_workers, sampler=sampler))

    def _pipeline(self) -> tuple[StepEncoder, StepSampler]:
        tc = self.cfg.train
        # per-task gradients (EPO): one forward per task, or forwards across tasks (task_segments)
        split = not tc.concat_forward or (self.objective.needs_task_gradients and tc.task_gradients == "forwards")
        encoder = StepEncoder(self.wb, tc.rays_per_step, self.micro_batch_size, split)
        return encoder, StepSampler([copy.deepcopy(s) for s in self.streams], self.step_no)

    # --- one step -----------------------------------------------------------------------------------
    def step(self, data: StepData | None = None) -> dict[str, Any]:
        tc, wb = self.cfg.train, self.wb
        if data is None:  # no pipeline running (a caller driving steps by hand): encode in this process
            encoder, sampler = self._pipeline()
            data = encoder[next(iter(sampler))]
        for s, st in zip(self.streams, data.stream_states):
            s.load_state_dict(st)
        for g in self.opt.param_groups:
            g["lr"] = self._lr_at(self.step_no)
        rays = self.sampler.sample(tc.rays_per_step)  # CPU: validated there, copied to the device per ray
        try:
            task_losses, total = accumulate_router_gradients(
                self.model,
                self.params,
                self.objective,
                rays,
                data.rays,
                wb.segment_losses,
                names=wb.info.task_names,
                scale=self.scaler.scale if self.scaler.is_enabled() else None,
            )
        except NonFiniteLossError as e:
            kept = (
                f"the last good checkpoint (step {self.saved_step}) is kept"
                if self.saved_step is not None
                else f"no checkpoint was saved before it (the first was due at step {tc.save_interval}), so "
                "there is nothing to resume: train anew with --overwrite"
            )
            raise NonFiniteLossError(
                f"at step {self.step_no + 1}: {e}; training stopped and {kept}. Lower train.lr or check the data"
            ) from None
        if self.world > 1:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params])
            torch.distributed.all_reduce(flat)
            flat_to_grads(self.params, flat / self.world, accumulate=False)
        lr = self.opt.param_groups[0]["lr"]
        self.scaler.step(self.opt)  # a plain opt.step() unless fp16 (then skipped on inf gradients)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.step_no += 1
        return {
            "step": self.step_no,
            "loss": total,
            "losses": dict(zip(wb.info.task_names, task_losses.tolist())),
            "lr": lr,
            **self.objective.stats(),
        }

    # --- the whole run ------------------------------------------------------------------------------
    def run(self, changes: dict[str, tuple[Any, Any]] | None = None) -> Path:
        tc = self.cfg.train
        self.setup()
        if self.resume:
            self.load_checkpoint(changes or {})
        if self.world > 1:  # start from rank 0's routers, whatever happened before
            for p in self.params:
                torch.distributed.broadcast(p.data, src=0)
        metrics_path = self.run_dir / METRICS
        if self.main:
            atomic_write_text(self.run_dir / CONFIG, dump_config(self.cfg))
            _truncate_metrics(metrics_path, self.step_no)
        if self.resume and self.step_no >= tc.steps:
            # nothing to train: rewrite the router file from the trainer state (it may have been damaged)
            self.save_checkpoint()
            if self.main:
                print(
                    f"{self.run_dir} already trained {self.step_no} of {tc.steps} steps; routers rewritten "
                    "from the trainer state (raise train.steps to train further)"
                )
            return self.run_dir
        bar = _progress(tc.steps, self.step_no, disable=not self.main)
        t_start, step0 = time.perf_counter(), self.step_no
        data = self.batches()
        try:
            while self.step_no < tc.steps:
                rec = self.step(next(data))
                step = self.step_no
                if self.main and (step % tc.log_interval == 0 or step == tc.steps):
                    append_line(metrics_path, json.dumps(rec))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({"loss": f"{rec['loss']:.3f}", **{n: f"{v:.3f}" for n, v in rec["losses"].items()}})
                if self.main and tc.val_interval and (step % tc.val_interval == 0 or step == tc.steps):
                    vrec = self.validate()  # before the checkpoint, which records the best so far
                    append_line(metrics_path, json.dumps(vrec))
                    if bar is not None:
                        bar.write(f"step {step}: validation hypervolume {vrec['val_hv']:.4f}")
                if step % tc.save_interval == 0 or step == tc.steps:
                    self.save_checkpoint()
                if self.on_step is not None:
                    self.on_step(self, step)
        finally:
            del data  # stops the pipeline's workers
            if bar is not None:
                bar.close()
        if self.main:
            rate = (self.step_no - step0) / max(time.perf_counter() - t_start, 1e-9)
            stats = self.objective.stats()
            msg = f"trained {self.step_no} steps ({rate:.2f} steps/s); run directory: {self.run_dir}"
            if stats.get("epo_fallbacks"):
                msg += f"; EPO LP fallbacks: {stats['epo_fallbacks']} of {stats['epo_calls']}"
            if self.val_best:
                b = self.val_best
                chosen = tc.select == "best_val_hv"
                msg += f"; best validation hypervolume {b['val_hv']:.4f} at step {b['step']}" + (
                    " (selected: train.select=best_val_hv)" if chosen else " (train.select=last uses the last step)"
                )
                marker = self.run_dir / RUN_MARKER
                info = read_json(marker, "run marker", MAX_SMALL_FILE) if marker.is_file() else {}
                info["selection"] = {
                    "select": tc.select,
                    "selected_step": b["step"] if chosen else self.step_no,
                    "best_val_step": b["step"],
                    "best_val_hv": b["val_hv"],
                    "val_grid": tc.val_grid,
                }
                atomic_write_json(marker, info)
            print(msg)
        return self.run_dir


def train(
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    resume: str | Path | None = None,
    overwrite: bool = False,
    on_step: Callable[[TrainRecipe, int], None] | None = None,
    verbose: int = 0,
) -> Path:
    """Run `pwemoe train`; returns the run directory.

    A new run needs `run_dir` absent or empty (or, with `overwrite`, a pwemoe run directory, whose
    own files are replaced). `resume` continues a run; overrides may change only RESUMABLE keys.
    """
    changes: dict[str, tuple[Any, Any]] = {}
    if resume:
        run_dir = require_run_dir(resume)
        if not (run_dir / STATE).is_file():
            raise ValueError(
                f"{run_dir} has no {STATE}, so it cannot be resumed; train it anew with "
                f"pwemoe train CONFIG --overwrite (run_dir={run_dir})"
            )
        old = read_config(run_dir / CONFIG)
        cfg = read_config(run_dir / CONFIG, overrides)
        changes = resume_changes(old, cfg)
        cfg = build_config({**cfg.to_dict(), "run_dir": str(run_dir)})
    else:
        if config is None:
            raise ValueError("pwemoe train needs a config file (pwemoe train CONFIG.yaml) or --resume RUN")
        cfg = read_config(config, overrides)
        run_dir = Path(cfg.run_dir)
    join_launch(cfg.device)  # the process group under accelerate launch / torchrun
    rank, _ = rank_and_world()
    lock = RunLock(run_dir, "pwemoe train") if rank == 0 else None
    if lock is not None:
        lock.__enter__()
    try:
        if not resume and rank == 0:
            _prepare_new_run(run_dir, overwrite)
        wait_for_everyone()
        recipe = TrainRecipe(cfg, run_dir, resume=bool(resume), on_step=on_step)
        recipe.run(changes)
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)
    wait_for_everyone()
    return run_dir


def _prepare_new_run(run_dir: Path, overwrite: bool) -> None:
    """A new run starts in an empty directory, or replaces only pwemoe's own files (--overwrite)."""
    # a run that failed before its first file (bad data, missing tokenizer) left only the marker: empty
    others = (
        [p.name for p in run_dir.iterdir() if not p.name.startswith(".pwemoe.lock") and p.name != RUN_MARKER]
        if run_dir.is_dir()
        else []
    )
    if others:
        if is_run_dir(run_dir) or any(n in RUN_FILES for n in others):
            if not overwrite:
                hint = f"resume it with --resume {run_dir}, " if (run_dir / STATE).exists() else ""
                raise ValueError(
                    f"{run_dir} already holds a run; {hint}set run_dir=<new directory>, or pass "
                    "--overwrite to replace that run's files (other files are kept)"
                )
            clear_run_dir(run_dir)
        else:
            raise ValueError(
                f"{run_dir} is not empty and is not a pwemoe run ({sorted(others)[:5]}); pwemoe "
                "writes runs only into new or empty directories: set run_dir=<new directory>"
            )
    make_dirs(run_dir)  # its entry synced too: a power loss keeps the run
    atomic_write_json(
        run_dir / RUN_MARKER, {"created_by": f"pwemoe {__version__}", "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    )


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines from steps after the checkpoint (they will be redone)."""
    if not path.exists():
        return
    keep = []
    more = "it was not written by pwemoe: move it away"
    for ln in read_bounded(path, MAX_RESULTS_FILE, "metrics file", more).splitlines():
        try:
            if ln.strip() and json.loads(ln)["step"] <= step:
                keep.append(ln)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill mid-write: dropped, its step is redone
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def _progress(total: int, initial: int, disable: bool):
    if disable:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


__all__ = ["TrainRecipe", "train"]
