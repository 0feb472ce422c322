"""Reference: fusion-bench's own PWEMoE linear-scalarization training step, timed like train_step.py.

fusion-bench (tanganke/fusion_bench, the reference implementation of arXiv 2406.09770) is never a
pwemoe dependency: this script runs only from a separate virtual environment built by hand, and
imports fusion_bench lazily inside child_fusion_bench(). The environment was built with:

    python3 -m venv /work/fbvenv
    /work/fbvenv/bin/pip install -c /work/main/constraints.txt -e /work/main
    /work/fbvenv/bin/pip install -c /work/main/constraints.txt fusion-bench==0.2.33

(the constraints keep torch 2.13.0+cpu and transformers 5.24.0; fusion-bench's own deps -- hydra,
lightning, peft, tensorboard, ... -- install alongside without moving either.)

What is measured mirrors child() in benchmarks/train_step.py for variant "ls", with fusion-bench's
code in place of pwemoe's:

  build: fusion_bench.method.pwe_moe.clip_pwe_moe.PWEMoEAlgorithmForCLIP.setup_model, minus the
         model pool and zero-shot heads: the non-upscaled weights are merged by task arithmetic
         (scaling_factor=init_lambda; the math of its task_arithmetic_merge, written with its
         state_dict_sub/add/mul since 0.2.33's task_arithmetic_merge raises TypeError on any
         nn.Module), then every CLIP vision MLP is replaced by fusion-bench's
         ParetoWeightEnsemblingModule (upscale_mlp=True, upscale_attn=False, init_lambda=0.3,
         router_hidden_layers=2 as in its pwe_moe_ls_for_clip.yaml). Its layer access
         m.vision_model.encoder.layers is m.encoder.layers on transformers 5.
  step:  its training loop (PWEMoEAlgorithmForCLIP.train): ray ~ Dirichlet(1) from numpy,
         ParetoWeightEnsemblingModule.set_preferenece_vector, one forward per task (the merged
         weights are computed at the first forward and cached for the others), cross entropy on a
         random linear head over pooler_output (in place of its zero-shot CLIP head), loss from
         PWEMoELinearScalarizationForCLIP.compute_loss (sum r_i L_i), zero_grad, backward, Adam step.
         The cosine LR scheduler and logging are left out (constant cost per step).

    /work/fbvenv/bin/python benchmarks/fusion_bench_reference.py --k 2 --steps 3
    /work/fbvenv/bin/python benchmarks/fusion_bench_reference.py --k 2 --steps 1 --tiny   # smoke test
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import statistics
import time

from train_step import _status  # the same /proc reading as pwemoe's own benchmark (this folder)

MB = 2**20

VIT_B_32 = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "patch_size": 32,
    "image_size": 224,
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "patch_size": 32,
    "image_size": 64,
}


def child_fusion_bench(k: int, steps: int, shape: dict, check: bool = False) -> dict:
    # fusion_bench is imported here only: it is no dependency of pwemoe.
    import numpy as np
    import torch
    import torch.nn.functional as F
    from fusion_bench.method.pwe_moe.clip_pwe_moe import PWEMoELinearScalarizationForCLIP
    from fusion_bench.method.pwe_moe.module import ParetoWeightEnsemblingModule
    from fusion_bench.utils.state_dict_arithmetic import state_dict_add, state_dict_mul, state_dict_sub
    from transformers import CLIPVisionConfig, CLIPVisionModel

    init_lambda, router_hidden_layers = 0.3, 2  # fusion-bench's pwe_moe_ls_for_clip.yaml
    torch.set_num_threads(2)
    torch.manual_seed(0)
    np.random.seed(0)
    shape = {"image_size": 224, **shape}
    hidden, image_size = shape["hidden_size"], shape["image_size"]
    pretrained = CLIPVisionModel(CLIPVisionConfig(**shape)).eval()

    def expert(base: torch.nn.Module, i: int) -> torch.nn.Module:
        e = copy.deepcopy(base)
        with torch.no_grad():
            for p in e.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 1e-3)
        return e

    # PWEMoEAlgorithmForCLIP.setup_model, as it is written (all experts held at once)
    finetuned = [expert(pretrained, i) for i in range(k)]
    model = copy.deepcopy(pretrained)
    # task_arithmetic_merge(model, finetuned, init_lambda), done with its own state-dict arithmetic:
    # 0.2.33's task_arithmetic_merge raises TypeError on any nn.Module (its final state_dict_add
    # compares state_dict(keep_vars=True) Parameters with plain-Tensor task vectors).
    base_sd = model.state_dict()
    tv = None
    for m in finetuned:
        d = state_dict_sub(m.state_dict(), base_sd)
        tv = d if tv is None else state_dict_add(tv, d)
    model.load_state_dict(state_dict_add(base_sd, state_dict_mul(tv, init_lambda)))
    del base_sd, tv, d
    model.requires_grad_(False)

    def get_layers(m):  # fusion-bench writes m.vision_model.encoder.layers: transformers 5 has no .vision_model
        return getattr(m, "vision_model", m).encoder.layers

    layers, base_layers = get_layers(model), get_layers(pretrained)
    for idx in range(len(layers)):
        layers[idx].mlp = ParetoWeightEnsemblingModule(
            base_model=base_layers[idx].mlp,
            expert_models=[get_layers(m)[idx].mlp for m in finetuned],
            init_lambda=init_lambda,
            fix_base_model_and_experts=True,
            router_hidden_layers=router_hidden_layers,
        )
    del pretrained, finetuned, base_layers
    tv_bytes = 0  # task vectors are stored inside each module (expert_params), counted in rss0
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed build memory back, so RSS counts what is held

    heads = [torch.randn(hidden, 10, generator=torch.Generator().manual_seed(i)) * 0.05 for i in range(k)]
    g = torch.Generator().manual_seed(1)
    px = torch.randn(16 * k, 3, image_size, image_size, generator=g)
    labels = torch.randint(0, 10, (16 * k,), generator=g)
    batches = [(px[16 * i : 16 * (i + 1)], labels[16 * i : 16 * (i + 1)]) for i in range(k)]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    model.train()
    times = []
    rss0 = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for s in range(steps + 1):
        t = time.perf_counter()
        # PWEMoEAlgorithmForCLIP.train, one step
        ray = torch.from_numpy(np.random.dirichlet((1.0,) * k, 1).astype(np.float32).flatten())
        ParetoWeightEnsemblingModule.set_preferenece_vector(model, ray)
        losses = []
        for i, (images, y) in enumerate(batches):
            logits = model(images)[1] @ heads[i]  # compute_logits: pooler_output -> task head
            losses.append(F.cross_entropy(logits, y))
        loss = PWEMoELinearScalarizationForCLIP.compute_loss(None, model, ray, losses)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if s > 0:  # the first step is warm-up
            times.append(time.perf_counter() - t)
    out = {
        "k": k,
        "variant": "fusion_bench",
        "step_s": statistics.median(times),
        "times": times,
        "peak_MB": (_status("VmHWM") - rss0) / MB,
        "rss0_MB": rss0 / MB,
        "tv_MB": tv_bytes / MB,
    }
    if check:  # smoke-test facts: whose module is in place, and do gradients reach its routers
        optimizer.zero_grad()
        ParetoWeightEnsemblingModule.set_preferenece_vector(model, ray)
        loss = PWEMoELinearScalarizationForCLIP.compute_loss(
            None, model, ray, [F.cross_entropy(model(x)[1] @ heads[i], y) for i, (x, y) in enumerate(batches)]
        )
        loss.backward()
        mods = [m for m in model.modules() if isinstance(m, ParetoWeightEnsemblingModule)]
        gates = [p for m in mods for p in m.gate.parameters()]
        out["check"] = {
            "mlp_class": f"{type(layers[0].mlp).__module__}.{type(layers[0].mlp).__name__}",
            "n_modules": len(mods),
            "trainable": sorted({n.split(".mlp.")[-1] for n, p in model.named_parameters() if p.requires_grad}),
            "router_grad_norm": float(torch.stack([p.grad.norm() for p in gates]).norm()),
            # per module: router parameters with a nonzero gradient, and live ReLU units of the
            # router's hidden layer for this ray (its init -- zero bias, std 0.01 weights -- can
            # leave units dead, whose rows then get no gradient)
            "per_module": [
                {
                    "nonzero_grad": [n for n, p in m.gate.named_parameters() if p.grad is not None and p.grad.any()],
                    "live_hidden": int((m.gate[0](ray) > 0).sum()),
                }
                for m in mods
            ],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="a tiny CLIP shape for a smoke test (adds a 'check' entry)")
    a = ap.parse_args()
    print(json.dumps(child_fusion_bench(a.k, a.steps, TINY if a.tiny else VIT_B_32, check=a.tiny)))


if __name__ == "__main__":
    main()
