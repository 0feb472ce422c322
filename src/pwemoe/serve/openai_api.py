"""OpenAI-compatible endpoints of `pwemoe serve` for causal-LM runs: generation at any preference, per request.

    GET  /v1/models              the run, as a model
    POST /v1/chat/completions    messages through the chat template
    POST /v1/completions         a plain prompt

Both POSTs take `max_tokens` (or `max_completion_tokens`), `temperature`, `top_p`, `seed`, `stop`, `stream`
(server-sent events ending in `data: [DONE]`; `stream_options.include_usage` adds a usage chunk) and return
`usage`. The preference is an extra body field (`"preference": [0.7, 0.3]`, what the official client sends with
`extra_body`) or part of the model name (`"model": "<run name>@0.7,0.3"`); without one, the server's default.
Options pwemoe does not implement (`n` > 1, tools, logprobs, ...) are refused by name. Errors are OpenAI error
objects: {"error": {"message", "type", "param", "code"}} with the status codes the OpenAI API uses.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..core.preference import parse_preference
from ..generation import SamplingParams, check_messages
from .model import PreferenceModel

# Request fields accepted (besides the ones every endpoint reads), and those refused with the reason.
_IGNORED = {"user", "metadata", "store", "stream_options", "service_tier", "parallel_tool_calls"}
_REFUSED = {
    "tools": "tool calls are not supported",
    "tool_choice": "tool calls are not supported",
    "functions": "function calls are not supported",
    "function_call": "function calls are not supported",
    "logprobs": "log-probabilities are not returned",
    "top_logprobs": "log-probabilities are not returned",
    "response_format": "structured output is not supported",
    "logit_bias": "logit_bias is not supported",
    "best_of": "best_of is not supported",
    "echo": "echo is not supported",
    "suffix": "suffix is not supported",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "reasoning options are not supported",
    "web_search_options": "web search is not supported",
}
_ZERO_OK = {"presence_penalty", "frequency_penalty"}  # accepted only at their neutral value 0


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


def add_openai_routes(app: FastAPI, model: PreferenceModel, name: str) -> None:
    """Mount the /v1 endpoints for `model` (a causal-LM run) served under the model name `name`."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(model, name)]}

    @app.get("/v1/models/{model_id}")
    def model_card(model_id: str) -> dict[str, Any]:
        if model_id != name:
            raise OpenAIError(
                404, f"the model {model_id!r} does not exist; this server has {name!r}", "model", "model_not_found"
            )
        return _model_card(model, name)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await _json(request)
        if "messages" not in body:
            raise OpenAIError(400, "messages is required: a list of {'role', 'content'} objects", "messages")
        try:
            messages = check_messages(body["messages"])
        except ValueError as e:
            raise OpenAIError(400, str(e), "messages") from None
        return await _complete(request, model, name, body, messages, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await _json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                raise OpenAIError(
                    400, "prompt must be one string (a list of one string); send one request per prompt", "prompt"
                )
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise OpenAIError(400, f"prompt must be a non-empty string, got {prompt!r:.80}", "prompt")
        return await _complete(request, model, name, body, prompt, chat=False)


def _model_card(model: PreferenceModel, name: str) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": int(model.run.stat().st_mtime),
        "owned_by": "pwemoe",
        "preference_tasks": model.task_names,  # the order of the preference's weights
        "default_preference": model.default_preference,
    }


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OpenAIError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _preference(model: PreferenceModel, name: str, body: dict[str, Any]) -> list[float]:
    """From the body's `preference`, else from the model name (`<name>@0.7,0.3`), else the default."""
    m = body.get("model")
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
    pref = body.get("preference")
    where = "preference"
    if pref is None and tail:
        try:
            pref = parse_preference(tail)
        except ValueError as e:
            raise OpenAIError(400, f"model {m!r}: {e}", "model") from None
        where = "model"
    if pref is None:
        return list(model.default_preference)
    if not isinstance(pref, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in pref):
        raise OpenAIError(
            400,
            f"preference must be a list of {model.k} numbers (one weight per task: "
            f"{', '.join(model.task_names)}), got {pref!r:.80}",
            where,
        )
    try:
        return model.preference(pref)
    except (TypeError, ValueError) as e:
        raise OpenAIError(400, f"{where}: {e} (tasks: {', '.join(model.task_names)})", where) from None


def _submit_error(msg: str, chat: bool) -> OpenAIError:
    """A refused submission as OpenAI reports it: a prompt beyond the context is the prompt's fault, a completion
    beyond it (or beyond the token budget) is max_tokens'."""
    prompt = "messages" if chat else "prompt"
    if msg.startswith("the prompt has"):
        return OpenAIError(400, msg, prompt, "context_length_exceeded")
    if "model's context" in msg:
        return OpenAIError(400, msg, "max_tokens", "context_length_exceeded")
    if "token budget" in msg:
        return OpenAIError(400, msg, "max_tokens")
    return OpenAIError(400, msg, prompt)


def _params(body: dict[str, Any], chat: bool) -> SamplingParams:
    """Sampling parameters from the body; unsupported options refused by name."""
    for key, why in _REFUSED.items():
        if body.get(key) not in (None, False, [], {}):
            raise OpenAIError(400, f"{key}: {why} by pwemoe serve", key, "unsupported_parameter")
    for key in _ZERO_OK:
        if body.get(key) not in (None, 0, 0.0):
            raise OpenAIError(400, f"{key}: only 0 is supported by pwemoe serve", key, "unsupported_parameter")
    n = body.get("n", 1)
    if n not in (None, 1):
        raise OpenAIError(
            400,
            f"n={n!r}: pwemoe serve returns one choice per request (n=1); send n requests",
            "n",
            "unsupported_parameter",
        )
    known = {
        "model",
        "preference",
        "stream",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "n",
        *_IGNORED,
        *_REFUSED,
        *_ZERO_OK,
        "messages" if chat else "prompt",
    }
    unknown = sorted(set(body) - known)
    if unknown:
        raise OpenAIError(400, f"unknown parameter(s) {unknown}", unknown[0], "unknown_parameter")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is None and not chat:  # the OpenAI API's default for completions
        max_tokens = 16  # (chat: None, as many as the context leaves, at most generation.OPEN_ENDED_TOKENS)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0,
        top_p=body.get("top_p", 1.0) if body.get("top_p") is not None else 1.0,
        seed=body.get("seed"),
        stop=stops,
    )
    for problem in params.errors():
        field = problem.split(" ", 1)[0]
        param = {"max_new_tokens": key}.get(field, field)
        raise OpenAIError(400, problem.replace("max_new_tokens", key), param)
    return params


async def _complete(
    request: Request, model: PreferenceModel, name: str, body: dict[str, Any], prompt: Any, chat: bool
) -> Any:
    import asyncio

    pref = _preference(model, name, body)
    params = _params(body, chat)
    stream = bool(body.get("stream"))
    usage_chunk = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
    try:
        handle = model.submit(prompt, pref, params, loop=asyncio.get_running_loop())
    except ValueError as e:
        raise _submit_error(str(e), chat) from None
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    model_name = body["model"]
    if not stream:
        parts, done = [], {}
        try:
            async for kind, payload in handle.aevents():
                if kind == "text":
                    parts.append(payload)
                elif kind == "done":
                    done = payload
                else:
                    raise OpenAIError(500, f"generation failed: {payload}", None, "server_error")
        finally:
            handle.cancel()  # a no-op when finished; frees the row if the client went away
        text = "".join(parts)
        choice = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": done["finish_reason"]}
            if chat
            else {"index": 0, "text": text, "finish_reason": done["finish_reason"], "logprobs": None}
        )
        return {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": model_name,
            "choices": [choice],
            "usage": done["usage"],
            "preference": pref,
        }

    def chunk(delta: dict[str, Any] | str | None, finish: str | None = None, usage: Any = None) -> str:
        if chat:
            choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
            obj = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model_name,
                "choices": choices,
            }
        else:
            choices = [] if delta is None else [{"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}]
            obj = {"id": rid, "object": "text_completion", "created": created, "model": model_name, "choices": choices}
        if usage is not None:
            obj["usage"] = usage
        obj["preference"] = pref
        return f"data: {json.dumps(obj)}\n\n"

    async def events():
        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            async for kind, payload in handle.aevents():
                if kind == "text":
                    yield chunk({"content": payload} if chat else payload)
                elif kind == "done":
                    yield chunk({} if chat else "", payload["finish_reason"])
                    if usage_chunk:
                        yield chunk(None, usage=payload["usage"])
                else:
                    err = {
                        "error": {
                            "message": f"generation failed: {payload}",
                            "type": "server_error",
                            "param": None,
                            "code": None,
                        }
                    }
                    yield f"data: {json.dumps(err)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            handle.cancel()  # the client went away (or we are done): its row leaves the batch at the next step

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


__all__ = ["OpenAIError", "add_openai_routes", "openai_error_body"]
