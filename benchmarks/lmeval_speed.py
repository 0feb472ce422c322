"""Examples per second of an lm-eval multiple-choice task at one preference: lm-eval over HTTP vs pwemoe's own scoring.

The task is one of the run's `causal_lm_choice` tasks, its first `--examples` test examples written as an lm-eval
task (`pwemoe.lmeval.write_task`: the prompt pwemoe builds, the label words as the choices with no delimiter added,
so both paths score the same texts). Both paths run on one loaded run, at one preference:

- pwemoe: `PreferenceModel.logits` over the examples in the run's evaluation batches (the merged copy at the
  preference, the prompt computed once for all labels), what `pwemoe evaluate` does;
- http: lm-eval's `local-completions` model, unchanged, against `pwemoe serve`'s app on 127.0.0.1 (uvicorn in
  this process), `--batch-size` prompts per request; the whole `simple_evaluate` call is timed, task loading
  included (lm-eval's task index, built once, is not). `--tokenizer`: lm-eval tokenizes with that
  folder's tokenizer (default: the run's base when it is a local folder with a tokenizer, else the server's
  /tokenize).

- in_process: what `pwemoe evaluate` runs for a task with an `lm_eval` block (`lmeval_scoring.LMEvalScorer`):
  lm-eval's `evaluate` with its hf model (HFLM) over the merged copy at the preference, `--hf-batch-size` prompts
  per forward (default: the run's eval.batch_size, as pwemoe's own scoring); the task is loaded once, and each
  call (timed) builds lm-eval's requests, runs them and logs the samples.

Each path runs once to warm up (merges, first forwards) and is then timed `--repeats` times (the median is
reported, every time is kept in the JSON); ratios are of the same run.

    .venv/bin/python benchmarks/lmeval_speed.py --run demo_runs_llm/run --examples 64 --out /tmp/lmeval_speed.json

Needs the lmeval extra (pip install 'pwemoe[lmeval]'); without it, one line and exit status 2, nothing written.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path


@contextlib.contextmanager
def _serving(app):
    """`app` on 127.0.0.1 at a free port in a thread until the block exits; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    while not server.started:
        if not t.is_alive():
            raise RuntimeError("the benchmark's server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        t.join(10)
        sock.close()


def _docs(pm, task, n: int) -> tuple[list[dict], list[str]]:
    """The task's first n test examples as lm-eval docs (pwemoe's own prompt text), and the raw inputs."""
    rows = task.test_data[:n]
    text_col = task.cfg.data.text_column
    prompts = task.prompts(rows)
    if task.use_chat:  # the text pwemoe scores: the prompt through the chat template
        tok = task.tokenizer
        prompts = [
            tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    labels = task.labels(rows).tolist()
    docs = [{"prompt": p, "choices": task.label_words, "label": y} for p, y in zip(prompts, labels)]
    return docs, [str(x) for x in rows[text_col]]


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def own_scoring(pm, task, inputs: list[str], labels: list[int], r: list[float], repeats: int = 1) -> dict:
    bs = pm.wb.cfg.eval.batch_size
    pm.logits(r, task.name, inputs[:bs])  # warm-up: the merge at r
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        preds = []
        for i in range(0, len(inputs), bs):
            preds += pm.logits(r, task.name, inputs[i : i + bs])[0].argmax(-1).tolist()
        times.append(time.perf_counter() - t0)
    seconds = _median(times)
    acc = sum(p == y for p, y in zip(preds, labels)) / len(labels)
    return {
        "seconds": seconds,
        "times": times,
        "examples_per_s": len(inputs) / seconds,
        "accuracy": acc,
        "predictions": preds,
    }


def over_http(
    pm, folder: Path, task_name: str, r: list[float], batch_size: int, tokenizer: str | None, repeats: int = 1
) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from pwemoe.generation import context_length
    from pwemoe.serve.app import create_app

    with _serving(create_app(pm)) as url:
        args = {
            "model": pm.run.resolve().name + "@" + ":".join(f"{x:g}" for x in r),
            "base_url": url + "/v1/completions",
            "batch_size": batch_size,
            "max_length": context_length(pm.wb.modality.model),
        }
        if tokenizer:
            args["tokenizer"] = tokenizer
        t0 = time.perf_counter()
        manager = TaskManager(include_path=str(folder), include_defaults=False)  # the one task: made once
        indexing = time.perf_counter() - t0

        def run() -> dict:
            return simple_evaluate(
                model="local-completions",
                model_args=args,
                tasks=[task_name],
                task_manager=manager,
                log_samples=True,
                bootstrap_iters=0,
                verbosity="ERROR",
            )

        run()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - t0)
        seconds = _median(times)
    samples = sorted(out["samples"][task_name], key=lambda s: s["doc_id"])
    preds = [max(range(len(s["resps"])), key=lambda j: float(s["resps"][j][0][0])) for s in samples]
    n = len(samples)
    return {
        "seconds": seconds,
        "times": times,
        "examples_per_s": n / seconds,
        "accuracy": out["results"][task_name]["acc,none"],
        "predictions": preds,
        "tokenizer": tokenizer or "the server's (/tokenize)",
        "task_index_seconds": indexing,
    }


def in_process(pm, folder: Path, task_name: str, r: list[float], batch_size: int, repeats: int = 1) -> dict:
    from types import SimpleNamespace

    from pwemoe.baselines import Point
    from pwemoe.config import LMEvalConfig
    from pwemoe.evaluation import MergedCopy
    from pwemoe.lmeval_scoring import LMEvalScorer

    spec = LMEvalConfig(task=task_name, include_path=str(folder), batch_size=batch_size)
    scorer = LMEvalScorer(pm.wb, SimpleNamespace(name=task_name, cfg=SimpleNamespace(lm_eval=spec)), batch_size)
    source = MergedCopy(pm.wb)
    try:
        with source.model(Point.at(r)) as backbone:
            scorer.evaluate(backbone)  # warm-up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                out = scorer.evaluate(backbone)
                times.append(time.perf_counter() - t0)
            seconds = _median(times)
    finally:
        source.release()
    samples = sorted(out["samples"][task_name], key=lambda s: s["doc_id"])
    preds = [max(range(len(s["resps"])), key=lambda j: float(s["resps"][j][0][0])) for s in samples]
    return {
        "seconds": seconds,
        "times": times,
        "examples_per_s": len(samples) / seconds,
        "accuracy": out["results"][task_name]["acc,none"],
        "predictions": preds,
        "batch_size": batch_size,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="demo_runs_llm/run")
    ap.add_argument("--task", help="a causal_lm_choice task of the run (default: its first)")
    ap.add_argument("--preference", help="e.g. 0.5,0.3,0.2 (default: uniform)")
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8, help="lm-eval's prompts per HTTP request")
    ap.add_argument("--hf-batch-size", type=int, help="in process: lm-eval's batch size (default: eval.batch_size)")
    ap.add_argument("--tokenizer", help="lm-eval's tokenizer folder (default: the run's base, else the server's)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each path after its warm-up (median)")
    ap.add_argument("--out", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    from pwemoe.lmeval import require

    try:
        require()  # before anything loads or is written
    except RuntimeError as e:
        print(f"lmeval_speed: error: {e}", file=sys.stderr)
        return 2
    import torch

    from pwemoe.core.preference import parse_preference
    from pwemoe.files import atomic_write_json
    from pwemoe.lmeval import write_task
    from pwemoe.serve.model import PreferenceModel

    pm = PreferenceModel(args.run, max_test_samples=args.examples)
    tasks = [t for t in pm.wb.tasks if t.cfg.type == "causal_lm_choice"]
    task = next((t for t in tasks if t.name == args.task), None) if args.task else (tasks[0] if tasks else None)
    if task is None:
        print(f"lmeval_speed: error: no causal_lm_choice task {args.task or ''} in {args.run}", file=sys.stderr)
        return 2
    r = pm.preference(parse_preference(args.preference) if args.preference else pm.default_preference)
    docs, inputs = _docs(pm, task, args.examples)
    tokenizer = args.tokenizer
    base = Path(str(pm.wb.modality.base))
    if tokenizer is None and (base / "tokenizer_config.json").exists():
        tokenizer = str(base)
    with tempfile.TemporaryDirectory() as tmp:
        name = f"pwemoe_{task.name}"
        write_task(tmp, name, docs, target_delimiter="")
        labels = [d["label"] for d in docs]
        own = own_scoring(pm, task, inputs, labels, r, args.repeats)
        http = over_http(pm, Path(tmp), name, r, args.batch_size, tokenizer, args.repeats)
        hf_bs = args.hf_batch_size or pm.wb.cfg.eval.batch_size
        inproc = in_process(pm, Path(tmp), name, r, hf_bs, args.repeats)
    agree = sum(a == b for a, b in zip(own["predictions"], http["predictions"])) / len(docs)
    agree_in = sum(a == b for a, b in zip(own["predictions"], inproc["predictions"])) / len(docs)
    result = {
        "run": str(Path(args.run).resolve()),
        "task": task.name,
        "preference": r,
        "examples": len(docs),
        "threads": torch.get_num_threads(),
        "pwemoe": {k: v for k, v in own.items() if k != "predictions"},
        "http": {k: v for k, v in http.items() if k != "predictions"},
        "in_process": {k: v for k, v in inproc.items() if k != "predictions"},
        "http_over_pwemoe": http["examples_per_s"] / own["examples_per_s"],
        "in_process_over_pwemoe": inproc["examples_per_s"] / own["examples_per_s"],
        "prediction_agreement": agree,
        "in_process_prediction_agreement": agree_in,
    }
    print(f"{task.name} at {r}, {len(docs)} examples, {torch.get_num_threads()} threads")
    for key in ("pwemoe", "http", "in_process"):
        v = result[key]
        print(
            f"  {key:10s} {v['examples_per_s']:8.2f} examples/s  ({v['seconds']:.2f} s)  accuracy {v['accuracy']:.4f}"
        )
    print(f"  http / pwemoe {result['http_over_pwemoe']:.3f}; the two agree on {agree:.1%} of predictions")
    print(
        f"  in_process / pwemoe {result['in_process_over_pwemoe']:.3f}; the two agree on {agree_in:.1%} of predictions"
    )
    if args.out:
        atomic_write_json(args.out, result)
    pm.scheduler().close()
    pm.scorer().close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
