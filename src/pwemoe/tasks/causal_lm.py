"""Causal-LM tasks: label words scored by log-likelihood (`causal_lm_choice`) and next-token loss (`causal_lm`).

Both run on the decoder's hidden states and apply the shared LM head only at the positions that
predict the tokens they score. Experts are PEFT LoRA adapters on the base (never densified) or
fine-tuned *ForCausalLM checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import string
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from ..config import LMEvalConfig, TaskConfig
from ..modalities.causal_lm import LABEL
from .base import Finetuning, Task, max_positions

log = logging.getLogger(__name__)


class CausalLMConfig(TaskConfig):
    """A causal-LM task's options."""

    chat_template: bool | None = Field(
        None, description="wrap the prompt in the tokenizer's chat template (default: if it has one)"
    )
    lm_eval: LMEvalConfig | None = Field(None, description="score the test split with an lm-eval task instead")


class CausalLMChoiceConfig(CausalLMConfig):
    """A causal-LM choice task's options: the prompt and each class's answer."""

    prompt_template: str | None = Field(
        None, description="the prompt, with {text} (and {text_pair}), e.g. 'Review: {text}\\nSentiment:'"
    )
    label_words: list[str] | None = Field(
        None, description="each class's answer, e.g. [' negative', ' positive'] (default: ' ' + name)"
    )

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(v) if f is not None]
        except ValueError as e:  # a lone '{' or '}'
            raise ValueError(f"{e} in {v!r}; write a literal brace as {{{{ or }}}}") from None
        bad = [f for f, spec, conv in fields if f not in ("text", "text_pair") or spec or conv]
        if bad or "text" not in [f for f, _, _ in fields]:
            raise ValueError(
                f"must hold {{text}} (and may hold {{text_pair}}), with no other fields or format specs, got {v!r}"
            )
        return v

    @model_validator(mode="after")
    def _pair(self) -> CausalLMChoiceConfig:
        if self.prompt_template and "{text_pair}" in self.prompt_template and not self.data.text_pair_column:
            raise ValueError("prompt_template uses {text_pair} but data.text_pair_column is not set; set it")
        return self


def load_causal_expert(path: str, task: str) -> Any:
    """A LoRA adapter folder (read, never densified) or a *ForCausalLM checkpoint's decoder."""
    from ..lora.adapter import is_lora_adapter, read_lora_adapter

    if is_lora_adapter(path):
        return read_lora_adapter(path, f"task {task!r} expert")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval().base_model


# Per token: 1 where the token is a training (or scoring) target, predicted from the token before it.
SCORED = "pwemoe_scored"


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token that the tokenizer's chat template puts right after an assistant's message (ChatML's
    `<|im_end|>`, Llama 3's `<|eot_id|>`, Gemma's `<end_of_turn>`), or None: no template, a template that fails on
    a user + assistant exchange, or one that ends a turn with plain text (a newline)."""
    mark = "PWEMOE_ANSWER_MARK"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "?"}, {"role": "assistant", "content": mark}], tokenize=False
        )
    except Exception:  # noqa: BLE001  (a template may raise anything from its own jinja code)
        return None
    if not isinstance(text, str) or mark not in text:
        return None
    ids = tokenizer(text.split(mark, 1)[1], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)
    }
    return ids[0] if ids and ids[0] in special else None


def _last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last attended token (right padding): LongTensor[n]."""
    return (torch.arange(mask.shape[1], device=mask.device) * mask).argmax(-1)


def _learned_position_limit(model: nn.Module | None) -> int | None:
    """The positions of a model with a learned position table (GPT-2's wpe, OPT's), beyond which a
    forward fails with an index error; None for rotary models (Llama), which have no such table."""
    n = max_positions(model)
    if n is None:
        return None
    tokens = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tables = (
        m for m in model.modules() if isinstance(m, nn.Embedding) and m is not tokens and m.num_embeddings in (n, n + 2)
    )
    return n if next(tables, None) is not None else None


class _CausalTask(Task):
    modality = "causal_lm"
    config_class: type[TaskConfig] = CausalLMConfig

    def __init__(self, cfg: CausalLMConfig) -> None:
        super().__init__(cfg)
        self.tokenizer: Any = None
        self.lm_head: nn.Module | None = None
        self.use_chat = False
        self.position_limit: int | None = None  # see _learned_position_limit

    def load_expert_backbone(self, path: str) -> Any:
        return load_causal_expert(path, self.name)

    def attach(self, modality: Any) -> None:
        self.tokenizer = modality.tokenizer
        self.lm_head = modality.lm_head
        self.position_limit = _learned_position_limit(getattr(modality, "model", None))
        self.check_max_length(self.position_limit)
        self.use_chat = self._chat(modality)

    def _chat(self, modality: Any) -> bool:
        """Whether prompts go through the tokenizer's chat template; a ValueError when asked for and absent."""
        has_chat = getattr(modality.tokenizer, "chat_template", None) is not None
        want = self.cfg.chat_template
        if want and not has_chat:
            raise ValueError(
                f"task {self.name!r}: chat_template is true but the tokenizer of {modality.base} has none; "
                "set chat_template: false"
            )
        return has_chat if want is None else bool(want)

    def check_before_load(self, modality: Any, errors: list[str], index: int) -> None:
        """With the tokenizer and the model's config, before the weights load: the label words (choice tasks)
        and the longest example against the model's positions: an error where they are a learned table (GPT-2:
        an index error past it), a warning where they are rotary (it runs; quality beyond them is unknown)."""
        self.tokenizer = modality.tokenizer
        if self.has_labels and not self.class_names:  # no expert names them: the data's ClassLabel, as later
            col = self.cfg.data.label_column
            found = (
                getattr(ds.features.get(col), "names", None)
                for ds in (self.train_data, self.test_data)
                if ds is not None
            )
            self.class_names = list(next((n for n in found if n), []))
            if not self.class_names:
                return  # the data checks say that class_names are required
        try:
            self.use_chat = self._chat(modality)
            self._check_labels(modality)
        except ValueError as e:
            errors.append(f"tasks[{index}]: {e}")
            return
        errors.extend(f"tasks[{index}].label_words: {e}" for e in self._label_data_problems())
        shell = modality.shell() if hasattr(modality, "shell") else None
        learned, declared = _learned_position_limit(shell), max_positions(shell)
        longest, parts, per_token = self._longest()
        limit = learned if learned is not None else declared
        if limit is None or longest <= limit:
            return
        fit = (limit - (longest - per_token * self.cfg.max_length)) // per_token
        fix = f"set tasks[{index}].max_length <= {fit}" if fit >= 1 else "shorten the prompt template"
        what = (
            f"task {self.name!r}: an example can take {longest} tokens ({parts}), beyond the model's {limit} positions"
        )
        if learned is not None:
            errors.append(f"tasks[{index}].max_length: {what} (a learned position table: longer inputs fail); {fix}")
        else:
            log.warning("%s (rotary: it runs, but quality past %d tokens is not known); %s", what, limit, fix)

    def _check_labels(self, modality: Any) -> None:
        """Raise a ValueError when the label words cannot be used with this tokenizer (choice tasks)."""

    def _label_data_problems(self) -> list[str]:
        """What contradicts the data in the label words (choice tasks)."""
        return []

    def _fixed_tokens(self, template: str) -> int:
        """Tokens a prompt takes besides its texts: the template's own text and the chat template's turn."""
        return len(self._prompt_ids([template.format(text="", text_pair="")])[0])

    def _longest(self) -> tuple[int, str, int]:
        """(the most tokens one example's row can take, how they add up, how many times max_length counts in it)."""
        n = self.cfg.max_length
        if not getattr(self.cfg.data, "prompt_column", None):
            return n, f"max_length {n}", 1
        fixed, eos = self._fixed_tokens("{text}"), int(self.tokenizer.eos_token_id is not None)
        return fixed + 2 * n + eos, f"{fixed} of chat template, max_length {n} for the prompt and for the text", 2

    def _fits(self, seqs: list[dict[str, list[int]]]) -> list[dict[str, list[int]]]:
        """seqs, or a clear error when one is longer than a model with learned positions has positions
        (the template, the prompt, the answer or a label's tokens come on top of the truncated text)."""
        limit = self.position_limit
        longest = max((len(x["input_ids"]) for x in seqs), default=0)
        if limit is not None and longest > limit:
            raise ValueError(
                f"task {self.name!r}: an encoded example has {longest} tokens, beyond the model's {limit} "
                f"positions (max_length {self.cfg.max_length} counts only the text); lower tasks[].max_length "
                "or shorten the prompt template"
            )
        return seqs

    def _prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of prompts, through the chat template (user turn + generation prompt) when in use."""
        if self.use_chat:
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                for p in prompts
            ]
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return self.tokenizer(prompts)["input_ids"]

    def _truncated(self, texts: list[str]) -> list[str]:
        """Each text cut to max_length tokens (the template around it is kept whole)."""
        enc = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=self.cfg.max_length)
        return [
            t if len(ids) < self.cfg.max_length else self.tokenizer.decode(ids)
            for t, ids in zip(texts, enc["input_ids"])
        ]

    def head_fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(self._provenance(), sort_keys=True).encode())
        return h.hexdigest()

    def _provenance(self) -> dict[str, Any]:
        return {"type": self.cfg.type, "chat": self.use_chat, "max_length": self.cfg.max_length}

    def export_model(self, plain: nn.Module) -> nn.Module:
        return plain  # one plain *ForCausalLM serves every task

    LORA_DEFAULTS: dict[str, Any] = {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}

    def finetuning(self, base: str, data: Any, seed: int, options: dict[str, Any]) -> Finetuning:
        """A PEFT LoRA adapter on the base (extra "llm"), trained on this task's own encode / head / loss.

        options: "lora" ({"r", "alpha", "targets"}; defaults LORA_DEFAULTS) and "base_name" (how the config
        names the base: written as the adapter's base_model_name_or_path, which upcycling checks)."""
        try:
            import peft
        except ImportError:
            raise ValueError("LoRA experts are trained with peft: pip install 'pwemoe[llm]'") from None
        from ..config import ConfigError
        from ..devices import move
        from ..lora.adapter import peft_wrapping
        from ..modalities import MODALITIES
        from ..modalities.causal_lm import HEAD_ONLY_PREFIX

        lora = {**self.LORA_DEFAULTS, **(options.get("lora") or {})}
        modality = MODALITIES[self.modality](base)
        modality.load_preprocessing()
        self.train_data = data
        if not self.class_names and self.has_labels:
            self.class_names = list(getattr(data.features[self.cfg.data.label_column], "names", None) or [])
        errors: list[str] = []
        self.validate_data(errors, 0)
        self.check_before_load(modality, errors, 0)
        if errors:
            raise ConfigError(errors)
        modality.load()
        self.attach(modality)
        torch.manual_seed(seed)
        pcfg = peft.LoraConfig(
            r=int(lora["r"]),
            lora_alpha=float(lora["alpha"]),
            target_modules=list(lora["targets"]),
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        )
        with peft_wrapping():
            model = peft.get_peft_model(modality.model, pcfg)  # LoRA layers are injected into modality.backbone too

        def loss(rows: dict[str, list], device: torch.device) -> torch.Tensor:
            inputs = move(modality.collate(self.finetune_features(rows)), device)
            outputs = modality.backbone(**{k: v for k, v in inputs.items() if not k.startswith(HEAD_ONLY_PREFIX)})
            return self.finetune_loss(outputs, inputs, rows)

        def save(out: Path) -> None:
            model.peft_config["default"].base_model_name_or_path = options.get("base_name") or base
            # the embeddings are never adapted: no need for peft to look up the base's vocabulary (on the hub,
            # for a hub id, where it warns "Could not find a config file" offline)
            model.save_pretrained(out, save_embedding_layers=False)

        return Finetuning(
            model,
            [p for p in model.parameters() if p.requires_grad],
            loss,
            save,
            weight_decay=0.0,
            description=f"finetune {self.name} (LoRA r={lora['r']})",
        )

    def finetune_features(self, rows: dict[str, list]) -> list[dict[str, list[int]]]:
        """What `pwemoe finetune` trains on: the task's own encoding (overridden where training differs)."""
        return self.encode(rows)

    def finetune_loss(self, outputs: Any, inputs: dict[str, torch.Tensor], rows: dict[str, list]) -> torch.Tensor:
        """The fine-tuning loss of a batch: the task's own head and loss."""
        return self.loss(self.head(outputs, inputs), self.labels(rows).to(inputs["input_ids"].device))

    def expert_provenance(self, options: dict[str, Any]) -> dict[str, Any]:
        """The prompt, the answers and the LoRA settings are part of what the adapter learned."""
        return {
            "task_format": {
                "type": self.cfg.type,
                "prompt_template": getattr(self.cfg, "prompt_template", None),
                "label_words": getattr(self.cfg, "label_words", None),
                "chat_template": self.cfg.chat_template,
                "lora": {**self.LORA_DEFAULTS, **(options.get("lora") or {})},
            }
        }

    def _token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(target | prefix) for hidden Tensor[m, h] and target ids LongTensor[m] -> Tensor[m] (fp32)."""
        logits = self.lm_head(hidden).float()
        return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)


class CausalLMChoiceTask(_CausalTask):
    """Classification by label words: the prediction is the label whose tokens are most likely after the prompt.

    `head` returns Tensor[n, C]: log p(label_c | prompt), summed over the label's tokens. The routers' training
    loss is the cross-entropy of the true label's tokens over the whole vocabulary (-log p(label_y | prompt)).
    Labels that are one token each take one forward per example; otherwise each example runs once per label.

    `pwemoe finetune` trains the expert on the answer and its end: -log p(label_y, end | prompt), where the end is
    the chat template's end-of-turn token when prompts go through the chat template, else the EOS token
    (`answer_end_id`). Scoring still reads only the label words; the end teaches generation to stop after them.
    """

    config_class = CausalLMChoiceConfig

    def __init__(self, cfg: CausalLMChoiceConfig) -> None:
        super().__init__(cfg)
        self.label_ids: list[list[int]] = []
        if not self.class_names and cfg.label_words:
            self.class_names = [w.strip() for w in cfg.label_words]

    @property
    def label_words(self) -> list[str]:
        return list(self.cfg.label_words or [" " + c for c in self.class_names])

    @property
    def rows_per_example(self) -> int:
        return 1 if all(len(ids) == 1 for ids in self.label_ids) else len(self.label_ids)

    def attach(self, modality: Any) -> None:
        super().attach(modality)
        self._check_labels(modality)

    def _check_labels(self, modality: Any) -> None:
        """Tokenise the label words (`label_ids`); a ValueError when one is empty, or two are the same."""
        words = self.label_words
        if self.cfg.label_words and self.class_names and len(words) != len(self.class_names):
            raise ValueError(
                f"task {self.name!r}: {len(words)} label_words for {len(self.class_names)} classes; give one per class"
            )
        if not self.class_names:
            self.class_names = [w.strip() for w in words]
        self.label_ids = [modality.tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
        empty = [w for w, ids in zip(words, self.label_ids) if not ids]
        if empty:
            raise ValueError(
                f"task {self.name!r}: label word(s) {empty} tokenise to nothing with the tokenizer of "
                f"{modality.base}; give label_words with visible text, e.g. ' positive'"
            )
        if len({tuple(ids) for ids in self.label_ids}) != len(self.label_ids):
            raise ValueError(f"task {self.name!r}: two label words tokenise to the same ids: {words}")

    def _label_data_problems(self) -> list[str]:
        """Label words given without class_names stand for the classes 0..C-1: the data must have those classes
        (its ClassLabel names, or else the labels of its training split), or a word can be predicted and never
        be right."""
        if not self.cfg.label_words or self.cfg.class_names:
            return []
        words, col = self.label_words, self.cfg.data.label_column
        for ds in (self.train_data, self.test_data):
            names = getattr(getattr(ds, "features", {}).get(col), "names", None) if ds is not None else None
            if names and len(names) != len(words):
                return [
                    f"task {self.name!r}: {len(words)} label_words for the {len(names)} classes of its data "
                    f"({names}); give one label word per class, in that order"
                ]
            if names:  # the data declares its classes: a slice that lacks one is no contradiction
                return []
        if self.train_data is None or col not in self.train_data.column_names:
            return []
        present = {v for v in self.train_data[col] if isinstance(v, int)}
        missing = [i for i in range(len(words)) if i not in present]
        if not missing:
            return []
        return [
            f"task {self.name!r}: label_words {[words[i] for i in missing]} stand for class(es) {missing}, which its "
            f"training data never has (its labels: {sorted(present)[:10]}); give one label word per class of the "
            "data, or set class_names to list every class if the data only lacks some"
        ]

    def _longest(self) -> tuple[int, str, int]:
        n = self.cfg.max_length
        tpl = self.cfg.prompt_template or "{text}"
        fields = sum(f is not None for _, f, _, _ in string.Formatter().parse(tpl))  # each text up to max_length
        fixed = self._fixed_tokens(tpl)
        label = max((len(ids) for ids in self.label_ids), default=0) if self.rows_per_example > 1 else 0
        parts = f"{fixed} of prompt template{' and chat template' if self.use_chat else ''}, " + (
            f"max_length {n}" if fields == 1 else f"{fields} x max_length {n}"
        )
        return fixed + fields * n + label, parts + (f", {label} of the longest label" if label else ""), fields

    def _provenance(self) -> dict[str, Any]:
        return super()._provenance() | {"template": self.cfg.prompt_template, "labels": self.label_ids}

    def prompts(self, rows: dict[str, list]) -> list[str]:
        d = self.cfg.data
        texts = self._truncated([str(t) for t in rows[d.text_column]])
        pairs = self._truncated([str(t) for t in rows[d.text_pair_column]]) if d.text_pair_column else None
        tpl = self.cfg.prompt_template or "{text}"
        return [tpl.format(text=t, text_pair=pairs[i] if pairs else "") for i, t in enumerate(texts)]

    def _encoded_prompts(self, rows: dict[str, list]) -> list[list[int]]:
        prompts = self._prompt_ids(self.prompts(rows))
        empty = sum(not ids for ids in prompts)
        if empty:  # the answer is scored from the position before it: there must be one
            raise ValueError(
                f"task {self.name!r}: {empty} prompt(s) encode to no tokens; give a prompt_template with visible "
                "text around {text}, or drop the examples whose text the tokenizer drops"
            )
        return prompts

    def encode(self, rows: dict[str, list]) -> list[dict[str, list[int]]]:
        out = []
        per = self.rows_per_example
        prompts = self._encoded_prompts(rows)
        for ids in prompts:
            if per == 1:
                out.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
                continue
            for lab in self.label_ids:  # the label tokens marked: evaluation computes the prompt once for all C
                seq = ids + lab
                out.append({"input_ids": seq, "attention_mask": [1] * len(seq), LABEL: [0] * len(ids) + [1] * len(lab)})
        return self._fits(out)

    def head(self, outputs: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden, mask = outputs.last_hidden_state, inputs["attention_mask"]
        last = _last_index(mask)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if self.rows_per_example == 1:  # one token per label: one softmax at the last prompt position
            logp = torch.log_softmax(self.lm_head(hidden[rows, last]).float(), -1)
            return logp[:, [ids[0] for ids in self.label_ids]]
        C = len(self.label_ids)
        scores = []
        for j in range(hidden.shape[0]):  # row j scores label j % C; its tokens end the sequence
            ids = torch.tensor(self.label_ids[j % C], device=hidden.device)
            pos = last[j] - len(ids) + torch.arange(len(ids), device=hidden.device)
            scores.append(self._token_logprobs(hidden[j, pos], ids).sum())
        return torch.stack(scores).view(-1, C)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        nll = -logits.gather(-1, labels.to(logits.device)[:, None]).squeeze(-1)
        return nll.sum() if reduction == "sum" else nll.mean() if reduction == "mean" else nll

    def answer_end_id(self) -> int | None:
        """The token that ends an answer: the chat template's end-of-turn token when prompts go through the chat
        template (and it ends turns with a special token), else the tokenizer's EOS; None if it has neither."""
        end = end_of_turn_id(self.tokenizer) if self.use_chat else None
        return end if end is not None else self.tokenizer.eos_token_id

    def finetune_features(self, rows: dict[str, list]) -> list[dict[str, list[int]]]:
        """One row per example: prompt + the true label's tokens + the end of the answer, the answer and its end
        marked as targets (`SCORED`)."""
        end = self.answer_end_id()
        tail = [end] if end is not None else []
        out = []
        for ids, y in zip(self._encoded_prompts(rows), self.labels(rows).tolist()):
            answer = self.label_ids[y] + tail
            seq = ids + answer
            out.append({"input_ids": seq, "attention_mask": [1] * len(seq), SCORED: [0] * len(ids) + [1] * len(answer)})
        return self._fits(out)

    def finetune_loss(self, outputs: Any, inputs: dict[str, torch.Tensor], rows: dict[str, list]) -> torch.Tensor:
        """-log p(label_y, end | prompt), averaged over the batch: the label's tokens and the end, summed per
        example (the label part is the routers' loss; the end is what makes generation stop)."""
        hidden, ids = outputs.last_hidden_state, inputs["input_ids"]
        pos = inputs[SCORED][:, 1:].bool().nonzero()  # token t+1 is predicted from position t
        lp = self._token_logprobs(hidden[pos[:, 0], pos[:, 1]], ids[pos[:, 0], pos[:, 1] + 1])
        return -lp.sum() / ids.shape[0]

    def expert_provenance(self, options: dict[str, Any]) -> dict[str, Any]:
        out = super().expert_provenance(options)
        out["task_format"]["trained_answer"] = "label tokens + end of answer"  # experts of label tokens only differ
        return out


class CausalLMTask(_CausalTask):
    """Next-token loss on a text column (after a prompt column through the chat template, when given).

    `head` returns Tensor[n, 1]: each example's mean next-token loss over its scored tokens (all of the
    text, or only the response after a prompt). The metric is that loss: lower is better.
    """

    metric = "loss"
    higher_is_better = False
    has_labels = False

    def encode(self, rows: dict[str, list]) -> list[dict[str, list[int]]]:
        d = self.cfg.data
        texts = [str(t) for t in rows[d.text_column]]
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        if d.prompt_column:
            prompts = self._prompt_ids(self._truncated([str(p) for p in rows[d.prompt_column]]))
            answers = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=self.cfg.max_length)
            out = []
            for p, a in zip(prompts, answers["input_ids"]):
                seq = p + a + eos
                out.append(
                    {
                        "input_ids": seq,
                        "attention_mask": [1] * len(seq),
                        "pwemoe_scored": [0] * len(p) + [1] * (len(a) + len(eos)),
                    }
                )
            return self._fits(out)
        enc = self.tokenizer(texts, truncation=True, max_length=self.cfg.max_length)
        short = sum(len(ids) < 2 for ids in enc["input_ids"])
        if short:  # the first token is never predicted: a loss needs a second one
            raise ValueError(
                f"task {self.name!r}: {short} text(s) encode to fewer than 2 tokens, which leaves no token to "
                "predict; drop them, or raise tasks[].max_length if it cut them"
            )
        return self._fits(
            [
                {"input_ids": ids, "attention_mask": [1] * len(ids), "pwemoe_scored": [0] + [1] * (len(ids) - 1)}
                for ids in enc["input_ids"]
            ]
        )

    def input_columns(self) -> list[str]:
        d = self.cfg.data
        return ([d.prompt_column] if d.prompt_column else []) + [d.text_column]  # (prompt, response) pairs

    def labels(self, rows: dict[str, list]) -> torch.Tensor:
        return torch.zeros(len(rows[self.cfg.data.text_column]), dtype=torch.long)  # no labels: the text is the target

    def head(self, outputs: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden, ids = outputs.last_hidden_state, inputs["input_ids"]
        scored = inputs["pwemoe_scored"][:, 1:].bool()  # token t+1 is predicted from position t
        n = ids.shape[0]
        pos = scored.nonzero()
        lp = self._token_logprobs(hidden[pos[:, 0], pos[:, 1]], ids[pos[:, 0], pos[:, 1] + 1])
        total = torch.zeros(n, device=hidden.device).index_add(0, pos[:, 0], -lp)
        count = scored.sum(1).clamp(min=1)
        return (total / count)[:, None]

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        per = logits[:, 0]
        return per.sum() if reduction == "sum" else per.mean() if reduction == "mean" else per

    def example_scores(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return logits[:, 0].float()
