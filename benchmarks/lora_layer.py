"""One Llama decoder layer upcycled with k LoRA experts: a router training step, factored against dense.

What is measured (CPU, fp32, random weights, no download): one transformers `LlamaDecoderLayer`
(default: Llama-7B's shape, hidden 4096, MLP 11008, 32 heads, 32 kv heads) upcycled with k LoRA
experts of rank r on all 7 linear layers (q/k/v/o_proj, gate/up/down_proj), one router per block
(self_attn, mlp) as pwemoe makes it. A step of linear-scalarisation router training is: draw a
preference p ~ Dirichlet(1_k), `set_preference(p)` on both blocks, forward hidden states
[batch, seq, hidden] (RoPE cos/sin from `LlamaRotaryEmbedding`, causal SDPA, no mask), loss =
mean(out^2), backward. Variants:

  factored:     `FactoredEnsemblingModule` with the experts' A_i [r, in], B_i [out, r], s_i kept as
                factors (`concat_factors`), never densified; only the routers need a gradient.
  dense:        `WeightEnsemblingModule` with the same experts densified to task vectors
                T[k, out, in], T_i = s_i B_i A_i (what pwemoe does for fully fine-tuned experts).
  frozen:       the plain layer, weights frozen, backward to the input hidden states only
                (the floor the factored step should come close to; it even computes the input
                gradient, which a single layer's router step does not need, a model's next-to-first
                layers do).
  frozen_wgrad: the plain layer with the 7 linear weights requiring grad (no input gradient): the
                floor of any dense-expert method, since dL/dlambda_i = <dL/dW, tau_i> needs dL/dW.

Time: median wall time of --steps steps after one warm-up step. Each variant runs, timed and
measured, in its own fresh subprocess of one invocation of this script (one after the other, never
two at once); peak memory = that process's `getrusage(RUSAGE_SELF).ru_maxrss` (absolute, so it
includes the torch and transformers imports, whose RSS is reported too). Expert storage = bytes of the
wrappers' `stored_tensors()` (factored: A, B plus the tiny owner / scale vectors; dense: T).

The extrapolation table (not measured) uses, per layer with hidden h, MLP m, n_h heads, n_kv kv
heads, d = h / n_h, kv = n_kv * d, and the linear layers' (in, out):
    q (h, h), k (h, kv), v (h, kv), o (h, h), gate (h, m), up (h, m), down (m, h)
  dense task-vector bytes   = k * L * sum_linear(in * out) * bytes      (bytes 4 fp32, 2 bf16)
  factored bytes            = k * L * sum_linear(r * (in + out)) * bytes
  flops(layer)              = 2 * batch * seq * sum_linear(in * out) + 4 * batch * seq^2 * h
                              (forward matmuls: projections, then QK^T and AV without causal savings)
  time per step (model)     = measured step time of the layer * flops(target layer) / flops(measured
                              layer) * L
For the measured shape the FLOP ratio is 1 (Llama-7B with the defaults); for Llama-70B it is the
ratio of one 70B layer to one measured layer at the same batch and seq. The one ratio is applied
to every variant (the dense merge and the factored terms do not scale exactly like the layer), and
embeddings, the final norm and the LM head are left out: an estimate, not a measurement.

    .venv/bin/python benchmarks/lora_layer.py --out lora_layer.json              # Llama-7B shape
    .venv/bin/python benchmarks/lora_layer.py --hidden 256 --intermediate 512 --heads 4 --kv-heads 4 \
        --seq 16 --steps 2 --threads 1 [--check]                                   # smoke test
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MB = 2**20
GiB = 2**30
VARIANTS = ["factored", "dense", "frozen", "frozen_wgrad"]
LABELS = {
    "factored": "factored (LoRA, never densified)",
    "dense": "dense (task vectors T)",
    "frozen": "frozen floor (input grad)",
    "frozen_wgrad": "frozen + weight grads",
}
BLOCKS = {"self_attn": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}
SCALING = 2.0  # LoRA alpha / r with alpha = 2r
MODELS = {  # name: (layers, hidden, intermediate, heads, kv heads)
    "Llama-7B": (32, 4096, 11008, 32, 32),
    "Llama-70B": (80, 8192, 28672, 64, 8),
}


def linear_shapes(hidden: int, intermediate: int, heads: int, kv_heads: int) -> dict[str, tuple[int, int]]:
    """(in, out) of the 7 linear layers of one Llama decoder layer."""
    kv = kv_heads * (hidden // heads)
    return {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (hidden, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }


def layer_flops(hidden: int, intermediate: int, heads: int, kv_heads: int, batch: int, seq: int) -> float:
    shapes = linear_shapes(hidden, intermediate, heads, kv_heads).values()
    return 2.0 * batch * seq * sum(i * o for i, o in shapes) + 4.0 * batch * seq * seq * hidden


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS")


def _factors(path_index: int, i: int, shape: tuple[int, int], rank: int):
    """Expert i's LoRA factors of one linear layer: A [rank, in], B [out, rank], the same in every process."""
    import torch

    g = torch.Generator().manual_seed(1000 * path_index + i)
    fin, fout = shape
    return torch.randn(rank, fin, generator=g) * 0.01, torch.randn(fout, rank, generator=g) * 0.01


def build(variant: str, a: argparse.Namespace):
    """(layer, upcycled blocks, trainable params, stored expert bytes) for one variant."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from pwemoe.core.ensembling import WeightEnsemblingModule
    from pwemoe.core.factored import FactoredEnsemblingModule, concat_factors
    from pwemoe.core.router import Router

    torch.manual_seed(0)
    layer = LlamaDecoderLayer(_config(a), layer_idx=0).requires_grad_(False)
    shapes = linear_shapes(a.hidden, a.intermediate, a.heads, a.kv_heads)
    order = list(shapes)
    wrappers = []
    if variant in ("factored", "dense"):
        for b, (block, paths) in enumerate(BLOCKS.items()):
            module = getattr(layer, block)
            names = {n for n, _ in module.named_parameters()}
            if names != {f"{p}.weight" for p in paths}:  # Llama has no biases: the linear weights are all
                raise RuntimeError(f"{block} has parameters {sorted(names)}, expected the weights of {paths}")
            torch.manual_seed(100 + b)  # the same router weights in both variants
            router = Router(a.k)
            if variant == "factored":
                lowrank = {
                    p: concat_factors(
                        [(i, *_factors(order.index(p), i, shapes[p], a.rank), SCALING) for i in range(a.k)]
                    )
                    for p in paths
                }
                wrapper = FactoredEnsemblingModule(module, lowrank, {}, router)
            else:
                tvs = {}
                for p in paths:
                    fin, fout = shapes[p]
                    T = torch.empty(a.k, fout, fin)  # filled in place: no k-fold temporary
                    for i in range(a.k):
                        A, B = _factors(order.index(p), i, shapes[p], a.rank)
                        torch.matmul(B, A, out=T[i])
                        T[i].mul_(SCALING)
                    tvs[f"{p}.weight"] = T
                wrapper = WeightEnsemblingModule(module, tvs, router)
            setattr(layer, block, wrapper)
            wrappers.append(wrapper)
    elif variant == "frozen_wgrad":
        for block, paths in BLOCKS.items():
            for p in paths:
                getattr(layer, block).get_submodule(p).weight.requires_grad_(True)
    elif variant != "frozen":
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    params = [p for p in layer.parameters() if p.requires_grad]
    stored = sum(t.numel() * t.element_size() for w in wrappers for t in w.stored_tensors())
    return layer, wrappers, params, stored


def _config(a: argparse.Namespace):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        attn_implementation="sdpa",
    )


def _inputs(a: argparse.Namespace):
    """Hidden states [batch, seq, hidden] and RoPE (cos, sin) for positions 0..seq-1."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    x = torch.randn(a.batch, a.seq, a.hidden, generator=torch.Generator().manual_seed(7))
    pos = torch.arange(a.seq).unsqueeze(0).expand(a.batch, -1)
    with torch.no_grad():
        cos, sin = LlamaRotaryEmbedding(_config(a))(x, pos)
    return x, (cos, sin)


def step(variant: str, layer, wrappers, x, rope, r) -> None:
    """One router training step (or the floor's forward + backward); gradients are left on params."""
    for w in wrappers:
        w.set_preference(r)
    if variant == "frozen":
        x = x.detach().requires_grad_(True)  # the gradient goes to the input only
    out = layer(x, attention_mask=None, position_embeddings=rope)
    out = out[0] if isinstance(out, tuple) else out
    out.pow(2).mean().backward()


def run_variant(variant: str, a: argparse.Namespace) -> dict:
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported before the baseline RSS)

    import pwemoe.core.factored  # noqa: F401
    from pwemoe.core.preference import DirichletSampler

    if a.threads:
        torch.set_num_threads(a.threads)
    rss_imports = _rss()
    layer, wrappers, params, stored = build(variant, a)
    rss_built = _rss()
    x, rope = _inputs(a)
    sampler = DirichletSampler(a.k, seed=0)
    times = []
    for s in range(a.steps + 1):  # step 0 is warm-up
        r = sampler.sample(1)[0]
        t = time.perf_counter()
        step(variant, layer, wrappers, x, rope, r)
        for p in params:
            p.grad = None
        if s > 0:
            times.append(time.perf_counter() - t)
    return {
        "variant": variant,
        "step_s": statistics.median(times),
        "times": [round(v, 4) for v in times],
        "peak_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB,  # Linux: kB
        "rss_imports_MB": rss_imports / MB,
        "rss_built_MB": rss_built / MB,
        "stored_MB": stored / MB,
        "stored_bytes": stored,
        "trainable_params": sum(p.numel() for p in params),
        "threads": torch.get_num_threads(),
    }


def check(a: argparse.Namespace) -> None:
    """Factored and dense give the same output and router gradients at the same preferences."""
    import torch

    from pwemoe.core.preference import DirichletSampler

    if a.hidden > 1024 or a.intermediate > 4096:
        raise SystemExit("--check builds both variants in one process: use a small shape (e.g. --hidden 256 ...)")
    x, rope = _inputs(a)
    built = {v: build(v, a) for v in ("factored", "dense")}
    sampler = DirichletSampler(a.k, seed=3)
    for _ in range(2):
        r = sampler.sample(1)[0]
        res = {}
        for v, (layer, wrappers, params, _) in built.items():
            for p in params:
                p.grad = None
            for w in wrappers:
                w.set_preference(r)
            out = layer(x, attention_mask=None, position_embeddings=rope)
            out = out[0] if isinstance(out, tuple) else out
            out.pow(2).mean().backward()
            res[v] = (out.detach(), torch.cat([p.grad.reshape(-1) for p in params]))
        (of, gf), (od, gd) = res["factored"], res["dense"]
        if not gf.abs().max() > 0:
            raise AssertionError("the router gradient is zero: the check would prove nothing")
        rel = float((gf - gd).abs().max() / gd.abs().max())
        print(f"preference {[round(v, 3) for v in r.tolist()]}: router grad max |f - d| / max |d| = {rel:.2e}")
        torch.testing.assert_close(of, od, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gf, gd, rtol=1e-3, atol=1e-6 * float(gd.abs().max()))
    print("check passed: factored and dense give the same output and router gradients")


def _child(variant: str, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--variant", variant]
    for opt in ("hidden", "intermediate", "heads", "kv_heads", "k", "rank", "batch", "seq", "steps", "threads"):
        cmd += [f"--{opt.replace('_', '-')}", str(getattr(a, opt))]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"variant {variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def extrapolate(rows: list[dict], a: argparse.Namespace) -> list[dict]:
    measured = layer_flops(a.hidden, a.intermediate, a.heads, a.kv_heads, a.batch, a.seq)
    out = []
    for name, (layers, h, m, nh, nkv) in MODELS.items():
        shapes = linear_shapes(h, m, nh, nkv).values()
        dense = a.k * layers * sum(i * o for i, o in shapes)
        factored = a.k * layers * sum(a.rank * (i + o) for i, o in shapes)
        ratio = layer_flops(h, m, nh, nkv, a.batch, a.seq) / measured
        out.append(
            {
                "model": name,
                "layers": layers,
                "dense_fp32_GiB": dense * 4 / GiB,
                "dense_bf16_GiB": dense * 2 / GiB,
                "factored_fp32_GiB": factored * 4 / GiB,
                "factored_bf16_GiB": factored * 2 / GiB,
                "flop_ratio": ratio,
                "step_s": {r["variant"]: r["step_s"] * ratio * layers for r in rows},
            }
        )
    return out


def _seconds(x: float) -> str:
    """A number for the tables: 1,234 / 12.34 / 0.0123."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.2f}" if x >= 1 else f"{x:.3g}"


def _tables(rows: list[dict], extra: list[dict], a: argparse.Namespace) -> None:
    floor = next((r["step_s"] for r in rows if r["variant"] == "frozen"), None)
    shape = f"hidden {a.hidden}, MLP {a.intermediate}, {a.heads} heads, {a.kv_heads} kv heads"
    print(f"\nOne LlamaDecoderLayer ({shape}), fp32 CPU, k={a.k}, rank {a.rank}, batch {a.batch}, seq {a.seq}")
    print(f"median of {a.steps} steps after 1 warm-up; each variant in its own process\n")
    print("| variant | step s | / frozen floor | peak RSS MB | RSS after imports MB | expert storage MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        rel = f"{r['step_s'] / floor:.2f}" if floor else "-"
        print(
            f"| {LABELS[r['variant']]} | {r['step_s']:.4f} | {rel} | {r['peak_MB']:.0f} | "
            f"{r['rss_imports_MB']:.0f} | {r['stored_MB']:.2f} |"
        )
    shapes = linear_shapes(a.hidden, a.intermediate, a.heads, a.kv_heads).values()
    print(
        f"\nformula for this layer (fp32, A and B / T only): factored "
        f"{a.k * sum(a.rank * (i + o) for i, o in shapes) * 4 / MB:.2f} MB, dense "
        f"{a.k * sum(i * o for i, o in shapes) * 4 / MB:.2f} MB; peak RSS includes torch + transformers"
    )
    print(f"\nExtrapolation, not measured: whole model (all layers), k={a.k}, rank {a.rank}")
    print("\n| model | layers | dense T fp32 GiB | dense T bf16 GiB | factored fp32 GiB | factored bf16 GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for e in extra:
        print(
            f"| {e['model']} | {e['layers']} | {e['dense_fp32_GiB']:.1f} | {e['dense_bf16_GiB']:.1f} | "
            f"{e['factored_fp32_GiB']:.2f} | {e['factored_bf16_GiB']:.2f} |"
        )
    print(
        f"\nExtrapolation, not measured: s per step = measured layer step x FLOP ratio x layers "
        f"(batch {a.batch}, seq {a.seq}; layers only, no embeddings / LM head)\n"
    )
    names = [r["variant"] for r in rows]
    print("| model | FLOP ratio (layer / measured layer) | " + " | ".join(LABELS[v] for v in names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for e in extra:
        cells = " | ".join(_seconds(e["step_s"][v]) for v in names)
        print(f"| {e['model']} | {_seconds(e['flop_ratio'])} | {cells} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--k", type=int, default=8, help="experts")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank of every expert")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after 1 warm-up)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", metavar="FILE", help="write the results as JSON here")
    ap.add_argument("--check", action="store_true", help="assert factored == dense router gradients, then exit")
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.variant:
        print(json.dumps(run_variant(a.variant, a)))
        return
    if a.check:
        check(a)
        return
    rows = []
    for v in VARIANTS:
        rows.append(_child(v, a))
        print(json.dumps(rows[-1]), flush=True)
    extra = extrapolate(rows, a)
    _tables(rows, extra, a)
    if a.out:
        config = {
            k: getattr(a, k)
            for k in ("hidden", "intermediate", "heads", "kv_heads", "k", "rank", "batch", "seq", "steps", "threads")
        }
        result = {"config": config, "scaling": SCALING, "rows": rows, "extrapolation_not_measured": extra}
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
