"""lm-evaluation-harness against `pwemoe serve`: its `local-completions` model, unchanged, over a real uvicorn server
on 127.0.0.1, runs a multiple-choice (log-likelihood) task and a generate_until task at two preferences, and
gives what lm-eval's own `hf` model gives on the plain model exported at that preference. Tasks are lm-eval task
YAMLs over JSON-lines files the test writes (no network). And the lm-eval extra, when missing, is one line.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

import pwemoe
from tests.serving import running

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["good", "bad", "red", "blue", "film", "team", "the", "was", "very", "not", "sky", "sea", "tree", "song"]


@pytest.fixture(scope="module")
def lmeval_server(llm_run, tmp_path_factory):
    """The run served on 127.0.0.1, and two local lm-eval tasks: `pw_choice` (multiple choice between ' bad' and
    ' good' after '<words> answer :') and `pw_gen` (greedy generation of up to 4 tokens after such a prompt)."""
    pytest.importorskip("lm_eval")
    from pwemoe.lmeval import write_task
    from pwemoe.serve.app import create_app
    from pwemoe.serve.model import PreferenceModel

    folder = tmp_path_factory.mktemp("lmeval_tasks")
    rng = random.Random(3)

    def prompt() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))) + " answer :"

    write_task(
        folder, "pw_choice", [{"prompt": prompt(), "choices": ["bad", "good"], "label": i % 2} for i in range(12)]
    )
    gen = [{"prompt": prompt(), "answer": rng.choice(WORDS)} for _ in range(6)]
    write_task(folder, "pw_gen", gen, kind="generate_until", until=["\n"], max_gen_toks=4)
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(folder), include_defaults=False)  # our two tasks only: fast
    pm = PreferenceModel(llm_run, max_batch=8, token_budget=400, max_test_samples=2)
    with running(create_app(pm)) as url:
        yield pm, url, manager
    pm.scheduler().close()
    pm.scorer().close()


def _evaluate(model, manager, model_args: dict | None = None) -> dict:
    from lm_eval import simple_evaluate

    return simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["pw_choice", "pw_gen"],
        task_manager=manager,
        log_samples=True,
        bootstrap_iters=0,
        verbosity="ERROR",
    )


@pytest.mark.parametrize(
    "preference, remote",
    [([0.7, 0.2, 0.1], False), ([0.0, 0.5, 0.5], True)],
    ids=["local tokenizer", "server's tokenizer"],
)
def test_local_completions_equals_hf_on_the_exported_model(lmeval_server, llm_run, preference, remote):
    """Accuracy, every log-likelihood (tolerance) and every generated text of lm-eval's local-completions model
    over HTTP at a preference equal lm-eval's hf model on merge_and_unload(model, preference)."""
    from lm_eval.models.huggingface import HFLM

    pm, url, manager = lmeval_server
    tok = pm.wb.modality.tokenizer
    name = pm.run.resolve().name
    args = {
        "model": f"{name}@" + ",".join(str(x) for x in preference),
        "base_url": url + "/v1/completions",
        "max_length": 48,  # the tiny model's context
        "batch_size": 4,  # several prompts per request
        "max_retries": 1,
    }
    if not remote:  # otherwise lm-eval finds /tokenizer_info and /tokenize and uses the server's tokenizer
        args["tokenizer"] = str(llm_run.parent / "base")
    served = _evaluate("local-completions", manager, args)
    plain = pwemoe.merge_and_unload(pm.wb.modality.model, preference).eval()
    hf = HFLM(pretrained=plain, tokenizer=tok, max_length=48, batch_size=4, device="cpu")
    ref = _evaluate(hf, manager)
    for task, metric in (("pw_choice", "acc,none"), ("pw_gen", "exact_match,none")):
        assert served["results"][task][metric] == ref["results"][task][metric], task

    def samples(out: dict, task: str) -> list[dict]:
        return sorted(out["samples"][task], key=lambda s: s["doc_id"])

    got = [[float(x[0][0]) for x in s["resps"]] for s in samples(served, "pw_choice")]
    want = [[float(x[0][0]) for x in s["resps"]] for s in samples(ref, "pw_choice")]
    assert len(got) == 12 and all(len(g) == 2 for g in got)
    assert all(abs(a - b) < 1e-4 for g, w in zip(got, want) for a, b in zip(g, w)), (got, want)
    texts = [s["filtered_resps"] for s in samples(served, "pw_gen")]
    assert texts == [s["filtered_resps"] for s in samples(ref, "pw_gen")] and any(t[0] for t in texts)


def test_the_lmeval_extra_missing_is_one_line_and_exit_2(tmp_path, monkeypatch):
    """Without lm-eval, `pwemoe.lmeval.require` names the extra, and the benchmark that needs it prints that one
    line, exits with status 2 and writes nothing."""
    from pwemoe.lmeval import require

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without the package gives
    with pytest.raises(RuntimeError) as e:
        require()
    assert "pip install 'pwemoe[lmeval]'" in str(e.value) and "\n" not in str(e.value)
    hide = "import sys; sys.modules['lm_eval'] = None; "
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    result = tmp_path / "speed.json"
    bench = (
        hide + f"import runpy; sys.argv = ['lmeval_speed.py', '--run', {str(tmp_path)!r}, '--out', {str(result)!r}]; "
        f"runpy.run_path({str(ROOT / 'benchmarks' / 'lmeval_speed.py')!r}, run_name='__main__')"
    )
    out = subprocess.run([sys.executable, "-c", bench], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "pwemoe[lmeval]" in lines[0] and not result.exists() and not list(tmp_path.iterdir())
