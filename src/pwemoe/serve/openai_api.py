"""OpenAI-compatible endpoints of `pwemoe serve` for causal-LM runs: generation at any preference, per request.

    GET  /v1/models              the run, as a model
    POST /v1/chat/completions    messages through the chat template
    POST /v1/completions         prompts (strings or token ids), with echo and logprobs (openai_completions.py)
    POST /tokenize, POST /detokenize, GET /tokenizer_info
                                 the server's tokenizer, in vLLM's shapes (tokenizer_api.py)
    GET  /lora-adapters          the experts, in llama.cpp's shape (dialects.py)

Both POSTs take `max_tokens` (or `max_completion_tokens`), `temperature`, `top_p`, `seed`, `stop`, `stream`
(server-sent events ending in `data: [DONE]`; `stream_options.include_usage` adds a usage chunk) and return
`usage`. The preference is an extra body field (`"preference": [0.7, 0.3]`, what the official client sends with
`extra_body`) or part of the model name (`"model": "<run name>@0.7,0.3"`); without one, the server's default.
Instead of a preference, a request may give raw per-expert scales in an engine's dialect (llama.cpp's `lora`,
LoRAX's `merged_adapters`: `dialects.py`). Chat takes `logprobs: true` with `top_logprobs` (not streamed).
Options pwemoe does not implement (`n` > 1, tools, ...) are refused by name. Errors are OpenAI error
objects: {"error": {"message", "type", "param", "code"}} with the status codes the OpenAI API uses.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..generation import check_messages
from .dialects import lora_adapters
from .model import PreferenceModel
from .openai_common import OpenAIError, Weights, openai_error_body, read_json, request_weights, sampling_params
from .openai_common import submit_error as _submit_error
from .openai_completions import collect, complete, parse_prompts, token_pieces
from .tokenizer_api import add_tokenizer_routes


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

    @app.get("/lora-adapters")
    def adapters() -> list[dict[str, Any]]:
        return lora_adapters(model.task_names, model.meta.get("experts"))

    add_tokenizer_routes(app, model, name)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await read_json(request)
        if "messages" not in body:
            raise OpenAIError(400, "messages is required: a list of {'role', 'content'} objects", "messages")
        try:
            messages = check_messages(body["messages"])
        except ValueError as e:
            raise OpenAIError(400, str(e), "messages") from None
        return await _complete(request, model, name, body, messages, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await read_json(request)
        prompts = parse_prompts(body.get("prompt"))
        if not body.get("stream"):
            return await complete(model, name, body, prompts)
        for key in ("echo", "logprobs"):  # the streamed form sends text deltas only
            if body.get(key) not in (None, False):
                raise OpenAIError(400, f"{key} is not streamed by pwemoe serve; send stream: false", key)
        if len(prompts) != 1:
            raise OpenAIError(400, "a streamed request takes one prompt; send stream: false for several", "prompt")
        return await _complete(request, model, name, body, prompts[0], chat=False)


def _model_card(model: PreferenceModel, name: str) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": int(model.run.stat().st_mtime),
        "owned_by": "pwemoe",
        "preference_tasks": model.task_names,  # the order of the preference's weights
        "default_preference": model.default_preference.tolist(),
    }


async def _complete(
    request: Request, model: PreferenceModel, name: str, body: dict[str, Any], prompt: Any, chat: bool
) -> Any:
    import asyncio

    weights = request_weights(model, name, body)
    params = sampling_params(body, chat, extra={"top_logprobs"} if chat else {"echo"})
    stream = bool(body.get("stream"))
    if stream and params.logprobs is not None:
        raise OpenAIError(400, "logprobs is not streamed by pwemoe serve; send stream: false", "logprobs")
    usage_chunk = bool((body.get("stream_options") or {}).get("include_usage")) if stream else False
    try:
        handle = model.submit(prompt, params=params, loop=asyncio.get_running_loop(), **weights.kwargs())
    except ValueError as e:
        raise _submit_error(e, chat) from None
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    model_name = body["model"]
    if not stream:
        try:
            text, done = await collect(handle)
        finally:
            handle.cancel()  # a no-op when finished; frees the row if the client went away
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": done["finish_reason"]}
        if params.logprobs is not None:
            choice["logprobs"] = _chat_logprobs(model, handle.seq.prompt_ids, done["logprobs"])
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model_name,
            "choices": [choice],
            "usage": done["usage"],
            **weights.fields(),
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
        obj.update(weights.fields())
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


def _chat_logprobs(model: PreferenceModel, prompt: list[int], records: list[Any]) -> dict[str, Any]:
    """The chat form: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]} for the
    completion's tokens (the end of text, which the message does not show, left out)."""
    tok, eos = model.wb.modality.tokenizer, model.scheduler().decoder.eos
    records = [r for r in records if r[0] not in eos]
    pieces = token_pieces(tok, prompt + [r[0] for r in records], len(prompt))

    def entry(text: str, lp: float) -> dict[str, Any]:
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    content = [
        {**entry(piece, lp), "top_logprobs": [entry(tok.decode([a]), alp) for a, alp in alts]}
        for (_, lp, alts), piece in zip(records, pieces)
    ]
    return {"content": content, "refusal": None}


__all__ = ["OpenAIError", "Weights", "add_openai_routes", "openai_error_body"]
