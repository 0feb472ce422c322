"""The gradient engine of router training: one merge theta(r) shared by a step's forwards, router gradients
for linear and per-task objectives, and how a step's examples are cut into forwards.

The recipe (`recipes/train.py`) drives it; benchmarks and tests use it directly. Only the routers train:
each forward's backward stops at the merged weights (leaves), and their summed gradient reaches the routers
in one pass over the task vectors.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .core.ensembling import EnsemblingModule
from .core.preference import PreferenceLike, normalize_preference
from .objectives import Objective
from .routing import modules_or_raise, set_on
from .tasks.data import TaskStream
from .workbench import ForwardBatch, Workbench, segment_rows


class NonFiniteLossError(RuntimeError):
    """A task's loss became NaN or infinite during training."""


class SharedMerge:
    """One merge theta(r) shared by several forwards (`shared_merge`); gradients reach the routers on demand.

    The forwards inside the block run on detached leaf copies of theta(r), so each forward's
    backward stops at the leaves (dL/dW, summed over forwards) and frees its activations at once.
    `backward()` then carries the summed dL/dW through the merge to the routers in one pass over T;
    `router_grads()` does the same without touching `.grad`, for per-task gradients (EPO).
    """

    def __init__(self, modules: list[EnsemblingModule]) -> None:
        self.modules = modules

    def _roots(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        roots, grads = [], []
        for m in self.modules:
            r, g = m.shared_roots()
            roots += r
            grads += g
        return roots, grads

    def zero_grad(self) -> None:
        for m in self.modules:
            m.zero_shared_grad()

    def backward(self) -> None:
        """Accumulate the routers' gradients (p.grad) from the leaves' gradients, then zero the leaves."""
        roots, grads = self._roots()
        if roots:
            torch.autograd.backward(roots, grads, retain_graph=True)
        self.zero_grad()

    def task_router_grads(self, params: Sequence[torch.Tensor], k: int) -> torch.Tensor:
        """G: Tensor[k, p], row i = dL_i/d(params) from the per-task leaves of `task_segments`; zeroes them.

        The merge's backward for all k tasks takes one pass over each T (`lambda_grads`); only the
        routers' tiny backward runs once per task.
        """
        lams, glams = [], []
        for m in self.modules:
            g = m.segment_lambda_grads(k)
            if g is not None and m._shared_lam is not None:
                lams.append(m._shared_lam)
                glams.append(g.to(m._shared_lam.dtype))
        rows = []
        for i in range(k):
            out = (
                torch.autograd.grad(lams, list(params), [g[i] for g in glams], retain_graph=True, allow_unused=True)
                if lams
                else [None] * len(params)
            )
            rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, out)]))
        self.zero_grad()
        return torch.stack(rows)

    def router_grads(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """d(sum of backwards since the last zero)/d(params), one tensor per param; zeroes the leaves."""
        roots, grads = self._roots()
        out = torch.autograd.grad(roots, list(params), grads, retain_graph=True, allow_unused=True) if roots else ()
        self.zero_grad()
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, out or [None] * len(params))]


@contextlib.contextmanager
def task_segments(model: nn.Module, sizes: Sequence[int]) -> Iterator[None]:
    """Inside `shared_merge`: the next forwards (and their backwards, which may replay them under
    gradient checkpointing) hold sizes[i] rows of task i, in task order. Each task's rows run on its
    own leaf view of theta(r), so one forward and one backward of sum_i L_i give every dL_i/dW
    (`SharedMerge.task_router_grads`), since a row's activations depend on no other row."""
    mods = [m for _, m in modules_or_raise(model)]
    # a KV cache would collect every segment's keys in one object: training forwards need none
    configs = {id(c): c for sub in model.modules() if (c := getattr(sub, "config", None)) is not None}
    caching = {i: getattr(c, "use_cache", None) for i, c in configs.items()}
    for m in mods:
        m._segments = list(sizes)
    for i, c in configs.items():
        if caching[i]:
            c.use_cache = False
    try:
        yield
    finally:
        for m in mods:
            m._segments = None
        for i, c in configs.items():
            if caching[i]:
                c.use_cache = caching[i]


@contextlib.contextmanager
def shared_merge(model: nn.Module, r: PreferenceLike | None = None) -> Iterator[SharedMerge]:
    """Under autograd, compute theta(r) once and run every forward inside the block on it.

    Gradients stop at the merged weights; call `.backward()` on the yielded `SharedMerge` (once,
    after all forwards' backwards) to reach the routers. Merges are dropped on exit. With `r`, the
    preference is set first, as `set_preference` would (one walk over the model per step, not two).
    """
    mods = [m for _, m in modules_or_raise(model)]
    if r is not None:
        set_on(mods, normalize_preference(r, mods[0].k))
    for m in mods:
        m.clear_cache()
        m.share_under_grad = True
        if torch.is_grad_enabled():
            m.begin_shared()  # merged here, not inside a (checkpointed) forward, which would replay it
    try:
        yield SharedMerge(mods)
    finally:
        for m in mods:
            m.share_under_grad = False
            m.clear_cache()


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
                check_finite(losses, names)  # the LP needs the losses on the CPU anyway
                if not bool(torch.isfinite(G).all()):  # fp16 overflow: let the scaler skip this step
                    w = torch.ones(k, device=device)
                else:
                    w = objective.weights(losses, r, G / _scale_of(scale, G)).to(device)
                flat_to_grads(params, (w.to(G) @ G) / R, accumulate=True)
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
    check_finite(out[:k], names)
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


class StepSampler(torch.utils.data.Sampler):
    """Draws each step's indices from the seeded streams, in this process: (step, indices, states after)."""

    def __init__(self, streams: list[TaskStream], start: int) -> None:
        self.streams, self.start = streams, start

    def __iter__(self) -> Iterator[tuple[int, list[list[int]], list[dict[str, int]]]]:
        step = self.start
        while True:
            idx = [s.next_indices() for s in self.streams]
            yield step, idx, [s.state_dict() for s in self.streams]
            step += 1


class StepEncoder(torch.utils.data.Dataset):
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


def check_finite(losses: torch.Tensor, names: list[str] | None) -> None:
    names = names or [f"task {i}" for i in range(len(losses))]
    bad = [n for n, v in zip(names, losses.tolist()) if not math.isfinite(v)]
    if bad:
        raise NonFiniteLossError(f"loss is not finite for task(s) {bad} (values {losses.tolist()})")


def flat_to_grads(params: list[torch.nn.Parameter], flat: torch.Tensor, accumulate: bool) -> None:
    """Write a flat gradient vector into p.grad, added to what is there when `accumulate`."""
    for p, g in zip(params, torch.split(flat, [p.numel() for p in params])):
        g = g.view_as(p)
        p.grad = p.grad + g if accumulate and p.grad is not None else g.clone()


__all__ = [
    "NonFiniteLossError",
    "SharedMerge",
    "StepData",
    "StepEncoder",
    "StepSampler",
    "accumulate_router_gradients",
    "check_finite",
    "default_micro_batch_size",
    "flat_to_grads",
    "forward_groups",
    "make_optimizer",
    "shared_merge",
    "task_segments",
]
