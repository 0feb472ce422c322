"""Host work of an LS step against the plain model's, interleaved in one process.

A small model on a fast GPU is bound by the host: Python, op dispatch and kernel launches, not the
math (session 2's H200 profile: 68 ms of CPU time per bf16 ViT-B/32 step against 16 ms of GPU time).
The `vit-b32-host` shape has ViT-B/32's module count (12 layers, so 12 upcycled MLPs and 48 router
tensors) at negligible width, so on any machine its step time is that host work alone. Compared:

  floor: the plain frozen model, one forward of the k*16 images, dL/dW of every MLP weight
         (benchmarks/train_step.py's `limit_wgrad`);
  ls:    the training loop's own step (`accumulate_router_gradients`, one forward, + Adam as
         `make_optimizer` builds it), on the upcycled model;
  epo_segments, epo_forwards (--epo): EPO's step with `train.task_gradients` segments (one forward
         across tasks) and forwards (one forward per task).

They alternate in blocks of `--block` steps (the first of each block is not timed), so drift hits
both alike. Reported: medians, their ratio, the LS step's phases (merge, forward, backward, the
merge backward to the routers, optimizer) and the ops dispatched per step (torch profiler: aten
ops on a CPU, kernels on a GPU).

    .venv/bin/python benchmarks/host_overhead.py [--shape vit-b32-host] [--k 8] [--rounds 8] [--epo]
    PYTHONPATH=src python3 benchmarks/host_overhead.py --device cuda --precision bf16 --shape vit-b32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import train_step  # noqa: E402  (the shapes and model builders)

BATCH = train_step.BATCH


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="vit-b32-host", choices=sorted(train_step.SHAPES))
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--block", type=int, default=10, help="consecutive steps of one variant (the first is not timed)")
    ap.add_argument("--epo", action="store_true", help="also EPO's step, task_gradients segments and forwards")
    ap.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    import pwemoe
    from pwemoe.devices import autocast, resolve_device, synchronize
    from pwemoe.objectives import EPO, LinearScalarization
    from pwemoe.training import accumulate_router_gradients, make_optimizer, shared_merge

    device = resolve_device(args.device)
    if device.type == "cpu":
        # One thread: the host work measured here is single-threaded (as a GPU's launching thread is),
        # and a second thread's hand-offs on these tiny ops only add noise.
        torch.set_num_threads(1)
    k, shape = args.k, args.shape
    model, _ = train_step._build(shape, k, "ls", device, None, False)
    floor, _ = train_step._build(shape, k, "limit_wgrad", device, None, False)
    hidden = train_step.SHAPES[shape]["hidden_size"]
    size = train_step.SHAPES[shape].get("image_size", 224)
    g = torch.Generator().manual_seed(1)
    px = torch.randn(BATCH * k, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, 10, (BATCH * k,), generator=g).to(device)
    heads = [(torch.randn(hidden, 10, generator=torch.Generator().manual_seed(i)) * 0.05).to(device) for i in range(k)]
    params = [p for p in model.parameters() if p.requires_grad]
    floor_params = [p for p in floor.parameters() if p.requires_grad]
    opt = make_optimizer(params, 1e-2)
    sampler = pwemoe.DirichletSampler(k, seed=0)
    objective = LinearScalarization()

    class Part:  # one forward of some tasks' images, as ForwardBatch has them
        def __init__(self, tasks: list[int]) -> None:
            self.x = torch.cat([px[BATCH * i : BATCH * (i + 1)] for i in tasks])
            self.segments = [(i, BATCH) for i in tasks]

    together, apart = [Part(list(range(k)))], [Part([i]) for i in range(k)]  # inputs cut once, before timing

    def losses(net: torch.nn.Module, part: Part | None = None) -> torch.Tensor:
        """Tensor[len(segments)]: each task's summed CE, from one forward (all tasks without `part`)."""
        part = part or together[0]
        with autocast(device, args.precision):
            out = net(pixel_values=part.x).pooler_output
        return torch.stack(
            [
                F.cross_entropy(o.float() @ heads[i], labels[BATCH * i : BATCH * (i + 1)], reduction="sum")
                for (i, _), o in zip(part.segments, out.split(BATCH))
            ]
        )

    def router_step(objective, forwards: list[Part]):
        def step() -> None:
            accumulate_router_gradients(
                model, params, objective, sampler.sample(1), [forwards], lambda part: losses(model, part)
            )
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    ls_step = router_step(objective, together)

    def floor_step() -> None:
        losses(floor).sum().backward()
        for p in floor_params:
            p.grad = None

    steps = {"ls": ls_step, "floor": floor_step}
    if args.epo:  # EPO's per-task gradients: one forward across tasks (segments) or one per task (forwards)
        steps["epo_segments"] = router_step(EPO(), together)
        steps["epo_forwards"] = router_step(EPO(), apart)
    times: dict[str, list[float]] = defaultdict(list)
    for fn in steps.values():  # warm-up: allocator, kernels, optimizer state
        for _ in range(3):
            fn()
    for _ in range(args.rounds):
        for name, fn in steps.items():
            for j in range(args.block):
                synchronize(device)
                t = time.perf_counter()
                fn()
                synchronize(device)
                if j:
                    times[name].append(time.perf_counter() - t)
    med = {n: statistics.median(v) * 1e3 for n, v in times.items()}

    # Where the LS step's host time goes: the same step cut at its phases (synchronised at each cut).
    phases: dict[str, list[float]] = defaultdict(list)
    r = sampler.sample(1)[0]
    marks: list[tuple[str, float]] = []

    def mark(name: str) -> None:
        synchronize(device)
        marks.append((name, time.perf_counter()))

    for _ in range(args.rounds * 2):
        marks.clear()
        mark("")
        with shared_merge(model, r) as merge:
            mark("merge")
            (r.to(device) * losses(model)).sum().backward()
            mark("forward + backward")
            merge.backward()
            mark("merge backward")
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark("optimizer")
        for (_, a), (name, b) in zip(marks, marks[1:]):
            phases[name].append(b - a)
    phase_ms = {n: statistics.median(v) * 1e3 for n, v in phases.items()}

    from torch.profiler import ProfilerActivity, profile

    def dispatched(fn) -> int:
        """aten ops (CPU) or kernels (GPU) of one step."""
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            fn()
            synchronize(device)
        if device.type == "cuda":
            return sum(1 for e in prof.events() if getattr(getattr(e, "device_type", None), "name", "") == "CUDA")
        return sum(1 for e in prof.events() if e.name.startswith("aten::"))

    ops = {name: dispatched(fn) for name, fn in steps.items()}
    out = {
        "shape": shape,
        "k": k,
        "device": str(device),
        "precision": args.precision,
        "step_ms": med,
        "ls_over_floor": med["ls"] / med["floor"],
        "ls_phases_ms": phase_ms,
        "ops_per_step": ops,
        "ops_kind": "cuda kernels" if device.type == "cuda" else "aten ops",
        "times_ms": {n: [round(x * 1e3, 3) for x in v] for n, v in times.items()},
    }
    print(json.dumps(out))
    print(f"\n{shape}, k={k}, {device}, {args.precision}: medians of {len(times['ls'])} steps each, interleaved")
    print(f"  floor {med['floor']:8.2f} ms   {ops['floor']:6d} {out['ops_kind']}")
    print(f"  ls    {med['ls']:8.2f} ms   {ops['ls']:6d} {out['ops_kind']}   ls / floor = {out['ls_over_floor']:.2f}")
    for name in steps:
        if name.startswith("epo"):
            ratio = med[name] / med["ls"]
            print(f"  {name} {med[name]:8.2f} ms   {ops[name]:6d} {out['ops_kind']}   / ls = {ratio:.2f}")
    print("  ls phases: " + ", ".join(f"{n} {v:.2f} ms" for n, v in phase_ms.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
