"""Two serving engines' ways of asking for "these adapters, each with a weight", on the OpenAI routes.

    llama.cpp server:  "lora": [{"id": 0, "scale": 0.5}, {"id": 2, "scale": 1.0}]
                       (id: the expert's index, in the run's task order; an expert left out gets 0)
                       GET /lora-adapters lists them: [{"id", "path", "scale", "task"}]
    LoRAX:             "merged_adapters": {"ids": [0, "color"], "weights": [0.5, 1.0], "merge_strategy": "linear"}
                       (ids: expert indices or task names; only the linear merge)

Both give raw per-expert scales: lambda itself, the same in every upcycled module, so the model is task
arithmetic theta_0 + sum_i s_i tau_i, and the trained routers are bypassed. A request gives scales or a
preference (routed), never both. Rows with different scales decode in one batch, as different preferences do.
"""

from __future__ import annotations

import math
from typing import Any

DIALECTS = ("lora", "merged_adapters")
MERGE_STRATEGIES = ("linear",)  # LoRAX also names ties, dare_linear and dare_ties: refused by name


def request_scales(body: dict[str, Any], field: str, tasks: list[str]) -> list[float]:
    """Per-expert scales (k numbers >= 0) from the body's `field` (one of DIALECTS); ValueError naming the
    field's part that is wrong, what was expected and what was received."""
    k = len(tasks)
    value = body[field]
    if field == "lora":
        if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
            raise ValueError(f'lora must be a list of {{"id", "scale"}} objects, got {value!r:.80}')
        pairs = []
        for i, e in enumerate(value):
            extra = sorted(set(e) - {"id", "scale"})
            if extra:
                raise ValueError(f'lora[{i}] has unknown fields {extra}; give {{"id", "scale"}}')
            if "id" not in e or "scale" not in e:
                raise ValueError(f'lora[{i}] needs both "id" and "scale", got {e!r:.80}')
            pairs.append((e["id"], e["scale"], f"lora[{i}]"))
    elif field == "merged_adapters":
        if not isinstance(value, dict):
            raise ValueError(
                f'merged_adapters must be an object {{"ids", "weights", "merge_strategy"}}, got {value!r:.80}'
            )
        extra = sorted(set(value) - {"ids", "weights", "merge_strategy"})
        if extra:
            raise ValueError(
                f"merged_adapters has unsupported fields {extra} (density and majority_sign_method belong to the "
                "ties and dare strategies, which pwemoe does not serve); give ids, weights and merge_strategy"
            )
        strategy = value.get("merge_strategy", "linear")
        if strategy not in MERGE_STRATEGIES:
            raise ValueError(
                f"merged_adapters.merge_strategy {strategy!r} is not supported; pwemoe serves the linear merge "
                "(task arithmetic with these weights): give merge_strategy: linear"
            )
        ids, weights = value.get("ids"), value.get("weights")
        if not isinstance(ids, list) or not isinstance(weights, list) or len(ids) != len(weights) or not ids:
            raise ValueError(
                f"merged_adapters needs ids and weights as lists of the same non-zero length, got ids={ids!r:.60} "
                f"and weights={weights!r:.60}"
            )
        pairs = [(a, w, f"merged_adapters.ids[{i}]") for i, (a, w) in enumerate(zip(ids, weights))]
    else:
        raise ValueError(f"unknown dialect {field!r}; one of {DIALECTS}")
    scales = [0.0] * k
    seen: set[int] = set()
    for ident, scale, where in pairs:
        if isinstance(ident, str) and ident in tasks and field == "merged_adapters":
            ident = tasks.index(ident)
        if isinstance(ident, bool) or not isinstance(ident, int) or not 0 <= ident < k:
            names = "an expert index 0..{} or a task name ({})".format(k - 1, ", ".join(tasks))
            if field == "lora":
                names = f"an expert index 0..{k - 1} (experts: {', '.join(tasks)})"
            raise ValueError(f"{where}: {ident!r:.40} is not {names}")
        if ident in seen:
            raise ValueError(f"{where}: expert {ident} ({tasks[ident]}) is listed twice; give each expert once")
        seen.add(ident)
        what = where if field == "lora" else where.replace(".ids[", ".weights[")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
            raise ValueError(f"{what}: the scale must be a finite number >= 0, got {scale!r:.40}")
        scales[ident] = float(scale)
    return scales


def lora_adapters(tasks: list[str], experts: dict[str, str] | None) -> list[dict[str, Any]]:
    """GET /lora-adapters in llama.cpp's shape: one entry per expert, in the run's task order. `scale` is what a
    `lora` request that leaves the expert out gives it (0); requests without `lora` are routed by preference."""
    experts = experts or {}
    return [{"id": i, "path": experts.get(t, ""), "scale": 0.0, "task": t} for i, t in enumerate(tasks)]


__all__ = ["DIALECTS", "MERGE_STRATEGIES", "lora_adapters", "request_scales"]
