"""`PreferenceModel`, its merge cache, and the `pwemoe serve` API against a real server on 127.0.0.1."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.serving import call, call_expecting_continue, running

pytest.importorskip("fastapi")

TEXTS = ["good movie very good", "the film was bad", "red green news", "blue team won the game"]


@pytest.fixture(scope="module")
def evaluated_run(text_setup, tmp_path_factory) -> Path:
    """A tiny BERT run (k = 2), trained 20 steps and evaluated on the M = 3 grid with baselines."""
    from pwemoe.recipes.evaluate import evaluate_run
    from pwemoe.recipes.train import train

    root, base_cfg = text_setup
    tmp = tmp_path_factory.mktemp("serverun")
    cfg = {**base_cfg, "run_dir": str(tmp / "run"), "train": {**base_cfg["train"], "steps": 20}}
    (tmp / "c.yaml").write_text(yaml.safe_dump(cfg))
    run = Path(train(tmp / "c.yaml", []))
    evaluate_run(run, grid=3, verbose=-1)
    return run


@pytest.fixture(scope="module")
def model(evaluated_run):
    from pwemoe import PreferenceModel

    return PreferenceModel(evaluated_run, cache_size=2, max_batch=8)


def test_serving_limits_are_checked_up_front(evaluated_run):
    from pwemoe import PreferenceModel

    for bad in (0, -3, True):  # 0 used to evaluate everything while reporting 0; -3 blamed an empty split
        with pytest.raises(ValueError, match="max_test_samples must be an integer >= 1"):
            PreferenceModel(evaluated_run, max_test_samples=bad)


def _plain_logits(export_dir: Path, task: str, texts: list[str]) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    m = AutoModelForSequenceClassification.from_pretrained(export_dir / task).eval()
    tok = AutoTokenizer.from_pretrained(export_dir / task)
    enc = tok(texts, truncation=True, max_length=16, padding=True, return_tensors="pt")
    with torch.no_grad():
        return m(**enc).logits


def test_a_failing_computation_is_a_500_and_finished_jobs_are_bounded(model, monkeypatch):
    """Only a held run directory is 409 'in use'; any other runtime failure (CUDA out of memory, say)
    is a 500 naming it. Finished evaluation jobs are kept for polling up to _Jobs.KEEP."""
    import time

    from pwemoe.serve.app import _Jobs, create_app

    def oom(*a, **kw):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(model, "predict", oom)
    with running(create_app(model)) as url:
        status, res = call(url + "/api/predict", {"preference": [0.5, 0.5], "task": "polarity", "inputs": ["x"]})
    assert status == 500 and res["error"] == "RuntimeError: CUDA out of memory"

    class Instant:
        def evaluate(self, preference, progress):
            return {"preference": preference}

    jobs = _Jobs()
    jobs.KEEP = 3
    for _ in range(10):
        jobs.start(Instant(), [0.5, 0.5])
        time.sleep(0.02)  # each job finishes at once
    assert len(jobs.jobs) <= jobs.KEEP + 1 and "10" in jobs.jobs  # the newest are kept


def test_encoded_test_batches_are_kept_only_within_the_byte_cap(model):
    """The server's encoded test batches are the workbench's sweep cache (one for both): kept between
    evaluations only while they fit its budget (all tasks together); beyond it encoded again, same results."""
    from pwemoe.workbench import EncodedCache

    budget = model.wb.encoded.budget
    model.wb.encoded = EncodedCache(budget_bytes=1)
    small = model.evaluate([0.4, 0.6], store=False)
    assert model.wb.encoded.kept == {} and model.wb.encoded.bytes == 0
    model.wb.encoded = EncodedCache(budget)
    again = model.evaluate([0.4, 0.6], store=False)
    assert again["accuracy"] == small["accuracy"]
    kept = model.wb.encoded.kept
    assert {key[0] for key in kept} == set(model.task_names) and 0 < model.wb.encoded.bytes <= budget
    # the kept batches are what the next evaluation reads: encoding them again is not needed
    first = {key: list(batches) for key, batches in kept.items()}
    model.evaluate([0.7, 0.3], store=False)
    assert all(kept[key] is not None and all(a is b for a, b in zip(kept[key], first[key])) for key in first)


def test_predict_equals_the_exported_plain_model(model, evaluated_run):
    r = [0.3, 0.7]
    out = model.export(r, name="pm-check")
    assert Path(out["path"]) == (evaluated_run / "exports" / "pm-check").resolve()
    assert out["preference"] == pytest.approx({"polarity": 0.3, "color": 0.7})
    for task in ("polarity", "color"):
        logits, _ = model.logits(r, task, TEXTS)
        want = _plain_logits(Path(out["path"]), task, TEXTS)
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
        pred = model.predict(r, task, TEXTS)
        names = model.wb.tasks[model.task_names.index(task)].class_names
        assert [p["label"] for p in pred["predictions"]] == [names[i] for i in want.argmax(-1).tolist()]
        for p, row in zip(pred["predictions"], want.softmax(-1)):
            assert list(p["probabilities"].values()) == pytest.approx(row.tolist(), abs=1e-6)
            assert math.isclose(sum(p["probabilities"].values()), 1.0, abs_tol=1e-5)


def test_merge_cache_is_lru_reuses_free_copies_and_never_a_held_one(model):
    from pwemoe import merge_and_unload
    from pwemoe.serve import MergeCache

    cache = MergeCache(model.wb.backbone, 2, model._lock)
    keys = [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (0.25, 0.75)]

    def check(m, key):  # the copy holds exactly theta(key)
        want = merge_and_unload(model.wb.backbone, list(key)).state_dict()
        for n, v in m.state_dict().items():
            assert torch.equal(v, want[n]), n

    with cache.lease(keys[0]) as (m0, hit):
        assert not hit
    with cache.lease(keys[1]) as (m1, hit):
        assert not hit
    with cache.lease(keys[0]) as (m, hit):
        assert hit and m is m0  # a repeated preference costs no merge
    with cache.lease(keys[2]) as (m2, hit):  # full: re-merges the least recently used copy (keys[1]'s)
        assert not hit and m2 is m1 and cache.reused == 1
        check(m2, keys[2])
    assert list(cache.entries) == [keys[0], keys[2]]
    # both copies held: another preference waits (never a held copy, never a third copy: memory stays
    # at `size` backbones), then gets the copy released first, re-merged
    import threading
    import time

    got = {}

    def other() -> None:
        with cache.lease(keys[3]) as (c, hit):
            got.update(c=c, hit=hit, held=len(cache.entries))
            check(c, keys[3])

    with cache.lease(keys[0]) as (a, _):
        with cache.lease(keys[2]) as (b, _):
            t = threading.Thread(target=other)
            t.start()
            for _ in range(200):  # until it is waiting
                if cache.waits:
                    break
                time.sleep(0.01)
            assert cache.waits == 1 and not got and len(cache.entries) == 2
        t.join(timeout=60)  # b released: the waiting caller re-merges it
        assert not t.is_alive() and got["c"] is b and not got["hit"] and got["held"] == 2
        check(a, keys[0])
    assert list(cache.entries) == [keys[0], keys[3]]
    assert cache.stats() == {"size": 2, "held": 2, "hits": 3, "misses": 4, "waits": 1, "declined": 0}
    with pytest.raises(ValueError, match="cache_size"):
        MergeCache(model.wb.backbone, 0, model._lock)


def test_api_endpoints(model, evaluated_run):
    from pwemoe import merge_and_unload, routing_weights
    from pwemoe.recipes.evaluate import evaluate_run  # noqa: F401  (the rows below come from it)
    from pwemoe.runs import open_run
    from pwemoe.serve.app import create_app

    wb, _ = open_run(evaluated_run)  # an independent copy of the run, for reference values
    with running(create_app(model)) as url:
        status, info = call(url + "/api/run")
        assert status == 200 and info["k"] == 2 and [t["name"] for t in info["tasks"]] == ["polarity", "color"]
        assert info["targets"] and info["metrics"] == {n: "accuracy, higher is better" for n in ("polarity", "color")}
        assert info["experts"] and info["base"]

        status, page = call(url + "/")
        assert status == 200 and b'src="/static/plotly.min.js"' in page and b"http" not in page  # no CDN
        status, js = call(url + "/static/plotly.min.js")
        assert status == 200 and len(js) > 1_000_000
        assert call(url + "/static/explorer.js")[0] == 200
        assert call(url + "/static/nothing.js")[0] == 404

        status, lam = call(url + "/api/routing_weights", {"preference": [2, 6]})  # normalised to (0.25, 0.75)
        want = routing_weights(wb.model, [0.25, 0.75])
        assert status == 200 and lam["preference"] == [0.25, 0.75]
        assert set(lam["routing_weights"]) == set(want)
        for n, v in want.items():
            assert lam["routing_weights"][n] == pytest.approx(v.tolist(), abs=1e-6)

        body = {"preference": [0.9, 0.1], "task": "color", "inputs": TEXTS[:2]}
        status, first = call(url + "/api/predict", body)
        status2, again = call(url + "/api/predict", body)
        assert status == status2 == 200 and again["cache"] == "hit"
        assert again["predictions"] == first["predictions"]
        assert first["predictions"] == model.predict([0.9, 0.1], "color", TEXTS[:2])["predictions"]

        rows = json.loads((evaluated_run / "results.json").read_text())
        grid_row = next(r for r in rows if r["method"] == "pwemoe" and r["preference"] == [0.5, 0.5])
        status, res = call(url + "/api/evaluate", {"preference": [1, 1], "wait": True})
        assert status == 200 and res["row"]["reused"] and res["row"]["accuracy"] == grid_row["accuracy"]

        status, job = call(url + "/api/evaluate", {"preference": [0.3, 0.7]})  # new: a job to poll
        assert status == 200 and job["status"] == "running"
        for _ in range(600):
            status, job = call(url + f"/api/jobs/{job['id']}")
            if job["status"] != "running":
                break
            import time

            time.sleep(0.05)
        assert job["status"] == "done" and job["done"] == job["total"] > 0, job
        plain = merge_and_unload(wb.backbone, [0.3, 0.7])
        want = {t.name: wb.accuracy(t, 64, backbone=plain) for t in wb.tasks}
        assert job["row"]["accuracy"] == want and not job["row"]["reused"]
        stored = json.loads((evaluated_run / "results.json").read_text())
        assert sum(r["method"] == "pwemoe" and r["preference"] == [0.3, 0.7] for r in stored) == 1
        assert len(stored) == len(rows) + 1  # added, nothing else touched

        status, res = call(url + "/api/results")
        assert status == 200 and res["other_rows"] == 0 and len(res["rows"]) == len(rows) + 1
        assert res["summary"]["methods"]["pwemoe"]["points"] == 4
        assert [f["name"] for f in res["figures"]["accuracy"]] == ["plane"]

        status, ex = call(url + "/api/export", {"preference": [0.6, 0.4], "name": "api-export"})
        assert (
            status == 200
            and Path(ex["path"]).is_dir()
            and ex["preference"] == pytest.approx({"polarity": 0.6, "color": 0.4})
        )
        logits, _ = model.logits([0.6, 0.4], "polarity", TEXTS)
        torch.testing.assert_close(logits, _plain_logits(Path(ex["path"]), "polarity", TEXTS), rtol=1e-5, atol=1e-5)
        status, err = call(url + "/api/export", {"preference": [0.6, 0.4], "name": "api-export"})
        assert status == 400 and "not empty" in err["error"]
        assert call(url + "/api/export", {"preference": [0.6, 0.4], "name": "api-export", "overwrite": True})[0] == 200
        status, err = call(url + "/api/export", {"preference": [0.6, 0.4], "name": "../outside"})
        assert status == 400 and "export name" in err["error"]
        assert not (evaluated_run.parent / "outside").exists()
        assert call(url + "/api/jobs/nope")[0] == 404


@pytest.mark.parametrize(
    "path, body, raw, ctype, status, words",
    [
        ("predict", {"preference": [1.0], "task": "color", "inputs": ["a"]}, None, None, 400, "length k=2"),
        ("predict", {"preference": [-1, 2], "task": "color", "inputs": ["a"]}, None, None, 400, "non-negative"),
        ("predict", None, b'{"preference": [NaN, 1], "task": "color", "inputs": ["a"]}', None, 400, "finite"),
        ("predict", {"preference": [0, 0], "task": "color", "inputs": ["a"]}, None, None, 400, "positive sum"),
        ("predict", {"preference": [1, 1], "task": "colour", "inputs": ["a"]}, None, None, 400, "unknown task"),
        ("predict", {"preference": [1, 1], "task": "color", "inputs": []}, None, None, 400, "inputs is empty"),
        ("predict", {"preference": [1, 1], "task": "color", "inputs": ["a", ""]}, None, None, 400, "non-empty"),
        ("predict", {"preference": [1, 1], "task": "color", "inputs": "a"}, None, None, 422, "inputs"),
        ("predict", {"preference": [1, 1], "task": "color", "inputs": ["a"] * 9}, None, None, 413, "at most 8"),
        ("predict", {"preference": [1, 1], "inputs": ["a"]}, None, None, 422, "task: Field required"),
        ("predict", {"preference": "0.5,0.5", "task": "color", "inputs": ["a"]}, None, None, 422, "valid list"),
        ("predict", None, b'{"preference": [1, 1], "task": ', None, 422, "JSON"),
        ("predict", None, b'{"preference": [1, 1], "task": "color", "inputs": ["a"]}', "text/plain", 422, ""),
        ("predict", None, b'{"inputs": ["' + b"x" * (3 << 20) + b'"]}', None, 413, "larger than"),
        ("routing_weights", {"preference": [1, 1], "extra": 1}, None, None, 422, "extra"),
        ("evaluate", {"preference": [1, math.inf]}, None, None, 400, "finite"),
        ("export", {"preference": [1, 1], "name": ".hidden"}, None, None, 400, "export name"),
    ],
)
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(model, path, body, raw, ctype, status, words):
    from pwemoe.serve.app import create_app

    if raw is None:
        raw = json.dumps(body).encode()  # Infinity / NaN as Python's json writes them
    with running(create_app(model, max_body_bytes=2 << 20)) as url:
        if len(raw) > 2 << 20:  # refused from its Content-Length, before the body is sent
            got, res = call_expecting_continue(url, f"/api/{path}", raw)
        else:
            got, res = call(f"{url}/api/{path}", raw=raw, content_type=ctype or "application/json")
        assert got == status, res
        assert isinstance(res, dict) and words in res["error"], res
        assert call(url + "/api/run")[0] == 200


def test_concurrent_requests_with_mixed_preferences_equal_one_at_a_time(model):
    """16 requests at once over 5 preferences with a 2-copy cache: evictions and re-merges under load."""
    from pwemoe.serve.app import create_app

    prefs = [[1, 0], [0, 1], [0.5, 0.5], [0.2, 0.8], [0.7, 0.3]]
    bodies = [{"preference": prefs[i % 5], "task": ["polarity", "color"][i % 2], "inputs": TEXTS} for i in range(16)]
    with running(create_app(model)) as url:
        alone = [call(url + "/api/predict", b) for b in bodies]
        with ThreadPoolExecutor(16) as ex:
            together = list(ex.map(lambda b: call(url + "/api/predict", b), bodies))
    assert all(s == 200 for s, _ in alone + together)
    for (_, a), (_, b) in zip(alone, together):
        assert a["predictions"] == b["predictions"] and a["preference"] == b["preference"]
    assert model.cache.stats()["held"] <= 2


def test_serve_binds_loopback_unless_public_is_asked(evaluated_run, capsys):
    from pwemoe.cli import main

    assert main(["serve", str(evaluated_run), "--host", "0.0.0.0"]) == 2
    assert "--public" in capsys.readouterr().err


def test_evaluate_writes_a_self_contained_interactive_report(evaluated_run):
    page = (evaluated_run / "report.html").read_text()
    assert page.count("Plotly.newPlot(") >= 2  # raw and normalised fronts
    assert "<script src=" not in page and "<link" not in page  # plotly.js is inlined: nothing to fetch
    assert "r = (0.5, 0.5)" in page and "polarity: " in page  # hover text of the PWEMoE rows
    assert len(page) > 1_000_000


@pytest.mark.parametrize("k, names", [(2, ["plane"]), (3, ["ternary", "planes"]), (4, ["parcoords"])])
def test_front_figures_per_k(k, names):
    from pwemoe.report.interactive import front_figures
    from pwemoe.results import normalize

    tasks = [f"t{i}" for i in range(k)]
    eye = [[float(i == j) for j in range(k)] for i in range(k)]
    rows = [
        {
            "method": f"expert:{t}",
            "preference": eye[i],
            "param": None,
            "accuracy": {u: 0.9 - 0.1 * (u != t) for u in tasks},
        }
        for i, t in enumerate(tasks)
    ] + [
        {"method": "pwemoe", "preference": [1 / k] * k, "param": None, "accuracy": {u: 0.85 for u in tasks}},
        {"method": "task_arithmetic", "preference": None, "param": 0.3, "accuracy": {u: 0.8 for u in tasks}},
    ]
    normalize(rows, tasks)
    figs = front_figures(rows, tasks)
    assert [f["name"] for f in figs] == names
    data = [t for f in figs for t in f["figure"]["data"]]
    if k == 4:
        (pc,) = data
        assert [d["label"] for d in pc["dimensions"]] == tasks and len(pc["dimensions"][0]["values"]) == len(rows)
    else:  # every row appears once per plane, with hover text naming its method and values
        texts = [x for t in data if t["type"] == "scatter" for x in t["text"]]
        assert len(texts) == len(rows) * (1 if k == 2 else 3)
        assert any("PWEMoE" in x and "t0: 0.8500" in x for x in texts) and any("λ = 0.3" in x for x in texts)
    if k == 3:
        tern = figs[0]["figure"]["data"][0]
        assert tern["a"] == [1 / 3] and tern["marker"]["color"] == [pytest.approx(0.85 / 0.9)]


def test_body_limit_counts_streamed_bodies_without_a_length():
    """A chunked body (no Content-Length) is cut off with 413 once it passes the limit."""
    import asyncio

    from pwemoe.serve.app import BodyLimit

    seen = []

    async def app(scope, receive, send):  # reads the whole body, then answers 200
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        seen.append(len(body))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def run(chunks: list[bytes]) -> int:
        msgs = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
        sent = []

        async def receive():
            return msgs.pop(0)

        async def send(m):
            sent.append(m)

        asyncio.run(BodyLimit(app, 100)({"type": "http", "headers": []}, receive, send))
        return next(m["status"] for m in sent if m["type"] == "http.response.start")

    assert run([b"x" * 60, b"x" * 30]) == 200 and seen == [90]
    assert run([b"x" * 60, b"x" * 60, b"x" * 60]) == 413 and seen == [90]  # the app never got the body


def test_serve_options_are_checked_before_the_run_loads(tmp_path, capsys):
    from pwemoe.cli import main

    args = ["--max-body-mb", "-1", "--cache-size", "0", "--max-batch", "0", "--eval-queue", "0"]
    assert main(["serve", str(tmp_path / "no-run"), *args]) == 2
    err = capsys.readouterr().err
    assert all(f"{k} must be" in err for k in args[::2]) and "no-run" not in err, err  # before the run is read


def _evaluate_with_headers(url: str, body: dict) -> tuple[int, dict, Any]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url + "/api/evaluate", json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as res:
            return res.status, json.loads(res.read()), res.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def test_asynchronous_evaluations_wait_in_a_bounded_queue(model, monkeypatch):
    """One worker thread runs the evaluations in order; `eval_queue` (8) may wait behind it, more get 429."""
    import threading
    import time

    from pwemoe.serve.app import create_app

    gate = threading.Event()

    def slow(preference, progress=None, store=True):
        gate.wait(60)
        return {"preference": list(preference), "reused": False}

    def workers() -> int:
        return sum(t.name == "pwemoe-evaluate" for t in threading.enumerate())

    monkeypatch.setattr(model, "evaluate", slow)
    before = workers()  # other apps' idle workers
    with running(create_app(model)) as url:  # --eval-queue 8 by default
        jobs = [_evaluate_with_headers(url, {"preference": [0.5, 0.5]}) for _ in range(9)]  # 1 runs, 8 wait
        assert [j[0] for j in jobs] == [200] * 9
        status, res, headers = _evaluate_with_headers(url, {"preference": [0.5, 0.5]})
        assert status == 429 and "8 evaluations are waiting" in res["error"] and int(headers["Retry-After"]) >= 1
        assert workers() == before + 1  # one thread for all of them
        gate.set()
        for _, job, _ in jobs:
            for _ in range(600):
                if call(url + f"/api/jobs/{job['id']}")[1]["status"] == "done":
                    break
                time.sleep(0.02)
            assert call(url + f"/api/jobs/{job['id']}")[1]["status"] == "done"
        assert _evaluate_with_headers(url, {"preference": [0.5, 0.5]})[0] == 200  # room again


def _post_chunked(url: str, path: str, chunks: list[bytes]) -> tuple[int, dict]:
    """POST a body with Transfer-Encoding: chunked (no Content-Length); (status, parsed JSON)."""
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        head = f"POST {path} HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Type: application/json\r\n"
        head += "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        # all in one send: the server reads it at once, so its early answer is not cut by a reset
        s.sendall(head.encode() + b"".join(f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in chunks) + b"0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    return int(head_bytes.split(b" ", 2)[1]), json.loads(body)


def test_every_4xx_has_an_error_and_a_streamed_body_over_the_limit_is_413(model):
    from pwemoe.serve.app import create_app

    with running(create_app(model, max_body_bytes=1000)) as url:
        body = json.dumps({"preference": [1, 1], "task": "color", "inputs": ["a " * 500]}).encode()
        status, res = _post_chunked(url, "/api/predict", [body[:600], body[600:]])
        assert status == 413 and "larger than 1000 bytes" in res["error"], res
        small = json.dumps({"preference": [1, 1], "task": "color", "inputs": ["good"]}).encode()
        status, res = _post_chunked(url, "/api/predict", [small[:20], small[20:]])
        assert status == 200 and len(res["predictions"]) == 1  # a small streamed body is read as usual
        for path, method_body, want in [("/api/nope", None, 404), ("/api/predict", None, 405)]:
            status, res = call(url + path, method_body)
            assert status == want and "error" in res and path in res["error"], res
        assert call(url + "/api/run")[0] == 200


@pytest.mark.parametrize("tied", [False, True])
def test_merged_copies_keep_linear_weights_in_the_autocast_dtype_with_the_same_outputs(tied):
    """A cached copy's linear weights stored in bf16 give the same bits under bf16 autocast as the fp32 copy (autocast
    rounds them the same way at every call), also after a merge writes new values into them; a weight shared with
    another module (tied embeddings) stays as it is."""
    import copy

    from pwemoe.serve.merge_cache import linear_weights_to
    from tests.conftest import tiny_llama

    fp32 = tiny_llama(tied).requires_grad_(False)
    half = copy.deepcopy(fp32)
    linear_weights_to(half, torch.bfloat16)
    assert half.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert half.model.embed_tokens.weight.dtype == torch.float32
    assert half.lm_head.weight.dtype == (torch.float32 if tied else torch.bfloat16)
    ids = torch.randint(0, 48, (3, 7))

    def logits(m):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return m(input_ids=ids).logits

    assert torch.equal(logits(fp32), logits(half))
    with torch.no_grad():  # a merge writes fp32 values into both copies (copy_, as merge_into does)
        for (_, a), (_, b) in zip(fp32.named_parameters(), half.named_parameters()):
            new = a.float() + 0.01 * torch.randn(a.shape)
            a.copy_(new)
            b.copy_(new)
    assert torch.equal(logits(fp32), logits(half))
