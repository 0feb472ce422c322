"""Prompt log-probabilities and the completions contract harnesses use (echo, logprobs, token-id and batched
prompts, the tokenizer endpoints), and the engine dialects (llama.cpp's `lora`, LoRAX's `merged_adapters`).

References: pwemoe's own causal-LM scoring (`PreferenceModel.logits` on a `causal_lm_choice` task), plain
`transformers` on `merge_and_unload(model, r)`, and for raw per-expert scales a model merged by hand from the
adapters' own files (theta_0 + sum_i s_i (alpha_i / r_i) B_i A_i), independent of pwemoe's upcycling.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import pwemoe
from tests.serving import call, running

pytest.importorskip("fastapi")
pytest.importorskip("peft")

R = [0.6, 0.3, 0.1]


@pytest.fixture(scope="module")
def served(llm_run):
    """The run's PreferenceModel and its app on a real uvicorn server (fp32, the run's own setting)."""
    from pwemoe.serve.app import create_app
    from pwemoe.serve.model import PreferenceModel

    pm = PreferenceModel(llm_run, max_batch=8, token_budget=400, max_test_samples=4)
    with running(create_app(pm)) as url:
        yield pm, url, pm.run.resolve().name
    pm.scheduler().close()
    pm.scorer().close()


def _plain_logprobs(model: torch.nn.Module, ids: list[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1 from a plain model's own forward, alone (no padding)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return [float(lp[t - 1, ids[t]]) for t in range(1, len(ids))]


def _by_hand(llm_run: Path, scales: list[float]) -> torch.nn.Module:
    """The base with each expert's LoRA delta added at its scale, read from the adapter folders directly."""
    import yaml

    cfg = yaml.safe_load((llm_run / "config.yaml").read_text())
    model = AutoModelForCausalLM.from_pretrained(cfg["model"]["base"]).eval()
    state = model.state_dict()
    for task, s in zip(cfg["tasks"], scales):
        folder = Path(task["expert"])
        acfg = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(folder / "adapter_model.safetensors")
        for key, A in tensors.items():
            if ".lora_A." not in key:
                continue
            B = tensors[key.replace(".lora_A.", ".lora_B.")]
            target = key.replace("base_model.model.", "", 1).replace(".lora_A.weight", ".weight")
            state[target] += s * acfg["lora_alpha"] / acfg["r"] * (B.float() @ A.float())
    model.load_state_dict(state)
    return model


def _greedy(model: torch.nn.Module, tok, ids: list[int], n: int) -> tuple[int, ...]:
    """Plain transformers' greedy tokens, up to the end of text."""
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, len(ids) :].tolist()
    return tuple(new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new)


def test_echo_logprobs_equal_pwemoe_scoring_and_the_merged_model(served):
    """Every token_logprobs entry of an echoed prompt equals what pwemoe's causal-LM scoring gives the same tokens
    at the same preference (the label word after the task's prompt) and plain transformers on merge_and_unload(r);
    with other requests at other preferences in flight at the same time, and in lm-eval's request shape."""
    pm, url, name = served
    tok = pm.wb.modality.tokenizer
    task = pm.wb.tasks[0]  # polarity: "{text} answer :" then " bad" or " good", one token each
    texts = ["good film was very", "the team was not", "sea tree song", "very bad film"]
    prompts = [tok(f"{t} answer :")["input_ids"] for t in texts]
    labels = [ids[0] for ids in task.label_ids]
    rows = [p + [lab] for p in prompts for lab in labels]
    own = pm.logits(R, task.name, texts)[0]  # Tensor[4, 2]: log p(label | prompt), pwemoe's own scoring
    plain = pwemoe.merge_and_unload(pm.wb.modality.model, R).eval()

    def request(pref, prompt_rows, max_tokens=0):
        body = {"model": name, "prompt": prompt_rows, "echo": True, "logprobs": 1, "max_tokens": max_tokens}
        return call(url + "/v1/completions", {**body, "preference": pref, "temperature": 0})

    others = [[1, 0, 0], [0, 0.5, 0.5], [0.2, 0.2, 0.6]]
    with ThreadPoolExecutor(4) as pool:  # the request at R shares forwards with requests at other preferences
        futs = [pool.submit(request, R, rows)] + [pool.submit(request, r, rows[:3]) for r in others]
        (status, res), *rest = [f.result() for f in futs]
    assert status == 200 and all(s == 200 for s, _ in rest), (res, rest)
    assert res["preference"] == R and len(res["choices"]) == len(rows)
    for i, (row, ch) in enumerate(zip(rows, res["choices"])):
        lp = ch["logprobs"]
        assert ch["index"] == i and len(lp["tokens"]) == len(row) and lp["token_logprobs"][0] is None
        assert lp["top_logprobs"][0] is None and all(len(d) >= 1 for d in lp["top_logprobs"][1:])
        expected = _plain_logprobs(plain, row)
        torch.testing.assert_close(lp["token_logprobs"][1:], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lp["token_logprobs"][-1], float(own[i // 2, i % 2]), rtol=1e-5, atol=1e-5)
        assert "".join(lp["tokens"]) == ch["text"] and lp["text_offset"][-1] == len(ch["text"]) - len(lp["tokens"][-1])
    one_pref = _plain_logprobs(pwemoe.merge_and_unload(pm.wb.modality.model, others[1]).eval(), rows[2])
    torch.testing.assert_close(
        rest[1][1]["choices"][2]["logprobs"]["token_logprobs"][1:], one_pref, atol=1e-5, rtol=1e-5
    )
    # lm-eval's log-likelihood request: token ids, echo, logprobs 1, max_tokens 1, temperature 0; it reads
    # token_logprobs[ctxlen:-1] and calls the continuation greedy when each equals the best of top_logprobs
    status, res = request(R, rows, max_tokens=1)
    assert status == 200
    for row, ch in zip(rows, res["choices"]):
        lp = ch["logprobs"]
        assert len(lp["token_logprobs"]) == len(row) + 1  # the sampled token is listed, even the end of text
        cont, top = lp["token_logprobs"][len(row) - 1 : -1], lp["top_logprobs"][len(row) - 1 : -1]
        with torch.no_grad():
            best = int(plain(input_ids=torch.tensor([row[:-1]])).logits[0, -1].argmax())
        assert (cont[0] == max(top[0].values())) == (best == row[-1])
        last = lp["top_logprobs"][-1]
        assert lp["token_logprobs"][-1] == max(last.values())  # temperature 0: the sampled token is the best one


def test_rows_at_preferences_and_at_scales_share_one_forward(served, llm_run):
    """One scoring forward of rows at two preferences and at raw scales equals each row scored alone."""
    from pwemoe.logprobs import ScoreRow
    from pwemoe.routing import check_scales

    pm, _, _ = served
    scorer = pm.scorer()
    ids = [[5, 9, 3, 7, 12, 4], [3, 3, 8, 1], [4, 2, 2, 9, 10]]
    weights = [(torch.tensor(R), False), (torch.tensor([0.0, 1.0, 0.0]), False), (check_scales([0.8, 0, 0.3], 3), True)]
    before = scorer.forwards
    together = scorer.score([ScoreRow(i, w, raw, top=2) for i, (w, raw) in zip(ids, weights)])
    assert scorer.forwards == before + 1
    for i, (w, raw), got in zip(ids, weights, together):
        ref = _by_hand(llm_run, w.tolist()) if raw else pwemoe.merge_and_unload(pm.wb.modality.model, w).eval()
        torch.testing.assert_close(got.token_logprobs[1:], _plain_logprobs(ref, i), rtol=1e-5, atol=1e-5)
        assert all(len(t) == 2 and t[0][1] >= t[1][1] for t in got.top[1:])


def test_prompt_forms_echo_and_max_tokens_zero(served):
    """A string, strings, token ids and token-id lists: one choice per prompt, in order; echo returns the prompt;
    max_tokens 0 only with echo; logprobs without echo cover the completion, each sampled token greedy at T=0."""
    pm, url, name = served
    tok = pm.wb.modality.tokenizer
    base = {"model": name, "temperature": 0, "max_tokens": 3}
    ids = tok("the good film")["input_ids"]
    forms = ["the good film", ["the good film", "red sea"], ids, [ids, tok("red sea")["input_ids"]]]
    texts = {}
    for prompt in forms:
        status, res = call(url + "/v1/completions", {**base, "prompt": prompt, "preference": R})
        assert status == 200, res
        n = 2 if isinstance(prompt[0], (str, list)) and not isinstance(prompt, str) else 1
        assert [c["index"] for c in res["choices"]] == list(range(n))
        texts.setdefault(n, []).append([c["text"] for c in res["choices"]])
        assert res["usage"]["prompt_tokens"] == (len(ids) if n == 1 else len(ids) + 2)
    assert texts[1][0] == texts[1][1] and texts[2][0] == texts[2][1]  # strings and their token ids agree
    status, res = call(url + "/v1/completions", {**base, "prompt": "the good film", "echo": True, "preference": R})
    assert res["choices"][0]["text"] == "the good film" + texts[1][0][0]
    status, res = call(url + "/v1/completions", {**base, "prompt": ids, "echo": True, "max_tokens": 0})
    assert status == 200 and res["choices"][0]["text"] == "the good film" and res["usage"]["completion_tokens"] == 0
    status, res = call(url + "/v1/completions", {**base, "prompt": ids, "logprobs": 2, "preference": R})
    lp = res["choices"][0]["logprobs"]
    assert status == 200 and 1 <= len(lp["tokens"]) <= 3 and all(len(t) in (2, 3) for t in lp["top_logprobs"])
    assert all(v == max(t.values()) for v, t in zip(lp["token_logprobs"], lp["top_logprobs"]))
    assert "".join(lp["tokens"]).strip().startswith(res["choices"][0]["text"].strip())
    # lm-eval splits model_args at commas: a model name may separate the weights with colons
    status, res = call(url + "/v1/completions", {**base, "prompt": ids, "model": f"{name}@0.6:0.3:0.1"})
    assert status == 200 and res["preference"] == R
    status, raw = call(url + "/v1/completions", {**base, "prompt": ids, "stream": True, "echo": False})
    assert status == 200 and raw.rstrip().endswith(b"data: [DONE]")
    bad = [
        ({**base, "prompt": ids, "max_tokens": 0}, "max_tokens"),
        ({**base, "prompt": ids, "echo": True, "logprobs": 6}, "logprobs"),
        ({**base, "prompt": ids, "echo": "yes"}, "echo"),
        ({**base, "prompt": ids, "echo": True, "stream": True}, "echo"),
        ({**base, "prompt": [ids, ids], "stream": True}, "prompt"),
        ({**base, "prompt": [1, 2, 10**6]}, "prompt"),
        ({**base, "prompt": [[]]}, "prompt"),
        ({**base, "prompt": ["a", 3]}, "prompt"),
    ]
    for body, param in bad:
        status, res = call(url + "/v1/completions", body)
        assert status == 400 and res["error"]["param"] == param, (body, res)


def test_tokenizer_endpoints_in_vllms_shape(served):
    pm, url, name = served
    tok = pm.wb.modality.tokenizer
    status, res = call(url + "/tokenize", {"model": name, "prompt": "the good film", "return_token_strs": True})
    assert status == 200 and res["tokens"] == tok("the good film")["input_ids"] and res["count"] == 3
    assert res["token_strs"] == ["the", "good", "film"] and res["max_model_len"] == 48
    status, chat = call(url + "/tokenize", {"messages": [{"role": "user", "content": "good"}]})
    text = tok.apply_chat_template([{"role": "user", "content": "good"}], tokenize=False, add_generation_prompt=True)
    assert status == 200 and chat["tokens"] == tok(text, add_special_tokens=False)["input_ids"]
    status, res = call(url + "/detokenize", {"tokens": res["tokens"]})
    assert status == 200 and res == {"prompt": "the good film"}
    status, info = call(url + "/tokenizer_info")
    assert status == 200 and info["eos_token"] == "<eos>" and info["tokenizer_class"] and info["chat_template"]
    for path, body, param in [
        ("/tokenize", {"prompt": 3}, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": []}, "prompt"),
        ("/tokenize", {"model": "other", "prompt": "a"}, "model"),
        ("/detokenize", {"tokens": [1, -2]}, "tokens"),
        ("/detokenize", {"tokens": [1], "extra": 1}, "extra"),
    ]:
        status, res = call(url + path, body)
        assert status in (400, 404) and res["error"]["param"] == param, (path, body, res)


def test_chat_logprobs(served):
    pm, url, name = served
    body = {"model": name, "messages": [{"role": "user", "content": "good sky"}], "max_tokens": 4, "temperature": 0}
    status, res = call(url + "/v1/chat/completions", {**body, "logprobs": True, "top_logprobs": 2})
    assert status == 200, res
    content = res["choices"][0]["logprobs"]["content"]
    assert content and all(
        len(c["top_logprobs"]) == 2 and c["logprob"] == c["top_logprobs"][0]["logprob"] for c in content
    )
    shown = "".join(
        c["token"] for c in content if c["token"].strip() not in pm.wb.modality.tokenizer.all_special_tokens
    )
    assert shown.strip() == res["choices"][0]["message"]["content"].strip()  # special tokens are listed, not shown
    for extra, param in [({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "stream": True}, "logprobs")]:
        status, res = call(url + "/v1/chat/completions", {**body, **extra})
        assert status == 400 and res["error"]["param"] == param, res
    status, res = call(url + "/v1/chat/completions", {**body, "echo": True})
    assert status == 400 and res["error"]["param"] == "echo"  # chat has no echo: refused by name


def test_lora_scales_equal_task_arithmetic_by_hand_and_mix_in_one_batch(served, llm_run):
    """`lora` and `merged_adapters` scales give exactly the greedy tokens of the base with each adapter added at
    its scale (merged by hand from the adapter files), whatever else decodes beside them; requests at preferences
    and at scales join one batch."""
    pm, url, name = served
    tok = pm.wb.modality.tokenizer
    ids = tok("the good film was")["input_ids"]
    scales = [[0.8, 0.0, 0.3], [0.0, 1.5, 0.0], [0.5, 0.5, 0.5]]
    refs = [_greedy(_by_hand(llm_run, s), tok, ids, 6) for s in scales]
    refs.append(_greedy(pwemoe.merge_and_unload(pm.wb.modality.model, R).eval(), tok, ids, 6))
    refs.append(_greedy(pwemoe.merge_and_unload(pm.wb.modality.model, [0, 0, 1]).eval(), tok, ids, 6))
    assert len(set(refs)) > 2  # the scales do change the text
    lora = [{"id": i, "scale": s} for i, s in enumerate(scales[0]) if s]
    base = {"model": name, "prompt": ids, "max_tokens": 6, "temperature": 0}
    status, res = call(url + "/v1/completions", {**base, "lora": lora})
    assert status == 200 and res["scales"] == scales[0] and "preference" not in res
    assert res["choices"][0]["text"] == tok.decode(refs[0], skip_special_tokens=True)
    merged = {"ids": ["polarity", 2], "weights": [0.8, 0.3], "merge_strategy": "linear"}
    status, res2 = call(url + "/v1/completions", {**base, "merged_adapters": merged})
    assert status == 200 and res2["choices"][0]["text"] == res["choices"][0]["text"]
    status, chat = call(
        url + "/v1/chat/completions",
        {"model": name, "messages": [{"role": "user", "content": "red"}], "max_tokens": 3, "lora": lora},
    )
    assert status == 200 and chat["scales"] == scales[0]
    # one batch: two preferences and three sets of scales, submitted while the decoder waits for the model
    from pwemoe.generation import SamplingParams

    sched = pm.scheduler()
    sizes, join = [], sched.decoder.join

    def recording(seqs):
        sizes.append(sorted(s.raw for s in seqs))
        return join(seqs)

    sched.decoder.join = recording
    try:
        params = SamplingParams(max_new_tokens=6, temperature=0)
        with pm._lock:
            handles = [pm.submit(ids, params=params, scales=s) for s in scales] + [pm.submit(ids, R, params)]
            handles.append(pm.submit(ids, [0, 0, 1], params))
        got = [h.result() for h in handles]
    finally:
        sched.decoder.join = join
    assert any(True in s and False in s for s in sizes), sizes  # preferences and scales prefilled together
    assert [tuple(h.seq.tokens) for h in handles] == refs  # token-identical, each to its own reference
    assert [out["text"] for out in got] == [tok.decode(r, skip_special_tokens=True) for r in refs]


def test_lora_adapters_and_dialect_errors_name_the_field(served):
    pm, url, name = served
    status, listed = call(url + "/lora-adapters")
    assert status == 200 and [a["id"] for a in listed] == [0, 1, 2]
    assert [a["task"] for a in listed] == pm.task_names and all(a["path"] and a["scale"] == 0.0 for a in listed)
    base = {"model": name, "prompt": "good", "max_tokens": 2}
    chat = {"model": name, "messages": [{"role": "user", "content": "good"}], "max_tokens": 2}
    cases = [
        ({"lora": [{"id": 3, "scale": 1}]}, "lora", "0..2"),
        ({"lora": [{"id": -1, "scale": 1}]}, "lora", "0..2"),
        ({"lora": [{"id": "polarity", "scale": 1}]}, "lora", "expert index"),
        ({"lora": [{"id": 0, "scale": -0.5}]}, "lora", ">= 0"),
        ({"lora": [{"id": 0, "scale": 1}, {"id": 0, "scale": 2}]}, "lora", "twice"),
        ({"lora": [{"id": 0}]}, "lora", "scale"),
        ({"lora": {"id": 0, "scale": 1}}, "lora", "list"),
        ({"lora": [{"id": 0, "scale": 1}], "preference": [1, 0, 0]}, "lora", "preference"),
        ({"lora": [{"id": 0, "scale": 1}], "model": f"{name}@1,0,0"}, "lora", "model"),
        (
            {"lora": [{"id": 0, "scale": 1}], "merged_adapters": {"ids": [0], "weights": [1]}},
            "merged_adapters",
            "not both",
        ),
        ({"merged_adapters": {"ids": [0], "weights": [1], "merge_strategy": "ties"}}, "merged_adapters", "ties"),
        ({"merged_adapters": {"ids": [0, 1], "weights": [1]}}, "merged_adapters", "same"),
        ({"merged_adapters": {"ids": ["nope"], "weights": [1]}}, "merged_adapters", "task name"),
        ({"merged_adapters": {"ids": [0], "weights": [1], "density": 0.5}}, "merged_adapters", "density"),
    ]
    for extra, param, words in cases:
        for path, body in (("/v1/completions", base), ("/v1/chat/completions", chat)):
            status, res = call(url + path, {**body, **extra})
            err = res["error"]
            assert status == 400 and err["param"] == param and words in err["message"], (path, extra, err)
            assert set(err) == {"message", "type", "param", "code"}
    for raw in (b"NaN", b"Infinity"):  # Python's json reads them; the scale must still be finite
        body = b'{"model": "%s", "prompt": "good", "lora": [{"id": 0, "scale": %s}]}' % (name.encode(), raw)
        status, res = call(url + "/v1/completions", raw=body)
        assert status == 400 and res["error"]["param"] == "lora" and "finite" in res["error"]["message"]
    status, res = call(url + "/v1/completions", {**base, "temperature": 0})
    assert status == 200  # the server keeps serving


def test_raw_rows_equal_fixed_lambda_on_dense_and_factored_modules():
    """set_row_preferences with raw rows: each raw row runs at lambda = its scales (as fixed_lambda does for the
    whole batch), each other row at its routed preference; dense task vectors and LoRA-like factors alike."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(seed: int) -> LlamaForCausalLM:
        torch.manual_seed(seed)
        cfg = LlamaConfig(
            vocab_size=16,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=16,
        )
        return LlamaForCausalLM(cfg).eval()

    experts = {}
    for i in range(2):
        e = llama(0)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in e.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        experts[f"t{i}"] = e
    ids = torch.tensor([[1, 5, 9, 3], [3, 3, 8, 1], [1, 5, 9, 3]])
    rows = torch.tensor([[0.7, 0.3], [1.5, 0.25], [0.7, 0.3]])  # row 0 a preference, rows 1-2 scales
    raw = [False, True, True]
    for name, model in {
        "dense": pwemoe.upcycle(llama(0), experts),
        "factored": pwemoe.upcycle(llama(0), experts, task_vector_rank=4),
    }.items():
        with torch.no_grad():
            with pwemoe.row_preferences(model, rows, raw):
                mixed = model(input_ids=ids).logits
            pwemoe.set_preference(model, rows[0])
            alone = [model(input_ids=ids[:1]).logits]
            for b in (1, 2):
                with pwemoe.fixed_lambda(model, rows[b]):
                    alone.append(model(input_ids=ids[b : b + 1]).logits)
        torch.testing.assert_close(mixed, torch.cat(alone), rtol=1e-5, atol=1e-5, msg=name)
        assert not torch.allclose(alone[0], alone[2], atol=1e-4)  # the same numbers as a preference: routed
    with pytest.raises(ValueError, match="row 1: scales must be finite and >= 0"):
        pwemoe.set_row_preferences(model, [[1, 1], [-1, 1]], raw=[False, True])
