"""Causal-LM tasks on a tiny Llama with a word-level tokenizer: scoring against the plain model's own logits,
the pipeline over LoRA experts (train, evaluate, both exports), and lower-is-better metrics in the summary."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pwemoe.configfile import build_config
from pwemoe.results import summarize
from pwemoe.workbench import Workbench
from tests.fixtures import write_csv_splits

peft = pytest.importorskip("peft")

WORDS = ["good", "bad", "red", "blue", "film", "team", "the", "was", "very", "not", "topic", "answer", "review"]
SPECIAL = ["<pad>", "<unk>", "<eos>"]


def _tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS + [":", "?", "\n"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    return tok


def _rows(task: str, n: int, rng: random.Random) -> list[dict]:
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS[4:10]) for _ in range(rng.randint(2, 6))]
        y = rng.randint(0, 1)
        words.insert(rng.randint(0, len(words)), (["bad", "good"] if task == "polarity" else ["red", "blue"])[y])
        out.append({"text": " ".join(words), "label": y})
    return out


@pytest.fixture(scope="module")
def causal_setup(tmp_path_factory) -> dict:
    """Base tiny Llama + tokenizer, CSV data, and one LoRA expert per task trained by `pwemoe finetune`."""
    from pwemoe.recipes.finetune import finetune_from_config

    root = tmp_path_factory.mktemp("causal")
    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    rng = random.Random(0)
    tasks = []
    for task, words in (("polarity", [" bad", " good"]), ("color", [" red", " blue"])):
        data = write_csv_splits(root, task, {"train": _rows(task, 160, rng), "test": _rows(task, 40, rng)})
        tasks.append(
            {
                "name": task,
                "type": "causal_lm_choice",
                "expert": str(root / "experts" / task),
                "max_length": 12,
                "prompt_template": "review: {text} answer:",
                "label_words": words,
                "data": data,
            }
        )
    config = {
        "model": {"base": str(root / "base"), "init_lambda": 0.3},
        "tasks": tasks,
        "train": {"steps": 12, "lr": 0.05, "batch_size": 8, "save_interval": 6, "log_interval": 1, "seed": 0},
        "eval": {"batch_size": 16, "grid": 3, "ta_scales": [0.5], "bootstrap_resamples": 50},
        "run_dir": str(root / "run"),
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    for t in tasks:
        finetune_from_config(
            root / "config.yaml",
            t["name"],
            t["expert"],
            epochs=10.0,
            lr=3e-2,
            batch_size=16,
            lora={"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "up_proj"]},
        )
    return {"root": root, "config": config}


def test_finetune_writes_a_peft_adapter_that_learned_the_task(causal_setup):
    from pwemoe.lora import read_lora_adapter
    from pwemoe.recipes.finetune import FINETUNE_INFO

    cfg = causal_setup["config"]
    expert = Path(cfg["tasks"][0]["expert"])
    ad = read_lora_adapter(expert)
    assert ad.base_model_name_or_path == cfg["model"]["base"]
    assert json.loads((expert / FINETUNE_INFO).read_text())["task_format"]["lora"]["r"] == 4
    wb = Workbench(build_config(cfg), load_train=False)
    import pwemoe

    for i, t in enumerate(wb.tasks):  # the adapter alone (one-hot lambda) beats the base (lambda = 0) on its task
        with pwemoe.fixed_lambda(wb.backbone, torch.eye(2)[i]):
            own = wb.accuracy(t, 16)
        with pwemoe.fixed_lambda(wb.backbone, torch.zeros(2)):
            base = wb.accuracy(t, 16)
        assert own > max(base, 0.75), (t.name, own, base)


def test_finetuned_experts_answer_and_stop(causal_setup):
    """`pwemoe finetune` trains the label followed by EOS: greedy generation from each expert (peft on the plain
    base, without pwemoe) gives one label word, then EOS, and stops there."""
    cfg = causal_setup["config"]
    wb = Workbench(build_config(cfg), load_train=False, upcycle=False)
    for t in wb.tasks:
        base = AutoModelForCausalLM.from_pretrained(cfg["model"]["base"])
        model = peft.PeftModel.from_pretrained(base, t.cfg.expert).eval()
        labels = {ids[0] for ids in t.label_ids}
        for prompt in t.prompts(t.test_data[:8]):
            ids = torch.tensor([t.tokenizer(prompt)["input_ids"]])
            with torch.no_grad():
                out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
            new = out[0, ids.shape[1] :].tolist()
            assert len(new) == 2 and new[0] in labels and new[1] == t.tokenizer.eos_token_id, (t.name, new)


def test_finetuning_targets_the_label_and_the_end_of_the_answer(causal_setup):
    """The training rows are prompt + true label + end; the end is EOS, or the chat template's end-of-turn token
    when prompts go through a template that ends turns with a special token. Scoring rows are unchanged."""
    from pwemoe.tasks.causal_lm import SCORED, end_of_turn_id

    wb = Workbench(build_config(causal_setup["config"]), load_train=False, upcycle=False)
    t = wb.tasks[0]
    rows = t.test_data[:6]
    scoring = t.encode(rows)
    eos = t.tokenizer.eos_token_id
    for f, s, y in zip(t.finetune_features(rows), scoring, rows["label"]):
        assert f["input_ids"] == s["input_ids"] + t.label_ids[y] + [eos]
        assert f[SCORED] == [0] * len(s["input_ids"]) + [1] * (len(t.label_ids[y]) + 1)
    tok = _tokenizer()
    assert end_of_turn_id(tok) is None  # no chat template
    tok.add_special_tokens({"additional_special_tokens": ["<end>"]})
    turns = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}END{% endfor %}"
    tok.chat_template = turns.replace("END", " \n")  # a turn ended by plain text: EOS ends the answer
    assert end_of_turn_id(tok) is None
    tok.chat_template = turns.replace("END", "<end> \n")
    end = tok.convert_tokens_to_ids("<end>")
    assert end_of_turn_id(tok) == end != eos
    t.tokenizer, t.use_chat = tok, True
    assert t.answer_end_id() == end
    assert all(f["input_ids"][-1] == end for f in t.finetune_features(rows))
    t.use_chat = False
    assert t.answer_end_id() == eos


def test_choice_scores_are_the_plain_models_label_log_likelihoods(causal_setup):
    cfg = dict(causal_setup["config"])
    wb = Workbench(build_config(cfg), load_train=False, upcycle=False)
    plain = AutoModelForCausalLM.from_pretrained(cfg["model"]["base"]).eval()
    for t in wb.tasks:
        rows = t.test_data[:5]
        scores = wb.logits([(t, rows)])[0]
        ids = [t.tokenizer(p)["input_ids"] for p in t.prompts(rows)]
        for j, seq in enumerate(ids):
            with torch.no_grad():
                logp = torch.log_softmax(plain(input_ids=torch.tensor([seq])).logits[0, -1], -1)
            want = logp[[t.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in t.label_words]]
            torch.testing.assert_close(scores[j], want, rtol=1e-5, atol=1e-5)


def test_examples_beyond_a_learned_position_table_are_a_clear_error(causal_setup):
    """GPT-2-style learned positions end in an index error past their table: the limit is found (none
    for rotary Llama), max_length beyond it is refused, and an encoded example beyond it (template and
    labels come on top of the truncated text) is a ValueError naming the fix, which the server sends as 400."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pwemoe.tasks.causal_lm import _learned_position_limit

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=24))
    assert _learned_position_limit(gpt2) == 24
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=64,
        )
    )
    assert _learned_position_limit(llama) is None  # rotary: no table (its 64-token vocabulary is not one)
    wb = Workbench(build_config(dict(causal_setup["config"])), load_train=False, upcycle=False)
    t = wb.tasks[0]
    rows = t.test_data[:3]
    assert len(t.encode(rows)) == 3 * t.rows_per_example
    t.position_limit = 4  # as a learned table of 4 positions would set it
    with pytest.raises(ValueError, match=r"tokens, beyond the model's 4 positions .* lower tasks\[\]\.max_length"):
        t.encode(rows)


def _assert_plain_label_scores(t, rows: dict, scores: torch.Tensor, plain) -> None:
    """scores[j, c] is log p(label c's tokens | prompt j) under the plain model, each sequence run alone."""
    for j, p in enumerate(t.prompts(rows)):
        prompt = t.tokenizer(p)["input_ids"]
        for c, w in enumerate(t.label_words):
            lab = t.tokenizer(w, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(plain(input_ids=torch.tensor([prompt + lab])).logits[0], -1)
            want = sum(logp[len(prompt) - 1 + i, tok] for i, tok in enumerate(lab))
            torch.testing.assert_close(scores[j, c], want, rtol=1e-5, atol=1e-5)


def test_multi_token_labels_score_each_label_sequence(causal_setup):
    cfg = json.loads(json.dumps(causal_setup["config"]))
    cfg["tasks"][0]["label_words"] = [" very bad", " not very good"]  # 2 and 3 tokens
    wb = Workbench(build_config(cfg), load_train=False, upcycle=False)
    t = wb.tasks[0]
    assert t.rows_per_example == 2
    plain = AutoModelForCausalLM.from_pretrained(cfg["model"]["base"]).eval()
    rows = t.test_data[:3]
    scores = wb.logits([(t, rows)])[0]
    assert scores.shape == (3, 2)
    _assert_plain_label_scores(t, rows, scores, plain)
    # the loss is the true label's negative log-likelihood
    y = torch.tensor(rows["label"])
    torch.testing.assert_close(t.loss(scores, y, "none"), -scores[torch.arange(3), y])


def test_label_word_that_tokenises_to_nothing_is_refused(causal_setup):
    cfg = json.loads(json.dumps(causal_setup["config"]))
    cfg["tasks"][1]["label_words"] = [" red", " "]
    with pytest.raises(ValueError, match=r"task 'color': label word\(s\) \[' '\] tokenise to nothing"):
        Workbench(build_config(cfg), load_train=False, upcycle=False)


def test_contradicting_task_configs_are_refused_before_the_model_loads(causal_setup, tmp_path, monkeypatch, caplog):
    """Label words the data has no class for, an example longer than a learned position table (the prompt
    template's own tokens on top of max_length), max_length beyond it: one config error each, naming the task and
    the fix, before any weights load; with rotary positions a warning only."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pwemoe.config import ConfigError

    gpt2 = tmp_path / "gpt2"  # 16 learned positions, the same word-level tokenizer
    GPT2LMHeadModel(
        GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=len(_tokenizer()), n_positions=16)
    ).save_pretrained(gpt2)
    _tokenizer().save_pretrained(gpt2)

    def loaded(*args, **kwargs):
        raise AssertionError("model weights loaded before the config was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", loaded)

    def refused(cfg: dict) -> list[str]:
        with pytest.raises(ConfigError) as e:
            Workbench(build_config(cfg), upcycle=False)
        return e.value.errors

    cfg = json.loads(json.dumps(causal_setup["config"]))
    cfg["tasks"][1]["label_words"] = [" red", " blue", " very"]  # the data's labels are 0 and 1
    (err,) = refused(cfg)
    assert err.startswith("tasks[1].label_words: task 'color': label_words [' very'] stand for class(es) [2], which")
    assert "set class_names to list every class" in err
    cfg["tasks"][1]["class_names"] = ["red", "blue", "very"]  # said on purpose: the data lacks a class
    with pytest.raises(AssertionError, match="weights loaded"):
        Workbench(build_config(cfg), upcycle=False)
    # data that declares its classes (a ClassLabel): the count must match; a slice that lacks one is no error
    import datasets

    from pwemoe.modalities.causal_lm import CausalLMModality
    from pwemoe.tasks import TASK_TYPES

    del cfg["tasks"][1]["class_names"]
    modality = CausalLMModality(cfg["model"]["base"])
    modality.load_preprocessing()
    for names, want in ((["red", "blue", "very"], []), (["red", "blue"], ["3 label_words for the 2 classes"])):
        task = TASK_TYPES["causal_lm_choice"](build_config(cfg).tasks[1])
        feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
        task.train_data = datasets.Dataset.from_dict({"text": ["red", "blue"], "label": [0, 1]}, features=feats)
        errors: list[str] = []
        task.check_before_load(modality, errors, 1)
        assert len(errors) == len(want) and all(w in e for w, e in zip(want, errors)), errors

    cfg = json.loads(json.dumps(causal_setup["config"]))
    cfg["model"]["base"] = str(gpt2)
    cfg["tasks"][0]["prompt_template"] = "review : the film was very good , bad ? {text} answer :"  # 12 tokens
    cfg["tasks"][0]["max_length"] = 8
    cfg["tasks"][1]["max_length"] = 20
    first, second = refused(cfg)
    assert first == (
        "tasks[0].max_length: task 'polarity': an example can take 20 tokens (12 of prompt template, max_length 8), "
        "beyond the model's 16 positions (a learned position table: longer inputs fail); set tasks[0].max_length <= 4"
    )
    assert second.startswith("tasks[1].max_length: task 'color': an example can take 24 tokens") and "<= 12" in second

    cfg = json.loads(json.dumps(causal_setup["config"]))  # rotary Llama with 64 positions: it runs, with a warning
    cfg["tasks"][0]["max_length"] = 100
    with caplog.at_level("WARNING", logger="pwemoe.tasks.causal_lm"), pytest.raises(AssertionError, match="weights"):
        Workbench(build_config(cfg), upcycle=False)
    (warning,) = [r.getMessage() for r in caplog.records if "positions" in r.getMessage()]
    assert "task 'polarity': an example can take 104 tokens" in warning and "rotary" in warning, warning


def test_causal_lm_loss_task_matches_transformers_loss(causal_setup, tmp_path):
    cfg = json.loads(json.dumps(causal_setup["config"]))
    for t in cfg["tasks"]:
        t["type"] = "causal_lm"
        for key in ("prompt_template", "label_words"):
            t.pop(key)
    wb = Workbench(build_config(cfg), load_train=False, upcycle=False)
    plain = AutoModelForCausalLM.from_pretrained(cfg["model"]["base"]).eval()
    t = wb.tasks[0]
    assert not t.higher_is_better and wb.directions() == {"polarity": "min", "color": "min"}
    rows = t.test_data[:4]
    per = wb.logits([(t, rows)])[0][:, 0]
    for j, text in enumerate(rows["text"]):
        ids = torch.tensor([t.tokenizer(text)["input_ids"]])
        with torch.no_grad():
            want = plain(input_ids=ids, labels=ids).loss
        torch.testing.assert_close(per[j], want, rtol=1e-5, atol=1e-6)
    scores = wb.correct(t, 16)
    assert scores.dtype == torch.float32 and len(scores) == len(t.test_data)
    assert wb.accuracy(t, 16) == pytest.approx(float(scores.mean()), rel=1e-6)
    # a loss task's data needs no label column: the rows' provenance digest (evaluate, serve) reads none
    from pwemoe.results import split_fingerprint

    t.test_data = t.test_data.remove_columns([t.cfg.data.label_column])
    assert len(split_fingerprint(t)) == 64


def test_lower_is_better_metrics_in_hypervolume_dominance_and_normalisation():
    names = ["acc_task", "loss_task"]
    rows = [
        {
            "method": "expert:acc_task",
            "preference": [1.0, 0.0],
            "param": None,
            "accuracy": {"acc_task": 0.9, "loss_task": 3.0},
        },
        {
            "method": "expert:loss_task",
            "preference": [0.0, 1.0],
            "param": None,
            "accuracy": {"acc_task": 0.5, "loss_task": 1.0},
        },
        {"method": "pwemoe", "preference": [0.5, 0.5], "param": None, "accuracy": {"acc_task": 0.8, "loss_task": 1.5}},
        {"method": "pwemoe", "preference": [0.6, 0.4], "param": None, "accuracy": {"acc_task": 0.7, "loss_task": 2.0}},
    ]
    s = summarize(rows, names, 0.0, directions={"acc_task": "max", "loss_task": "min"}, loss_reference=4.0)
    assert s["directions"] == {"acc_task": "max", "loss_task": "min"}
    assert s["reference_point"]["accuracy"] == [0.0, 4.0]
    # (0.7, 2.0) is dominated by (0.8, 1.5) once loss counts as lower-is-better
    assert s["methods"]["pwemoe"]["non_dominated"] == [[0.5, 0.5]]
    assert s["methods"]["pwemoe"]["hypervolume"] == pytest.approx(0.8 * (4.0 - 1.5))
    # normalised: accuracy / expert's, expert's loss / loss
    assert rows[2]["normalized"] == {"acc_task": pytest.approx(0.8 / 0.9), "loss_task": pytest.approx(1.0 / 1.5)}
    # without a loss reference: 1.1 x the worst loss, stated
    s2 = summarize(rows, names, 0.0, directions={"acc_task": "max", "loss_task": "min"})
    assert s2["reference_point"]["accuracy"] == [0.0, pytest.approx(3.3)]
    # bootstrap over per-example losses (floats) as well as correctness (bools)
    rng = np.random.default_rng(0)
    correct = {
        "acc_task": rng.random((4, 30)) < np.array([[0.9], [0.5], [0.8], [0.7]]),
        "loss_task": rng.gamma(2.0, 1.0, (4, 30)) * np.array([[1.5], [0.5], [0.75], [1.0]]),
    }
    s3 = summarize(
        rows, names, 0.0, correct, 100, directions={"acc_task": "max", "loss_task": "min"}, loss_reference=4.0
    )
    lo, hi = s3["methods"]["pwemoe"]["hypervolume_ci"]
    assert 0 < lo < hi
    with pytest.raises(ValueError, match="'max' or 'min'"):
        summarize(rows, names, 0.0, directions={"acc_task": "up"})


def test_lora_pipeline_trains_evaluates_and_exports_both_ways(causal_setup, tmp_path):
    """`pwemoe train/evaluate/export` over LoRA experts; the dense export and the PEFT adapter reproduce the run."""
    import pwemoe
    from pwemoe.recipes.evaluate import evaluate_run
    from pwemoe.recipes.train import train
    from pwemoe.runs import export_run, open_run

    root = causal_setup["root"]
    cfg = json.loads(json.dumps(causal_setup["config"]))
    cfg["run_dir"] = str(tmp_path / "run")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = train(path, [], verbose=-1)
    summary = evaluate_run(run, verbose=-1)
    assert {"pwemoe", "pref_task_arithmetic", "average", "experts"} <= set(summary["methods"])
    assert summary["directions"] == {"polarity": "max", "color": "max"}
    out = export_run(run, [0.5, 0.5], tmp_path / "export")
    assert (out / "model" / "config.json").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    wb, _ = open_run(run, load_test=False)
    ids = torch.tensor([[5, 6, 7, 8, 3, 4], [9, 10, 11, 12, 13, 4]])
    pwemoe.set_preference(wb.backbone, torch.tensor([0.5, 0.5]))
    with torch.no_grad():
        want = wb.model(input_ids=ids).logits
        dense = AutoModelForCausalLM.from_pretrained(out / "model").eval()(input_ids=ids).logits
        pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), out / "adapter")
        adapter = pm.eval()(input_ids=ids).logits
    torch.testing.assert_close(dense, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adapter, want, rtol=1e-4, atol=1e-5)


def test_multi_token_labels_evaluate_per_example(causal_setup):
    cfg = json.loads(json.dumps(causal_setup["config"]))
    cfg["tasks"][0]["label_words"] = [" very bad", " not very good"]
    wb = Workbench(build_config(cfg), load_train=False, upcycle=False)
    t = wb.tasks[0]
    c = wb.correct(t, 16)  # length-sorted batches are built per example, not per label row
    assert c.dtype == torch.bool and len(c) == len(t.test_data)
    rows = t.test_data[:]
    want = wb.logits([(t, rows)])[0].argmax(-1) == torch.tensor(rows["label"])
    assert torch.equal(c, want)


def test_loss_and_choice_tasks_share_one_forward(causal_setup):
    cfg = json.loads(json.dumps(causal_setup["config"]))
    t0 = cfg["tasks"][0]
    t0["type"] = "causal_lm"
    for key in ("prompt_template", "label_words"):
        t0.pop(key)
    wb = Workbench(build_config(cfg), load_train=False, upcycle=False)
    parts = [(wb.tasks[0], wb.tasks[0].test_data[:3]), (wb.tasks[1], wb.tasks[1].test_data[:4])]
    together = wb.logits(parts)
    alone = [wb.logits([p])[0] for p in parts]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_empty_texts_of_a_loss_task_are_refused(causal_setup, tmp_path):
    cfg = json.loads(json.dumps(causal_setup["config"]))
    t0 = cfg["tasks"][0]
    t0["type"] = "causal_lm"
    for key in ("prompt_template", "label_words"):
        t0.pop(key)
    p = tmp_path / "with_empty.csv"
    p.write_text("text,label\ngood film,1\n,0\nbad team,0\n")
    t0["data"]["files"]["test"] = str(p)
    from pwemoe.config import ConfigError

    with pytest.raises(ConfigError, match=r"1 empty cell\(s\) in column 'text' \(rows \[1\]\)"):
        Workbench(build_config(cfg), load_train=False, upcycle=False)


def test_tables_normalise_loss_tasks_in_their_direction(tmp_path):
    from pwemoe.results import write_tables

    names = ["a", "b"]
    rows = [
        {"method": "expert:a", "preference": [1.0, 0.0], "param": None, "accuracy": {"a": 0.8, "b": 3.0}, "inputs": ""},
        {"method": "expert:b", "preference": [0.0, 1.0], "param": None, "accuracy": {"a": 0.4, "b": 2.0}, "inputs": ""},
        {"method": "pwemoe", "preference": [0.5, 0.5], "param": None, "accuracy": {"a": 0.6, "b": 2.5}, "inputs": ""},
    ]
    summary = summarize(rows, names, directions={"a": "max", "b": "min"})
    write_tables(tmp_path, rows, names, summary)
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored[2]["normalized"] == {"a": pytest.approx(0.75), "b": pytest.approx(0.8)}  # 2.0 / 2.5, not 1.25


def test_adapter_export_never_overwrites_a_foreign_folder(causal_setup, tmp_path):
    from pwemoe.lora import write_lora_adapter

    out = tmp_path / "adapter"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    layers = {"model.layers.0.self_attn.q_proj": (torch.zeros(2, 32), torch.zeros(32, 2))}
    with pytest.raises(ValueError, match="not empty"):
        write_lora_adapter(out, layers, "base")
    write_lora_adapter(out, layers, "base", overwrite=True)  # replaces only what pwemoe writes; keeps the rest
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "adapter_config.json").is_file() and not list(tmp_path.glob(".*pwemoe-tmp"))


def test_select_follows_a_loss_tasks_direction(causal_setup, tmp_path):
    """`pwemoe select` on a run with a loss task (lower is better) and a choice task, LoRA experts: the loss is
    minimised, its constraints take upper bounds, its expert's rows come from the upcycled model."""
    from pwemoe.cli import main
    from pwemoe.recipes.train import train
    from pwemoe.results import unpack_correct
    from pwemoe.selection import Settings, select_run

    cfg = json.loads(json.dumps(causal_setup["config"]))
    t0 = cfg["tasks"][0]
    t0["type"] = "causal_lm"
    for key in ("prompt_template", "label_words"):
        t0.pop(key)
    for t in cfg["tasks"]:
        t["data"]["validation_fraction"] = 0.25
    cfg["run_dir"] = str(tmp_path / "run")
    # routers that start at lambda(r) = 0.6 r: the color expert is there at r = (0, 1) after 4 steps (merged with the
    # polarity adapter at 0.3 each, the color task is near chance with these tiny adapters)
    cfg["model"]["router_init"] = "preference"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run = train(tmp_path / "c.yaml", ["train.steps=4"], verbose=-1)
    assert main(["select", str(run), "--maximize", "polarity"]) == 2  # a loss is minimised
    rec = select_run(run, None, "polarity", ["color >= 0.3", "polarity <= 1.5 expert"], Settings(budget=5), name="loss")
    assert rec["query"]["metrics"]["polarity"] == {"metric": "loss", "higher_is_better": False}
    assert rec["split"]["stratified_by"] == {"polarity": None, "color": "label"}
    correct = json.loads((run / "validation" / "correct.json").read_text())
    cert = np.array(rec["split"]["certification_indices"]["polarity"])
    for c in rec["candidates"]:
        key = "pwemoe|" + ",".join(f"{x:.6f}" for x in c["preference"]) + "|"
        loss = unpack_correct(correct[key]["tasks"]["polarity"])
        assert c["objective"] == pytest.approx(np.delete(loss, cert).mean(), rel=1e-6)  # the search part's mean loss
        share = c["constraints"][1]
        assert share["bound"] >= share["estimate"]  # an upper bound on loss / expert's loss
    feasible = [c["objective"] for c in rec["candidates"] if c["feasible"]]
    assert rec["status"] == "certified" and rec["chosen"]["search"]["objective"] == min(feasible)
    row = rec["certification"]["constraints"][1]
    assert row["method"] == "paired percentile bootstrap" and row["met"] == (row["bound"] <= 1.5)
    assert rec["test"]["values"]["polarity"] > 0
    assert rec["evaluation"]["experts"] == ["polarity"]


def _decoder(causal_setup):
    return AutoModelForCausalLM.from_pretrained(causal_setup["config"]["model"]["base"]).eval().base_model


def test_prompt_shared_forward_equals_whole_rows(causal_setup):
    """Each example's prompt computed once for its label rows (left-padded prompts, their cache selected per row)
    gives the whole rows' hidden states at every real token, for prompts and labels of different lengths, and
    two consecutive examples with the same prompt (one group)."""
    from pwemoe.modalities.causal_lm import prompt_shared_forward

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 16, (n,), generator=g).tolist() for n in (5, 2, 7, 7)]
    prompts[3] = prompts[2]  # the same prompt twice in a row
    labels = [[4], [5, 6, 7], [8, 9]]
    rows = [(p, lab) for p in prompts for lab in labels]
    L = max(len(p) + len(lab) for p, lab in rows)
    ids = torch.zeros((len(rows), L), dtype=torch.long)
    mask, lmask = torch.zeros_like(ids), torch.zeros_like(ids)
    for j, (p, lab) in enumerate(rows):
        ids[j, : len(p) + len(lab)] = torch.tensor(p + lab)
        mask[j, : len(p) + len(lab)] = 1
        lmask[j, len(p) : len(p) + len(lab)] = 1
    dec = _decoder(causal_setup)
    with torch.no_grad():
        want = dec(input_ids=ids, attention_mask=mask).last_hidden_state
    got = prompt_shared_forward(dec, ids, mask, lmask).last_hidden_state
    assert got.shape == want.shape
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_prefix_shared_forward_equals_whole_rows(causal_setup):
    from pwemoe.modalities.causal_lm import prefix_shared_forward, shared_prefix

    g = torch.Generator().manual_seed(1)
    head = torch.randint(3, 16, (6,), generator=g).tolist()
    seqs = [head + torch.randint(3, 16, (n,), generator=g).tolist() for n in (1, 4, 2)]
    assert shared_prefix(seqs) == 6
    L = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (L - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seqs])
    dec = _decoder(causal_setup)
    with torch.no_grad():
        want = dec(input_ids=ids, attention_mask=mask).last_hidden_state
    got = prefix_shared_forward(dec, ids, mask, 6).last_hidden_state
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)


def test_evaluation_takes_the_shared_paths_and_scores_as_the_plain_model(causal_setup, monkeypatch):
    """Multi-token labels: the prompt once per example; one-token labels under a long template: the template once
    per batch. Both score as the plain model does, row by row; with autograd (training) whole rows run."""
    import pwemoe.modalities.causal_lm as cl

    calls = {"prompt": 0, "prefix": 0}
    for name, key in (("prompt_shared_forward", "prompt"), ("prefix_shared_forward", "prefix")):
        real = getattr(cl, name)

        def spy(*a, _real=real, _key=key, **k):
            calls[_key] += 1
            return _real(*a, **k)

        monkeypatch.setattr(cl, name, spy)
    cfg = json.loads(json.dumps(causal_setup["config"]))
    cfg["tasks"][0]["label_words"] = [" very bad", " not very good"]
    cfg["tasks"][1]["prompt_template"] = "the review was very : {text} answer :"  # 6 shared tokens
    wb = Workbench(build_config(cfg), load_train=False, upcycle=False)
    plain = AutoModelForCausalLM.from_pretrained(cfg["model"]["base"]).eval()
    for t, key in zip(wb.tasks, ("prompt", "prefix")):
        rows = t.test_data[:4]
        before = dict(calls)
        with torch.no_grad():  # as evaluation runs
            scores = wb.logits([(t, rows)])[0]
        assert calls[key] == before[key] + 1, (t.name, calls)
        _assert_plain_label_scores(t, rows, scores, plain)
    before = dict(calls)
    with torch.enable_grad():
        wb.logits([(wb.tasks[0], wb.tasks[0].test_data[:2])])
    assert calls == before


def test_peft_wrapping_silences_only_peft_s_deprecated_attribute_warning():
    """peft reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model; pwemoe filters that
    one FutureWarning where it wraps, and lets every other warning through."""
    import warnings

    from pwemoe.lora.adapter import peft_wrapping
    from tests.conftest import tiny_llama

    cfg = peft.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        with peft_wrapping():
            peft.get_peft_model(tiny_llama(), cfg)
            warnings.warn("another FutureWarning", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in got if issubclass(w.category, FutureWarning)] == ["another FutureWarning"]
