"""The server's tokenizer over HTTP, in the shapes vLLM serves, so clients tokenize as the server does.

    POST /tokenize         {"prompt": text, "add_special_tokens": true, "return_token_strs": false}
                           or {"messages": [...], "add_generation_prompt": true} (through the chat template)
                           -> {"count", "max_model_len", "tokens", "token_strs"}
    POST /detokenize       {"tokens": [ids]} -> {"prompt": text}
    GET  /tokenizer_info   the tokenizer's configuration (tokenizer_config.json's fields: eos_token, bos_token,
                           chat_template, ...) and tokenizer_class

lm-evaluation-harness's `local-completions` probes /tokenizer_info and /tokenize and, when both answer, uses them
as its tokenizer. `model` is optional; when given it must name this server's model.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

from ..generation import check_messages, context_length
from .model import PreferenceModel
from .openai_common import OpenAIError, check_model, read_json


def add_tokenizer_routes(app: FastAPI, model: PreferenceModel, name: str) -> None:
    tok = model.wb.modality.tokenizer
    max_len = context_length(model.wb.modality.model)
    vocab = model.wb.modality.model.get_input_embeddings().num_embeddings

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await read_json(request)
        _known(
            body, {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt"}, {"return_token_strs"}
        )
        if body.get("model") is not None:
            check_model(model, name, body["model"])
        if ("prompt" in body) == ("messages" in body):
            raise OpenAIError(400, "give prompt (a text) or messages (a chat), one of them", "prompt")
        if "messages" in body:
            try:
                messages = check_messages(body["messages"])
            except ValueError as e:
                raise OpenAIError(400, str(e), "messages") from None
            if getattr(tok, "chat_template", None) is None:
                raise OpenAIError(400, "this model's tokenizer has no chat template; send a prompt", "messages")
            text = tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=_flag(body, "add_generation_prompt", True)
            )
            ids = tok(text, add_special_tokens=_flag(body, "add_special_tokens", False))["input_ids"]
        else:
            prompt = body["prompt"]
            if not isinstance(prompt, str):
                raise OpenAIError(400, f"prompt must be a string, got {prompt!r:.80}", "prompt")
            ids = tok(prompt, add_special_tokens=_flag(body, "add_special_tokens", True))["input_ids"]
        strs = tok.convert_ids_to_tokens(ids) if _flag(body, "return_token_strs", False) else None
        return {"count": len(ids), "max_model_len": max_len, "tokens": list(ids), "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = await read_json(request)
        _known(body, {"model", "tokens"})
        if body.get("model") is not None:
            check_model(model, name, body["model"])
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(type(t) is int and 0 <= t < vocab for t in ids):
            raise OpenAIError(400, f"tokens must be a list of token ids in [0, {vocab}), got {ids!r:.80}", "tokens")
        return {"prompt": tok.decode(ids)}

    @app.get("/tokenizer_info")
    def tokenizer_info() -> dict[str, Any]:
        return tokenizer_config(tok)


def tokenizer_config(tok: Any) -> dict[str, Any]:
    """The tokenizer's init arguments as JSON (file paths left out, special tokens as their text), its special
    tokens, its chat template and its class name."""
    config = {k: _plain(v) for k, v in (getattr(tok, "init_kwargs", None) or {}).items()}
    for key in ("vocab_file", "merges_file", "tokenizer_file", "name_or_path"):
        config.pop(key, None)
    for key in ("eos_token", "bos_token", "pad_token", "unk_token"):
        config.setdefault(key, getattr(tok, key, None))
    config.setdefault("model_max_length", getattr(tok, "model_max_length", None))
    if getattr(tok, "chat_template", None):
        config["chat_template"] = tok.chat_template
    config["tokenizer_class"] = type(tok).__name__
    return {k: v for k, v in config.items() if _json_ok(v)}


def _plain(v: Any) -> Any:
    if hasattr(v, "content"):  # an AddedToken
        return v.content
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _json_ok(v: Any) -> bool:
    if v is None or isinstance(v, (str, bool, int)):
        return True
    if isinstance(v, float):
        return v == v and abs(v) != float("inf")  # model_max_length is often 1e30: kept, NaN and inf are not
    if isinstance(v, list):
        return all(_json_ok(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _json_ok(x) for k, x in v.items())
    return False


def _flag(body: dict[str, Any], key: str, default: bool) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise OpenAIError(400, f"{key} must be true or false, got {v!r:.40}", key)
    return v


def _known(body: dict[str, Any], fields: set[str], more: set[str] = frozenset()) -> None:
    unknown = sorted(set(body) - fields - more)
    if unknown:
        raise OpenAIError(400, f"unknown parameter(s) {unknown}", unknown[0], "unknown_parameter")


__all__ = ["add_tokenizer_routes", "tokenizer_config"]
