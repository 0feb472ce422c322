"""A causal-LM run over three random LoRA adapters on a tiny Llama with a word-level tokenizer and a chat template:
what the generation, serving and browser tests share (seconds to build)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tests.fixtures import write_csv_splits

WORDS = ["good", "bad", "red", "blue", "film", "team", "the", "was", "very", "not", "sky", "sea", "tree", "song"]
SPECIAL = ["<pad>", "<unk>", "<eos>"]
CHAT = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} \n{% endfor %}"
    "{% if add_generation_prompt %}answer :{% endif %}"
)


def _tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS + [":", "?", "\n", "user", "system", "assistant", "answer"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    tok.chat_template = CHAT
    return tok


def _rows(n: int, rng: random.Random, words: list[str]) -> list[dict]:
    out = []
    for _ in range(n):
        y = rng.randint(0, 1)
        text = [rng.choice(WORDS[4:]) for _ in range(rng.randint(2, 5))] + [words[y]]
        out.append({"text": " ".join(text), "label": y})
    return out


@pytest.fixture(scope="session")
def llm_run(tmp_path_factory) -> Path:
    """A causal-LM run over three random LoRA adapters on a tiny Llama (2 router steps), with a chat template."""
    import peft

    from pwemoe.recipes.train import train

    root = tmp_path_factory.mktemp("gen")
    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=48,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        initializer_range=0.25,  # spread logits: greedy decoding that does not repeat one token
    )
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    tasks = []
    rng = random.Random(0)
    specs = [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
        dict(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"]),
        dict(r=3, lora_alpha=3, target_modules=["v_proj", "gate_proj"]),
    ]
    for i, (name, words) in enumerate(
        (("polarity", ["bad", "good"]), ("color", ["red", "blue"]), ("nature", ["sky", "sea"]))
    ):
        torch.manual_seed(100 + i)
        pm = peft.get_peft_model(
            AutoModelForCausalLM.from_pretrained(root / "base"),
            peft.LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **specs[i]),
        )
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.4)
        pm.peft_config["default"].base_model_name_or_path = str(root / "base")
        pm.save_pretrained(root / "experts" / name)
        data = write_csv_splits(root, name, {"train": _rows(48, rng, words), "test": _rows(8, rng, words)})
        tasks.append(
            {
                "name": name,
                "type": "causal_lm_choice",
                "expert": str(root / "experts" / name),
                "max_length": 8,
                "prompt_template": "{text} answer :",
                "label_words": [" " + w for w in words],
                "chat_template": False,
                "data": data,
            }
        )
    config = {
        # routers start at lambda(r) = k c r (c = 0.5): each vertex is one adapter at 1.5, so preferences matter
        "model": {"base": str(root / "base"), "init_lambda": 0.5, "router_init": "preference"},
        "tasks": tasks,
        "train": {"steps": 2, "lr": 0.5, "batch_size": 6, "save_interval": 2, "log_interval": 1, "seed": 0},
        "eval": {"batch_size": 8, "grid": 2, "ta_scales": [], "bootstrap_resamples": 0},
        "run_dir": str(root / "run"),
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    train(root / "config.yaml")
    return root / "run"
