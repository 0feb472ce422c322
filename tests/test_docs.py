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
