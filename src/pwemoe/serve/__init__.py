"""`pwemoe serve RUN`: a Pareto explorer in the browser and an inference API taking a preference per request.

`PreferenceModel` (the Python API) needs only the core; the web app needs the `serve` extra
(fastapi, uvicorn, plotly), imported when a server is started.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .merge_cache import MergeCache
from .model import PreferenceModel, TooLarge

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_host(host: str, public: bool) -> None:
    """Serving beyond this machine must be asked for: the API writes exports and results into the run."""
    if host not in LOOPBACK and not public:
        raise ValueError(
            f"--host {host} would serve the run to other machines; pwemoe binds to 127.0.0.1 unless "
            "--public is given too (the API has no authentication: put it behind one if you do)"
        )


def serve(
    run: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    public: bool = False,
    max_body_mb: float = 8.0,
    model_name: str | None = None,
    eval_queue: int = 8,
    **model_kwargs: Any,
) -> None:
    """Load the run and serve the explorer and the API until interrupted (uvicorn). The limits are checked
    before the run loads; `eval_queue`: asynchronous evaluations that may wait behind the running one."""
    check_host(host, public)
    if not 0 < port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    try:
        import uvicorn

        from .app import check_options, create_app
    except ImportError as e:
        raise RuntimeError(f"pwemoe serve needs the serve extra: pip install 'pwemoe[serve]' ({e})") from None
    limits = {k: model_kwargs[k] for k in ("cache_size", "max_batch", "token_budget") if k in model_kwargs}
    check_options(max_body_mb, eval_queue=eval_queue, **limits)
    model = PreferenceModel(run, **model_kwargs)
    app = create_app(model, max_body_bytes=int(max_body_mb * (1 << 20)), eval_queue=eval_queue, model_name=model_name)
    shown = f"[{host}]" if ":" in host else host
    print(f"pwemoe serve: {Path(run)} on http://{shown}:{port}/ (API: http://{shown}:{port}/api/run; Ctrl-C stops)")
    if model.can_generate:
        name = model_name or model.run.resolve().name
        print(f"OpenAI-compatible API: base_url http://{shown}:{port}/v1, model {name!r} (or {name}@<preference>)")
    uvicorn.run(app, host=host, port=port, log_level="warning")


__all__ = ["MergeCache", "PreferenceModel", "TooLarge", "check_host", "serve"]
