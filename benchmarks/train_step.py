"""Training-step time and peak memory against the floor of a plain frozen forward + backward.

CLIP vision model of the paper's shapes (random init, no download), k tasks, batch 16 per task.
On a CPU each variant runs in its own subprocess, so its peak RSS (VmHWM) is its own; on a GPU
all run in one process, each from an empty device, peak = torch.cuda.max_memory_allocated.

  limit:       the plain model (no merging) on all k*16 images; weights frozen, gradients flow
               through every layer (pixel_values.requires_grad).
  limit_wgrad: dL/dW of every MLP weight (no input gradient), still no merging: the floor for any
               exact router gradient, since dL/dlambda_i = <dL/dW, tau_i> needs dL/dW.
  ls@M:        pwemoe LS step (`accumulate_router_gradients` + Adam): one shared merge, forwards of
               M images (M=0: all at once), each backpropagated at once, one merge backward.
  epo:         pwemoe EPO step: one shared merge, per-task forwards, k router gradients, LP, Adam.
  V+SCOPE:     variant V with gradient checkpointing of SCOPE (layers or upcycled), e.g. ls@0+upcycled;
               --checkpointing applies `layers` to every variant.
  pipeline:    LS steps fed end to end by the real input pipeline (worker processes running the
               CLIP image processor on random 224x224 RGB images); reports the share of the step
               spent waiting for data.
  fusion_bench: fusion-bench 0.2.33's own step (benchmarks/fusion_bench_reference.py), run with
               the python of a separate environment given by --fusion-bench (never a dependency).

    .venv/bin/python benchmarks/train_step.py [--k 2 8] [--steps 3] [--micro 0 16]
    PYTHONPATH=src python3 benchmarks/train_step.py --device cuda --precision bf16 --shape vit-l14 \
        --k 8 --tv-dtype bfloat16 --checkpointing --variants limit_wgrad ls
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MB = 2**20
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=32),
    "vit-b32": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=32
    ),
    "vit-l14": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14
    ),
    # ViT-B/32's module count at negligible width: the step is all host work (Python, dispatch,
    # kernel launches), which is what bounds a small model's step on a fast GPU.
    "vit-b32-host": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=12, num_attention_heads=2, patch_size=32, image_size=32
    ),
}
BATCH = 16


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


class _Meter:
    """Peak memory of one variant: RSS high-water mark on a CPU, max_memory_allocated on a GPU."""

    def __init__(self, device) -> None:
        import torch

        self.device, self.torch = device, torch
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed build memory back: RSS counts what is held
            self.rss0 = _status("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return self.torch.cuda.max_memory_allocated() / MB
        return _status("VmHWM") / MB  # absolute: the process's own high-water mark


def _build(shape: str, k: int, variant: str, device, tv_dtype, checkpointing: str | None):
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    import pwemoe

    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(**{"image_size": 224, **SHAPES[shape]})).eval()
    tv_bytes = 0
    if variant.startswith(("ls", "epo", "pipeline")):
        src = copy.deepcopy(model)  # upcycle moves `model` itself to the device; experts come from a CPU copy

        def expert(i: int) -> torch.nn.Module:  # built on demand: upcycle streams them one at a time
            e = copy.deepcopy(src)
            with torch.no_grad():
                for p in e.parameters():
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 1e-3)
            return e

        model = pwemoe.upcycle(
            model, {f"t{i}": (lambda i=i: expert(i)) for i in range(k)}, task_vector_dtype=tv_dtype, device=device
        )
        tv_bytes = sum(
            m.task_vector(p).numel() * m.task_vector(p).element_size()
            for _, m in pwemoe.ensembling_modules(model)
            for p in m.param_names
        )
        if checkpointing:
            pwemoe.gradient_checkpointing(model, scope=checkpointing)
    else:
        model.to(device).requires_grad_(False)
        if variant == "limit_wgrad":  # the floor for exact router gradients: dL/dW of every MLP, no merging
            for n, p in model.named_parameters():
                p.requires_grad_(".mlp." in n)
        if checkpointing == "layers":  # (the plain model has no upcycled modules)
            pwemoe.gradient_checkpointing(model)
    return model, tv_bytes


def run_variant(shape: str, k: int, name: str, steps: int, device_s: str, precision: str, tv: str, ckpt: bool) -> dict:
    import torch

    import pwemoe
    from pwemoe.devices import autocast, resolve_device, synchronize
    from pwemoe.objectives import EPO, LinearScalarization
    from pwemoe.training import accumulate_router_gradients, forward_groups, make_optimizer

    variant, _, scope = name.partition("+")  # e.g. ls@0+upcycled: checkpointing of that scope
    scope = scope or ("layers" if ckpt else None)
    if scope == "upcycled" and variant.startswith("limit"):
        raise SystemExit(f"{name}: the plain model has no upcycled modules to checkpoint")
    device = resolve_device(device_s)
    if device.type == "cpu":
        torch.set_num_threads(2)
    tv_dtype = {"float32": None, "bfloat16": torch.bfloat16}[tv]
    model, tv_bytes = _build(shape, k, variant, device, tv_dtype, scope)
    hidden = SHAPES[shape]["hidden_size"]
    heads = [(torch.randn(hidden, 10, generator=torch.Generator().manual_seed(i)) * 0.05).to(device) for i in range(k)]
    g = torch.Generator().manual_seed(1)
    size = SHAPES[shape].get("image_size", 224)
    px = torch.randn(BATCH * k, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, 10, (BATCH * k,), generator=g).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, 1e-2) if variant.startswith(("ls", "epo", "pipeline")) else None
    epo = EPO()
    sampler = pwemoe.DirichletSampler(k, seed=0)

    class Part:  # a forward: images of (task, n) segments, as ForwardBatch has them
        def __init__(self, x, y, segments):
            self.x, self.y, self.segments = x, y, segments

    def loss_fn(part: Part) -> torch.Tensor:
        """Summed CE of each segment, from one forward."""
        with autocast(device, precision):
            out = model(pixel_values=part.x).pooler_output
        res, lo = [], 0
        for (i, n), y in zip(part.segments, part.y):
            res.append(torch.nn.functional.cross_entropy(out[lo : lo + n].float() @ heads[i], y, reduction="sum"))
            lo += n
        return torch.stack(res)

    def parts_for(micro: int | None, split: bool) -> list[Part]:
        idx = [(i, list(range(BATCH * i, BATCH * (i + 1)))) for i in range(k)]
        return [
            Part(torch.cat([px[ix] for _, ix in grp]), [labels[ix] for _, ix in grp], [(i, len(ix)) for i, ix in grp])
            for grp in forward_groups(idx, micro, split)
        ]

    pipe = None
    if variant == "pipeline":
        pipe = _pipeline(k, device, precision, model)
    objective = epo if variant == "epo" else LinearScalarization()
    micro = int(variant.split("@")[1]) if "@" in variant else 0
    parts = parts_for(micro or None, variant == "epo")
    times, waits = [], []
    meter = None
    for s in range(steps + 1):
        if s == 1:  # the first step is warm-up (allocator, kernels, worker start)
            meter = _Meter(device)
        synchronize(device)
        t = time.perf_counter()
        if variant in ("limit", "limit_wgrad"):
            x = px.clone().requires_grad_(variant == "limit")  # limit_wgrad: the weight gradients drive it
            with autocast(device, precision):
                out = model(pixel_values=x).pooler_output
            sum(
                torch.nn.functional.cross_entropy(
                    out[BATCH * i : BATCH * (i + 1)].float() @ heads[i], labels[BATCH * i :][:BATCH]
                )
                for i in range(k)
            ).backward()
            for p in params:
                p.grad = None
        elif variant == "pipeline":
            t_wait = time.perf_counter()
            data = next(pipe["it"])
            synchronize(device)
            waits.append(time.perf_counter() - t_wait)
            accumulate_router_gradients(
                model, params, objective, sampler.sample(1), data.rays, pipe["wb"].segment_losses
            )
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:  # the training loop's own step (pwemoe.recipes.train.accumulate_router_gradients) + Adam
            accumulate_router_gradients(model, params, objective, sampler.sample(1), [parts], loss_fn)
            opt.step()
            opt.zero_grad(set_to_none=True)
        synchronize(device)
        if s > 0:
            times.append(time.perf_counter() - t)
    if os.environ.get("PWEMOE_BENCH_PROFILE") and variant.startswith("ls"):  # where an LS step's time goes
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(3):
                accumulate_router_gradients(model, params, objective, sampler.sample(1), [parts], loss_fn)
                opt.step()
                opt.zero_grad(set_to_none=True)
            synchronize(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=18), file=sys.stderr)
    out = {
        "shape": shape,
        "k": k,
        "variant": name,
        "device": str(device),
        "precision": precision,
        "tv_dtype": tv,
        "checkpointing": scope,
        "step_s": statistics.median(times),
        "times": [round(x, 4) for x in times],
        "peak_MB": meter.peak_mb(),
        "tv_MB": tv_bytes / MB,
        "epo_fallbacks": epo.fallbacks,
    }
    if waits:
        out["data_wait_share"] = sum(waits[1:]) / sum(times)
        out["workers"] = pipe["workers"]
    if pipe is not None:
        del pipe["it"]
    return out  # the caller frees the device (gc + empty_cache) before the next variant


def _pipeline(k: int, device, precision: str, model) -> dict:
    """The real input pipeline (pwemoe's step encoder and loader) over k tasks of random RGB images."""
    import numpy as np
    from PIL import Image
    from transformers import CLIPImageProcessor

    from pwemoe.tasks.clip import CLIPZeroShotTask
    from pwemoe.tasks.data import TaskStream
    from pwemoe.training import StepEncoder as _StepEncoder
    from pwemoe.training import StepSampler as _StepSampler
    from pwemoe.workbench import Workbench, default_workers

    class Images:
        """n random 224x224 RGB images, made on access (rows of a datasets split: column dict)."""

        def __init__(self, n: int, seed: int) -> None:
            self.n, self.seed = n, seed

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, idx: list[int]) -> dict:
            ims = [
                Image.fromarray(np.random.default_rng(self.seed * 100003 + i).integers(0, 255, (224, 224, 3), np.uint8))
                for i in idx
            ]
            return {"image": ims, "label": [i % 10 for i in idx]}

    class Modality:
        def collate(self, feats):
            import torch

            return {"pixel_values": torch.stack([f["pixel_values"] for f in feats])}

    proc = CLIPImageProcessor()  # CLIP's defaults: resize 224, center crop, normalise
    wb = Workbench.__new__(Workbench)  # the workbench's encode / forward / loader, without files
    wb.device, wb.precision, wb.modality, wb.backbone = device, precision, Modality(), model
    wb.tasks = []
    for i in range(k):
        from pwemoe.config import DataConfig, TaskConfig

        t = CLIPZeroShotTask(
            TaskConfig(name=f"t{i}", type="clip_zero_shot", expert="x", data=DataConfig(source="hub", path="x"))
        )
        t.processor, t.train_data, t.class_names = proc, Images(10_000, i), [str(c) for c in range(10)]
        t.head = _head(i, device)  # a fixed linear head on the pooled output
        wb.tasks.append(t)
    workers = int(os.environ.get("PWEMOE_BENCH_WORKERS", default_workers(device)))
    enc = _StepEncoder(wb, 1, None, False)
    sampler = _StepSampler([TaskStream(10_000, BATCH, i) for i in range(k)], 0)
    return {"it": iter(wb.loader(enc, workers, sampler=sampler)), "wb": wb, "workers": workers}


def _head(i: int, device):
    """A fixed random linear head Tensor[hidden, 10] on the pooled output (made on first use)."""
    import torch

    cache: dict = {}

    def head(outputs, inputs):
        out = outputs.pooler_output
        if "W" not in cache:
            g = torch.Generator().manual_seed(i)
            cache["W"] = (torch.randn(out.shape[-1], 10, generator=g) * 0.05).to(device)
        return out.float() @ cache["W"]

    return head


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--shape", default="vit-b32", choices=sorted(SHAPES))
    ap.add_argument("--tv-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--micro", type=int, nargs="+", default=None, help="LS micro-batch sizes (0: one forward)")
    ap.add_argument("--variants", nargs="+", default=None)
    ap.add_argument("--fusion-bench", metavar="PYTHON", help="python of an environment with fusion-bench 0.2.33")
    ap.add_argument("--json", metavar="FILE", help="also write the rows here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    common = (a.device, a.precision, a.tv_dtype, a.checkpointing)
    if a.child:
        kk, v = a.child.split(",")
        print(json.dumps(run_variant(a.shape, int(kk), v, a.steps, *common)))
        return
    cuda = a.device.startswith("cuda")
    micro = a.micro if a.micro is not None else ([0] if cuda else [0, 16])
    variants = a.variants or ["limit", "limit_wgrad", *[f"ls@{m}" for m in micro], "epo"] + (
        ["pipeline"] if cuda else []
    )
    variants = [f"ls@{micro[-1]}" + v[2:] if v == "ls" or v.startswith("ls+") else v for v in variants]
    rows = []
    for k in a.k:
        for v in variants + (["fusion_bench"] if a.fusion_bench else []):
            if v == "fusion_bench":
                ref = Path(__file__).with_name("fusion_bench_reference.py")
                cmd = [a.fusion_bench, str(ref), "--k", str(k), "--steps", str(a.steps)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                row["peak_MB"] = row["peak_MB"] + row["rss0_MB"]  # absolute, like ours
                row["shape"] = a.shape
            elif cuda:  # one process: each variant starts from an empty device
                row = run_variant(a.shape, k, v, a.steps, *common)
                gc.collect()
                import torch

                torch.cuda.empty_cache()
            else:
                cmd = [sys.executable, __file__, "--child", f"{k},{v}", "--steps", str(a.steps), "--shape", a.shape]
                cmd += ["--device", a.device, "--precision", a.precision, "--tv-dtype", a.tv_dtype]
                cmd += ["--checkpointing"] if a.checkpointing else []
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(out.stderr[-3000:])
                row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    _table(rows, a.k)


def _table(rows: list[dict], ks: list[int]) -> None:
    by = {(r["k"], r["variant"]): r for r in rows}
    print(f"\n{'k':>2} {'variant':<13} {'step s':>8} {'/floor':>7} {'peak MB':>9} {'T MB':>7} {'peak/(limit+T)':>15}")
    for k in ks:
        floor = by.get((k, "limit_wgrad"))
        limit = by.get((k, "limit"))
        for (kk, v), r in by.items():
            if kk != k:
                continue
            rel = f"{r['step_s'] / floor['step_s']:.2f}" if floor else "-"
            mem = f"{r['peak_MB'] / (limit['peak_MB'] + r['tv_MB']):.2f}" if limit else "-"
            extra = f"  data wait {100 * r['data_wait_share']:.1f}%" if "data_wait_share" in r else ""
            print(
                f"{k:>2} {v:<13} {r['step_s']:>8.3f} {rel:>7} {r['peak_MB']:>9.0f} {r['tv_MB']:>7.0f} {mem:>15}{extra}"
            )
        if (k, "epo") in by:
            ls = next((r for (kk, v), r in by.items() if kk == k and v.startswith("ls")), None)
            if ls:
                print(f"{k:>2} EPO / LS = {by[(k, 'epo')]['step_s'] / ls['step_s']:.2f}")
        if (k, "fusion_bench") in by:
            fb = by[(k, "fusion_bench")]
            for (kk, v), r in by.items():
                if kk == k and v.startswith("ls"):
                    print(
                        f"{k:>2} {v} / fusion-bench: step {r['step_s'] / fb['step_s']:.2f}x, "
                        f"peak {r['peak_MB'] / fb['peak_MB']:.2f}x"
                    )


if __name__ == "__main__":
    main()
