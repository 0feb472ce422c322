"""Causal language models: an AutoModelForCausalLM whose decoder is upcycled; its LM head is shared by all tasks.

The backbone is the decoder (`model.base_model`, e.g. LlamaModel); tasks read its hidden states and
apply the frozen LM head only where they need logits (the label tokens), never over the whole
sequence. An export is one plain *ForCausalLM folder for all tasks, and, when the experts were LoRA
adapters, also one PEFT adapter for the preference.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..architectures import sliding_window_attention
from .base import Modality
from .text import load_tokenizer

# Keys a task may add to its features for its head only (masks); collated, but not given to the model.
HEAD_ONLY_PREFIX = "pwemoe_"
SHARED = HEAD_ONLY_PREFIX + "shared"  # per row: the length of the token prefix every row of the batch starts with
LABEL = HEAD_ONLY_PREFIX + "label"  # per token: 1 on the label tokens that end a multi-token choice row
MIN_SHARED = 4  # shorter shared prefixes are computed with the rest (one more forward would not pay)


def shared_prefix(rows: Sequence[Sequence[int]]) -> int:
    """The length of the longest token prefix all rows start with, leaving each row at least one token."""
    if not rows:
        return 0
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for j in range(max(n, 0)):
        if any(r[j] != first[j] for r in rows):
            return j
    return max(n, 0)


@torch.no_grad()
def prefix_shared_forward(
    decoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, shared: int
) -> Any:
    """The decoder's outputs for right-padded rows that all start with the same `shared` tokens, that prefix
    computed once: its keys and values (a `DynamicCache`) are repeated for every row and the rest of each row
    attends to them. Equal to one forward of the whole rows, up to float rounding; returns `last_hidden_state`
    Tensor[B, L, H] for every position, the prefix's repeated. Used only without autograd (evaluation)."""
    from transformers import DynamicCache

    B, L = input_ids.shape
    cache = DynamicCache(config=decoder.config)
    pre = decoder(
        input_ids=input_ids[:1, :shared], attention_mask=attention_mask[:1, :shared], cache=cache, use_cache=True
    )
    cache.batch_repeat_interleave(B)
    pos = torch.arange(shared, L, device=input_ids.device).expand(B, -1)
    rest = decoder(
        input_ids=input_ids[:, shared:], attention_mask=attention_mask, position_ids=pos, cache=cache, use_cache=True
    )
    hidden = torch.cat([pre.last_hidden_state.expand(B, -1, -1), rest.last_hidden_state], dim=1)
    return type(rest)(last_hidden_state=hidden)


@torch.no_grad()
def prompt_shared_forward(
    decoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, label_mask: torch.Tensor
) -> Any:
    """The decoder's outputs for right-padded rows `prompt + label`, where consecutive rows with the same prompt
    (one example's C label rows of a multi-token choice task) compute that prompt once.

    The distinct prompts run left-padded in one forward; its keys and values (a `DynamicCache`) are selected
    for every row, and each row's label tokens attend to them at the positions that follow its prompt. Equal
    to one forward of the whole rows, up to float rounding, for C times fewer prompt tokens. Returns
    `last_hidden_state` Tensor[B, L, H] in the rows' own right-padded layout (zeros at padding). Used only
    without autograd (evaluation).

    input_ids, attention_mask, label_mask: LongTensor[B, L]; label_mask is 1 on each row's label tokens.
    """
    from transformers import DynamicCache

    B, L = input_ids.shape
    cont = label_mask.bool() & attention_mask.bool()
    plen, clen = (attention_mask.bool() & ~cont).sum(1), cont.sum(1)
    opens = torch.ones(B, dtype=torch.bool)  # row j opens a group unless it repeats row j-1's prompt
    for j in range(1, B):
        n = int(plen[j])
        opens[j] = n != int(plen[j - 1]) or not torch.equal(input_ids[j, :n], input_ids[j - 1, :n])
    group = (opens.cumsum(0) - 1).to(input_ids.device)  # LongTensor[B]: each row's prompt
    starts = opens.nonzero().flatten().tolist()
    P, M = int(plen.max()), int(clen.max())
    # left padding: every prompt ends at column P - 1, where the label tokens go on
    pid = input_ids.new_zeros((len(starts), P))
    pmask = attention_mask.new_zeros((len(starts), P))
    for g, j in enumerate(starts):
        n = int(plen[j])
        pid[g, P - n :], pmask[g, P - n :] = input_ids[j, :n], 1
    cache = DynamicCache(config=decoder.config)
    pos = (pmask.cumsum(1) - 1).clamp(min=0)
    pre = decoder(input_ids=pid, attention_mask=pmask, position_ids=pos, cache=cache, use_cache=True)
    cache.batch_select_indices(group)
    cols = torch.arange(M, device=input_ids.device)
    take = plen[:, None].to(cols.device) + cols[None, :]  # LongTensor[B, M]: each row's label columns
    cid = input_ids.gather(1, take.clamp(max=L - 1))
    cmask = (cols[None, :] < clen[:, None].to(cols.device)).to(attention_mask.dtype)
    rest = decoder(
        input_ids=cid * cmask,
        attention_mask=torch.cat([pmask[group], cmask], 1),
        position_ids=take,
        cache=cache,
        use_cache=True,
    )
    hp, hc = pre.last_hidden_state, rest.last_hidden_state
    hidden = hc.new_zeros((B, L, hc.shape[-1]))
    for j in range(B):  # back to the rows' own layout: prompt (from its group), then the label tokens
        n, m, g = int(plen[j]), int(clen[j]), int(group[j])
        hidden[j, :n] = hp[g, P - n :]
        hidden[j, n : n + m] = hc[j, :m]
    return type(rest)(last_hidden_state=hidden)


class CausalLMModality(Modality):
    name = "causal_lm"
    generates = True
    mergekit_export = True

    @classmethod
    def mergekit_prefix(cls, base: str) -> str:
        """The name under which the causal LM holds its decoder ('model' for Llama, 'transformer' for GPT-2), read
        from the class that the base's config names (no weights are loaded); the LM head outside it is the base's."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(base)
        return AutoModelForCausalLM._model_mapping[type(config)].base_model_prefix

    def load_preprocessing(self) -> None:
        """The tokenizer and the model's config, no weights: tasks check their prompts, label words and
        lengths against them before the model loads."""
        from transformers import AutoConfig

        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.base)
            self.tokenizer.padding_side = "right"  # heads find each row's last token from the attention mask
            self.config = AutoConfig.from_pretrained(self.base)

    def shell(self) -> nn.Module:
        """The model built from its config on the meta device: its modules (a position table, say) without
        weights or memory, known before the model loads."""
        from transformers import AutoModelForCausalLM

        if getattr(self, "_shell", None) is None:
            self.load_preprocessing()
            with torch.device("meta"):
                self._shell = AutoModelForCausalLM.from_config(self.config)
        return self._shell

    def load(self) -> None:
        from transformers import AutoModelForCausalLM

        self.load_preprocessing()
        self.model = AutoModelForCausalLM.from_pretrained(self.base).eval()
        self.backbone = self.model.base_model
        # sliding-window caches crop keys from the left, where shared prefixes sit: such models run whole rows
        self.sliding = sliding_window_attention(self.model.config)

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def fresh_backbone(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.base).eval().base_model

    def run(self, backbone: nn.Module, model_inputs: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> Any:
        """Without autograd, the rows of a multi-token choice task compute each example's prompt once for all its
        labels (`prompt_shared_forward`), and other rows that share a prompt prefix (a task's template) compute
        it once (`prefix_shared_forward`); training, sliding-window models and anything else run whole rows."""
        if torch.is_grad_enabled() or set(model_inputs) != {"input_ids", "attention_mask"}:
            return backbone(**model_inputs)
        ids, mask = model_inputs["input_ids"], model_inputs["attention_mask"]
        if self.sliding:
            return backbone(**model_inputs)
        if LABEL in inputs and bool(((inputs[LABEL] * mask).sum(1) > 0).all()):
            return prompt_shared_forward(backbone, ids, mask, inputs[LABEL])
        shared = int(inputs[SHARED][0]) if SHARED in inputs and len(inputs[SHARED]) else 0
        if shared < MIN_SHARED:
            return backbone(**model_inputs)
        return prefix_shared_forward(backbone, ids, mask, shared)

    def collate(self, feats: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-pad every key (input_ids with the pad token, masks with 0) to the longest row; `pwemoe_shared`
        records the prompt prefix all rows share (`run` computes it once)."""
        n = max(len(f["input_ids"]) for f in feats)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        keys = list(dict.fromkeys(k for f in feats for k in f))  # tasks of one forward may add different masks
        out = {}
        for key in keys:
            fill = pad if key == "input_ids" else 0
            rows = [list(f.get(key, [0] * len(f["input_ids"]))) for f in feats]
            out[key] = torch.tensor([r + [fill] * (n - len(r)) for r in rows], dtype=torch.long)
        out[SHARED] = torch.full((len(feats),), shared_prefix([f["input_ids"] for f in feats]), dtype=torch.long)
        return out

    def lengths(self, task: Any, dataset: Any) -> list[int]:
        """One length per example (the longest of its rows: a multi-token choice task has one per label)."""
        f, p = task.encode(dataset[:]), task.rows_per_example
        return [max(len(x["input_ids"]) for x in f[i * p : (i + 1) * p]) for i in range(len(f) // p)]

    def plain_model(self, merge: Any) -> nn.Module:
        return merge(self.model)

    def save_export(
        self, plain: nn.Module, tasks: Sequence[Any], out: Path, adapter_rank: int | None = None
    ) -> dict[str, str]:
        """out/model: the plain *ForCausalLM for every task; out/adapter: the PEFT LoRA adapter (LoRA experts), of
        one rank `adapter_rank` for every layer when given (`export_info` then holds each layer's error)."""
        info = getattr(self.model, "pwemoe_info", None) or getattr(self.backbone, "pwemoe_info", None)
        lora = info is not None and info.expert_format == "lora"
        if adapter_rank is not None and not lora:
            raise ValueError(
                "--adapter-rank compresses the adapter of a run over LoRA experts; this run's experts are dense"
            )
        plain.save_pretrained(out / "model")
        self.tokenizer.save_pretrained(out / "model")
        self.export_info = {}
        if lora:
            from ..lora.export import save_lora_adapter

            errors: dict[str, float] = {}
            save_lora_adapter(
                self.model,
                out / "adapter",
                base_model_name_or_path=info.base_id or self.base,
                rank=adapter_rank,
                errors=errors,
            )
            if adapter_rank is not None:
                self.export_info = {"adapter": {"rank": adapter_rank, "relative_frobenius_error": errors}}
        return {t.name: str(out / "model") for t in tasks}
