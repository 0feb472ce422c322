"""Build time, peak memory and held bytes of `upcycle`, and the time of one merge.

ViT-B/32-shaped CLIP vision model (random init from config, no download), k = 2 and 8.
Experts are saved to a temp dir and streamed from disk, as a user would load them.
Each configuration runs in a fresh subprocess so peak RSS (VmHWM) is its own.

    .venv/bin/python benchmarks/upscale_memory.py [--k 2 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

MB = 2**20


def _rss(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def vit_b32():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=32,
    )
    return CLIPVisionModel(cfg)


def child(k: int, workdir: str, repeats: int, dtype: str) -> dict:
    import torch
    from transformers import CLIPVisionModel

    import pwemoe

    torch.set_num_threads(2)
    base_dir = os.path.join(workdir, "base")
    experts = {f"task{i}": os.path.join(workdir, f"e{i}") for i in range(k)}
    base = CLIPVisionModel.from_pretrained(base_dir)
    theta0 = sum(p.numel() * p.element_size() for p in base.parameters())
    rss0 = _rss()
    _reset_peak()
    t = time.perf_counter()
    tv_dtype = torch.bfloat16 if dtype == "bf16" else None
    model = pwemoe.upcycle(base, experts, task_vector_dtype=tv_dtype)
    build_s = time.perf_counter() - t
    peak_build = _rss("VmHWM") - rss0
    mods = list(pwemoe.ensembling_modules(model))
    tv = sum(m.task_vector(p).numel() * m.task_vector(p).element_size() for _, m in mods for p in m.param_names)
    target = sum(p.numel() * p.element_size() for _, m in mods for p in m.base_layer.parameters())
    routers = sum(p.numel() * p.element_size() for _, m in mods for p in m.router.parameters())
    # unique storages held by the model, after one merge (the cache holds one merged copy)
    pwemoe.set_preference(model, [1.0] * k)
    merge_times, naive_times = [], []
    with torch.no_grad():
        for _ in range(repeats):
            for _, m in mods:
                m.clear_cache()
            t = time.perf_counter()
            for _, m in mods:
                m.merged_weights()
            merge_times.append(time.perf_counter() - t)
        lam = torch.full((k,), 0.3)
        for _ in range(repeats):
            t = time.perf_counter()
            for _, m in mods:  # naive reference: materialises lambda_i * T_i for all i (k x P)
                for p in m.param_names:
                    dict(m.base_layer.named_parameters())[p] + (
                        lam.view(-1, *[1] * (m.task_vector(p).dim() - 1)) * m.task_vector(p).float()
                    ).sum(0)
            naive_times.append(time.perf_counter() - t)
    storages = {}
    for tns in list(model.parameters()) + list(model.buffers()):
        storages[tns.untyped_storage().data_ptr()] = tns.untyped_storage().nbytes()
    for _, m in mods:
        for tns in m._cache[1].values():
            storages[tns.untyped_storage().data_ptr()] = tns.untyped_storage().nbytes()
    held = sum(storages.values())
    return {
        "k": k,
        "tv_dtype": dtype,
        "build_s": build_s,
        "peak_build_MB": peak_build / MB,
        "theta0_MB": theta0 / MB,
        "task_vectors_MB": tv / MB,
        "target_weights_MB": target / MB,
        "routers_params": routers // 4,
        "held_MB": held / MB,
        "bound_MB": (theta0 + tv + target + routers) / MB,
        "merge_ms_median": 1e3 * statistics.median(merge_times),
        "naive_merge_ms_median": 1e3 * statistics.median(naive_times),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(int(a.child[0]), a.child[1], int(a.child[2]), a.child[3])))
        return
    import torch

    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        base = vit_b32()
        base.save_pretrained(os.path.join(d, "base"))
        for i in range(max(a.k)):
            with torch.no_grad():
                e = vit_b32()
                e.load_state_dict(base.state_dict())
                for p in e.parameters():
                    p.add_(torch.randn_like(p) * 1e-3)
            e.save_pretrained(os.path.join(d, f"e{i}"))
            del e
        rows = []
        for k in a.k:
            for dt in a.dtype:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", str(k), d, str(a.repeats), dt],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    one_expert = rows[0]["theta0_MB"]
    print(
        f"{'k':>2} {'tv':>5} {'build s':>8} {'peak build MB':>14} {'(θ0-free bound: T+expert+rest)':>31} "
        f"{'held MB':>8} {'θ0+T+merged MB':>15} {'merge ms':>9} {'naive ms':>9}"
    )
    for r in rows:
        rest = r["theta0_MB"] - r["target_weights_MB"]
        bound_build = r["task_vectors_MB"] + one_expert + rest
        print(
            f"{r['k']:>2} {r['tv_dtype']:>5} {r['build_s']:>8.2f} {r['peak_build_MB']:>14.0f} {bound_build:>31.0f} "
            f"{r['held_MB']:>8.0f} {r['bound_MB']:>15.0f} {r['merge_ms_median']:>9.1f} "
            f"{r['naive_merge_ms_median']:>9.1f}"
        )
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
