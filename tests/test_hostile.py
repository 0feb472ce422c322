"""Hostile files and inputs, through the real CLI where a user meets them: links planted in a run or an
output, YAML built to hang the parser, file modes, names with a trailing newline, code named by a config,
messages that must name the thing and the fix, and a fuzz of causal-LM task configs and LoRA adapters."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml

from pwemoe.cli import main
from pwemoe.config import ConfigError
from tests.fixtures import write_short_run_config


def _cfg(text_setup, where: Path, name: str = "run", **train) -> Path:
    return write_short_run_config(text_setup[1], where / f"{name}.yaml", where / name, **{"steps": 4, **train})


@pytest.fixture(scope="module")
def trained(text_setup, tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("hostile")
    assert main(["train", str(_cfg(text_setup, where))]) == 0
    return where / "run"


def _outside(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A directory outside every run and output, with a file; returns it and its contents to compare."""
    d = tmp_path / "outside"
    d.mkdir(exist_ok=True)
    (d / "victim.txt").write_text("not pwemoe's")
    return d, {p.name: p.read_bytes() for p in d.iterdir()}


def test_links_planted_in_a_run_or_an_output_are_never_followed(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    outside, before = _outside(tmp_path)
    victim = outside / "victim.txt"
    evaluate = ["evaluate", str(run), "--grid", "2", "--no-baselines"]
    # a link in place of a directory pwemoe writes into (plots/), of a file it rewrites, of the lock,
    # and of the metrics it appends to: refused with one line, nothing written outside
    for planted, command in [
        ("plots", evaluate),
        ("report.md", evaluate),
        (".pwemoe.lock", evaluate),
        ("metrics.jsonl", ["train", "--resume", str(run), "train.steps=6"]),
    ]:
        target = outside if planted == "plots" else victim
        (run / planted).unlink(missing_ok=True) if not (run / planted).is_dir() else shutil.rmtree(run / planted)
        (run / planted).symlink_to(target)
        assert main(command) == 2, planted
        err = capsys.readouterr().err
        assert "is a symbolic link" in err and str(run / planted) in err and "Traceback" not in err, err
        assert {p.name: p.read_bytes() for p in outside.iterdir()} == before, planted
        assert (run / planted).is_symlink()  # not replaced either
        (run / planted).unlink()
    assert main(evaluate) == 0  # without the links all is well
    # an export over a previous one whose sub-folder is a link out of it: refused before anything moves
    out = tmp_path / "out"
    assert main(["export", str(run), "--preference", "0.5,0.5", "--out", str(out)]) == 0
    shutil.rmtree(out / "polarity")
    (out / "polarity").symlink_to(outside, target_is_directory=True)
    assert main(["export", str(run), "--preference", "0.2,0.8", "--out", str(out), "--overwrite"]) == 2
    assert "did not write" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before and (out / "polarity").is_symlink()
    # a link elsewhere in it is someone else's file: carried into the new export as a link, never followed
    (out / "polarity").unlink()
    (out / "shared").symlink_to(outside, target_is_directory=True)
    assert main(["export", str(run), "--preference", "0.2,0.8", "--out", str(out), "--overwrite"]) == 0
    assert (out / "shared").is_symlink() and (out / "polarity" / "config.json").is_file()
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before
    # the output itself, or the folder pwemoe builds it in, as a link: refused
    (tmp_path / "out2").symlink_to(outside, target_is_directory=True)
    assert main(["export", str(run), "--preference", "0.5,0.5", "--out", str(tmp_path / "out2"), "--overwrite"]) == 2
    (tmp_path / ".out3.pwemoe-tmp").symlink_to(outside, target_is_directory=True)
    assert main(["export", str(run), "--preference", "0.5,0.5", "--out", str(tmp_path / "out3")]) == 2
    assert capsys.readouterr().err.count("is a symbolic link") == 2
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before


def test_the_server_export_folder_is_checked_whole(trained, tmp_path):
    from pwemoe import PreferenceModel

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    model = PreferenceModel(run, cache_size=1)
    for bad in ("name\n", "ok\nbad", "-x", ".x", "a/b"):
        with pytest.raises(ValueError, match="export name must be"):
            model.export([0.5, 0.5], bad)
    assert not (run / "exports").exists() or not any((run / "exports").iterdir())
    outside, before = _outside(tmp_path)
    (run / "exports").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="is a symbolic link"):
        model.export([0.5, 0.5], "mine")
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before


def _tree(d: Path) -> dict[str, bytes]:
    """Every file under d (relative path -> bytes), and each directory (-> b"<dir>")."""
    return {p.relative_to(d).as_posix(): b"<dir>" if p.is_dir() else p.read_bytes() for p in sorted(d.rglob("*"))}


def test_a_folder_named_like_a_staging_sibling_is_left_alone(trained, tmp_path, monkeypatch, capsys):
    """Only a folder whose ownership marker names the output is recovered: a user's folder named like the staging
    or the displaced sibling of an output stays where it is, with a one-line message; pwemoe's own leftover of a
    killed swap is still recovered."""
    from pwemoe import files

    area = tmp_path / "area"
    out = area / "out"
    with files.staged_dir(out, False, "export") as d:
        (d / "model.bin").write_bytes(b"v1")
    (out / "notes.txt").write_text("mine")
    for sibling in (".out.pwemoe-tmp", ".out.pwemoe-old"):
        mine = area / sibling
        (mine / "data").mkdir(parents=True)
        (mine / "data" / "thesis.txt").write_text("my own")
        (mine / files.MANIFEST).write_text('{"files": ["data/thesis.txt"]}')  # looks like an output pwemoe wrote
        before = _tree(area)
        with pytest.raises(ValueError) as e:
            with files.staged_dir(out, True, "export") as d:
                (d / "model.bin").write_bytes(b"v2")
        msg = str(e.value)
        assert f"{mine} was not made by pwemoe for {out}" in msg and "rename or move that folder" in msg, msg
        assert "\n" not in msg and _tree(area) == before  # nothing moved, nothing removed
        # the same through the CLI, before any model loads
        assert main(["export", str(trained), "--preference", "0.5,0.5", "--out", str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert "was not made by pwemoe" in err and "Traceback" not in err and _tree(area) == before
        # a marker naming another output is not a match either
        (mine / files.STAGED).write_text('{"pwemoe_output": "other", "role": "previous"}')
        with pytest.raises(ValueError, match="was not made by pwemoe"):
            files.recover_output(out, "export")
        shutil.rmtree(mine)
    # pwemoe's own leftover: a kill right after the exchange leaves the previous output at .out.pwemoe-tmp
    # (marked "previous") and the new one at out; the next run finishes the swap and keeps the user's file
    states = []

    def snapshot(kind: str, path: Path) -> None:
        if (kind, path) == ("rename", area / ".out.pwemoe-old"):
            shutil.copytree(area, tmp_path / f"state{len(states)}", symlinks=True)
            states.append(tmp_path / f"state{len(states)}")

    monkeypatch.setattr(files.writes, "_before_step", snapshot)
    with files.staged_dir(out, True, "export") as d:
        (d / "model.bin").write_bytes(b"v2")
    monkeypatch.setattr(files.writes, "_before_step", None)
    if not states:
        pytest.skip("no renameat2 exchange on this filesystem")
    shutil.rmtree(area)
    shutil.copytree(states[0], area, symlinks=True)
    assert (area / ".out.pwemoe-tmp" / "notes.txt").is_file() and (out / "model.bin").read_bytes() == b"v2"
    files.recover_output(out, "export")
    assert _tree(area) == {
        "out": b"<dir>",
        "out/.pwemoe_files.json": b'{\n "files": [\n  "model.bin"\n ]\n}',
        "out/model.bin": b"v2",
        "out/notes.txt": b"mine",
    }


def test_files_read_whole_are_bounded(trained, tmp_path, capsys):
    """A file pwemoe reads whole stops at its limit with one line naming it: `evaluate --preferences /dev/zero`
    (which read until the process was killed), a named pipe no one writes (which blocked), a huge adapter config,
    a results file that is not pwemoe's. Run in a child process with a memory limit: a regression fails, not hangs."""
    import subprocess
    import sys

    from pwemoe.lora.adapter import ADAPTER_CONFIG, read_lora_adapter

    fifo = tmp_path / "prefs.fifo"
    os.mkfifo(fifo)
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))\n"
        "from pwemoe.cli import main\n"
        "sys.exit(main(['evaluate', sys.argv[1], '--preferences', sys.argv[2]]))\n"
    )
    for source, words in (("/dev/zero", "holds more than 16 MiB"), (str(fifo), "holds no preferences")):
        p = subprocess.run(
            [sys.executable, "-c", script, str(trained), source], capture_output=True, text=True, timeout=300
        )
        err = p.stderr.strip().splitlines()
        assert p.returncode == 2 and err and words in err[-1], p.stderr[-2000:]
        if source == "/dev/zero":
            assert "the preferences file /dev/zero holds more than 16 MiB, the most pwemoe reads of it; " in err[-1]
    # a regular file over the limit is refused from its size, without reading it
    ad = _lora(tmp_path / "ad")
    with open(ad / ADAPTER_CONFIG, "r+b") as f:
        f.truncate(17 << 20)  # sparse: 17 MiB of zeros
    with pytest.raises(ValueError, match=r"expert 'big': the adapter config .* holds more than 16 MiB"):
        read_lora_adapter(ad, "expert 'big'")
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "results.json").symlink_to("/dev/zero")
    assert main(["evaluate", str(run), "--grid", "2", "--no-baselines"]) == 2
    err = capsys.readouterr().err
    assert "results.json holds more than 256 MiB" in err and "move it away" in err, err


def _laughs(levels: int = 9) -> str:
    """A "billion laughs" document: each level 10 aliases of the one below (10**levels leaves)."""
    lines = ["l0: &l0 [ha, ha, ha, ha, ha, ha, ha, ha, ha, ha]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def test_a_hostile_config_neither_hangs_the_parser_nor_runs_code(text_setup, tmp_path, capsys):
    from pwemoe.config import read_yaml

    good = yaml.safe_load(_cfg(text_setup, tmp_path).read_text())
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(yaml.safe_dump(good) + _laughs())
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="values once its aliases"):
        read_yaml(bomb)
    assert time.perf_counter() - t0 < 30  # refused before anything is expanded (it took forever)
    assert main(["train", str(bomb)]) == 2
    assert "aliases" in capsys.readouterr().err
    cases = {
        "self.yaml": ("a: &a [1, *a]\n", "refers to the value that contains it"),
        "deep.yaml": ("x: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
        "big.yaml": ("x: " + "a" * (2 << 20) + "\n", "more than a config may have"),  # 2 MiB
        "tag.yaml": (f"x: !!python/object/apply:os.system ['touch {tmp_path / 'ran'}']\n", "not valid YAML"),
    }
    for name, (text, words) in cases.items():
        (tmp_path / name).write_text(text)
        assert main(["train", str(tmp_path / name)]) == 2, name
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
    assert not (tmp_path / "ran").exists()  # the tag was never executed
    # the same limits hold for a value given on the command line
    assert (
        main(["train", str(_cfg(text_setup, tmp_path)), f"train.objective_args={{{_laughs().replace(chr(10), ', ')}}}"])
        == 2
    )
    assert "aliases" in capsys.readouterr().err


def test_files_get_the_modes_the_umask_gives(trained, tmp_path):
    def modes(root: Path) -> dict[str, int]:
        return {
            p.relative_to(root).as_posix(): p.stat().st_mode & 0o777
            for p in root.rglob("*")
            if not p.name.startswith(".pwemoe.lock")  # the run lock may stay private
        }

    old = os.umask(0o022)
    try:
        run = tmp_path / "run"
        shutil.copytree(trained, run)
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["run_dir"] = str(tmp_path / "fresh")
        (tmp_path / "fresh.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["train", str(tmp_path / "fresh.yaml")]) == 0
        assert main(["export", str(tmp_path / "fresh"), "--preference", "0.5,0.5", "--out", str(tmp_path / "ex")]) == 0
        for root in (tmp_path / "fresh", tmp_path / "ex"):
            got = modes(root)
            assert "config.yaml" in got or "pwemoe.json" in got
            want = {k: 0o755 if (root / k).is_dir() else 0o644 for k in got}
            assert got == want, {k: oct(v) for k, v in got.items() if v != want[k]}
        os.umask(0o027)  # a stricter umask is followed too (not a fixed 0644)
        assert main(["export", str(tmp_path / "fresh"), "--preference", "0.2,0.8", "--out", str(tmp_path / "ex2")]) == 0
        got = modes(tmp_path / "ex2")
        assert got and all(v == (0o750 if (tmp_path / "ex2" / k).is_dir() else 0o640) for k, v in got.items())
    finally:
        os.umask(old)


def test_names_are_checked_whole(text_setup, tmp_path, capsys):
    from pwemoe.configfile import build_config

    good = yaml.safe_load(_cfg(text_setup, tmp_path).read_text())
    for key, value, words in [
        ("name", "polarity\n", "tasks[0].name: must be a plain name"),
        ("name", "polarity\nx", "tasks[0].name: must be a plain name"),
    ]:
        bad = copy.deepcopy(good)
        bad["tasks"][0][key] = value
        with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
            build_config(bad)
    with pytest.raises(ConfigError, match="device: must be"):
        build_config({**good, "device": "cpu\n"})


def _lora(out: Path, modules: tuple[str, ...] = ("layer.0.q_proj", "layer.0.v_proj")) -> Path:
    from pwemoe.lora.adapter import write_lora_adapter

    g = torch.Generator().manual_seed(0)
    layers = {m: (torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)) for m in modules}
    return write_lora_adapter(out, layers, "base")


def test_messages_name_the_thing_and_the_fix(text_setup, tmp_path, capsys):
    from pwemoe.lora.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_lora_adapter

    # a truncated adapter file, and a pickle saved under the adapter's name: the expert, the file and the fix
    ad = _lora(tmp_path / "ad")
    weights = ad / ADAPTER_WEIGHTS
    good = weights.read_bytes()
    for broken in (good[: len(good) // 2], None):
        if broken is None:
            torch.save({"a": torch.zeros(2)}, weights)
        else:
            weights.write_bytes(broken)
        with pytest.raises(ValueError) as e:
            read_lora_adapter(ad, "expert 'polarity'")
        msg = str(e.value)
        assert "expert 'polarity'" in msg and str(weights) in msg and "safe_serialization=True" in msg, msg
    weights.write_bytes(good)
    # target_modules that disagree with the weights, either way round
    for targets, words in [
        (["q_proj"], "'layer.0.v_proj' has LoRA weights but target_modules"),
        (["q_proj", "v_proj", "k_proj"], "names 'k_proj' but no module"),
    ]:
        cfg = json.loads((ad / ADAPTER_CONFIG).read_text())
        (ad / ADAPTER_CONFIG).write_text(json.dumps({**cfg, "target_modules": targets}))
        with pytest.raises(ValueError, match=words):
            read_lora_adapter(ad, "expert 'polarity'")
    (ad / ADAPTER_CONFIG).write_text(json.dumps({**cfg, "target_modules": ["q_proj", "v_proj"]}))
    assert set(read_lora_adapter(ad).layers) == {"layer.0.q_proj", "layer.0.v_proj"}  # peft's suffix rule
    # a config path that is a directory
    assert main(["train", str(tmp_path)]) == 2
    assert f"config file {tmp_path} is a directory" in capsys.readouterr().err
    # a NaN before the first checkpoint: nothing is kept, and the message says so
    p = _cfg(text_setup, tmp_path, "nan", save_interval=100)
    assert main(["train", str(p), "train.lr=1.0e+30"]) == 2
    err = capsys.readouterr().err
    assert "loss is not finite" in err and "no checkpoint was saved" in err and "last good" not in err, err
    assert not (tmp_path / "nan" / "routers.safetensors").exists()
    # numbers of the wrong kind: the error says how to write what was meant
    overrides = ["train.lr='1e-3'", "train.steps=1e2", "tasks.0.name=1e3"]
    assert main(["train", str(_cfg(text_setup, tmp_path, "e")), *overrides]) == 2
    err = capsys.readouterr().err
    assert "train.lr: expected float, got str '1e-3' (quoted, a number is text; write it without quotes)" in err, err
    assert "train.steps: expected int, got float 100.0 (write the integer 100)" in err, err
    assert "tasks[0].name: expected str, got float 1000.0 (YAML reads it as a number; quote it to give text)" in err
    # a CSV with a header and no rows
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    assert main(["train", str(_cfg(text_setup, tmp_path, "c")), f"tasks.0.data.files.train={empty}"]) == 2
    err = capsys.readouterr().err
    assert f"csv file {empty} for split 'train' has no examples (only a header line)" in err, err


def test_exponent_floats_are_floats_in_configs_and_overrides(text_setup, tmp_path):
    """1e-3, 3e30 and -2E-5 are floats, as OmegaConf and Hydra read them (YAML 1.1 reads them as text); quoted,
    or not a number, they stay text."""
    from pwemoe.config import dump_config, load_yaml
    from pwemoe.configfile import read_config

    assert load_yaml("[1e-3, 3e30, -2E-5, 1.0e5, +4e2, .5e1]", "x") == [0.001, 3e30, -2e-5, 1.0e5, 400.0, 5.0]
    assert load_yaml("['1e-3', \"3e30\", 1e3abc, e3, 1e, 1e-3.5]", "x") == [
        "1e-3",
        "3e30",
        "1e3abc",
        "e3",
        "1e",
        "1e-3.5",
    ]
    p = _cfg(text_setup, tmp_path, lr="LR")
    p.write_text(p.read_text().replace("lr: LR", "lr: 1e-3"))  # written as a person writes it, not as YAML dumps it
    cfg = read_config(p, ["train.alpha=3e30", "model.init_lambda=-2E-5", "tasks.0.name=1e3abc"])
    assert (cfg.train.lr, cfg.train.alpha, cfg.model.init_lambda) == (1e-3, 3e30, -2e-5)
    assert cfg.tasks[0].name == "1e3abc"
    with pytest.raises(ConfigError, match=r"train.lr: expected float, got str '1e-3' \(quoted"):
        read_config(p, ["train.lr='1e-3'"])
    # what pwemoe writes (a run's config.yaml) reads back the same: a task named '1e3' stays quoted
    quoted = read_config(p, ["tasks.0.name='1e3'"])
    assert load_yaml(dump_config(quoted), "config.yaml")["tasks"][0]["name"] == "1e3"


def test_code_named_by_a_config_needs_trust_remote_code(text_setup, tmp_path, monkeypatch):
    from pwemoe.configfile import build_config
    from pwemoe.tasks.data import load_split

    (tmp_path / "someones_adapter.py").write_text(
        "from pathlib import Path\nimport datasets\n"
        f"def build(cache):\n    Path({str(tmp_path / 'ran')!r}).touch()\n"
        "    return {'train': datasets.Dataset.from_dict({'text': ['a'], 'label': [0]})}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    good = yaml.safe_load(_cfg(text_setup, tmp_path).read_text())
    cfg = copy.deepcopy(good)
    cfg["tasks"][0]["data"] = {"source": "adapter", "path": "someones_adapter:build"}
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.data\.path: 'someones_adapter:build' names Python code"):
        build_config(cfg)
    with pytest.raises(ValueError, match="trust_remote_code"):  # the Python API asks for the same opt-in
        load_split(build_config(good).tasks[0].data.model_copy(update=cfg["tasks"][0]["data"]), "train")
    assert not (tmp_path / "ran").exists()  # nothing was imported or run
    cfg["tasks"][0]["data"]["trust_remote_code"] = True
    data = build_config(cfg).tasks[0].data
    assert len(load_split(data, "train")) == 1 and (tmp_path / "ran").exists()
    # a registered adapter needs no opt-in, by its name or by the function it names; an unknown name is an error
    from pwemoe.tasks.data import registered_adapters

    names = registered_adapters()
    assert {"rt_sentiment", "bbc_news", "tweet_sentiment"} <= set(names)
    for path in ("rt_sentiment", names["rt_sentiment"]):
        cfg["tasks"][0]["data"] = {"source": "adapter", "path": path}
        build_config(cfg)
    cfg["tasks"][0]["data"] = {"source": "adapter", "path": "no_such_adapter"}
    with pytest.raises(ConfigError, match="unknown data adapter 'no_such_adapter'; installed adapters are"):
        build_config(cfg)
    # the demo configs name registered adapters only
    from importlib import resources

    for name in ("demo.yaml", "llm.yaml"):
        text = resources.files("pwemoe.demo").joinpath(f"configs/{name}").read_text()
        paths = [t["data"]["path"] for t in yaml.safe_load(text)["tasks"]]
        assert paths and all(p in names for p in paths), paths


# --- a fuzz of causal-LM task configs, data and LoRA adapters ------------------------------------------
FUZZ_WORDS = ["good", "bad", "red", "blue", "film", "team", "very", "not", "review", "answer"]


def _fuzz_tokenizer():
    """A word-level tokenizer that drops '~' (as real normalizers drop control characters), so a text can
    encode to nothing."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>", *FUZZ_WORDS, ":", "?"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Replace("~", "")
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def _fuzz_bases(root: Path) -> dict[str, Path]:
    """A tiny rotary Llama and a tiny GPT-2 with a 16-position table, with the fuzz tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = _fuzz_tokenizer()
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    models = {
        "llama": LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tok),
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=64,
                **ids,
            )
        ),
        "gpt2": GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=len(tok), n_positions=16, **ids)),
    }
    for name, m in models.items():
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return {name: root / name for name in models}


def _fuzz_value(rng: random.Random, choices: list):
    return copy.deepcopy(rng.choice(choices))


def test_fuzz_causal_lm_tasks_and_adapters(tmp_path):
    """Random causal-LM task configs and data on two bases (rotary and learned positions), and random damage
    to LoRA adapters: each case either scores finite values or is refused with ConfigError / ValueError,
    never another exception; an adapter's error names the expert."""
    import datasets

    from pwemoe.configfile import build_config
    from pwemoe.lora.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_lora_adapter
    from pwemoe.tasks import TASK_TYPES
    from pwemoe.workbench import Workbench
    from tests.fixtures import write_csv_splits

    bases = _fuzz_bases(tmp_path)
    data = write_csv_splits(tmp_path, "t", {"train": [{"text": "good film", "label": 0}] * 2, "test": []})
    benches = {}
    for name, base in bases.items():
        task = {
            "name": "t",
            "type": "causal_lm_choice",
            "expert": str(base),
            "class_names": ["good", "bad"],
            "max_length": 8,
            "data": data,
        }
        cfg = {"model": {"base": str(base)}, "tasks": [task, {**task, "name": "u"}], "device": "cpu"}
        benches[name] = Workbench(build_config(cfg), load_train=False, load_test=False, upcycle=False)
    texts = ["good film", "~~~", "good ~ bad", "very " * 40, "\x00 🙂", "review: answer?", "not\ngood", "~~~", ""]
    options = {
        "max_length": [1, 2, 8, 16, 17, 10**6, 0],
        "prompt_template": [
            None,
            "{text}",
            "review: {text} answer:",
            "",
            "{nope}",
            "{",
            "{0}",
            "{text_pair} {text}",
            "{text:>999}",
            "~{text}~",
            "very " * 20 + "{text}",
        ],
        "label_words": [
            None,
            [" good", " bad"],
            [" ", " bad"],
            ["", ""],
            [" good", " good"],
            [" very bad", " not good"],
            ["~", " bad"],
            [" good"],
            [],
            [" zzz", " bad"],
        ],
        "chat_template": [None, True, False],
        "prompt_column": [None, "prompt", "missing"],
    }
    rng = random.Random(0)
    outcomes: dict[str, int] = {}
    for _ in range(100):
        base = rng.choice(sorted(bases))
        t = {
            "name": "t",
            "type": rng.choice(["causal_lm_choice", "causal_lm"]),
            "expert": str(bases[base]),
            "class_names": ["good", "bad"],
            "max_length": 8,
            "data": dict(data),
        }
        for key in rng.sample(sorted(options), rng.randint(0, 3)):
            v = _fuzz_value(rng, options[key])
            if key == "prompt_column":
                t["data"]["prompt_column"] = v
            elif v is not None:
                t[key] = v
        if t.get("type") == "causal_lm":
            for key in ("prompt_template", "label_words", "class_names"):
                t.pop(key, None)
        n = rng.randint(1, 4)
        rows = {
            "text": [rng.choice(texts) for _ in range(n)],
            "prompt": [rng.choice(texts) for _ in range(n)],
            "label": [rng.choice([0, 1, 1, 2]) for _ in range(n)],
        }
        wb = benches[base]
        try:
            cfg = build_config({"model": {"base": str(bases[base])}, "tasks": [t, {**t, "name": "u"}]})
            task = TASK_TYPES[cfg.tasks[0].type](cfg.tasks[0])
            task.test_data = datasets.Dataset.from_dict(rows)
            errors: list[str] = []
            task.validate_data(errors, 0)
            if errors:
                raise ConfigError(errors)
            task.attach(wb.modality)
            wb.tasks = [task]
            out = wb.logits([(task, task.test_data[:])])[0]
            assert out.shape == (n, task.num_classes if task.has_labels else 1) and torch.isfinite(out).all(), (t, rows)
            outcomes["scored"] = outcomes.get("scored", 0) + 1
        except (ConfigError, ValueError) as e:
            assert str(e).strip(), (t, rows)
            outcomes["refused"] = outcomes.get("refused", 0) + 1
            for words in ("encode to no tokens", "beyond the model's", "tokenise to nothing", "fewer than 2 tokens"):
                outcomes[words] = outcomes.get(words, 0) + (words in str(e))
    assert outcomes["scored"] >= 5 and outcomes["refused"] >= 20, outcomes
    assert all(outcomes[w] for w in ("encode to no tokens", "beyond the model's", "tokenise to nothing")), outcomes

    good = _lora(tmp_path / "adapter")
    cfg0 = json.loads((good / ADAPTER_CONFIG).read_text())
    raw = (good / ADAPTER_WEIGHTS).read_bytes()
    values = [None, 0, -1, 3, 2.5, "8", "x", True, [], {}, ["q_proj"], ".*", "(", {"q_proj": 4}, {"(": 2}, 10**9]
    keys = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out"]
    read = {"ok": 0, "refused": 0}
    rng = random.Random(1)
    for i in range(150):
        d = tmp_path / f"damaged{i}"
        shutil.copytree(good, d)
        kind = rng.choice(["config", "config", "json", "bytes", "tensors"])
        if kind == "config":
            c = dict(cfg0)
            for _ in range(rng.randint(1, 3)):
                c[rng.choice(keys)] = _fuzz_value(rng, values)
            (d / ADAPTER_CONFIG).write_text(json.dumps(c))
        elif kind == "json":
            (d / ADAPTER_CONFIG).write_text(rng.choice(["[]", "1", "null", '"x"', "{", ""]))
        elif kind == "bytes":
            cut = raw[: rng.randint(0, len(raw) - 1)]
            (d / ADAPTER_WEIGHTS).write_bytes(rng.choice([cut, bytes(rng.randrange(256) for _ in range(64))]))
        else:
            from safetensors.torch import load_file, save_file

            w = load_file(str(good / ADAPTER_WEIGHTS))
            k = rng.choice(sorted(w))
            change = rng.choice(["drop", "shape", "int", "1d", "nan"])
            if change == "drop":
                del w[k]
            else:
                w[k] = {
                    "shape": torch.randn(3, 5),
                    "int": w[k].int(),
                    "1d": torch.zeros(4),
                    "nan": torch.full_like(w[k], float("nan")),
                }[change]
            save_file(w, str(d / ADAPTER_WEIGHTS))
        try:
            ad = read_lora_adapter(d, "expert 'fuzzed'")
            assert all(x.A.dim() == x.B.dim() == 2 and x.A.shape[0] == x.B.shape[1] for x in ad.layers.values())
            assert all(torch.isfinite(x.A).all() and torch.isfinite(x.B).all() for x in ad.layers.values())
            read["ok"] += 1
        except ValueError as e:
            assert "expert 'fuzzed'" in str(e), str(e)
            read["refused"] += 1
    assert read["ok"] >= 3 and read["refused"] >= 100, read
