"""What the OpenAI-compatible routes share: error objects, the request's JSON, its weights and its sampling.

The weights of a request are a preference (the body's `preference`, or the model name `<name>@0.7,0.3` or
`<name>@0.7:0.3`, else the server's default) or raw per-expert scales from an engine dialect (`dialects.py`:
llama.cpp's `lora`, LoRAX's `merged_adapters`); never both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from ..core.checks import positive_int_problem
from ..core.preference import Preference, parse_preference
from ..generation import SamplingParams
from ..generation.errors import RequestRefused
from .dialects import DIALECTS, request_scales
from .model import PreferenceModel

# Request fields accepted (besides the ones every endpoint reads), and those refused with the reason.
IGNORED = {"user", "metadata", "store", "stream_options", "service_tier", "parallel_tool_calls"}
REFUSED = {
    "tools": "tool calls are not supported",
    "tool_choice": "tool calls are not supported",
    "functions": "function calls are not supported",
    "function_call": "function calls are not supported",
    "response_format": "structured output is not supported",
    "logit_bias": "logit_bias is not supported",
    "best_of": "best_of is not supported",
    "suffix": "suffix is not supported",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "reasoning options are not supported",
    "web_search_options": "web search is not supported",
}
ZERO_OK = {"presence_penalty", "frequency_penalty"}  # accepted only at their neutral value 0
MAX_LOGPROBS = {"completions": 5, "chat": 20}  # the most alternatives per token, as the OpenAI API allows


class OpenAIError(Exception):
    """An error answered as an OpenAI error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = {
            400: "invalid_request_error",
            404: "invalid_request_error",
            413: "invalid_request_error",
            429: "rate_limit_error",
        }.get(self.status, "server_error")
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def openai_error_body(status: int, message: str) -> dict[str, Any]:
    """The body of an error raised outside a route (body too large, malformed JSON) for /v1 paths."""
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}


async def read_json(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OpenAIError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


@dataclass(frozen=True)
class Weights:
    """A request's weights: a normalised preference, or raw per-expert scales (the routers bypassed)."""

    preference: Preference | None = None  # validated once, here at the edge; passed down as it is
    scales: list[float] | None = None

    def fields(self) -> dict[str, list[float]]:
        """What a response reports: {"preference": ...} or {"scales": ...}."""
        return {"scales": self.scales} if self.scales is not None else {"preference": self.preference.tolist()}

    def kwargs(self) -> dict[str, Any]:
        """`PreferenceModel.submit` / `score` keyword arguments."""
        return {"scales": self.scales} if self.scales is not None else {"preference": self.preference}


def check_model(model: PreferenceModel, name: str, m: Any) -> str:
    """The preference tail of a model name `<name>[@<preference>]` ('' for none); errors name `model`."""
    if not isinstance(m, str) or not m:
        raise OpenAIError(
            400,
            f"model is required: {name!r}, or {name + '@' + ','.join(['w'] * model.k)!r} with a preference",
            "model",
        )
    base, _, tail = m.partition("@")
    if base != name:
        raise OpenAIError(
            404,
            f"the model {m!r} does not exist; this server has {name!r} (optionally {name}@<preference>)",
            "model",
            "model_not_found",
        )
    return tail


def request_weights(model: PreferenceModel, name: str, body: dict[str, Any]) -> Weights:
    """From an engine dialect's scales, else the body's `preference`, else the model name, else the default."""
    tail = check_model(model, name, body.get("model"))
    pref = body.get("preference")
    dialect = [f for f in DIALECTS if body.get(f) is not None]
    if dialect:
        if len(dialect) > 1:
            raise OpenAIError(400, f"give one of {' or '.join(dialect)}, not both", dialect[1])
        clash = "preference" if pref is not None else "model" if tail else None
        if clash:
            raise OpenAIError(
                400,
                f"{dialect[0]} gives raw per-expert scales (the routers bypassed) and {clash} gives a preference "
                f"(routed); give one of them, not both",
                dialect[0],
            )
        try:
            return Weights(scales=request_scales(body, dialect[0], model.task_names))
        except ValueError as e:
            raise OpenAIError(400, str(e), dialect[0]) from None
    where = "preference"
    if pref is None and tail:
        try:  # `:` separates weights too: lm-eval's model_args split on commas
            pref = parse_preference(tail.replace(":", ","))
        except ValueError as e:
            raise OpenAIError(400, f"model {body['model']!r}: {e}", "model") from None
        where = "model"
    if pref is None:
        return Weights(preference=model.default_preference)
    if not isinstance(pref, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in pref):
        raise OpenAIError(
            400,
            f"preference must be a list of {model.k} numbers (one weight per task: "
            f"{', '.join(model.task_names)}), got {pref!r:.80}",
            where,
        )
    try:
        return Weights(preference=model.preference(pref))
    except (TypeError, ValueError) as e:
        raise OpenAIError(400, f"{where}: {e} (tasks: {', '.join(model.task_names)})", where) from None


def submit_error(e: ValueError, chat: bool, max_tokens: str = "max_tokens") -> OpenAIError:
    """A refused submission as OpenAI reports it, by the type of its first problem (`generation_errors`): a prompt
    beyond the context is the prompt's fault, a completion beyond it (or beyond the token budget) is max_tokens'; a
    sampling field names itself. max_tokens: the body's name of the engine's max_new_tokens."""
    prompt = "messages" if chat else "prompt"
    if not isinstance(e, RequestRefused):
        return OpenAIError(400, str(e), prompt)
    first = e.first
    param = {"prompt": prompt, "max_new_tokens": max_tokens}.get(first.param, first.param)
    return OpenAIError(400, str(e).replace("max_new_tokens", max_tokens), param, first.code)


def sampling_params(body: dict[str, Any], chat: bool, extra: set[str] = frozenset(), zero_ok: bool = False) -> Any:
    """Sampling parameters from the body; unsupported options refused by name, unknown ones too (`extra`: the
    route's own fields). zero_ok: max_tokens 0 is allowed (the completions route's echo); then max_new_tokens 0."""
    for key, why in REFUSED.items():
        if body.get(key) not in (None, False, [], {}):
            raise OpenAIError(400, f"{key}: {why} by pwemoe serve", key, "unsupported_parameter")
    for key in ZERO_OK:
        if body.get(key) not in (None, 0, 0.0):
            raise OpenAIError(400, f"{key}: only 0 is supported by pwemoe serve", key, "unsupported_parameter")
    n = body.get("n", 1)
    if n not in (None, 1):
        raise OpenAIError(
            400,
            f"n={n!r}: pwemoe serve returns one choice per prompt (n=1); send n requests",
            "n",
            "unsupported_parameter",
        )
    known = {
        *("model", "preference", "stream", "max_tokens", "max_completion_tokens", "temperature", "top_p"),
        *("seed", "stop", "n", "logprobs", "ignore_eos", *DIALECTS, *IGNORED, *REFUSED, *ZERO_OK, *extra),
        "messages" if chat else "prompt",
    }
    unknown = sorted(set(body) - known)
    if unknown:
        raise OpenAIError(400, f"unknown parameter(s) {unknown}", unknown[0], "unknown_parameter")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is None and not chat:  # the OpenAI API's default for completions
        max_tokens = 16  # (chat: None, as many as the context leaves, at most generation.OPEN_ENDED_TOKENS)
    zero = zero_ok and max_tokens == 0 and not isinstance(max_tokens, bool)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    params = SamplingParams(
        max_new_tokens=1 if zero else max_tokens,
        temperature=body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0,
        top_p=body.get("top_p", 1.0) if body.get("top_p") is not None else 1.0,
        seed=body.get("seed"),
        stop=stops,
        logprobs=_logprobs(body, chat),
        ignore_eos=body.get("ignore_eos") if body.get("ignore_eos") is not None else False,
    )
    problems = params.problems()
    if problems:
        raise submit_error(RequestRefused(problems), chat, key)
    if zero:
        params.max_new_tokens = 0
    return params


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    """Alternatives per token asked for, or None: completions' `logprobs: N`; chat's `logprobs: true` with
    `top_logprobs: N`."""
    most = MAX_LOGPROBS["chat" if chat else "completions"]
    if chat:
        on, top = body.get("logprobs"), body.get("top_logprobs")
        if on not in (None, True, False):
            raise OpenAIError(400, f"logprobs must be true or false, got {on!r:.40}", "logprobs")
        if top is not None and not on:
            raise OpenAIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        problem = positive_int_problem("top_logprobs", top, 0, most) if top is not None else None
        if problem:
            raise OpenAIError(400, problem[:120], "top_logprobs")
        return (top or 0) if on else None
    n = body.get("logprobs")
    problem = positive_int_problem("logprobs", n, 0, most) if n is not None else None
    if problem:
        raise OpenAIError(400, problem[:120] + " (alternatives per token)", "logprobs")
    return n


__all__ = [
    "OpenAIError",
    "Weights",
    "openai_error_body",
    "read_json",
    "request_weights",
    "sampling_params",
    "submit_error",
]
