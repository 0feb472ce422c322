"""Training-step time and peak memory against the limit of a plain frozen forward + backward.

ViT-B/32-shaped CLIP vision model (random init, no download), k = 2 and 8, batch 16 per task,
CPU. Each (k, variant) runs in its own subprocess so its peak RSS (VmHWM) is its own.

  limit: the plain model (no merging) on the concatenated batches; weights frozen, gradients
         flow through every layer (pixel_values.requires_grad).
  limit_wgrad: the same plus dL/dW of every MLP weight, still no merging -- the floor for any
         exact router gradient, since dL/dlambda_i = <dL/dW, tau_i> needs dL/dW.
  ls:    pwemoe LS step: one merge, one concatenated forward, one backward, Adam step.
  epo:   pwemoe EPO step: one shared merge, k per-task forwards, k router gradients, LP, Adam step.

    .venv/bin/python benchmarks/train_step.py [--k 2 8] [--steps 3]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time

MB = 2**20


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child(k: int, variant: str, steps: int) -> dict:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    import pwemoe
    from pwemoe.objectives import EPO, LinearScalarization
    from pwemoe.recipes.train import accumulate_router_gradients

    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=32,
    )
    model = CLIPVisionModel(cfg).eval()
    tv_bytes = 0
    if variant in ("ls", "epo"):

        def expert(i: int) -> torch.nn.Module:  # built on demand: upscale streams them one at a time
            e = copy.deepcopy(model)
            with torch.no_grad():
                for p in e.parameters():
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 1e-3)
            return e

        model = pwemoe.upscale(model, {f"t{i}": (lambda i=i: expert(i)) for i in range(k)})
        tv_bytes = sum(m.task_vector(p).numel() * 4 for _, m in pwemoe.ensembling_modules(model) for p in m.param_names)
    else:
        model.requires_grad_(False)
        if variant == "limit_wgrad":  # the floor for exact router gradients: dL/dW of every MLP, no merging
            for n, p in model.named_parameters():
                p.requires_grad_(".mlp." in n)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed build memory back, so RSS counts what is held
    heads = [torch.randn(768, 10, generator=torch.Generator().manual_seed(i)) * 0.05 for i in range(k)]
    g = torch.Generator().manual_seed(1)
    px = torch.randn(16 * k, 3, 224, 224, generator=g)
    labels = torch.randint(0, 10, (16 * k,), generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2) if params else None
    epo = EPO()
    sampler = pwemoe.DirichletSampler(k, seed=0)
    times = []
    rss0 = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

    def losses_fn(parts):
        """parts: [(task index, pixel_values, labels)] -> per-part CE from one forward."""
        out = model(pixel_values=torch.cat([p[1] for p in parts])).pooler_output
        res, lo = [], 0
        for i, x, y in parts:
            res.append(torch.nn.functional.cross_entropy(out[lo : lo + len(x)] @ heads[i], y))
            lo += len(x)
        return torch.stack(res)

    objective = epo if variant == "epo" else LinearScalarization()
    parts = [(i, px[16 * i : 16 * (i + 1)], labels[16 * i : 16 * (i + 1)]) for i in range(k)]
    for s in range(steps + 1):
        t = time.perf_counter()
        if variant in ("limit", "limit_wgrad"):
            x = px.clone().requires_grad_(True)
            losses_fn([(i, x[16 * i : 16 * (i + 1)], y) for i, _, y in parts]).sum().backward()
            for p in params:
                p.grad = None
        else:  # the training loop's own step (pwemoe.recipes.train.accumulate_router_gradients) + Adam
            accumulate_router_gradients(model, params, objective, sampler.sample(1), [parts], losses_fn)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if s > 0:  # the first step is warm-up
            times.append(time.perf_counter() - t)
    return {
        "k": k,
        "variant": variant,
        "step_s": statistics.median(times),
        "times": times,
        "peak_MB": (_status("VmHWM") - rss0) / MB,
        "tv_MB": tv_bytes / MB,
        "rss0_MB": rss0 / MB,
        "epo_fallbacks": epo.fallbacks,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(int(a.child[0]), a.child[1], int(a.child[2]))))
        return
    rows = {}
    for k in a.k:
        for v in ("limit", "limit_wgrad", "ls", "epo"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(k), v, str(a.steps)],
                capture_output=True,
                text=True,
                check=True,
            )
            rows[(k, v)] = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps(rows[(k, v)]), flush=True)
    print(
        f"\n{'k':>2} {'limit s':>8} {'wgrad s':>8} {'LS s':>7} {'EPO s':>7} {'LS/limit':>9} {'LS/wgrad':>9} "
        f"{'EPO/LS':>7} {'limit MB':>9} {'wgrad MB':>9} {'LS MB':>7} {'T MB':>6} "
        f"{'LS/(limit+T)':>13} {'LS/(wgrad+T)':>13}"
    )
    for k in a.k:
        lim, wg, ls, epo = (rows[(k, v)] for v in ("limit", "limit_wgrad", "ls", "epo"))
        peak = {v: rows[(k, v)]["peak_MB"] + rows[(k, v)]["rss0_MB"] for v in ("limit", "limit_wgrad", "ls")}
        print(
            f"{k:>2} {lim['step_s']:>8.2f} {wg['step_s']:>8.2f} {ls['step_s']:>7.2f} {epo['step_s']:>7.2f} "
            f"{ls['step_s'] / lim['step_s']:>9.2f} {ls['step_s'] / wg['step_s']:>9.2f} "
            f"{epo['step_s'] / ls['step_s']:>7.2f} "
            f"{peak['limit']:>9.0f} {peak['limit_wgrad']:>9.0f} {peak['ls']:>7.0f} {ls['tv_MB']:>6.0f} "
            f"{peak['ls'] / (peak['limit'] + ls['tv_MB']):>13.2f} "
            f"{peak['ls'] / (peak['limit_wgrad'] + ls['tv_MB']):>13.2f}"
        )


if __name__ == "__main__":
    main()
