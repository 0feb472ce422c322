"""Time of one decoding step of a lone request, in one process: the upcycled model against a merged copy, each with
the output layer cast once to the autocast dtype or left to autocast (cast at every step).

Each variant decodes the same chat prompt greedily at one preference; the median step time of 31 steps after the
first, over `--repeats` interleaved rounds (medians of the rounds reported). The run's own precision.

    .venv/bin/python benchmarks/decode_step.py demo_runs_llm/run [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from pwemoe.generation import BatchDecoder, Request, SamplingParams
    from pwemoe.serve.model import PreferenceModel

    pm = PreferenceModel(args.run, max_test_samples=1)
    tok = pm.wb.modality.tokenizer
    messages = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    r = torch.full((pm.k,), 1.0 / pm.k)

    def step_time(merged: bool, cast_head: bool) -> float:
        merged_fn = pm._merged_for_decoding if merged else None
        dec = BatchDecoder(pm.wb.modality.model, tok, pm.wb.device, pm.wb.precision, merged=merged_fn)
        if not cast_head:
            dec._head = None
        req = Request(ids, r, SamplingParams(max_new_tokens=40, temperature=0), lambda kind, payload: None)
        times = []
        with pm._lock:
            dec.join([req])
            for _ in range(32):
                t0 = time.perf_counter()
                dec.step()
                times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    variants = [(m, h) for m in (False, True) for h in (False, True)]
    for v in variants:  # warm-up: the merged copy, allocations
        step_time(*v)
    res: dict[tuple[bool, bool], list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            res[v].append(step_time(*v))
    print(f"precision {pm.wb.precision}, median of {args.repeats} rounds (ms per decoding step, one request):")
    for (merged, cast_head), t in res.items():
        model = "merged copy" if merged else "upcycled   "
        head = "output layer cast once" if cast_head else "cast by autocast each step"
        print(f"  {model}, {head}: {statistics.median(t) * 1e3:6.1f}  {[round(x * 1e3, 1) for x in t]}")


if __name__ == "__main__":
    main()
