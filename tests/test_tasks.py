import copy

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

from pwemoe.tasks.data import TaskStream
from pwemoe.tasks.sequence_classification import HEADS, split_task_model


def _bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(
        BertConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=101,
            num_labels=3,
        )
    ).eval()


def _gpt2():
    torch.manual_seed(0)
    return GPT2ForSequenceClassification(
        GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=4,
            vocab_size=101,
            n_positions=64,
            num_labels=3,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=0,
        )
    ).eval()


@pytest.mark.parametrize("build", [_bert, _gpt2])
def test_head_rules_match_hf_task_model_forward(build):
    model = build()
    ids = torch.randint(1, 101, (3, 9))
    mask = torch.ones_like(ids)
    ids[1, 6:], mask[1, 6:] = 0, 0  # right padding with the pad id
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        shell, backbone = split_task_model(copy.deepcopy(model))
        out = backbone(input_ids=ids, attention_mask=mask)
        got = HEADS[model.config.model_type](shell, out, mask)
    assert torch.allclose(got, want, atol=1e-6)
    assert not any(p.requires_grad for p in shell.parameters())


def test_task_stream_reshuffles_each_epoch_and_resumes_exactly():
    s = TaskStream(10, 4, seed=3)
    epoch0 = s.next_indices() + s.next_indices() + s.next_indices()[:2]
    assert sorted(epoch0) == list(range(10))  # every example once per epoch
    s2 = TaskStream(10, 4, seed=3)
    for _ in range(3):
        s2.next_indices()
    state = s2.state_dict()
    assert state == {"epoch": 1, "pos": 2}
    nxt = [s2.next_indices() for _ in range(4)]
    s3 = TaskStream(10, 4, seed=3)
    s3.load_state_dict(state)
    assert [s3.next_indices() for _ in range(4)] == nxt
    e0 = TaskStream(10, 10, seed=3).next_indices()
    t = TaskStream(10, 10, seed=3)
    t.next_indices()
    assert t.next_indices() != e0  # a new permutation in the next epoch
