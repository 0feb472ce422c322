"""The serving side of per-row preferences: lambda routed once per preference, column scales kept while the batch
keeps its rows, never stale after a router or preference change, and the frozen weights cast once for bf16.

A tiny Llama with three in-memory LoRA experts (no peft needed); fp32 where outputs are compared token by token.
"""

from __future__ import annotations

import torch

import pwemoe
from pwemoe.generation import BatchDecoder, Request, SamplingParams
from pwemoe.lora import LoraAdapter, LoraLayer
from pwemoe.routing import ensembling_modules, row_preferences_table
from tests.conftest import tiny_llama

TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")


class _Tokenizer:
    """What BatchDecoder reads from a tokenizer."""

    eos_token_id = 47
    pad_token_id = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def _model() -> torch.nn.Module:
    base = tiny_llama()
    experts = {}
    for i in range(3):
        g = torch.Generator().manual_seed(20 + i)
        layers = {
            name: LoraLayer(
                torch.randn(2 + i, m.in_features, generator=g) * 0.3,
                torch.randn(m.out_features, 2 + i, generator=g) * 0.3,
                1.5,
            )
            for name, m in base.named_modules()
            if name.rsplit(".", 1)[-1] in TARGETS
        }
        experts[f"t{i}"] = LoraAdapter(f"mem_{i}", None, layers)
    model = pwemoe.upcycle(base, experts).eval()
    _perturb_routers(model, 1)
    return model


def _perturb_routers(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".router." in f".{n}":
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


def _runs(model: torch.nn.Module) -> list[int]:
    return [m.row_lambda_runs for _, m in ensembling_modules(model)]


def _reference(model: torch.nn.Module, prompt: list[int], r: torch.Tensor, n: int) -> list[int]:
    plain = pwemoe.merge_and_unload(model, r).eval()
    out = plain.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def test_rows_joining_and_leaving_after_lambda_is_cached_decode_as_plain_generate_and_route_once():
    """Requests join a running batch and leave it mid-generation; each decodes exactly the greedy tokens of its own
    merged model, and each module routes every preference once (not once per step or per batch change)."""
    torch.manual_seed(0)
    model = _model()
    dec = BatchDecoder(model, _Tokenizer(), torch.device("cpu"), "fp32")
    prefs = [torch.tensor(p) for p in ([0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.2, 0.5, 0.3])]
    prompts = [[5, 9, 3, 7], [11, 4], [8, 8, 2, 6, 1]]
    lengths = [9, 3, 6]  # the second leaves early; the third joins after three steps
    greedy = [SamplingParams(max_new_tokens=n, temperature=0) for n in lengths]
    reqs = [Request(p, r, sp, lambda kind, payload: None) for p, r, sp in zip(prompts, prefs, greedy)]
    base = _runs(model)
    dec.join(reqs[:2])
    for _ in range(3):
        dec.step()
        dec.drop_finished()
    dec.join([reqs[2], Request([3, 1], prefs[0].clone(), greedy[0], lambda kind, payload: None)])  # r0 again
    while dec.rows:
        dec.step()
        dec.drop_finished()
    for req, prompt, r, n in zip(reqs, prompts, prefs, lengths):
        assert req.tokens == _reference(model, prompt, r, n)[: len(req.tokens)]
        assert len(req.tokens) == n or req.finish_reason == "stop"
    # three distinct preferences in all: each module routed each one once, over a dozen steps and four batch changes
    assert [a - b for a, b in zip(_runs(model), base)] == [3] * len(base)


def test_a_changed_router_or_preference_never_reuses_a_stale_scale():
    """The same row table set again after the routers change (a router file loaded) gives the new routers' lambda;
    a new preference is routed on its own, never given a cached neighbour's lambda."""
    torch.manual_seed(0)
    model = _model()
    ids = torch.tensor([[5, 9, 3, 7], [11, 4, 2, 2]])
    R = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    table = row_preferences_table(model, R)

    def mixed() -> torch.Tensor:
        with torch.no_grad(), pwemoe.row_preferences(model, table):
            return model(input_ids=ids).logits

    def alone() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([pwemoe.merge_and_unload(model, R[b])(input_ids=ids[b : b + 1]).logits for b in range(2)])

    before = mixed()
    torch.testing.assert_close(before, alone(), rtol=1e-5, atol=1e-5)
    runs = _runs(model)
    state = pwemoe.router_state_dict(model)
    g = torch.Generator().manual_seed(3)
    pwemoe.load_router_state_dict(model, {k: v + torch.randn(v.shape, generator=g) for k, v in state.items()})
    after = mixed()
    torch.testing.assert_close(after, alone(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after, before, atol=1e-3)  # the new routers do change the outputs
    assert [a - b for a, b in zip(_runs(model), runs)] == [2] * len(runs)
    near = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.15, 0.75]])  # one row moved: only it is routed
    with torch.no_grad(), pwemoe.row_preferences(model, near):
        moved = model(input_ids=ids).logits
    torch.testing.assert_close(moved[:1], after[:1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(moved[1:], after[1:], atol=1e-3)
    assert [a - b for a, b in zip(_runs(model), runs)] == [3] * len(runs)


def test_serving_weights_in_bf16_give_the_bits_autocast_gives():
    """The decoder's copy of the frozen linear weights in bf16 computes what autocast computes from fp32 weights,
    and the model's own weights stay fp32 outside its forwards (merges read them)."""
    from pwemoe.devices import autocast
    from pwemoe.generation.weights import serving_weights

    torch.manual_seed(0)
    model = _model()
    ids = torch.tensor([[5, 9, 3, 7], [11, 4, 2, 2]])
    R = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    weights = serving_weights(model, torch.bfloat16)
    assert serving_weights(model, torch.bfloat16) is weights  # one copy per model, shared by decoder and scorer
    with torch.no_grad(), pwemoe.row_preferences(model, R), autocast(torch.device("cpu"), "bf16"):
        plain = model(input_ids=ids).logits
        with weights.swapped():
            swapped = model(input_ids=ids).logits
    assert torch.equal(plain, swapped)
    dtypes = {p.dtype for n, p in model.named_parameters()}
    assert dtypes == {torch.float32}


def test_fused_bf16_serving_layers_stay_close_to_the_fp32_merged_models():
    """In bf16 the factored layers serve rows from one fused copy [W_0; A] (one matmul, then one addmm): the logits
    stay within bf16 rounding of each row's fp32 merged model, and a batch of the wrong size is refused."""
    import pytest

    from pwemoe.devices import autocast

    torch.manual_seed(0)
    model = _model()
    ids = torch.tensor([[5, 9, 3, 7], [11, 4, 2, 2]])
    R = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    assert all(m.fused_layers(torch.bfloat16) for _, m in ensembling_modules(model))
    with torch.no_grad(), pwemoe.row_preferences(model, R), autocast(torch.device("cpu"), "bf16"):
        mixed = model(input_ids=ids).logits.float()
    with torch.no_grad():
        alone = torch.cat([pwemoe.merge_and_unload(model, R[b])(input_ids=ids[b : b + 1]).logits for b in range(2)])
    scale = float(alone.abs().max())
    torch.testing.assert_close(mixed, alone, rtol=0, atol=0.05 * scale)
    with torch.no_grad():  # row 1 at row 0's preference: beyond that tolerance, so the rows' preferences do matter
        other = pwemoe.merge_and_unload(model, R[0])(input_ids=ids[1:]).logits[0]
    assert not torch.allclose(other, alone[1], atol=0.05 * scale)
    with pytest.raises(ValueError, match="set them again for this batch"):
        with torch.no_grad(), pwemoe.row_preferences(model, R), autocast(torch.device("cpu"), "bf16"):
            model(input_ids=ids[:1])


def test_a_model_that_served_rows_still_pickles_and_copies():
    """The row state a module keeps for serving (closures, cast factors) is left out of pickles and deep copies."""
    import copy
    import pickle

    torch.manual_seed(0)
    model = _model()
    ids = torch.tensor([[5, 9, 3, 7], [11, 4, 2, 2]])
    table = row_preferences_table(model, torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.1, 0.8]]))
    with torch.no_grad(), pwemoe.row_preferences(model, table):
        want = model(input_ids=ids).logits
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert all("_row_state" not in m.__dict__ for _, m in ensembling_modules(clone))
        with torch.no_grad(), pwemoe.row_preferences(clone, table):
            torch.testing.assert_close(clone(input_ids=ids).logits, want, rtol=1e-6, atol=1e-6)
