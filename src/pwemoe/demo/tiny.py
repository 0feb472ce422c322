"""A built-in example on tiny random models: upcycle, route, export, reload. Runs in seconds."""

from __future__ import annotations

import copy
import tempfile

import torch


def run() -> dict[str, float]:
    from transformers import AutoModel, BertConfig, BertModel

    import pwemoe

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=200)
    base = BertModel(cfg).eval()
    experts = {}
    for i, task in enumerate(["sentiment", "topic", "tweets"]):
        e = copy.deepcopy(base)
        with torch.no_grad():
            for p in e.parameters():
                p.add_(torch.randn_like(p) * 0.02 * (i + 1))
        experts[task] = e
    model = pwemoe.upcycle(base, experts, init_lambda=0.3)
    n_router = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"upcycled {len(list(pwemoe.ensembling_modules(model)))} modules; {n_router} trainable router parameters")
    x = torch.randint(0, 200, (2, 12))
    r = [0.6, 0.3, 0.1]
    with pwemoe.preference(model, r), torch.no_grad():
        want = model(input_ids=x).last_hidden_state
    plain = pwemoe.merge_and_unload(model, r)
    with tempfile.TemporaryDirectory() as d:
        plain.save_pretrained(d)
        reloaded = AutoModel.from_pretrained(d).eval()
        with torch.no_grad():
            got = reloaded(input_ids=x).last_hidden_state
    err = (got - want).abs().max().item()
    print(f"exported preference {r} -> plain {type(reloaded).__name__}; max |export - upcycled| = {err:.2e}")
    return {"max_abs_err": err, "router_params": float(n_router)}
