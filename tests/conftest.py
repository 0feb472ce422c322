"""Tiny random models built from configs (milliseconds each) and experts derived from them."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    GPT2Config,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
)

torch.set_num_threads(2)

# shared fixtures of other modules: `llm_run` (a causal-LM run over LoRA experts, for generation and serving)
pytest_plugins = ["tests.llm_fixtures"]


def tiny_clip_vision() -> CLIPVisionModel:
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    return CLIPVisionModel(cfg).eval()


def tiny_gpt2() -> GPT2Model:
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2Model(cfg).eval()


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=101)
    return BertModel(cfg).eval()


def make_expert(base: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """A fake fine-tune: base + seeded Gaussian noise on every parameter."""
    g = torch.Generator().manual_seed(seed)
    e = copy.deepcopy(base)
    with torch.no_grad():
        for p in e.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return e


def model_inputs(model: torch.nn.Module, batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    mt = model.config.model_type
    if mt == "clip_vision_model":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    return {"input_ids": torch.randint(0, 101, (batch, 7), generator=g)}


BUILDERS = {"clip_vision": tiny_clip_vision, "gpt2": tiny_gpt2, "bert": tiny_bert}


@pytest.fixture(params=sorted(BUILDERS))
def arch(request) -> str:
    return request.param


@pytest.fixture
def base_and_experts(arch):
    base = BUILDERS[arch]()
    experts = {f"t{i}": make_expert(base, seed=i + 1) for i in range(3)}
    return base, experts


@pytest.fixture(scope="session")
def text_setup(tmp_path_factory):
    """A tiny BERT base, two fine-tuned experts and CSV data, built once per test session."""
    from tests.fixtures import build_text_setup

    root = tmp_path_factory.mktemp("text_setup")
    return root, build_text_setup(root)


def pytest_collection_modifyitems(config, items):
    """`cuda`-marked tests skip cleanly where there is no GPU (CI); benchmarks/gpu_check.sh runs them."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def tiny_llama(tied: bool = True) -> LlamaForCausalLM:
    """A two-layer Llama causal LM; tied: the output layer shares the input embeddings' weight."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg).eval()
