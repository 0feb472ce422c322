"""Every Python example of the README and the guides runs, so no example rots.

Each page's ```python blocks run in order in one namespace, in a sandbox holding what the examples name: a tiny
base with two experts (`models/base`, `models/experts/{sentiment,topic}`), a tiny Llama with three LoRA adapters
(`models/llm`, `adapters/{polarity,color,nature}`), a trained tiny text run with the demo's three task names
(`demo_runs/run`), and a tiny causal-LM run over those adapters (`demo_runs_llm/run`) served under
the name `pareto-smollm` (the examples' `http://127.0.0.1:8000` is that server). A block that cannot run offline on
tiny models carries `<!-- no-test: REASON -->` on the line before it. ```yaml blocks with `tasks:` are validated
as configs (schema, task types and objectives).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.serving import running

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"(?:<!--\s*no-test:\s*(?P<why>[^>]*?)\s*-->\s*\n)?```(?P<lang>\w+)\n(?P<code>.*?)\n```", re.S)


def blocks(page: Path, lang: str) -> list[tuple[str, str | None]]:
    """(code, why it is not run) of every block of `lang` on a page."""
    return [(m["code"], m["why"]) for m in FENCE.finditer(page.read_text()) if m["lang"] == lang]


PY_PAGES = [p for p in PAGES if blocks(p, "python")]


@pytest.fixture(scope="module")
def sandbox(text_setup, llm_run, tmp_path_factory):
    """The paths the examples name, and the LLM run served as `pareto-smollm`."""
    from pwemoe.recipes.train import train
    from pwemoe.serve.app import create_app
    from pwemoe.serve.model import PreferenceModel

    root, base_cfg = text_setup
    box = tmp_path_factory.mktemp("docs")
    shutil.copytree(root / "base", box / "models" / "base")
    for src, name in (("polarity", "sentiment"), ("color", "topic")):
        shutil.copytree(root / "experts" / src, box / "models" / "experts" / name)
    polarity, color = ({**t, "data": {**t["data"], "validation_fraction": 0.3}} for t in base_cfg["tasks"])
    tasks = [  # with validation data, as the demo's (pwemoe select needs it)
        {**polarity, "name": "rt_sentiment"},
        {**color, "name": "bbc_news"},
        {**polarity, "name": "tweet_sentiment"},
    ]
    cfg = {
        **base_cfg,
        "tasks": tasks,
        "run_dir": str(box / "demo_runs" / "run"),
        "train": {**base_cfg["train"], "steps": 4},
    }
    (box / "demo.yaml").write_text(yaml.safe_dump(cfg))
    train(box / "demo.yaml", [])
    shutil.copytree(llm_run, box / "demo_runs_llm" / "run")
    shutil.copytree(llm_run.parent / "base", box / "models" / "llm")
    for name in ("polarity", "color", "nature"):
        shutil.copytree(llm_run.parent / "experts" / name, box / "adapters" / name)
    pm = PreferenceModel(box / "demo_runs_llm" / "run", max_batch=4, max_test_samples=2)
    with running(create_app(pm, model_name="pareto-smollm")) as url:
        yield box, url
    pm.scheduler().close()


def test_every_python_block_runs_or_says_why_not():
    """The harness sees the examples: each page's blocks are found, and every skip names its reason."""
    assert ROOT / "README.md" in PY_PAGES
    for page in PAGES:
        for code, why in blocks(page, "python"):
            assert why is None or len(why) > 5, (page, code[:60])


@pytest.mark.parametrize("page", PY_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_examples_run(page, sandbox, monkeypatch):
    box, url = sandbox
    monkeypatch.chdir(box)
    ns: dict = {"__name__": "__docs__"}
    ran = 0
    for code, why in blocks(page, "python"):
        if why is not None:
            continue
        code = code.replace("http://127.0.0.1:8000", url)
        exec(compile(code, f"{page.name}:example", "exec"), ns)  # noqa: S102 - our own documentation
        ran += 1
    assert ran, f"{page} has python blocks but all are skipped"


def test_config_examples_are_valid_configs(tmp_path):
    from pwemoe.configfile import build_config

    seen = 0
    for page in PAGES:
        for code, why in blocks(page, "yaml"):
            data = yaml.safe_load(code)
            if why is None and isinstance(data, dict) and "tasks" in data and "model" in data:
                build_config(data)  # raises ConfigError naming every problem
                seen += 1
    assert seen >= 2
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # the examples never reached the hub


# --- the lists a user chooses from, written in the docs and in help texts, match their registries ---------------
# A list written in the docs is marked: <!-- list: NAME -->`a` (what a is), `b`<!-- /list --> (or a table whose first
# column names them); a YAML comment that lists a key's choices (`precision: bf16  # fp32 | bf16 | fp16`) is found
# by its key.
MARKED = re.compile(r"(?<!`)<!--\s*list:\s*(?P<name>\w+)\s*-->(?P<body>.*?)<!--\s*/list\s*-->", re.S)
COMMENTED = re.compile(r"^\s*(?P<key>device|precision|objective|source|type):\s*\S+\s+#(?P<comment>.*\|.*)$", re.M)
KEY_LISTS = {"device": "devices", "precision": "precisions", "objective": "objectives", "source": "data_sources"}
KEY_LISTS["type"] = "task_types"


def registry_lists() -> dict[str, list[str]]:
    from pwemoe.config.schema import DATA_SOURCES
    from pwemoe.devices import DEVICE_CHOICES, PRECISIONS
    from pwemoe.objectives import OBJECTIVES
    from pwemoe.tasks import TASK_TYPES

    project = (ROOT / "pyproject.toml").read_text()
    dependencies = re.search(r"^dependencies = \[(.*?)\]", project, re.S | re.M)[1]
    return {
        "dependencies": re.findall(r'"([A-Za-z0-9_.-]+)', dependencies),  # what pwemoe alone installs
        "devices": DEVICE_CHOICES.split(" | "),
        "precisions": list(PRECISIONS),
        "objectives": list(OBJECTIVES),
        "task_types": list(TASK_TYPES),
        "data_sources": list(DATA_SOURCES),
    }


def listed(body: str) -> list[str]:
    """The names a marked list gives: a table's first column, or the `code` spans of prose outside parentheses."""
    rows = [line for line in body.splitlines() if line.startswith("|") and not set(line) <= set("|-: ")]
    if rows:
        return [re.findall(r"`([^`]+)`", row.split("|")[1])[0] for row in rows[1:]]  # rows[0]: the header
    while re.search(r"\([^()]*\)", body):
        body = re.sub(r"\([^()]*\)", "", body)
    return re.findall(r"`([^`]+)`", body)


def test_lists_match_registries():
    want = registry_lists()
    checked: dict[str, int] = {}
    for page in [*PAGES, ROOT / "CONTRIBUTING.md"]:
        where = page.relative_to(ROOT)
        for m in MARKED.finditer(page.read_text()):
            assert m["name"] in want, f"{where}: unknown list {m['name']!r}; known: {sorted(want)}"
            got = listed(m["body"])
            assert sorted(got) == sorted(want[m["name"]]), f"{where}: {m['name']} lists {got}, not {want[m['name']]}"
            checked[m["name"]] = checked.get(m["name"], 0) + 1
        for code, _ in blocks(page, "yaml"):
            for m in COMMENTED.finditer(code):
                name = KEY_LISTS[m["key"]]
                got = [re.match(r"\s*(\w+(?::\w+)?)", item)[1] for item in m["comment"].split("|")]
                assert sorted(got) == sorted(want[name]), f"{where}: the comment on {m['key']!r} lists {got}"
                checked[name] = checked.get(name, 0) + 1
    assert set(checked) == set(want), f"lists found in the docs: {checked}"  # every list is checked somewhere


def test_help_texts_list_the_registries(monkeypatch, capsys):
    """`pwemoe config --explain` and `--help` show what is registered when they run (a toy objective, task type and
    precision added here), and `serve --help` sends the reader to the serving guide."""
    from pwemoe.cli import main
    from pwemoe.devices import DEVICE_CHOICES, PRECISIONS
    from pwemoe.objectives import OBJECTIVES
    from pwemoe.objectives.ls import LinearScalarization
    from pwemoe.tasks import TASK_TYPES, SequenceClassificationTask

    monkeypatch.setitem(OBJECTIVES, "toy_objective", LinearScalarization)
    monkeypatch.setitem(TASK_TYPES, "toy_task", type("ToyTask", (SequenceClassificationTask,), {}))
    monkeypatch.setitem(PRECISIONS, "toy_precision", None)
    assert main(["config", "--explain"]) == 0
    lines = {line.split(" ")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert lines["tasks[i].type"].endswith(" | ".join(TASK_TYPES)) and "toy_task" in lines["tasks[i].type"]
    assert lines["train.objective"].endswith(" | ".join(OBJECTIVES)) and "toy_objective" in lines["train.objective"]
    assert DEVICE_CHOICES in lines["device"]
    assert all(p in lines["precision"] for p in PRECISIONS if p != "toy_precision")
    for command in ("evaluate", "serve"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "toy_precision" in out and DEVICE_CHOICES in out, command
    assert "docs/guides/serving.md" in out and "README" not in out
