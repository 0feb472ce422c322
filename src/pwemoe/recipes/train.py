"""`pwemoe train`: the training recipe. Setup, load checkpoint, step, save checkpoint; reads top to bottom.

Runs data-parallel under `accelerate launch` / `torchrun`: each rank samples its own preferences
and batches; router gradients are all-reduced (mean); rank 0 writes the run directory.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..checkpoint import check_hashes, load_state, save_routers, save_state
from ..config import Config, ConfigError, dump_config
from ..core.preference import DirichletSampler
from ..io import (
    CONFIG,
    METRICS,
    ROUTERS,
    RUN_FILES,
    RUN_MARKER,
    STATE,
    RunLock,
    atomic_write_json,
    atomic_write_text,
    clear_run_dir,
    is_run_dir,
)
from ..objectives import Objective, build_objective
from ..tasks.data import TaskStream
from ..upscale import load_router_state_dict, router_state_dict, set_preference, shared_merge
from ..workbench import Workbench, build_config, read_config

log = logging.getLogger(__name__)

# Settings that may change when a run is resumed; any other difference is refused.
RESUMABLE = ("train.steps", "train.lr", "train.min_lr_ratio", "train.save_interval", "train.log_interval", "eval.")


class NonFiniteLossError(RuntimeError):
    pass


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


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


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
                f"{x} (this setting cannot change on --resume; only {', '.join(RESUMABLE)}* may; "
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
        self.rank, self.world = _dist()
        self.main = self.rank == 0
        self.step_no = 0
        self.segment = {"start": 0, "lr": cfg.train.lr, "end": cfg.train.steps}

    # --- setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        tc = self.cfg.train
        torch.manual_seed(tc.seed)  # router init: identical on every rank
        self.wb = wb = Workbench(self.cfg, load_train=True, load_test=False)
        self.model, self.tasks, k = wb.model, wb.tasks, len(wb.tasks)
        self.params = wb.trainable_parameters()
        self.opt = torch.optim.Adam(self.params, lr=tc.lr)
        self.objective: Objective = build_objective(tc.objective, **tc.objective_args)
        # Each rank draws its own preferences and batches (documented in the README).
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
        self.objective.load_state_dict(st["objective"])
        self.step_no = int(st["step"])
        self.segment = dict(st["lr_segment"])
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
        ranks = [{"sampler": self.sampler.state_dict(), "streams": [s.state_dict() for s in self.streams]}]
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(gathered, ranks[0])
            ranks = gathered
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
                "objective": self.objective.state_dict(),
            },
        )
        save_routers(self.run_dir / ROUTERS, routers, checkpoint_metadata(self.cfg, self.wb, self.step_no))

    # --- one step -----------------------------------------------------------------------------------
    def step(self) -> dict[str, Any]:
        tc, wb = self.cfg.train, self.wb
        for g in self.opt.param_groups:
            g["lr"] = self._lr_at(self.step_no)
        rays = self.sampler.sample(tc.rays_per_step)
        rows = [t.train_data[s.next_indices()] for t, s in zip(self.tasks, self.streams)]
        chunks = [[(t, _chunk(rw, j, tc.rays_per_step)) for t, rw in zip(self.tasks, rows)] for j in range(len(rays))]
        try:
            task_losses, total = accumulate_router_gradients(
                self.model,
                self.params,
                self.objective,
                rays,
                chunks,
                wb.losses,
                concat=tc.concat_forward,
                names=wb.info.task_names,
            )
        except NonFiniteLossError as e:
            raise NonFiniteLossError(f"at step {self.step_no + 1}: {e}") from None
        if self.world > 1:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params])
            torch.distributed.all_reduce(flat)
            _flat_to_grads(self.params, flat / self.world, accumulate=False)
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
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
        try:
            while self.step_no < tc.steps:
                rec = self.step()
                step = self.step_no
                if self.main and (step % tc.log_interval == 0 or step == tc.steps):
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({"loss": f"{rec['loss']:.3f}", **{n: f"{v:.3f}" for n, v in rec["losses"].items()}})
                if step % tc.save_interval == 0 or step == tc.steps:
                    self.save_checkpoint()
                if self.on_step is not None:
                    self.on_step(self, step)
        finally:
            if bar is not None:
                bar.close()
        if self.main:
            rate = (self.step_no - step0) / max(time.perf_counter() - t_start, 1e-9)
            stats = self.objective.stats()
            msg = f"trained {self.step_no} steps ({rate:.2f} steps/s); run directory: {self.run_dir}"
            if stats.get("epo_fallbacks"):
                msg += f"; EPO LP fallbacks: {stats['epo_fallbacks']} of {stats['epo_calls']}"
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
    from accelerate import PartialState

    changes: dict[str, tuple[Any, Any]] = {}
    if resume:
        run_dir = Path(resume)
        if not (run_dir / CONFIG).is_file():
            raise FileNotFoundError(f"{run_dir} is not a run directory (no {CONFIG})")
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
    state = PartialState()  # initialises the process group under accelerate launch / torchrun (gloo on CPU)
    rank, _ = _dist()
    lock = RunLock(run_dir, "pwemoe train") if rank == 0 else None
    if lock is not None:
        lock.__enter__()
    try:
        if not resume and rank == 0:
            _prepare_new_run(run_dir, overwrite)
        state.wait_for_everyone()
        recipe = TrainRecipe(cfg, run_dir, resume=bool(resume), on_step=on_step)
        recipe.run(changes)
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)
    state.wait_for_everyone()
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
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        run_dir / RUN_MARKER, {"created_by": f"pwemoe {__version__}", "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    )


def accumulate_router_gradients(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    objective: Objective,
    rays: torch.Tensor,
    chunks: list[list[Any]],
    losses_fn: Callable[[list[Any]], torch.Tensor],
    concat: bool = True,
    names: list[str] | None = None,
) -> tuple[torch.Tensor, float]:
    """One step's router gradients, accumulated into `p.grad` (the optimizer step is the caller's).

    rays: Tensor[R, k] preferences; chunks[j]: the k per-task parts for ray j; losses_fn(parts)
    returns Tensor[len(parts)], the per-part losses from one forward over the concatenated parts.
    Returns the ray-averaged per-task losses Tensor[k] and the ray-averaged objective value.
    """
    R, k = rays.shape
    task_losses, total = torch.zeros(k), 0.0
    for r, chunk in zip(rays, chunks):
        set_preference(model, r)
        if objective.needs_task_gradients:
            # Per-task forwards sharing one merge: L_i's graph holds only task i's batch, so all
            # k router gradients cost about one backward. Each L_i stays its own graph root:
            # indexing a stacked tensor would backpropagate zeros through every other task.
            with shared_merge(model):
                per_task = [losses_fn([c])[0] for c in chunk]
                losses = torch.stack([x.detach() for x in per_task])
                _check_finite(losses, names)
                G = torch.stack(
                    [
                        torch.cat([g.reshape(-1) for g in torch.autograd.grad(x, params, retain_graph=i < k - 1)])
                        for i, x in enumerate(per_task)
                    ]
                )
            w = objective.weights(losses, r, G)
            _flat_to_grads(params, (w.to(G) @ G) / R, accumulate=True)
            value = float((w * losses).sum())
        else:
            losses = losses_fn(chunk) if concat else torch.cat([losses_fn([c]) for c in chunk])
            _check_finite(losses.detach(), names)
            obj = objective.loss(losses, r.to(losses)) / R
            obj.backward()
            value = float(obj.detach()) * R
        task_losses += losses.detach() / R
        total += value / R
    return task_losses, total


def _chunk(rows: dict[str, list], j: int, n: int) -> dict[str, list]:
    """The j-th of n near-equal slices of a column dict."""
    size = len(next(iter(rows.values())))
    lo, hi = (j * size) // n, ((j + 1) * size) // n
    return {c: v[lo:hi] for c, v in rows.items()}


def _check_finite(losses: torch.Tensor, names: list[str] | None) -> None:
    names = names or [f"task {i}" for i in range(len(losses))]
    bad = [n for n, v in zip(names, losses.tolist()) if not math.isfinite(v)]
    if bad:
        raise NonFiniteLossError(
            f"loss is not finite for task(s) {bad} (values {losses.tolist()}); "
            "training stopped and the last good checkpoint is kept. Lower train.lr or check the data."
        )


def _flat_to_grads(params: list[torch.nn.Parameter], flat: torch.Tensor, accumulate: bool) -> None:
    """Write a flat gradient vector into p.grad, added to what is there when `accumulate`."""
    for p, g in zip(params, torch.split(flat, [p.numel() for p in params])):
        g = g.view_as(p)
        p.grad = p.grad + g if accumulate and p.grad is not None else g.clone()


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines from steps after the checkpoint (they will be redone)."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text().splitlines():
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


__all__ = ["NonFiniteLossError", "TrainRecipe", "accumulate_router_gradients", "train"]
