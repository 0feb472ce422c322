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
                                   causal-LM runs: OpenAI-compatible generation at any preference (openai_api.py)

Bad input gets a 4xx whose `error` says what was expected: 400 (invalid values), 404 (unknown job),
409 (the run directory is in use), 413 (body or batch too large), 422 (malformed JSON or fields).
A failure of the computation itself (e.g. CUDA out of memory) is a 500 whose `error` names it.
"""

import itertools
import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict

from ..baselines import describe_methods
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
    """ASGI middleware: refuse request bodies over `limit` bytes with 413, before they are read whole."""

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
                if seen > self.limit:
                    raise _BodyTooLarge
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


class _BodyTooLarge(Exception):
    pass


def _too_large(limit: int, path: str = "") -> JSONResponse:
    msg = f"request body larger than {limit} bytes; send fewer or smaller inputs (or raise --max-body-mb)"
    body = openai_error_body(413, msg) if path.startswith("/v1/") else {"error": msg}
    return JSONResponse(body, status_code=413)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        got = e.get("input")
        parts.append(f"{loc}: {e.get('msg')}" + (f" (got {got!r:.80})" if got is not None and loc != "body" else ""))
    return "; ".join(parts) + ". Expected JSON such as " + '{"preference": [0.5, 0.5], ...}'


class _Jobs:
    """Evaluations run in background threads, one at a time (the model serialises them); polled by id."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.ids = itertools.count(1)
        self.lock = threading.Lock()

    KEEP = 1000  # finished jobs kept for polling; older ones are forgotten (memory stays bounded)

    def start(self, model: PreferenceModel, preference: list[float]) -> dict[str, Any]:
        with self.lock:
            job = {"id": str(next(self.ids)), "status": "running", "done": 0, "total": None, "preference": preference}
            self.jobs[job["id"]] = job
            finished = [k for k, v in self.jobs.items() if v["status"] != "running"]
            for k in finished[: max(0, len(finished) - self.KEEP)]:  # oldest first (insertion order)
                del self.jobs[k]

        def progress(done: int, total: int) -> None:
            job["done"], job["total"] = done, total

        def work() -> None:
            try:
                job["row"] = model.evaluate(preference, progress)
                job["status"] = "done"
            except Exception as e:  # noqa: BLE001 - reported to the poller
                job["status"], job["error"] = "failed", str(e) or type(e).__name__

        threading.Thread(target=work, daemon=True, name=f"pwemoe-evaluate-{job['id']}").start()
        return dict(job)


def create_app(model: PreferenceModel, max_body_bytes: int = 8 << 20, model_name: str | None = None) -> FastAPI:
    """The FastAPI app serving `model` (interactive docs off: they load from a CDN). For a causal-LM run it also
    serves the OpenAI-compatible /v1 endpoints, under `model_name` (default: the run directory's name)."""
    app = FastAPI(title="pwemoe", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    jobs = _Jobs()
    name = model_name or model.run.resolve().name

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _validation_message(exc)}, status_code=422)

    @app.exception_handler(TooLarge)
    async def _large(request: Request, exc: TooLarge) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=413)

    async def _bad(request: Request, exc: Exception) -> JSONResponse:
        if request.url.path.startswith("/v1/"):
            return JSONResponse(openai_error_body(400, str(exc)), status_code=400)
        return JSONResponse({"error": str(exc)}, status_code=400)

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
        lam = model.routing_weights(body.preference)
        return {"preference": model.preference(body.preference), "tasks": model.task_names, "routing_weights": lam}

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


__all__ = ["create_app"]


def _dirs(res: dict[str, Any]) -> dict[str, str] | None:
    return (res.get("summary") or {}).get("directions")
