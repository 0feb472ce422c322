"""The `pwemoe serve` web app: the Pareto explorer page and a JSON API over a `PreferenceModel`.

Everything the page needs is served from installed packages (its own static files, and
plotly.min.js from the plotly package): no CDN, no network. Endpoints (JSON in and out):

    GET  /api/run                  tasks, k, upcycled modules, metrics, base and expert ids
    GET  /api/results              results.json rows of this run's models and data, summary, figures
    POST /api/routing_weights      {preference} -> lambda(r) per upcycled module
    POST /api/predict              {preference, task, inputs} -> labels and probabilities
    POST /api/evaluate             {preference, wait} -> the results row (wait) or a job to poll
    GET  /api/jobs/{id}            an evaluation's progress and, when done, its row
    POST /api/export               {preference, name?, overwrite?} -> where the plain models were written
    POST /api/select               {maximize | minimize, require, confidence?, budget?, ...} -> a certified choice
    GET  /v1/models, POST /v1/chat/completions, POST /v1/completions
                                   causal-LM runs: OpenAI-compatible generation at any preference (openai_api.py);
                                   with POST /tokenize, /detokenize, GET /tokenizer_info and GET /lora-adapters

Bad input gets a 4xx whose `error` says what was expected: 400 (invalid values), 404 (unknown job or
path), 405 (wrong method), 409 (the run directory is in use), 413 (body or batch too large, with or
without a Content-Length), 422 (malformed JSON or fields), 429 (the evaluation queue is full; Retry-After
says when to ask again). A failure of the computation itself (e.g. CUDA out of memory) is a 500 whose
`error` names it.
"""

import itertools
import math
import queue
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..baselines import describe_methods
from ..core.preference import Preference
from ..files import RunDirInUse
from ..report.interactive import front_figures, plotly_js_path
from .model import PreferenceModel, TooLarge
from .openai_api import add_openai_routes, openai_error_body

STATIC = Path(__file__).parent / "static"


class PreferenceBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    preference: list[float]


class PredictBody(PreferenceBody):
    task: str
    inputs: list[Any]


class EvaluateBody(PreferenceBody):
    wait: bool = False


class ExportBody(PreferenceBody):
    name: str | None = None
    overwrite: bool = False


class SelectBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    maximize: str | None = None
    minimize: str | None = None
    require: list[str] = []
    confidence: float = 0.95
    budget: int = 24
    grid: int | None = None
    seed: int = 0
    certify_fraction: float = 0.5
    name: str | None = None


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes with 413, before they are read whole; drop a
    request whose client hung up before its body was whole."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _too_large(self.limit, scope.get("path", ""))(scope, receive, send)
        seen, started = 0, False

        async def limited_receive() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:  # an HTTPException, so that FastAPI's body parsing passes it on as it is
                    raise _BodyTooLarge(413, _too_large_message(self.limit))
            return msg

        async def tracking_send(msg: dict) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _too_large(self.limit, scope.get("path", ""))(scope, receive, send)
        except ClientDisconnect:  # it hung up before its body was whole: no one to answer, nothing to log as an error
            return


class _BodyTooLarge(HTTPException):
    pass


def _too_large_message(limit: int) -> str:
    return f"request body larger than {limit} bytes; send fewer or smaller inputs (or raise --max-body-mb)"


def _too_large(limit: int, path: str = "") -> JSONResponse:
    return JSONResponse(_error_body(path, _too_large_message(limit)), status_code=413)


def _error_body(path: str, msg: str) -> dict[str, Any]:
    """{"error": msg}, or for the OpenAI-compatible /v1 paths an OpenAI error object."""
    return openai_error_body(0, msg) if path.startswith("/v1/") else {"error": msg}


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        got = e.get("input")
        parts.append(f"{loc}: {e.get('msg')}" + (f" (got {got!r:.80})" if got is not None and loc != "body" else ""))
    return "; ".join(parts) + ". Expected JSON such as " + '{"preference": [0.5, 0.5], ...}'


def check_options(
    max_body_mb: float = 8.0, cache_size: int = 4, max_batch: int = 64, eval_queue: int = 8, token_budget: int = 16384
) -> None:
    """The server's limits, checked at start-up before the run loads; every problem in one ConfigError."""
    from ..config import ConfigError
    from ..core.checks import positive_int_problem

    counts = {"cache-size": cache_size, "max-batch": max_batch, "eval-queue": eval_queue, "token-budget": token_budget}
    errors = [p for p in (positive_int_problem(f"--{k}", v) for k, v in counts.items()) if p]
    if isinstance(max_body_mb, bool) or not isinstance(max_body_mb, (int, float)) or not 0 < max_body_mb < math.inf:
        errors.insert(0, f"--max-body-mb must be a number > 0 (megabytes), got {max_body_mb!r}")
    if errors:
        raise ConfigError(errors)


class QueueFull(Exception):
    """Too many evaluations wait already (the server answers 429 with Retry-After)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Jobs:
    """Asynchronous evaluations, polled by id: one worker thread runs them in order (the model serialises
    evaluations anyway), and at most `max_queued` wait behind the running one; more are refused (QueueFull)."""

    KEEP = 1000  # finished jobs kept for polling; older ones are forgotten (memory stays bounded)

    def __init__(self, max_queued: int = 8) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.ids = itertools.count(1)
        self.lock = threading.Lock()
        self.max_queued, self.pending, self.last_seconds = max_queued, 0, 1.0
        self.queue: queue.Queue = queue.Queue()
        self.worker: threading.Thread | None = None  # a daemon: a stopped server does not wait for the queue

    def start(self, model: PreferenceModel, preference: Preference | list[float]) -> dict[str, Any]:
        with self.lock:
            if self.pending > self.max_queued:  # one running, max_queued waiting
                retry = min(600, max(1, math.ceil(self.last_seconds * self.pending)))
                raise QueueFull(
                    f"{self.pending - 1} evaluations are waiting already (at most {self.max_queued}, "
                    f"--eval-queue); ask again in about {retry} s",
                    retry,
                )
            self.pending += 1
            job = {
                "id": str(next(self.ids)),
                "status": "running",
                "done": 0,
                "total": None,
                "preference": list(preference),
            }
            self.jobs[job["id"]] = job
            finished = [k for k, v in self.jobs.items() if v["status"] != "running"]
            for k in finished[: max(0, len(finished) - self.KEEP)]:  # oldest first (insertion order)
                del self.jobs[k]

        def progress(done: int, total: int) -> None:
            job["done"], job["total"] = done, total

        def work() -> None:
            t0 = time.perf_counter()
            try:
                job["row"] = model.evaluate(preference, progress)
                job["status"] = "done"
            except Exception as e:  # noqa: BLE001 - reported to the poller
                job["status"], job["error"] = "failed", str(e) or type(e).__name__
            finally:
                with self.lock:
                    self.pending -= 1
                    self.last_seconds = time.perf_counter() - t0

        self.queue.put(work)
        with self.lock:
            if self.worker is None:
                self.worker = threading.Thread(target=self._run, daemon=True, name="pwemoe-evaluate")
                self.worker.start()
        return dict(job)

    def _run(self) -> None:
        while True:
            self.queue.get()()


def create_app(
    model: PreferenceModel, max_body_bytes: int = 8 << 20, eval_queue: int = 8, model_name: str | None = None
) -> FastAPI:
    """The FastAPI app serving `model` (interactive docs off: they load from a CDN). `eval_queue`: how many
    asynchronous evaluations may wait behind the running one. For a causal-LM run it also serves the
    OpenAI-compatible /v1 endpoints, under `model_name` (default: the run directory's name)."""
    check_options(max_body_bytes / (1 << 20), eval_queue=eval_queue)
    app = FastAPI(title="pwemoe", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    jobs = _Jobs(eval_queue)
    name = model_name or model.run.resolve().name

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:  # 404, 405, 413 of a streamed body
        msg = exc.detail if exc.status_code == 413 else f"{exc.detail}: {request.method} {request.url.path}"
        return JSONResponse(_error_body(request.url.path, msg), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(QueueFull)
    async def _full(request: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=429, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _validation_message(exc)}, status_code=422)

    @app.exception_handler(TooLarge)
    async def _large(request: Request, exc: TooLarge) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=413)

    async def _bad(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(_error_body(request.url.path, str(exc)), status_code=400)

    for invalid in (ValueError, TypeError):  # the public API's errors for bad values
        app.add_exception_handler(invalid, _bad)

    @app.exception_handler(RunDirInUse)
    async def _busy(request: Request, exc: RunDirInUse) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=409)

    @app.exception_handler(RuntimeError)
    async def _failed(request: Request, exc: RuntimeError) -> JSONResponse:  # e.g. CUDA out of memory: not "in use"
        return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=500)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Any:
        if name == "plotly.min.js":
            return FileResponse(plotly_js_path(), media_type="text/javascript")
        files = {p.name: p for p in STATIC.iterdir() if p.is_file()}
        if name not in files:
            return JSONResponse({"error": f"no static file {name!r}"}, status_code=404)
        return FileResponse(files[name])

    @app.get("/api/run")
    def run_info() -> dict:
        return {**model.info(), "generation": model.can_generate, "model_name": name}

    @app.get("/api/results")
    def results() -> dict:
        res = model.results()
        figs: dict[str, list] = {"accuracy": [], "normalized": []}
        if res["rows"]:
            figs["accuracy"] = front_figures(res["rows"], model.task_names, "accuracy", _dirs(res))
            if res["summary"] and "ideal_point" in res["summary"]:
                figs["normalized"] = front_figures(res["rows"], model.task_names, "normalized", _dirs(res))
        return {**res, "figures": figs, "methods": describe_methods()}

    @app.post("/api/routing_weights")
    def routing(body: PreferenceBody) -> dict:
        pref = model.preference(body.preference)
        lam = model.routing_weights(pref)
        return {"preference": pref.tolist(), "tasks": model.task_names, "routing_weights": lam}

    @app.post("/api/predict")
    def predict(body: PredictBody) -> dict:
        return model.predict(body.preference, body.task, body.inputs)

    @app.post("/api/evaluate")
    def evaluate(body: EvaluateBody) -> dict:
        pref = model.preference(body.preference)  # invalid input fails here, not in the job
        if body.wait:
            return {"status": "done", "row": model.evaluate(pref)}
        return jobs.start(model, pref)

    @app.get("/api/jobs/{job_id}")
    def job(job_id: str) -> Any:
        j = jobs.jobs.get(job_id)
        if j is None:
            return JSONResponse({"error": f"no evaluation job {job_id!r}; POST /api/evaluate starts one"}, 404)
        return dict(j)

    @app.post("/api/export")
    def export(body: ExportBody) -> dict:
        return model.export(body.preference, body.name, body.overwrite)

    @app.post("/api/select")
    def select(body: SelectBody) -> dict:
        return model.select(**body.model_dump())

    if model.can_generate:
        add_openai_routes(app, model, name)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    return app


__all__ = ["QueueFull", "check_options", "create_app"]


def _dirs(res: dict[str, Any]) -> dict[str, str] | None:
    return (res.get("summary") or {}).get("directions")
