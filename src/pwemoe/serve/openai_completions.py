"""POST /v1/completions without streaming: several prompts, `echo`, and `logprobs` as the legacy OpenAI API has them.

    prompt     a string, a list of strings, a list of token ids, or a list of token-id lists: one choice per
               prompt (`index` in the prompt's order), all decoded in one batch at the request's weights
    echo       the prompt comes back in front of the completion; `max_tokens: 0` then scores the prompt only
    logprobs   N (0 to 5): choices[i].logprobs = {tokens, token_logprobs, top_logprobs, text_offset}, over the
               echoed prompt (its first token's log-probability is null: nothing precedes it) and the completion;
               top_logprobs[t] maps the N most likely tokens, and the token itself, to their log-probabilities

The prompt's log-probabilities come from one forward of the prompts at the request's weights (`PromptScorer`,
batched with other requests); a completion's from the sampling step that drew each token (`generation`).
lm-evaluation-harness's log-likelihood request (token ids, echo, logprobs 1, max_tokens 1, temperature 0) is
answered by that one forward: the token after the prompt is sampled from its last position. A completion's
`tokens` list the end-of-text token when the model drew it (its text is empty), as vLLM does.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from ..generation import prompt_ids
from .model import PreferenceModel
from .openai_common import OpenAIError, request_weights, sampling_params, submit_error

MAX_PROMPTS = 1024  # prompts in one request
Record = tuple[int, float | None, list[tuple[int, float]] | None]  # (token, log-probability, alternatives)


def parse_prompts(prompt: Any) -> list[str | list[int]]:
    """The request's prompts: strings or token-id lists (one per choice); errors name `prompt`."""

    def ids(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(type(t) is int for t in x)

    if isinstance(prompt, str) or ids(prompt):
        out = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or ids(p) for p in prompt):
        out = list(prompt)
    else:
        raise OpenAIError(
            400,
            "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists, "
            f"each non-empty; got {prompt!r:.80}",
            "prompt",
        )
    if any(p == "" for p in out):
        raise OpenAIError(400, "prompt: an empty string has no token to complete; give some text", "prompt")
    if len(out) > MAX_PROMPTS:
        raise OpenAIError(400, f"{len(out)} prompts in one request; at most {MAX_PROMPTS}: split it", "prompt")
    return out


async def complete(model: PreferenceModel, name: str, body: dict[str, Any], prompts: list[str | list[int]]) -> Any:
    """The non-streamed completions response for `prompts` (see the module's docstring)."""
    weights = request_weights(model, name, body)
    echo = body.get("echo", False)
    if echo not in (True, False, None):
        raise OpenAIError(400, f"echo must be true or false, got {echo!r:.40}", "echo")
    params = sampling_params(body, chat=False, extra={"echo"}, zero_ok=bool(echo))
    tok = model.wb.modality.tokenizer
    sched = model.scheduler()
    try:
        ids = [p if isinstance(p, list) else prompt_ids(tok, p) for p in prompts]
    except ValueError as e:
        raise OpenAIError(400, str(e), "prompt") from None
    vocab = model.wb.modality.model.get_input_embeddings().num_embeddings
    for i, p in enumerate(ids):
        if not all(0 <= t < vocab for t in p):
            raise OpenAIError(400, f"prompt {i}: token ids must be integers in [0, {vocab}), got {p!r:.80}", "prompt")
    top, n_new = params.logprobs, params.max_new_tokens
    scored: list[Any] = [None] * len(ids)
    one_token = bool(echo) and top is not None and n_new == 1  # the scoring forward samples it: no decoding
    try:
        if echo and top is not None:
            fut = model.score(ids, top=top, params=params if one_token else None, **weights.kwargs())
            scored = await asyncio.wrap_future(fut)
        if n_new == 0:
            gens = [("", "length", [], 0) for _ in ids]
        elif one_token:
            gens = [_one_token(tok, sched.decoder.eos, s.next, params.stop) for s in scored]
        else:
            loop = asyncio.get_running_loop()
            handles = [model.submit(p, params=params, loop=loop, **weights.kwargs()) for p in ids]
            try:
                gens = await asyncio.gather(*(_collect(h) for h in handles))
            finally:
                for h in handles:
                    h.cancel()  # a no-op when finished; frees the rows if the client went away
    except ValueError as e:
        raise submit_error(e, chat=False) from None
    choices = []
    for i, (p, s, (text, finish, records, _)) in enumerate(zip(ids, scored, gens)):
        shown = (prompts[i] if isinstance(prompts[i], str) else tok.decode(p)) if echo else ""
        lp = None
        if top is not None:
            head: list[Record] = list(zip(p, s.token_logprobs, s.top)) if echo else []
            lp = legacy_logprobs(tok, p, head, records, 0 if echo else len(p))
        choices.append({"index": i, "text": shown + text, "finish_reason": finish, "logprobs": lp})
    n_in, n_out = sum(len(p) for p in ids), sum(g[3] for g in gens)
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": choices,
        "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out},
        **weights.fields(),
    }


async def collect(handle: Any) -> tuple[str, dict[str, Any]]:
    """(the whole text, the "done" payload: finish_reason, usage, logprobs) of a submitted generation; an engine
    error is a 500 OpenAI error."""
    parts, done = [], {}
    async for kind, payload in handle.aevents():
        if kind == "text":
            parts.append(payload)
        elif kind == "done":
            done = payload
        else:
            raise OpenAIError(500, f"generation failed: {payload}", None, "server_error")
    return "".join(parts), done


async def _collect(handle: Any) -> tuple[str, str, list[Record], int]:
    """(text, finish_reason, the sampled tokens' records, completion tokens) of a submitted generation."""
    text, done = await collect(handle)
    return text, done["finish_reason"], done.get("logprobs", []), done["usage"]["completion_tokens"]


def _one_token(tok: Any, eos: set[int], nxt: Any, stops: list[str]) -> tuple[str, str, list[Record], int]:
    """The completion of one token the scoring forward sampled: the end of text stops with no text."""
    token = nxt[0]
    if token in eos:
        return "", "stop", [nxt], 0
    text = tok.decode([token], skip_special_tokens=True)
    cuts = [at for at in (text.find(x) for x in stops) if at >= 0]
    if cuts:
        return text[: min(cuts)], "stop", [nxt], 1
    return text, "length", [nxt], 1


def token_pieces(tok: Any, ids: list[int], start: int = 0, window: int = 6) -> list[str]:
    """The text each token of ids[start:] adds, decoded after up to `window` tokens before it (so a word's
    leading space and multi-byte characters come out as they do in the whole text)."""
    spans = [(max(0, i - window), i) for i in range(start, len(ids))]
    before = tok.batch_decode([ids[lo:i] for lo, i in spans])
    full = tok.batch_decode([ids[lo : i + 1] for lo, i in spans])
    return [f[len(b) :] if f.startswith(b) else tok.decode([ids[i]]) for b, f, (_, i) in zip(before, full, spans)]


def legacy_logprobs(
    tok: Any, prompt: list[int], head: list[Record], records: list[Record], start: int
) -> dict[str, list[Any]]:
    """{tokens, token_logprobs, top_logprobs, text_offset} over the echoed prompt's records (`head`, empty
    without echo) and the completion's; `start`: where in prompt + completion the listed tokens begin."""
    rows = head + list(records)
    ids = prompt + [r[0] for r in records]
    pieces = token_pieces(tok, ids, start)
    names = tok.batch_decode([[a] for r in rows for a, _ in (r[2] or [])]) if rows else []
    tokens, logprobs, tops, offsets, at, used = [], [], [], [], 0, 0
    for (token, lp, alts), piece in zip(rows, pieces):
        tokens.append(piece)
        logprobs.append(lp)
        offsets.append(at)
        at += len(piece)
        if alts is None:
            tops.append(None)
            continue
        d = {}
        for (_, alp), key in zip(alts, names[used : used + len(alts)]):
            d.setdefault(key, alp)
        used += len(alts)
        d.setdefault(tok.decode([token]), lp)  # the token itself is always listed, as the OpenAI API does
        tops.append(d)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


__all__ = ["collect", "complete", "legacy_logprobs", "parse_prompts", "token_pieces"]
