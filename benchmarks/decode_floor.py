"""One decoding step of 8 rows: the per-row path against its floor (the model with one unmerged LoRA adapter).

Four models decode the same batch of 8 rows, one token a step, from the same prefilled cache (cropped back after each
step, so every step attends over the same length):

- per-row, 8 preferences: the upcycled model, each row at its own preference (`pwemoe.set_row_preferences`, as the
  server's `BatchDecoder` runs it; the rows' table is made when the batch changes, not at every step);
- per-row, 1 preference: the same, all 8 rows at one preference;
- floor: the base model with ONE unmerged LoRA adapter of rank sum r_i on the same layers, `W0 x + B (A x)` in plain
  torch (and with `--peft`, the same adapter through peft);
- merged: the plain model holding theta(r) (`pwemoe.merge_and_unload`).

A step is one forward as `BatchDecoder._logits` runs it (autocast at the precision, `logits_to_keep=1`); the
`BatchDecoder.step` of the per-row batch (sampling, text) is timed as well. Medians of `--steps` steps per round over
`--rounds` interleaved rounds, ratios printed. `--profile` prints a `torch.profiler` table of one 8-row step of the
per-row path (top ops by self CPU time).

The model is a synthetic SmolLM2-135M-shaped Llama built from its config (random weights) with 3 LoRA experts of
rank 8 on q/v/up/down, so no demo run is needed; `--run DIR` uses a trained LLM demo run instead.

    .venv/bin/python benchmarks/decode_floor.py [--precision bf16|fp32] [--rounds 5] [--steps 20] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")


class _Tokenizer:
    """What `BatchDecoder` reads from a tokenizer, for a model without one."""

    eos_token_id = 2
    pad_token_id = 2

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(f"t{i}" for i in ids)


def synthetic(layers: int, k: int, rank: int) -> tuple[nn.Module, object]:
    """(upcycled model, tokenizer stand-in): a SmolLM2-135M-shaped Llama (random weights) with k LoRA experts of
    rank `rank` (scaling 2) on q/v/up/down of every layer, routers perturbed so preferences differ."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import pwemoe
    from pwemoe.lora import LoraAdapter, LoraLayer

    torch.manual_seed(0)
    cfg = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers})
    base = LlamaForCausalLM(cfg).eval()
    experts = {}
    for i in range(k):
        g = torch.Generator().manual_seed(10 + i)
        ly = {}
        for name, m in base.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                a = torch.randn(rank, m.in_features, generator=g) / m.in_features**0.5
                b = torch.randn(m.out_features, rank, generator=g) * 0.02
                ly[name] = LoraLayer(a, b, 2.0)
        experts[f"task_{i}"] = LoraAdapter(f"synthetic_{i}", None, ly)
    model = pwemoe.upcycle(base, experts).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".router." in f".{n}":
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model, _Tokenizer()


def from_run(run: str) -> tuple[nn.Module, object, str]:
    from pwemoe.serve.model import PreferenceModel

    pm = PreferenceModel(run, max_test_samples=1)
    return pm.wb.modality.model, pm.wb.modality.tokenizer, pm.wb.precision


class LoraLinear(nn.Module):
    """The floor: base(x) + (x A^T) B^T, one adapter of rank R = sum r_i, factors in the compute dtype, scaling
    folded into B."""

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("At", A.t().contiguous().to(dtype))  # [in, R]
        self.register_buffer("Bt", B.t().contiguous().to(dtype))  # [R, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.At) @ self.Bt


def one_adapter(model: nn.Module, r: torch.Tensor, dtype: torch.dtype) -> nn.Module:
    """The plain base model (theta_0) with one unmerged LoRA adapter per factored layer: the experts' factors
    concatenated (rank sum r_i), their columns scaled by lambda(r) s (any preference: the cost is the same)."""
    import pwemoe
    from pwemoe.core.factored import FactoredEnsemblingModule, lowrank_columns
    from pwemoe.routing import ensembling_modules

    lams = {}
    with pwemoe.preference(model, r), torch.no_grad():
        for name, m in ensembling_modules(model):
            lams[name] = m.routing_weights()
    plain = pwemoe.merge_and_unload(model, torch.tensor([1.0] + [0.0] * (len(r) - 1)))
    with torch.no_grad():
        for name, m in ensembling_modules(model):
            if not isinstance(m, FactoredEnsemblingModule):
                continue
            block = plain.get_submodule(name)
            for path in m.factored_paths:
                lr = m.factors(path)
                lin = block.get_submodule(path)
                lin.weight.copy_(m.base_layer.get_submodule(path).weight)  # theta_0, the adapter unmerged
                cols = lowrank_columns(lams[name], lr.owner, lr.scale)
                parent, _, attr = path.rpartition(".")
                owner = block.get_submodule(parent) if parent else block
                setattr(owner, attr, LoraLinear(lin, lr.A, lr.B * cols, dtype))
    return plain


def peft_adapter(model: nn.Module, rank: int) -> nn.Module:
    """The same floor through peft: a LoRA adapter of rank `rank` on the same layers of the plain base."""
    import peft

    import pwemoe

    k = pwemoe.routing.num_tasks(model)
    plain = pwemoe.merge_and_unload(model, torch.full((k,), 1.0 / k))
    cfg = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGETS), init_lora_weights=False)
    return peft.get_peft_model(plain, cfg).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="an LLM demo run folder (default: the synthetic SmolLM2-135M-shaped model)")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=48, help="tokens in each row's cache before the timed steps")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--peft", action="store_true", help="also time the floor through peft")
    ap.add_argument("--profile", action="store_true", help="profile one 8-row step of the per-row path")
    ap.add_argument(
        "--throughput",
        action="store_true",
        help="also decode whole requests through the Scheduler in this process: mixed against shared-preference "
        "merged throughput, and time to first token with all rows arriving together against one alone",
    )
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request (--throughput)")
    ap.add_argument("--throughput-rounds", type=int, default=3)
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: torch's default); 1 is steadier on a busy machine"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import DynamicCache

    import pwemoe
    from pwemoe.devices import autocast, native_bf16, numerics_description
    from pwemoe.generation import BatchDecoder, Request, SamplingParams, _cast_head
    from pwemoe.routing import num_tasks

    dev = torch.device("cpu")
    if args.run:
        model, tok, precision = from_run(args.run)
    else:
        model, tok = synthetic(args.layers, 3, 8)
        precision = "bf16" if native_bf16(dev) else "fp32"
    if args.precision != "auto":
        precision = args.precision
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    k = num_tasks(model)
    rank = sum(m.factors(p).rank for _, m in pwemoe.routing.ensembling_modules(model) for p in m.factored_paths[:1])
    rank //= max(1, len(list(pwemoe.routing.ensembling_modules(model))))
    B = args.rows
    g = torch.Generator().manual_seed(0)
    prefs = torch.distributions.Dirichlet(torch.ones(k)).sample((B,))  # 8 different preferences
    shared = torch.full((B, k), 1.0 / k)
    merged = pwemoe.merge_and_unload(model, shared[0]).eval()
    floor = one_adapter(model, shared[0], dtype).eval()
    models: dict[str, tuple[nn.Module, torch.Tensor | None]] = {
        f"per-row, {B} preferences": (model, prefs),
        "per-row, 1 preference": (model, shared),
        f"floor: one adapter of rank {rank}": (floor, None),
        "merged": (merged, None),
    }
    if args.peft:
        models[f"floor through peft, rank {rank}"] = (peft_adapter(model, rank), None)
    from pwemoe.serve.model import linear_weights_to

    for m, _ in models.values():  # the output layer cast once, as BatchDecoder does (not by autocast every step)
        attr, head = _cast_head(m, None if precision == "fp32" else dtype)
        if attr is not None:
            setattr(m, attr, head)
    serving = None
    if precision != "fp32":  # linear weights in bf16 once: the server's merged copies, and the floor likewise
        linear_weights_to(merged, dtype)
        linear_weights_to(floor, dtype)
        try:  # the upcycled model's serving copy of its frozen weights, as BatchDecoder swaps it in
            from pwemoe.generation.weights import ServingWeights

            serving = ServingWeights(model, dtype)
        except ImportError:
            pass
    ids = torch.randint(3, 1000, (B, args.prompt + 1), generator=g)
    mask = torch.ones(B, args.prompt + 1, dtype=torch.long)
    pos = torch.arange(args.prompt + 1).expand(B, -1)

    def run(m: nn.Module, rows: torch.Tensor | None, x: torch.Tensor, cache: object, at: slice) -> torch.Tensor:
        swap = serving.swapped() if serving is not None and m is model else _null()
        with swap, autocast(dev, precision):
            return m(
                input_ids=x,
                attention_mask=mask[:, : at.stop],
                position_ids=pos[:, at],
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits

    def stepper(m: nn.Module, rows: torch.Tensor | None) -> Callable[[], None]:
        """A function running one decoding step of `m` on a cache of args.prompt tokens per row (cropped back)."""
        cache = DynamicCache(config=m.config)
        table = getattr(pwemoe.routing, "row_preferences_table", None)  # made once per batch, as BatchDecoder does
        rows = table(m, rows) if table is not None and rows is not None else rows
        ctx = pwemoe.row_preferences(m, rows) if rows is not None else _null()
        with ctx, torch.no_grad():
            run(m, rows, ids[:, :-1], cache, slice(0, args.prompt))

        def step() -> None:
            with pwemoe.row_preferences(m, rows) if rows is not None else _null(), torch.no_grad():
                run(m, rows, ids[:, -1:], cache, slice(args.prompt, args.prompt + 1))
            cache.crop(-1)

        return step

    def decoder_stepper() -> Callable[[], None]:
        """`BatchDecoder.step` of the per-row batch at 8 preferences (sampling and text included)."""
        dec = BatchDecoder(model, tok, dev, precision)
        sp = SamplingParams(max_new_tokens=10**6, temperature=0)
        dec.join([Request(ids[b, :-1].tolist(), prefs[b], sp, lambda kind, payload: None) for b in range(B)])

        def step() -> None:
            dec.step()
            dec.mask = dec.mask[:, :-1]
            dec.cache.crop(-1)
            for s in dec.rows:
                s.tokens.clear()

        return step

    steppers = {name: stepper(m, rows) for name, (m, rows) in models.items()}
    steppers[f"BatchDecoder.step, {B} preferences"] = decoder_stepper()
    times: dict[str, list[float]] = {n: [] for n in steppers}
    for f in steppers.values():  # warm-up
        for _ in range(3):
            f()
    for _ in range(args.rounds):
        for name, f in steppers.items():
            ts = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t0)
            times[name].append(statistics.median(ts))
    med = {n: statistics.median(t) for n, t in times.items()}
    floor_name = f"floor: one adapter of rank {rank}"
    print(
        f"{'synthetic SmolLM2-135M-shaped Llama, ' + str(args.layers) + ' layers' if not args.run else args.run}, "
        f"{k} LoRA experts on {'/'.join(TARGETS)}, {B} rows, cache of {args.prompt} tokens, {precision}; "
        f"{numerics_description(dev)}"
    )
    print(f"median of {args.rounds} rounds of the median of {args.steps} steps (ms per decoding step):")
    for name, t in med.items():
        print(
            f"  {name:34s} {t * 1e3:7.2f}   x{t / med[floor_name]:.2f} the floor   x{t / med['merged']:.2f} merged"
            f"   rounds {[round(x * 1e3, 1) for x in times[name]]}"
        )
    if args.throughput:
        throughput(model, tok, dev, precision, dtype, prefs, merged, args)
    if args.profile:
        profile_steps(steppers, [f"per-row, {B} preferences", floor_name, "merged"], B)


def profile_steps(steppers: dict[str, Callable[[], None]], names: list[str], rows: int) -> None:
    """`torch.profiler` over one step of each of `names` (after a few untimed ones): the per-row path's table (top
    ops by self CPU time), then the same ops' self time and calls in the others, side by side."""
    from torch.profiler import ProfilerActivity, profile

    stats = {}
    for name in names:
        for _ in range(2):
            steppers[name]()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            steppers[name]()
        stats[name] = prof.key_averages()
        if name == names[0]:
            print(f"\none step of the per-row path, {rows} rows at {rows} preferences (top ops by self CPU time):")
            print(stats[name].table(sort_by="self_cpu_time_total", row_limit=20))
    per_op = {name: {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in st} for name, st in stats.items()}
    top = sorted(per_op[names[0]], key=lambda k: -per_op[names[0]][k][0])[:15]
    print("self CPU ms (calls) of one step, by op: " + " | ".join(names))
    for op in top:
        cells = [per_op[n].get(op, (0.0, 0)) for n in names]
        print(f"  {op:50s} " + " | ".join(f"{ms:8.2f} ({c:4d})" for ms, c in cells))
    totals = [sum(ms for ms, _ in per_op[n].values()) for n in names]
    print(f"  {'total':50s} " + " | ".join(f"{t:8.2f}       " for t in totals))


def throughput(model, tok, dev, precision, dtype, prefs, merged, args) -> None:
    """Whole requests through `generation.Scheduler` in this process (no HTTP): mixed preferences on the upcycled
    model; the same requests at one preference, which decode on a merged copy (linear weights in the compute dtype,
    as the server's cache holds it, merged beforehand); time to first token of all rows arriving at once and alone."""
    import contextlib

    from pwemoe.generation import BatchDecoder, SamplingParams, Scheduler

    B = args.rows
    g = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(3, 1000, (int(n),), generator=g).tolist() for n in torch.randint(16, 40, (B,), generator=g)
    ]
    shared_r = torch.full_like(prefs[0], 1.0 / prefs.shape[1])
    backbone = merged.get_submodule(model.base_model_prefix)

    @contextlib.contextmanager
    def merged_copy(r: torch.Tensor, merge: bool):
        yield backbone if torch.allclose(r, shared_r) else None

    def make(with_merged: bool) -> Scheduler:
        dec = BatchDecoder(model, tok, dev, precision, merged=merged_copy if with_merged else None)
        return Scheduler(dec, max_batch=B, token_budget=B * (40 + args.tokens + 8))

    sp = SamplingParams(max_new_tokens=args.tokens, temperature=0)
    scheds = {"mixed": make(False), "shared, merged copy": make(True)}

    def run(name: str, rows: list[int], at: list[torch.Tensor]) -> tuple[float, list[float]]:
        sched = scheds[name]
        t0 = time.perf_counter()
        handles = [sched.submit(prompts[b], at[b], sp) for b in rows]
        done = [h.result() for h in handles]
        wall = time.perf_counter() - t0
        ttft = [h.seq.first_token_at - h.seq.submitted for h in handles]
        return sum(d["usage"]["completion_tokens"] for d in done) / wall, ttft

    everyone = list(range(B))
    shared = [shared_r] * B
    res: dict[str, list[float]] = {"mixed": [], "shared, merged copy": [], "ttft all": [], "ttft alone": []}
    for _ in range(args.throughput_rounds):
        tps, ttft = run("mixed", everyone, list(prefs))
        res["mixed"].append(tps)
        res["ttft all"].append(statistics.median(ttft))
        res["shared, merged copy"].append(run("shared, merged copy", everyone, shared)[0])
        res["ttft alone"].append(run("mixed", [0], list(prefs))[1][0])
    for s in scheds.values():
        s.close()
    med = {n: statistics.median(v) for n, v in res.items()}
    print(
        f"\nwhole requests through the Scheduler, {B} at once, {args.tokens} new tokens each, greedy, in this process:"
    )
    print(f"  mixed, {B} preferences:            {med['mixed']:7.1f} tokens/s  {[round(x, 1) for x in res['mixed']]}")
    print(
        f"  shared preference, merged copy:  {med['shared, merged copy']:7.1f} tokens/s  "
        f"{[round(x, 1) for x in res['shared, merged copy']]}"
    )
    print(f"  mixed / shared merged: {med['mixed'] / med['shared, merged copy']:.3f}")
    print(
        f"  time to first token p50, {B} arriving together: {med['ttft all'] * 1e3:.0f} ms; alone: "
        f"{med['ttft alone'] * 1e3:.0f} ms; ratio {med['ttft all'] / med['ttft alone']:.2f}"
    )


def _null():
    import contextlib

    return contextlib.nullcontext()


if __name__ == "__main__":
    main()
