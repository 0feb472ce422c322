"""The one training loop: sample r, one batch per task, combine losses by the objective, step Adam.

Reads top to bottom (torchtune style). Runs data-parallel under `accelerate launch` / `torchrun`:
each rank samples its own preferences and batches; router gradients are all-reduced (mean).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from . import __version__
from .checkpoint import ROUTERS, STATE, atomic_write_text, check_hashes, load_state, save_routers, save_state
from .config import Config, ConfigError, dump_config, load_config
from .core.preference import DirichletSampler
from .objectives import Objective, build_objective
from .pipeline import Workbench
from .tasks.data import TaskStream
from .upscale import load_router_state_dict, router_state_dict, set_preference, shared_merge

log = logging.getLogger(__name__)


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


def train(config: str | Path | None, overrides: list[str] | None = None, resume: str | Path | None = None,
          verbose: int = 0) -> Path:
    """Run `pwemoe train`; returns the run directory."""
    from accelerate import PartialState

    state = PartialState()  # initialises the process group under accelerate launch / torchrun (gloo on CPU)
    rank, world = _dist()
    main = rank == 0
    if resume:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
        cfg = load_config(run_dir / "config.yaml", overrides)
    else:
        if config is None:
            raise ValueError("pwemoe train needs a config file")
        cfg = load_config(config, overrides)
        run_dir = Path(cfg.run_dir)
        if (run_dir / STATE).exists():
            raise ValueError(f"{run_dir} already holds a run; resume it with --resume {run_dir} "
                             "or set run_dir=<new directory>")
    tc = cfg.train
    torch.manual_seed(tc.seed)  # router init: identical on every rank
    wb = Workbench(cfg, load_train=True, load_test=False)
    model, tasks, k = wb.model, wb.tasks, len(wb.tasks)
    params = wb.trainable_parameters()
    opt = torch.optim.Adam(params, lr=tc.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tc.steps, eta_min=tc.lr * tc.min_lr_ratio)
    objective = build_objective(tc.objective, **tc.objective_args)
    # Each rank draws its own preferences and batches (documented in the README).
    sampler = DirichletSampler(k, tc.alpha, seed=tc.seed + 7919 * rank)
    streams = [TaskStream(len(t.train_data), tc.batch_size, tc.seed + 104729 * rank + i) for i, t in enumerate(tasks)]
    step = 0
    if resume and (run_dir / STATE).exists():
        st = load_state(run_dir / STATE)
        check_hashes(st["metadata_hashes"], wb.info.hashes, f"run {run_dir}")
        if st["world_size"] != world:
            raise ValueError(f"{run_dir} was trained with {st['world_size']} processes; resume it with the same number")
        load_router_state_dict(model, st["routers"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        mine = st["ranks"][rank]
        sampler.load_state_dict(mine["sampler"])
        for s, ss in zip(streams, mine["streams"]):
            s.load_state_dict(ss)
        objective.load_state_dict(st["objective"])
        step = int(st["step"])
        log.info("resumed %s at step %d", run_dir, step)
    if world > 1:  # start from rank 0's routers, whatever happened before
        for p in params:
            torch.distributed.broadcast(p.data, src=0)
    metrics_path = run_dir / "metrics.jsonl"
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
        _truncate_metrics(metrics_path, step)

    def save() -> None:
        ranks = [{"sampler": sampler.state_dict(), "streams": [s.state_dict() for s in streams]}]
        if world > 1:
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, ranks[0])
            ranks = gathered
        if not main:
            return
        routers = router_state_dict(model)
        save_state(run_dir / STATE, {
            "step": step, "world_size": world, "routers": routers, "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "ranks": ranks, "metadata_hashes": wb.info.hashes,
            "objective": objective.state_dict(),
        })
        save_routers(run_dir / ROUTERS, routers, checkpoint_metadata(cfg, wb, step))

    kill_at = int(os.environ.get("PWEMOE_DEBUG_KILL_AT_STEP", "0"))  # tests: a real SIGKILL mid-run
    bar = _progress(tc.steps, step, disable=not main)
    t_start, step0 = time.perf_counter(), step
    while step < tc.steps:
        rays = sampler.sample(tc.rays_per_step)
        rows = [t.train_data[s.next_indices()] for t, s in zip(tasks, streams)]
        chunks = [[(t, _chunk(rw, j, tc.rays_per_step)) for t, rw in zip(tasks, rows)] for j in range(len(rays))]
        try:
            task_losses, total = accumulate_router_gradients(model, params, objective, rays, chunks, wb.losses,
                                                             concat=tc.concat_forward, names=wb.info.task_names)
        except NonFiniteLossError as e:
            if bar is not None:
                bar.close()
            raise NonFiniteLossError(f"at step {step + 1}: {e}") from None
        if world > 1:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            torch.distributed.all_reduce(flat)
            _flat_to_grads(params, flat / world, accumulate=False)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if main and (step % tc.log_interval == 0 or step == tc.steps):
            rec = {"step": step, "loss": total, "losses": dict(zip(wb.info.task_names, task_losses.tolist())),
                   "lr": sched.get_last_lr()[0], **objective.stats()}
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if bar is not None:
            bar.update(1)
            bar.set_postfix({"loss": f"{total:.3f}", **{n: f"{v:.3f}" for n, v in zip(wb.info.task_names, task_losses.tolist())}})
        if step % tc.save_interval == 0 or step == tc.steps:
            save()
        if kill_at and step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    if bar is not None:
        bar.close()
    if main:
        rate = (step - step0) / max(time.perf_counter() - t_start, 1e-9)
        stats = objective.stats()
        msg = f"trained {step} steps ({rate:.2f} steps/s); run directory: {run_dir}"
        if stats.get("epo_fallbacks"):
            msg += f"; EPO LP fallbacks: {stats['epo_fallbacks']} of {stats['epo_calls']}"
        print(msg)
    dump = os.environ.get("PWEMOE_DUMP_ROUTERS")  # tests: each rank's in-memory routers
    if dump:
        from safetensors.torch import save_file

        save_file(router_state_dict(model), os.path.join(dump, f"memory_rank{rank}.safetensors"))
    state.wait_for_everyone()
    return run_dir


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
                G = torch.stack([
                    torch.cat([g.reshape(-1) for g in torch.autograd.grad(x, params, retain_graph=i < k - 1)])
                    for i, x in enumerate(per_task)
                ])
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
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def _progress(total: int, initial: int, disable: bool):
    if disable:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


__all__ = ["ConfigError", "NonFiniteLossError", "train"]
