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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..checkpoint import check_hashes, load_routers, load_state, save_routers, save_state
from ..config import Config, ConfigError, dump_config
from ..core.preference import DirichletSampler, simplex_grid
from ..devices import grad_scaler, rank_and_world
from ..io import (
    BEST_ROUTERS,
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
from ..pareto import hypervolume
from ..tasks.data import TaskStream
from ..upscale import (
    gradient_checkpointing,
    load_router_state_dict,
    merge_and_unload,
    merge_into,
    router_state_dict,
    shared_merge,
    task_segments,
)
from ..workbench import ForwardBatch, Workbench, build_config, read_config, segment_rows

log = logging.getLogger(__name__)

# Settings that may change when a run is resumed; any other difference is refused.
# Where and how fast a run computes may change too (resume a CPU run on a GPU), not what it computes.
RESUMABLE = (
    "train.steps",
    "train.lr",
    "train.min_lr_ratio",
    "train.save_interval",
    "train.log_interval",
    "train.num_workers",
    "train.val_interval",
    "train.select",
    "train.task_gradients",
    "train.micro_batch_size",
    "train.gradient_checkpointing",
    "device",
    "precision",
    "eval.",
)


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
        self.rank, self.world = rank_and_world()
        self.main = self.rank == 0
        self.step_no = 0
        self.segment = {"start": 0, "lr": cfg.train.lr, "end": cfg.train.steps}
        # {"step", "val_hv", "settings"} of the best validated routers so far (settings: _val_settings)
        self.val_best: dict[str, Any] = {}

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
        self.objective.load_state_dict(mine.get("objective", st["objective"]))  # (rank 0's in older states)
        if st.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(st["scaler"])
        self.step_no = int(st["step"])
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
        plain, points = None, []
        for r in simplex_grid(len(wb.tasks), tc.val_grid):
            plain = merge_and_unload(wb.backbone, r).eval() if plain is None else merge_into(wb.backbone, plain, r)
            points.append([wb.accuracy(t, bs, backbone=plain) for t in wb.tasks])
        del plain
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

    def _pipeline(self) -> tuple[_StepEncoder, _StepSampler]:
        tc = self.cfg.train
        # per-task gradients (EPO): one forward per task, or forwards across tasks (task_segments)
        split = not tc.concat_forward or (self.objective.needs_task_gradients and tc.task_gradients == "forwards")
        encoder = _StepEncoder(self.wb, tc.rays_per_step, self.micro_batch_size, split)
        return encoder, _StepSampler([copy.deepcopy(s) for s in self.streams], self.step_no)

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
            raise NonFiniteLossError(f"at step {self.step_no + 1}: {e}") from None
        if self.world > 1:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params])
            torch.distributed.all_reduce(flat)
            _flat_to_grads(self.params, flat / self.world, accumulate=False)
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
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({"loss": f"{rec['loss']:.3f}", **{n: f"{v:.3f}" for n, v in rec["losses"].items()}})
                if self.main and tc.val_interval and (step % tc.val_interval == 0 or step == tc.steps):
                    vrec = self.validate()  # before the checkpoint, which records the best so far
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(vrec) + "\n")
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
                info = json.loads(marker.read_text()) if marker.is_file() else {}
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
    # the process group under accelerate launch / torchrun: gloo for a CPU run, even where CUDA is available
    # (NCCL cannot reduce CPU tensors), NCCL on GPUs
    state = PartialState(cpu=cfg.device == "cpu")
    rank, _ = rank_and_world()
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
    batches: Sequence[Sequence[Any]],
    loss_fn: Callable[[Any], torch.Tensor],
    names: list[str] | None = None,
    scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, float]:
    """One step's router gradients, accumulated into `p.grad` (the optimizer step is the caller's).

    rays: Tensor[R, k] preferences. batches[j]: the forwards of ray j, objects with `.segments`
    [(task index, example count)] (`ForwardBatch`); loss_fn(batch) returns Tensor[len(segments)],
    each segment's summed loss. Task i's loss L_i is its mean over the ray's examples, however they
    are split into forwards. All forwards of a ray share one merge (`shared_merge`): each
    forward's backward stops at the merged weights and frees its activations, and the summed
    weight gradient goes through the merge to the routers once. So the step's cost and memory do
    not depend on how the examples are split, except for objectives that are neither linear
    nor gradient-based (Tchebycheff), whose graphs are all kept until the losses are known.
    `scale` multiplies what is backpropagated (fp16 loss scaling; the scaler unscales the grads).
    Returns the ray-averaged per-task losses Tensor[k] (CPU) and the ray-averaged objective value.
    """
    R, k = rays.shape
    scale = scale or (lambda x: x)
    device = next(iter(params)).device if params else rays.device
    rays_cpu = rays.detach().cpu()  # shared_merge validates r on the CPU; the math below runs on the device
    task_losses = torch.zeros(k, device=device)
    total = torch.zeros((), device=device)
    for r_cpu, groups in zip(rays_cpu, batches):
        r = r_cpu.to(device, non_blocking=True)
        counts = [0] * k
        for g in groups:
            for i, n in g.segments:
                counts[i] += n
        missing = [i for i in range(k) if counts[i] == 0]
        if missing:
            raise ValueError(f"every task needs examples for each preference; tasks {missing} have none")
        inv = torch.tensor([1.0 / n for n in counts]).to(device, non_blocking=True)
        with shared_merge(model, r_cpu) as merge:
            if objective.needs_task_gradients:
                across = any(len(g.segments) > 1 for g in groups)
                task_grads = _task_grads_across_tasks if across else _task_grads_per_forward
                losses, G = task_grads(model, params, merge, groups, loss_fn, inv, scale, k)
                _check_finite(losses, names)  # the LP needs the losses on the CPU anyway
                if not bool(torch.isfinite(G).all()):  # fp16 overflow: let the scaler skip this step
                    w = torch.ones(k, device=device)
                else:
                    w = objective.weights(losses, r, G / _scale_of(scale, G)).to(device)
                _flat_to_grads(params, (w.to(G) @ G) / R, accumulate=True)
                value = (w.to(losses) * losses).sum()
            else:
                c = objective.linear_weights(r)
                losses = torch.zeros(k, device=device)
                for g in groups:
                    idx = torch.tensor([i for i, _ in g.segments]).to(device, non_blocking=True)
                    part = torch.zeros(k, device=device).index_add(0, idx, loss_fn(g)) * inv
                    if c is not None:  # linear: backpropagate this forward now, its graph is freed
                        scale((c.to(part) * part).sum() / R).backward()
                        part = part.detach()
                    losses = losses + part
                if c is None:
                    obj = objective.loss(losses, r.to(losses)) / R
                    scale(obj).backward()
                    value = obj.detach() * R
                else:
                    value = (c.to(losses) * losses).sum()
            merge.backward()  # summed dL/dW of every forward -> the routers, one pass over T
        task_losses += losses.detach() / R
        total += value.detach() / R
    # one device sync per step, for the logged scalars (and the check before the optimizer step)
    out = torch.cat([task_losses, total.reshape(1)]).double().cpu()
    _check_finite(out[:k], names)
    return out[:k].float(), float(out[k])


def _task_grads_across_tasks(
    model: torch.nn.Module,
    params: list,
    merge: Any,
    groups: Sequence[Any],
    loss_fn: Callable,
    inv: torch.Tensor,
    scale: Callable,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses Tensor[k], G Tensor[k, p]) from forwards across tasks: each task's rows run on their own
    leaf view of the merge (task_segments), so one backward of sum_i L_i gives every dL_i/dW."""
    losses = torch.zeros(k, device=inv.device)
    for g in groups:
        order = [i for i, _ in g.segments]
        if order != sorted(set(order)):
            raise ValueError(f"a forward's segments must be in task order, one per task; got {order}")
        sizes = [0] * k
        for i, n in zip(order, segment_rows(g)):  # model rows, not examples
            sizes[i] = n
        idx = torch.tensor(order).to(inv.device, non_blocking=True)
        with task_segments(model, sizes):
            part = torch.zeros(k, device=inv.device).index_add(0, idx, loss_fn(g)) * inv
            scale(part.sum()).backward()
        losses = losses + part.detach()
    return losses, merge.task_router_grads(params, k)


def _task_grads_per_forward(
    model: torch.nn.Module,
    params: list,
    merge: Any,
    groups: Sequence[Any],
    loss_fn: Callable,
    inv: torch.Tensor,
    scale: Callable,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses Tensor[k], G Tensor[k, p]) from forwards that each hold one task's examples."""
    per_task: list[list[Any]] = [[] for _ in range(k)]
    for g in groups:
        tasks = {i for i, _ in g.segments}
        if len(tasks) != 1:
            raise ValueError("objectives with per-task gradients need one task per forward")
        per_task[tasks.pop()].append(g)
    rows, vals = [], []
    for i in range(k):
        li = torch.zeros((), device=inv.device)
        for g in per_task[i]:
            x = loss_fn(g).sum() * inv[i]
            scale(x).backward()
            li = li + x.detach()
        vals.append(li)
        rows.append(torch.cat([gr.reshape(-1) for gr in merge.router_grads(params)]))
    return torch.stack(vals), torch.stack(rows)


def make_optimizer(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """Adam on the routers: a few hundred numbers in a few dozen tensors, so per-tensor dispatch dominates.
    Fused into one kernel on a GPU; multi-tensor (foreach) elsewhere, which on a CPU computes
    bit-for-bit what the per-tensor loop does, in 0.6x its time (measured, 48 router tensors)."""
    fused = bool(params) and params[0].device.type == "cuda"
    return torch.optim.Adam(params, lr=lr, fused=fused or None, foreach=None if fused else True)


def _scale_of(scale: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The factor `scale` multiplies by (1 without loss scaling)."""
    return scale(torch.ones((), device=like.device, dtype=like.dtype))


def default_micro_batch_size(device: torch.device) -> int | None:
    """Examples per forward when train.micro_batch_size is unset, chosen by benchmarks/train_step.py:
    on a CPU, forwards of 16 examples beat one big concatenated forward; on a GPU one forward of
    all examples is fastest (None: no split)."""
    return 16 if device.type == "cpu" else None


@dataclass
class StepData:
    """One step's encoded input: per ray, its forwards; and the index streams' state after the step."""

    rays: list[list[ForwardBatch]]
    stream_states: list[dict[str, int]]

    def pin_memory(self) -> StepData:
        return StepData([[b.pin_memory() for b in fw] for fw in self.rays], self.stream_states)


class _StepSampler(torch.utils.data.Sampler):
    """Draws each step's indices from the seeded streams, in this process: (step, indices, states after)."""

    def __init__(self, streams: list[TaskStream], start: int) -> None:
        self.streams, self.start = streams, start

    def __iter__(self) -> Iterator[tuple[int, list[list[int]], list[dict[str, int]]]]:
        step = self.start
        while True:
            idx = [s.next_indices() for s in self.streams]
            yield step, idx, [s.state_dict() for s in self.streams]
            step += 1


class _StepEncoder(torch.utils.data.Dataset):
    """Item (step, indices, states) -> StepData: rows read, tokenised / preprocessed and collated
    into the step's forwards (run in the loader's worker processes)."""

    def __init__(self, wb: Workbench, rays: int, micro: int | None, split_tasks: bool) -> None:
        self.wb, self.rays, self.micro, self.split_tasks = wb, rays, micro, split_tasks

    def __getitem__(self, item: tuple[int, list[list[int]], list[dict[str, int]]]) -> StepData:
        _, idx, states = item
        tasks = self.wb.tasks
        out = []
        for j in range(self.rays):
            parts = [(i, _chunk(ix, j, self.rays)) for i, ix in enumerate(idx)]
            out.append(
                [
                    self.wb.encode([(i, tasks[i].train_data[sub]) for i, sub in group])
                    for group in forward_groups(parts, self.micro, self.split_tasks)
                ]
            )
        return StepData(out, states)


def forward_groups(
    parts: list[tuple[int, list[int]]], micro: int | None, split_tasks: bool
) -> list[list[tuple[int, list[int]]]]:
    """Split the tasks' example indices into forwards of at most `micro` examples (None: no limit).

    parts: [(task index, indices)] in task order. With `split_tasks` a forward holds one task's
    examples only (per-task gradients, concat_forward=false); otherwise forwards run across tasks.
    """
    groups: list[list[tuple[int, list[int]]]] = []
    cur: list[tuple[int, list[int]]] = []
    room = micro or float("inf")
    for i, ix in parts:
        if split_tasks and cur:
            groups.append(cur)
            cur, room = [], micro or float("inf")
        pos = 0
        while pos < len(ix):
            take = int(min(room, len(ix) - pos))
            cur.append((i, ix[pos : pos + take]))
            pos += take
            room -= take
            if room == 0:
                groups.append(cur)
                cur, room = [], micro or float("inf")
    if cur:
        groups.append(cur)
    return groups


def _chunk(ix: list[int], j: int, n: int) -> list[int]:
    """The j-th of n near-equal slices of a list."""
    lo, hi = (j * len(ix)) // n, ((j + 1) * len(ix)) // n
    return ix[lo:hi]


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
