"""Per-architecture knowledge as data: where the MLPs and attention blocks are, and the heads.

Patterns are regexes matched (fullmatch) against module names; the `(?:.*\\.)?` prefix lets
the same row serve a bare backbone (`BertModel`) and a task model (`BertForSequenceClassification`,
whose backbone lives under `bert.`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_ANY = r"(?:.*\.)?"


@dataclass(frozen=True)
class Architecture:
    mlp: tuple[str, ...]
    attention: tuple[str, ...]
    heads: tuple[str, ...] = ()
    note: str = ""


ARCHITECTURES: dict[str, Architecture] = {
    # CLIPVisionModel (transformers 5: no `.vision_model` wrapper).
    "clip_vision_model": Architecture(
        mlp=(_ANY + r"encoder\.layers\.\d+\.mlp",),
        attention=(_ANY + r"encoder\.layers\.\d+\.self_attn",),
    ),
    # CLIPModel: only the vision tower is upcycled; the text tower builds zero-shot heads.
    "clip": Architecture(
        mlp=(_ANY + r"vision_model\.encoder\.layers\.\d+\.mlp",),
        attention=(_ANY + r"vision_model\.encoder\.layers\.\d+\.self_attn",),
    ),
    # GPT-2's c_fc / c_proj are Conv1D (weights stored transposed); the wrapper does not care.
    "gpt2": Architecture(
        mlp=(_ANY + r"h\.\d+\.mlp",),
        attention=(_ANY + r"h\.\d+\.attn",),
        heads=("score",),
    ),
    # BERT splits its MLP in `intermediate` (up-projection) and `output` (down-projection + LayerNorm).
    "bert": Architecture(
        mlp=(_ANY + r"encoder\.layer\.\d+\.intermediate", _ANY + r"encoder\.layer\.\d+\.output"),
        attention=(_ANY + r"encoder\.layer\.\d+\.attention",),
        heads=("classifier",),
    ),
    "roberta": Architecture(
        mlp=(_ANY + r"encoder\.layer\.\d+\.intermediate", _ANY + r"encoder\.layer\.\d+\.output"),
        attention=(_ANY + r"encoder\.layer\.\d+\.attention",),
        heads=("classifier",),
    ),
    "distilbert": Architecture(
        mlp=(_ANY + r"transformer\.layer\.\d+\.ffn",),
        attention=(_ANY + r"transformer\.layer\.\d+\.attention",),
        heads=("pre_classifier", "classifier"),
    ),
    # ViT: transformers 5 uses `layers.N.mlp`; 4.x used `encoder.layer.N.intermediate/output`.
    "vit": Architecture(
        mlp=(
            _ANY + r"layers\.\d+\.mlp",
            _ANY + r"encoder\.layer\.\d+\.intermediate",
            _ANY + r"encoder\.layer\.\d+\.output",
        ),
        attention=(_ANY + r"layers\.\d+\.attention", _ANY + r"encoder\.layer\.\d+\.attention"),
        heads=("classifier",),
    ),
}
# Llama-style decoders share one layout.
for _t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"):
    ARCHITECTURES[_t] = Architecture(
        mlp=(_ANY + r"layers\.\d+\.mlp",), attention=(_ANY + r"layers\.\d+\.self_attn",), heads=("score", "lm_head")
    )


def get_architecture(model_type: str | None) -> Architecture:
    """The table row for `config.model_type`, or a ValueError that explains the way out."""
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    raise ValueError(
        f"no default upcycling targets for model_type={model_type!r}. Known model types: "
        f"{', '.join(sorted(ARCHITECTURES))}. For another architecture pass targets explicitly, "
        "e.g. targets=['mlp'] (module-name suffixes, as in peft) or targets=r're:.*layers\\.\\d+\\.mlp' (a regex)."
    )


def sliding_window_attention(config: Any) -> bool:
    """Whether a model of this config has sliding-window attention layers (read from the cache layers transformers
    builds for it: Mistral with a window, Gemma 2 and 3, ...). Their caches crop keys from the left, where pwemoe's
    batched decoding pads and where its shared prompt prefixes sit, so those paths refuse or avoid such models."""
    from transformers import DynamicCache

    return any(getattr(layer, "is_sliding", False) for layer in DynamicCache(config=config).layers)
