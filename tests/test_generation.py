"""Generation at any preference, per request: per-row preferences in the forward, batched decoding with requests
joining mid-generation, the OpenAI-compatible endpoints (with the official `openai` client) and adapters of one rank.

The reference for every generated token is `merge_and_unload(model, r)` with plain `transformers` generate.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import pwemoe
from tests.serving import call, running

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def served(llm_run):
    """The run's PreferenceModel (decoding batches of up to 4) and its app on a real uvicorn server."""
    from pwemoe.serve.app import create_app
    from pwemoe.serve.model import PreferenceModel

    pm = PreferenceModel(llm_run, max_batch=4, token_budget=160, max_test_samples=2)
    with running(create_app(pm)) as url:
        yield pm, url
    pm.scheduler().close()


def _reference(pm, prompt_ids: list[int], r: list[float], n: int) -> list[int]:
    """Greedy tokens of `merge_and_unload(model, r)` with plain transformers generate (no padding, alone)."""
    model = pm.wb.modality.model
    plain = pwemoe.merge_and_unload(model, r).eval()
    out = plain.generate(
        torch.tensor([prompt_ids]),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=pm.wb.modality.tokenizer.pad_token_id,
    )
    return out[0, len(prompt_ids) :].tolist()


def _wait_idle(sched, seconds: float = 20) -> None:
    """Until the scheduler holds no sequence (a finished one leaves at the end of its step); fails after `seconds`."""
    deadline = time.time() + seconds
    while (sched.stats()["running"] or sched.stats()["waiting"]) and time.time() < deadline:
        time.sleep(0.01)
    assert sched.stats()["running"] == 0 and sched.stats()["waiting"] == 0, sched.stats()


def _ids(pm, text: str) -> list[int]:
    return pm.wb.modality.tokenizer(text)["input_ids"]


def test_rows_with_their_own_preferences_equal_each_row_alone():
    """One forward of rows at different preferences equals each row at its own preference: LoRA factors, dense
    task vectors in MLP and attention (GPT-2: Conv1D with biases), and SVD-compressed ones with dense biases."""
    ids = torch.tensor([[1, 5, 9, 3, 7, 2], [3, 3, 8, 1, 0, 6], [4, 2, 2, 9, 1, 1]])
    R = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])

    def llama(seed: int) -> LlamaForCausalLM:
        torch.manual_seed(seed)
        return LlamaForCausalLM(
            LlamaConfig(
                vocab_size=16,
                hidden_size=16,
                intermediate_size=24,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=16,
            )
        ).eval()

    def gpt2(seed: int) -> GPT2LMHeadModel:
        torch.manual_seed(seed)
        return GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=16, n_positions=16)).eval()

    def experts(make, k=3):
        out = {}
        for i in range(k):
            e = make(0)
            g = torch.Generator().manual_seed(10 + i)
            with torch.no_grad():
                for p in e.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
            out[f"t{i}"] = e
        return out

    cases = {
        "dense llama": pwemoe.upcycle(llama(0), experts(llama), include_attention=True),
        "dense gpt2": pwemoe.upcycle(gpt2(0), experts(gpt2), include_attention=True),
        "svd gpt2": pwemoe.upcycle(gpt2(0), experts(gpt2), include_attention=True, task_vector_rank=4),
    }
    for name, model in cases.items():
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".router." in f".{n}":
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
            alone = []
            for b in range(len(R)):
                pwemoe.set_preference(model, R[b])
                alone.append(model(input_ids=ids[b : b + 1]).logits)
            with pwemoe.row_preferences(model, R):
                mixed = model(input_ids=ids).logits
            pwemoe.set_preference(model, R[0])
            plain = model(input_ids=ids).logits  # rows back to one preference: the one-preference path
        torch.testing.assert_close(mixed, torch.cat(alone), rtol=1e-5, atol=1e-5, msg=name)
        assert not torch.allclose(alone[0], alone[1][:, :], atol=1e-3), name  # the preferences do differ
        # after the block every row runs at the one preference again (row 1 then differs from its own preference)
        torch.testing.assert_close(plain[0], alone[0][0], rtol=1e-5, atol=1e-5, msg=name)
        assert not torch.allclose(plain[1], alone[1][0], atol=1e-3), name
    with pytest.raises(ValueError, match="row 1: preference must be non-negative"):
        pwemoe.set_row_preferences(cases["dense llama"], [[1, 1, 1], [1, -1, 1]])
    with pytest.raises(ValueError, match="set them again for this batch"):
        with pwemoe.row_preferences(cases["dense llama"], R[:2]), torch.no_grad():
            cases["dense llama"](input_ids=ids)


def test_mixed_preferences_padding_and_joins_are_token_identical_to_plain_generate(served):
    """Greedy decoding of requests at different preferences and prompt lengths, some joining while others are
    mid-generation, gives each request exactly the tokens of its own merged model generating alone."""
    pm, _ = served
    prompts = ["good film was", "the sky", "very bad team was not the", "song", "red blue sea tree film", "not"]
    prefs = [[0.2, 0.3, 0.5], [1, 0, 0], [0, 0.5, 0.5], [0.1, 0.1, 0.8], [1, 0, 0], [0.6, 0.2, 0.2]]
    sched = pm.scheduler()
    from pwemoe.generation import SamplingParams

    params = SamplingParams(max_new_tokens=10, temperature=0)
    handles = [pm.submit(p, r, params) for p, r in zip(prompts[:3], prefs[:3])]
    start = sched.steps
    deadline = time.time() + 30
    while sched.steps < start + 3 and time.time() < deadline:  # the first three are decoding
        time.sleep(0.005)
    handles += [pm.submit(p, r, params) for p, r in zip(prompts[3:], prefs[3:])]  # join mid-generation
    outs = [h.result() for h in handles]
    _wait_idle(sched)
    distinct = set()
    for p, r, h, out in zip(prompts, prefs, handles, outs):
        ids = _ids(pm, p)
        want = _reference(pm, ids, r, 10)
        got = h.seq.tokens + ([pm.wb.modality.tokenizer.eos_token_id] if out["finish_reason"] == "stop" else [])
        assert got == want[: len(got)] and (out["finish_reason"] == "stop" or len(got) == 10), (p, r, got, want)
        assert out["usage"] == {
            "prompt_tokens": len(ids),
            "completion_tokens": len(h.seq.tokens),
            "total_tokens": len(ids) + len(h.seq.tokens),
        }
        distinct.add(tuple(got))
    assert len(distinct) >= 4  # the preferences give different continuations: the check has teeth


def test_batches_at_one_preference_decode_on_a_merged_copy_that_never_waits_or_grows(served):
    """A decode step whose rows share one preference runs on the server's merged copy of the backbone: the same
    tokens as the merged reference, at most one copy added (to an empty cache), and with every copy held elsewhere
    the step runs on the upcycled model instead of waiting."""
    import contextlib

    from pwemoe.generation import BatchDecoder, SamplingParams

    pm, _ = served
    sched = pm.scheduler()
    _wait_idle(sched)
    n = BatchDecoder.MERGE_AFTER_TOKENS + BatchDecoder.MERGE_AFTER_STEPS + 4  # long enough for a step to merge
    params = SamplingParams(max_new_tokens=n, temperature=0)
    prompt, ids = "the film was", _ids(pm, "the film was")

    def tokens(h, out):
        return h.seq.tokens + ([pm.wb.modality.tokenizer.eos_token_id] if out["finish_reason"] == "stop" else [])

    def check(r, count):
        handles = [pm.submit(prompt, r, params) for _ in range(count)]
        outs = [h.result() for h in handles]
        _wait_idle(sched)
        want = _reference(pm, ids, r, n)
        for h, out in zip(handles, outs):
            got = tokens(h, out)
            assert got == want[: len(got)] and (out["finish_reason"] == "stop" or len(got) == n), (r, got, want)

    for r, count in (([0.25, 0.25, 0.5], 1), ([0.5, 0.3, 0.2], 2)):  # one request; two that agree
        before, held = sched.stats()["plain_forwards"], pm.cache.stats()["held"]
        check(r, count)
        assert sched.stats()["plain_forwards"] > before, r
        assert pm.cache.stats()["held"] == max(held, 1), pm.cache.stats()
    with contextlib.ExitStack() as stack:  # every copy in use by other callers
        for i in range(pm.cache.size):
            stack.enter_context(pm.cache.lease(tuple(pm.preference([1.0, 1.0 + i, 3.0]))))
        before, declined = sched.stats()["plain_forwards"], pm.cache.stats()["declined"]
        errors: list[BaseException] = []

        def check_alone():
            try:
                check([0.6, 0.2, 0.2], 1)
            except BaseException as e:  # noqa: BLE001 - reported by the test's own thread
                errors.append(e)

        done = threading.Thread(target=check_alone)
        done.start()
        done.join(60)
        assert not done.is_alive(), "decoding waited for a merged copy"
        assert not errors, errors
        assert sched.stats()["plain_forwards"] == before and pm.cache.stats()["declined"] > declined


def test_without_merged_decoding_every_step_runs_on_the_upcycled_model(llm_run):
    from pwemoe.generation import BatchDecoder, SamplingParams
    from pwemoe.serve.model import PreferenceModel

    pm = PreferenceModel(llm_run, max_test_samples=2, merged_decoding=False)
    n = BatchDecoder.MERGE_AFTER_TOKENS + BatchDecoder.MERGE_AFTER_STEPS + 4
    h = pm.submit("the film was", [0.25, 0.25, 0.5], SamplingParams(max_new_tokens=n, temperature=0))
    out = h.result()
    sched = pm.scheduler()
    _wait_idle(sched)
    assert sched.stats()["plain_forwards"] == 0 and pm.cache.stats()["held"] == 0
    got = h.seq.tokens + ([pm.wb.modality.tokenizer.eos_token_id] if out["finish_reason"] == "stop" else [])
    want = _reference(pm, _ids(pm, "the film was"), [0.25, 0.25, 0.5], n)
    assert got == want[: len(got)] and (out["finish_reason"] == "stop" or len(got) == n)
    sched.close()


def test_the_output_layer_cast_once_gives_the_same_bf16_logits(served):
    """The decoder keeps the output layer in the autocast dtype (cast once, not at every step): the same logits, bit
    for bit, as the model's own fp32 layer under bf16 autocast, on the upcycled model and on a merged copy."""
    from transformers import DynamicCache

    from pwemoe.generation import BatchDecoder, _one_preference

    pm, _ = served
    model, tok = pm.wb.modality.model, pm.wb.modality.tokenizer
    head, backbone = model.get_output_embeddings(), model.base_model
    ids = torch.tensor([_ids(pm, "the film was good"), _ids(pm, "a red sea tree")])
    mask = torch.ones_like(ids)
    prefs = [torch.tensor([0.2, 0.3, 0.5]), torch.tensor([0.6, 0.2, 0.2])]
    with pm._lock:
        cast = BatchDecoder(model, tok, pm.wb.device, "bf16", merged=pm._merged_for_decoding)
        own = BatchDecoder(model, tok, pm.wb.device, "bf16", merged=pm._merged_for_decoding)
        own._head = None
        assert cast._head is not None and cast._head.weight.dtype == torch.bfloat16
        for rows in (prefs, [prefs[0], prefs[0]]):  # two preferences (upcycled); one (a merged copy if cached)
            one = _one_preference(rows)
            a = cast._forward(ids, mask, DynamicCache(config=model.config), rows, one, may_merge=True)
            b = own._forward(ids, mask, DynamicCache(config=model.config), rows, one, may_merge=True)
            assert torch.equal(a, b)
    assert cast.plain_forwards == own.plain_forwards == 1
    assert model.get_output_embeddings() is head and model.base_model is backbone  # the model's own layers are back


def test_generate_api_and_sampling(served):
    pm, _ = served
    one = pm.generate("the good film", [0.5, 0.25, 0.25], max_new_tokens=6)
    assert set(one) >= {"text", "finish_reason", "usage", "preference"} and one["preference"] == [0.5, 0.25, 0.25]
    many = pm.generate(
        ["the good film", [{"role": "user", "content": "red sky"}]], [[1, 0, 0], [0, 0, 1]], max_new_tokens=6
    )
    assert len(many) == 2 and many[1]["preference"] == [0.0, 0.0, 1.0]
    # sampling with a seed is reproducible whatever else runs beside it
    a = pm.generate("the sea", [0.3, 0.3, 0.4], max_new_tokens=8, temperature=1.5, top_p=0.9, seed=7)
    b = pm.generate(["not good", "the sea"], [0.3, 0.3, 0.4], max_new_tokens=8, temperature=1.5, top_p=0.9, seed=7)
    assert a["text"] == b[1]["text"]
    # a stop string ends the text before it
    full = pm.generate("the good film", [0.5, 0.25, 0.25], max_new_tokens=8)["text"]
    word = full.split()[2]
    cut = pm.generate("the good film", [0.5, 0.25, 0.25], max_new_tokens=8, stop=[word])
    assert cut["finish_reason"] == "stop" and cut["text"] == full[: full.find(word)]
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0; top_p"):
        pm.generate("the", max_new_tokens=0, top_p=2)


def test_generation_needs_a_causal_lm_run(text_setup, tmp_path):
    from pwemoe.recipes.train import train
    from pwemoe.serve.model import PreferenceModel

    _, base_cfg = text_setup
    cfg = {**base_cfg, "run_dir": str(tmp_path / "run"), "train": {**base_cfg["train"], "steps": 1}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    pm = PreferenceModel(train(tmp_path / "c.yaml", []), max_test_samples=2)
    with pytest.raises(ValueError, match="generation needs a causal-LM run .* sequence_classification tasks"):
        pm.generate("hello")


def test_openai_client_chat_and_completions_streamed_and_not(served):
    openai = pytest.importorskip("openai")
    pm, url = served
    name = pm.run.resolve().name
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [name]
    messages = [{"role": "user", "content": "good red film ?"}]
    chat = client.chat.completions.create(
        model=name, messages=messages, max_tokens=8, temperature=0, extra_body={"preference": [0.6, 0.2, 0.2]}
    )
    text = chat.choices[0].message.content
    ids = pm.wb.modality.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want = pm.wb.modality.tokenizer.decode(
        _reference(pm, pm.wb.modality.tokenizer(ids, add_special_tokens=False)["input_ids"], [0.6, 0.2, 0.2], 8),
        skip_special_tokens=True,
    )
    assert text == want and chat.usage.completion_tokens >= 1 and chat.choices[0].finish_reason in ("stop", "length")
    # the preference in the model name: the same answer
    by_name = client.chat.completions.create(
        model=f"{name}@0.6,0.2,0.2", messages=messages, max_tokens=8, temperature=0
    )
    assert by_name.choices[0].message.content == text
    stream = client.chat.completions.create(
        model=f"{name}@3,1,1",
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    # completions: a plain prompt
    comp = client.completions.create(
        model=name, prompt="the blue sea", max_tokens=6, temperature=0, extra_body={"preference": [0, 1, 0]}
    )
    streamed = client.completions.create(
        model=name,
        prompt="the blue sea",
        max_tokens=6,
        temperature=0,
        stream=True,
        extra_body={"preference": [0, 1, 0]},
    )
    assert "".join(c.choices[0].text for c in streamed) == comp.choices[0].text
    ref = _reference(pm, _ids(pm, "the blue sea"), [0, 1, 0], 6)
    assert comp.choices[0].text == pm.wb.modality.tokenizer.decode(ref, skip_special_tokens=True)
    # another preference: the answer of its own merged model (vertices differ on this prompt)
    answers = set()
    for r in ([1, 0, 0], [0, 1, 0], [0, 0, 1]):
        got = (
            client.completions.create(
                model=f"{name}@{','.join(map(str, r))}", prompt="good red film", max_tokens=8, temperature=0
            )
            .choices[0]
            .text
        )
        ref = _reference(pm, _ids(pm, "good red film"), r, 8)
        assert got == pm.wb.modality.tokenizer.decode(ref, skip_special_tokens=True), r
        answers.add(got)
    assert len(answers) >= 2


def test_openai_errors_are_error_objects_and_the_server_keeps_serving(served):
    pm, url = served
    name = pm.run.resolve().name
    msgs = [{"role": "user", "content": "good"}]
    long_prompt = " ".join(["film"] * 60)
    cases = [
        ({"model": name, "messages": msgs, "preference": [1, 1]}, 400, "preference"),
        ({"model": name, "messages": msgs, "preference": [1, -1, 1]}, 400, "preference"),
        ({"model": name, "messages": msgs, "preference": [0, 0, 0]}, 400, "preference"),
        ({"model": f"{name}@1,x,1", "messages": msgs}, 400, "model"),
        ({"model": name, "messages": msgs, "max_tokens": 0}, 400, "max_tokens"),
        ({"model": name, "messages": msgs, "max_tokens": -3}, 400, "max_tokens"),
        ({"model": name, "messages": msgs, "max_tokens": 100}, 400, "max_tokens"),
        ({"model": name, "messages": [{"role": "user", "content": long_prompt}]}, 400, "messages"),
        ({"model": "gpt-4o", "messages": msgs}, 404, "model"),
        ({"model": name, "messages": msgs, "n": 2}, 400, "n"),
        ({"model": name, "messages": msgs, "tools": [{"type": "function"}]}, 400, "tools"),
        ({"model": name, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
        ({"model": name, "messages": "hello"}, 400, "messages"),
        ({"model": name}, 400, "messages"),
        ({"model": name, "messages": msgs, "temperature": -1}, 400, "temperature"),
    ]
    for body, status, param in cases:
        got, res = call(url + "/v1/chat/completions", body)
        assert got == status, (body, got, res)
        err = res["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"], (
            body,
            err,
        )
    got, res = call(
        url + "/v1/chat/completions", raw=b'{"model": "%s", "messages": [], "preference": [NaN, 1, 1]}' % name.encode()
    )
    assert got == 400 and res["error"]["param"] in ("preference", "messages")
    got, res = call(url + "/v1/chat/completions", raw=b"{not json")
    assert got == 400 and "not valid JSON" in res["error"]["message"]
    got, res = call(url + "/v1/completions", {"model": name, "prompt": long_prompt, "max_tokens": 2})
    assert got == 400 and res["error"]["code"] == "context_length_exceeded"
    got, res = call(url + "/v1/completions", {"model": name, "prompt": "good", "max_tokens": 3, "temperature": 0})
    assert got == 200 and res["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_client_that_disconnects_mid_stream_frees_its_row(served):
    """A streaming client that goes away is cancelled: its request leaves (here before it is decoded, since the
    model is held meanwhile) and the server goes on serving."""
    pm, url = served
    name = pm.run.resolve().name
    host, port = url.removeprefix("http://").split(":")
    sched = pm.scheduler()
    before = sched.stats()["cancelled"]
    body = json.dumps(
        {"model": name, "messages": [{"role": "user", "content": "the"}], "max_tokens": 30, "stream": True}
    ).encode()
    with pm._lock:  # the scheduler cannot decode while the test holds the model
        s = socket.create_connection((host, int(port)))
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        got = b""
        while b"data: " not in got:  # the stream has started (its first chunk: the assistant's role)
            got += s.recv(4096)
        s.close()  # the client goes away mid-stream
        time.sleep(0.3)  # the server notices
    deadline = time.time() + 20
    while sched.stats()["cancelled"] == before and time.time() < deadline:
        time.sleep(0.01)
    assert sched.stats()["cancelled"] == before + 1
    _wait_idle(sched)
    got, res = call(url + "/v1/completions", {"model": name, "prompt": "good", "max_tokens": 2, "temperature": 0})
    assert got == 200


def test_a_client_that_hangs_up_mid_body_is_dropped_quietly(served):
    """A body cut short (Content-Length says more than comes, then the client hangs up) was an unhandled
    ClientDisconnect on the /v1 endpoints, logged as an error with a traceback for every such request (found by
    benchmarks/serve_soak.py): it is dropped without an error in the server's log, and the server keeps serving."""
    import logging

    pm, url = served
    host, port = url.removeprefix("http://").split(":")
    errors: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR:
                errors.append(record.getMessage())

    keep = Keep()
    logging.getLogger("uvicorn.error").addHandler(keep)
    try:
        for path in ("/v1/completions", "/v1/chat/completions"):
            with socket.create_connection((host, int(port)), timeout=30) as s:
                head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                s.sendall((head + "Content-Length: 1000\r\n\r\n").encode() + b'{"model": ')
        time.sleep(1)  # the server reads what came, then sees the hang-up
        name = pm.run.resolve().name
        got, res = call(url + "/v1/completions", {"model": name, "prompt": "good", "max_tokens": 2, "temperature": 0})
        assert got == 200, res
    finally:
        logging.getLogger("uvicorn.error").removeHandler(keep)
    assert errors == [], errors


def test_concurrent_clients_each_get_their_own_preference(served):
    """Eight threads at once, four preferences: each answer equals the same request made alone."""
    pm, url = served
    name = pm.run.resolve().name
    prefs = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.4, 0.3, 0.3]] * 2
    alone = [
        call(
            url + "/v1/completions",
            {"model": name, "prompt": "very good", "max_tokens": 6, "temperature": 0, "preference": r},
        )[1]["choices"][0]["text"]
        for r in prefs[:4]
    ]
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        results[i] = call(
            url + "/v1/completions",
            {"model": name, "prompt": "very good", "max_tokens": 6, "temperature": 0, "preference": prefs[i]},
        )[1]["choices"][0]["text"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(8)] == alone * 2


def test_adapter_of_one_rank_loads_in_peft_and_its_error_falls_with_the_rank(llm_run, tmp_path):
    from pwemoe.runs import export_run

    base_dir = yaml.safe_load((llm_run / "config.yaml").read_text())["model"]["base"]
    r = "0.5,0.3,0.2"
    full = export_run(llm_run, r, tmp_path / "full")
    errs = {}
    for rank in (1, 3, 7):
        out = export_run(llm_run, r, tmp_path / f"r{rank}", adapter_rank=rank)
        info = json.loads((out / "pwemoe.json").read_text())["adapter"]
        cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert info["rank"] == rank and cfg["r"] == rank and cfg["rank_pattern"] == {}
        errs[rank] = max(info["relative_frobenius_error"].values())
    assert errs[1] > errs[3] > errs[7] and errs[7] < 1e-6  # 7 = 4 + 3 on v_proj: every layer's whole rank
    ids = torch.tensor([[3, 5, 7, 9, 4]])

    def logits(folder: Path) -> torch.Tensor:
        pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), folder / "adapter").eval()
        with torch.no_grad():
            return pm(input_ids=ids).logits

    torch.testing.assert_close(logits(tmp_path / "r7"), logits(full), rtol=1e-4, atol=1e-4)
    assert (logits(tmp_path / "r1") - logits(full)).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"adapter rank must be an integer in \[1, 7\]"):
        export_run(llm_run, r, tmp_path / "r8", adapter_rank=8)
    assert not (tmp_path / "r8").exists()


def test_compress_lowrank_is_the_truncated_svd_of_the_product():
    from pwemoe.lora.export import compress_lowrank

    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(7, 40, generator=g), torch.randn(30, 7, generator=g)
    dense = B.double() @ A.double()
    s = torch.linalg.svdvals(dense)
    for rank in (1, 3, 7):
        a, b, err = compress_lowrank(A, B, rank)
        assert a.shape == (rank, 40) and b.shape == (30, rank)
        want = math.sqrt(float((s[rank:] ** 2).sum() / (s**2).sum()))
        assert abs(err - want) < 1e-6
        assert abs(float(torch.linalg.norm(dense - b.double() @ a.double()) / torch.linalg.norm(dense)) - want) < 1e-5


def test_generate_on_the_command_line(served, capsys):
    from pwemoe.cli import main

    pm, _ = served
    want = pm.generate(["the good film", "red sky"], [0.2, 0.2, 0.6], max_new_tokens=6)
    assert (
        main(["generate", str(pm.run), "--preference", "1,1,3", "--max-new-tokens", "6", "the good film", "red sky"])
        == 0
    )
    out = capsys.readouterr().out
    assert out == f"--- the good film\n{want[0]['text']}\n--- red sky\n{want[1]['text']}\n"
    assert main(["generate", str(pm.run), "--preference", "1,1", "good"]) == 2
    assert "preference must have length k=3" in capsys.readouterr().err


def test_sliding_window_models_are_refused_not_mis_served():
    """Left-padded batches and a cache that crops from the left do not mix: a clear error, before any request."""
    from transformers import MistralConfig, MistralForCausalLM

    from pwemoe.generation import BatchDecoder

    def mistral() -> MistralForCausalLM:
        torch.manual_seed(0)
        cfg = MistralConfig(
            vocab_size=16,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            sliding_window=8,
        )
        return MistralForCausalLM(cfg).eval()

    model = pwemoe.upcycle(mistral(), {"a": mistral(), "b": mistral()})
    with pytest.raises(ValueError, match="sliding-window attention"):
        BatchDecoder(model, _tokenizer_stub(), torch.device("cpu"))


class _tokenizer_stub:  # noqa: N801 - what BatchDecoder reads of a tokenizer
    eos_token_id = 2
    pad_token_id = 0


def test_refusals_are_typed_and_the_api_edge_maps_them_by_type_not_by_text(served):
    from pwemoe.generation import SamplingParams
    from pwemoe.generation.errors import (
        BudgetExceeded,
        ContextExceeded,
        PromptTooLong,
        RequestRefused,
        SamplingFieldError,
    )
    from pwemoe.serve.openai_common import submit_error

    pm, _ = served
    sched = pm.scheduler()
    ctx = sched.decoder.max_positions
    kinds = {
        "prompt": ([1] * ctx, SamplingParams(max_new_tokens=1), PromptTooLong),
        "context": ([1] * (ctx - 2), SamplingParams(max_new_tokens=5), ContextExceeded),
        "temperature": ([1, 2], SamplingParams(max_new_tokens=1, temperature=-1), SamplingFieldError),
    }
    for name, (ids, params, kind) in kinds.items():
        with pytest.raises(RequestRefused) as e:
            sched.submit(ids, [1, 1, 1], params)
        assert isinstance(e.value, ValueError) and type(e.value.first) is kind, (name, e.value.problems)
    # several sampling fields wrong at once: every one reported, each naming its field
    problems = SamplingParams(max_new_tokens=0, temperature=-1, top_p=2, seed="x").problems()
    assert [p.param for p in problems] == ["max_new_tokens", "temperature", "top_p", "seed"]
    # the edge reads the type, whatever the message says
    cases = [
        (PromptTooLong("anything"), False, "prompt", "context_length_exceeded"),
        (PromptTooLong("anything"), True, "messages", "context_length_exceeded"),
        (ContextExceeded("anything"), True, "max_tokens", "context_length_exceeded"),
        (BudgetExceeded("anything"), False, "max_tokens", None),
        (SamplingFieldError("anything", "top_p"), False, "top_p", None),
    ]
    for problem, chat, param, code in cases:
        err = submit_error(RequestRefused([problem]), chat)
        assert (err.status, err.param, err.code, err.message) == (400, param, code, "anything")
    assert submit_error(RequestRefused([BudgetExceeded("x")]), False, "max_completion_tokens").param == (
        "max_completion_tokens"
    )


@pytest.mark.parametrize("weights", [[0.2, 0.3, 0.5], [1, 1, 1]])
def test_a_chat_completion_validates_its_preference_once(served, weights):
    """The preference is validated where the request enters (the body) into a `Preference`, then passed down: the
    scheduler, the decoding steps and the merged copies take it as it is (a shared preference decodes on a merged
    copy, mixed rows on the upcycled model: both paths)."""
    from pwemoe.core.preference import VALIDATIONS

    pm, url = served
    name = pm.run.resolve().name
    _wait_idle(pm.scheduler())
    before = VALIDATIONS["count"]
    body = {"model": name, "messages": [{"role": "user", "content": "good"}], "preference": weights}
    got, res = call(url + "/v1/chat/completions", {**body, "max_tokens": 4, "temperature": 0})
    assert got == 200 and res["usage"]["completion_tokens"] >= 1
    assert VALIDATIONS["count"] - before == 1


def test_ignore_eos_decodes_every_token_asked_for(served):
    """vLLM's `ignore_eos`: the request decodes max_tokens whatever the model samples (what serving benchmarks send);
    a value that is not a boolean is refused naming the field."""
    pm, url = served
    name = pm.run.resolve().name
    eos = next(iter(pm.scheduler().decoder.eos))
    body = {"model": name, "prompt": [5, 6, 7], "max_tokens": 6, "temperature": 0, "preference": [1, 0, 0]}
    # make the end of text the most likely token everywhere: without ignore_eos the request stops at once
    head = pm.wb.modality.model.get_output_embeddings()
    saved = None if head.bias is None else head.bias.detach().clone()
    with torch.no_grad():
        if head.bias is None:
            head.bias = torch.nn.Parameter(torch.zeros(head.out_features))
        head.bias[eos] += 1e4
    try:
        got, res = call(url + "/v1/completions", body)
        assert got == 200 and res["usage"]["completion_tokens"] == 0 and res["choices"][0]["finish_reason"] == "stop"
        got, res = call(url + "/v1/completions", {**body, "ignore_eos": True})
        assert got == 200 and res["usage"]["completion_tokens"] == 6 and res["choices"][0]["finish_reason"] == "length"
    finally:
        with torch.no_grad():
            if saved is None:
                head.bias = None
            else:
                head.bias.copy_(saved)
    got, res = call(url + "/v1/completions", {**body, "ignore_eos": "yes"})
    assert got == 400 and res["error"]["param"] == "ignore_eos"


def test_a_scored_completion_validates_its_preference_once(served):
    """lm-eval's log-likelihood request (echo, logprobs, max_tokens 1): the prompt scorer takes the request's
    Preference as it is, on its merged path and on the upcycled model."""
    from pwemoe.core.preference import VALIDATIONS

    pm, url = served
    name = pm.run.resolve().name
    body = {"model": name, "prompt": [5, 6, 7, 8], "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0}
    for weights in ([0.1, 0.2, 0.7], [0.1, 0.2, 0.7], [0.5, 0.25, 0.25]):  # the repeat may run on a merged copy
        before = VALIDATIONS["count"]
        got, res = call(url + "/v1/completions", {**body, "preference": weights})
        assert got == 200 and len(res["choices"][0]["logprobs"]["token_logprobs"]) == 5
        assert VALIDATIONS["count"] - before == 1
