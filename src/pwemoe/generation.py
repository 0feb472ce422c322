"""Generation at any preference, per request: a batch of sequences, each with its own preference, decoded together.

The upcycled causal LM runs every row of a batch at that row's own preference (`routing.set_row_preferences`):
for LoRA experts (and `task_vector_rank`) the preference only scales the rank columns of thin matmuls, so rows
with different preferences share one forward and no merge happens at all; dense experts merge once per distinct
preference (cached) and group rows at each linear layer.

`BatchDecoder` holds the running batch and its KV cache (transformers' `DynamicCache`, left-padded): sequences join
at any decode step (their prompts are prefilled together, then their cache is padded on the left to the batch's
length and concatenated) and leave when they finish (their rows are dropped from the cache). `Scheduler` runs it
in a thread (continuous batching): a new request joins the running batch at the next step, a finished or
cancelled one leaves it, bounded by `max_batch` sequences and a budget of tokens in flight.

When every row of a decode step has one preference (a lone request, or clients that agree), the step can run
on a plain merged copy of the backbone instead (`BatchDecoder(merged=...)`, the server's cache of merged copies):
the same theta(r) and the same KV cache, without the per-row work of the upcycled modules.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import itertools
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .architectures import sliding_window_attention
from .core.preference import PreferenceLike, normalize_preference
from .devices import PRECISIONS, autocast
from .generation_errors import (
    BudgetExceeded,
    ContextExceeded,
    EmptyPrompt,
    GenerationError,
    PromptTooLong,
    RequestRefused,
    SamplingFieldError,
)
from .routing import check_scales, ensembling_modules, num_tasks, set_row_preferences


@dataclass
class SamplingParams:
    """How one request is decoded. max_new_tokens None: as many as the context and the token budget leave, at most
    OPEN_ENDED_TOKENS. temperature 0 is greedy; seed makes sampling reproducible whatever else is in the batch
    (each request draws from its own generator); stop: strings that end the text (not included)."""

    max_new_tokens: int | None = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # record each sampled token's log-probability and the `logprobs` most likely

    def problems(self) -> list[SamplingFieldError]:
        """Every problem at once, each naming the field (`param`), the value and what is allowed."""
        out = []

        def bad(field: str, message: str) -> None:
            out.append(SamplingFieldError(message, field))

        n = self.max_new_tokens
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            bad("max_new_tokens", f"max_new_tokens must be an integer >= 1, got {n!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 100 or t != t:
            bad("temperature", f"temperature must be a number in [0, 100] (0: greedy), got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            bad("top_p", f"top_p must be a number in (0, 1], got {p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad("seed", f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", f"stop must be a list of non-empty strings, got {self.stop!r}")
        elif len(self.stop) > 16:
            bad("stop", f"stop takes at most 16 strings, got {len(self.stop)}")
        lp = self.logprobs
        if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= MAX_LOGPROBS):
            bad("logprobs", f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {lp!r}")
        return out

    def errors(self) -> list[str]:
        """`problems()` as messages."""
        return [str(p) for p in self.problems()]


MAX_LOGPROBS = 20  # the most alternatives a sampled token's record lists (`SamplingParams.logprobs`)


OPEN_ENDED_TOKENS = 256  # the most tokens a request without max_new_tokens gets


class Request:
    """One request in the batch: its prompt, preference, sampling, the tokens generated and the text emitted.

    Events go to `emit(kind, payload)`: ("text", delta) as text is confirmed, then ("done", {finish_reason,
    usage}) once, or ("error", message).
    """

    _ids = itertools.count(1)

    def __init__(
        self,
        prompt_ids: list[int],
        preference: torch.Tensor,
        params: SamplingParams,
        emit: Callable[[str, Any], None],
        raw: bool = False,
    ) -> None:
        self.id = next(self._ids)
        self.prompt_ids = list(prompt_ids)
        self.preference = preference  # Tensor[k], normalised; with raw, lambda itself (the routers bypassed)
        self.raw = raw
        self.params = params
        self.emit = emit
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        self.generator = torch.Generator().manual_seed(seed)
        self.tokens: list[int] = []
        self.logprobs: list[tuple[int, float, list[tuple[int, float]]]] = []  # params.logprobs: per sampled token
        self.emitted = ""  # text sent so far
        self.finish_reason: str | None = None
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None

    @property
    def budget(self) -> int:
        """Tokens this sequence may hold in the cache: its prompt and every token it may generate."""
        return len(self.prompt_ids) + self.params.max_new_tokens


class BatchDecoder:
    """The running batch of an upcycled causal LM: prefill joiners, decode one token for every row, drop rows.

    model: an AutoModelForCausalLM whose modules are upcycled; tokenizer: its tokenizer (decoding the text).
    Rows are left-padded: `mask` Tensor[B, S] marks real tokens, positions are counted from it, so a row's
    numbers do not depend on how much padding the batch gives it (up to float rounding).

    merged: optional `merged(r, merge)`, a context manager giving a plain copy of the model's backbone holding
    theta(r) (held until exit), or None: none is cached and merge is False, or none can be had now. A forward whose
    rows all have one preference then runs the model with that copy in place of its upcycled backbone. A decode
    step may merge when its rows may still generate `MERGE_AFTER_TOKENS` tokens (a merge costs a few steps) and the
    batch has kept that one preference for `MERGE_AFTER_STEPS` steps (a request decoding alone while others arrive
    does not merge for them); a prefill only takes a copy already cached, so a merge never delays a first token.
    """

    MERGE_AFTER_TOKENS = 16
    MERGE_AFTER_STEPS = 4

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        device: torch.device,
        precision: str = "fp32",
        merged: Callable[[torch.Tensor, bool], AbstractContextManager[nn.Module | None]] | None = None,
    ) -> None:
        self.model, self.tokenizer, self.device, self.precision = model, tokenizer, device, precision
        self.k = num_tasks(model)
        self.rows: list[Request] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # LongTensor[B, S]
        self.last: torch.Tensor | None = None  # LongTensor[B]: each row's newest token, the next step's input
        # the backbone a merged copy stands in for: only when every upcycled module lies inside it (an upcycled
        # head outside it would otherwise run at the model's one preference, not the rows')
        prefix = getattr(model, "base_model_prefix", "")
        backbone = getattr(model, prefix, None) if prefix else None
        inside = isinstance(backbone, nn.Module) and len(list(ensembling_modules(backbone))) == len(
            list(ensembling_modules(model))
        )
        self.merged = merged if inside else None
        self._backbone_attr = prefix
        self.plain_forwards = 0  # forwards run on a merged copy
        self._one_pref: torch.Tensor | None = None  # the one preference of the last decode step's rows, if one
        self._one_pref_steps = 0  # consecutive decode steps at that preference
        # the output layer in the autocast dtype: autocast would cast its weight (vocabulary x hidden, often the
        # largest matrix of a small model) at every step; the same bits, cast once
        self._head_attr, self._head = _cast_head(model, PRECISIONS[precision])
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        self.eos = {int(e) for e in [*eos, tokenizer.eos_token_id] if e is not None}
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos), 0)
        self.max_positions = context_length(model)
        # a sliding-window layer crops its cache from the left, where this decoder pads: refused, not mis-served
        if sliding_window_attention(model.config):
            raise ValueError(
                f"{type(model).__name__} uses sliding-window attention, whose cache pwemoe's batched decoding does "
                "not pad; generation needs a model with full attention"
            )

    # --- the batch -------------------------------------------------------------------------------
    def join(self, seqs: list[Request]) -> None:
        """Prefill the prompts of `seqs` together (left-padded, each at its own preference), sample each one's first
        token, and add them to the running batch."""
        if not seqs:
            return
        n = max(len(s.prompt_ids) for s in seqs)
        ids = torch.tensor([[self.pad] * (n - len(s.prompt_ids)) + s.prompt_ids for s in seqs])
        mask = torch.tensor([[0] * (n - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in seqs])
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        prefs, raw = [s.preference for s in seqs], [s.raw for s in seqs]
        logits = self._forward(ids, mask, cache, prefs, None if any(raw) else _one_preference(prefs), raw=raw)
        self._merge(cache, mask, seqs)
        self.last = (
            torch.cat([self.last, torch.zeros(len(seqs), dtype=torch.long)])
            if self.last is not None
            else (torch.zeros(len(seqs), dtype=torch.long))
        )
        self._advance(logits, range(len(self.rows) - len(seqs), len(self.rows)))

    def step(self) -> None:
        """Decode one token for every unfinished row."""
        if not self.rows:
            return
        self.mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=torch.long)], dim=1)
        prefs, raw = [s.preference for s in self.rows], [s.raw for s in self.rows]
        one = None if any(raw) else _one_preference(prefs)  # scales (raw lambda) never run on a merged copy
        same = one is not None and self._one_pref is not None and torch.equal(one, self._one_pref)
        self._one_pref_steps = self._one_pref_steps + 1 if same else int(one is not None)
        self._one_pref = one
        left = max(s.params.max_new_tokens - len(s.tokens) for s in self.rows)
        logits = self._forward(
            self.last[:, None],
            self.mask,
            self.cache,
            prefs,
            one,
            may_merge=left >= self.MERGE_AFTER_TOKENS and self._one_pref_steps >= self.MERGE_AFTER_STEPS,
            raw=raw,
        )
        self._advance(logits, range(len(self.rows)))

    def drop_finished(self) -> list[Request]:
        """Remove finished and cancelled rows from the batch and the cache; returns them."""
        gone = [s for s in self.rows if s.finish_reason is not None or s.cancelled]
        if not gone:
            return []
        keep = [i for i, s in enumerate(self.rows) if s.finish_reason is None and not s.cancelled]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.mask, self.last = None, None, None
            return gone
        idx = torch.tensor(keep)
        self.cache.batch_select_indices(idx.to(self.device))
        self.mask, self.last = self.mask[idx], self.last[idx]
        # columns that are padding in every remaining row: cut from the left (less attention work per step)
        lead = int((self.mask.cumsum(1) == 0).all(0).sum())
        if lead:
            self.mask = self.mask[:, lead:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., lead:, :], layer.values[..., lead:, :]
        return gone

    # --- internals -------------------------------------------------------------------------------
    @torch.no_grad()
    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        cache: Any,
        prefs: list[torch.Tensor],
        one: torch.Tensor | None,
        may_merge: bool = False,
        raw: list[bool] | None = None,
    ) -> torch.Tensor:
        """Logits Tensor[B, V] (fp32, CPU) of each row's last position; the cache grows by ids' length.

        prefs: each row's preference; one: the preference they all share (`_one_preference`), or None;
        raw: which rows' prefs are lambda itself (`Request.raw`)."""
        pos = (mask.cumsum(1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        with (
            self.merged(one, may_merge)
            if self.merged is not None and one is not None
            else contextlib.nullcontext() as plain,
            _swapped(self.model, self._head_attr, self._head),
        ):
            if plain is not None:  # the model's own forward (its head, any logit scaling) around the merged copy
                with _swapped(self.model, self._backbone_attr, plain):
                    logits = self._logits(ids, mask, pos, cache)
                self.plain_forwards += 1
                return logits
            set_row_preferences(self.model, torch.stack(prefs), raw if raw and any(raw) else None)
            try:
                return self._logits(ids, mask, pos, cache)
            finally:
                set_row_preferences(self.model, None)

    def _logits(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any) -> torch.Tensor:
        with autocast(self.device, self.precision):
            out = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=pos.to(self.device),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return out.logits[:, -1].float().cpu()

    def _merge(self, cache: Any, mask: torch.Tensor, seqs: list[Request]) -> None:
        """Append the prefilled rows (their cache and mask) to the running batch, left-padding the shorter side."""
        if not self.rows:
            self.cache, self.mask, self.rows = cache, mask, list(seqs)
            return
        s_old, s_new = self.mask.shape[1], mask.shape[1]
        width = max(s_old, s_new)
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(mask, width)])
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([_left_pad(old.keys, width, -2), _left_pad(new.keys, width, -2)])
            old.values = torch.cat([_left_pad(old.values, width, -2), _left_pad(new.values, width, -2)])
        self.rows.extend(seqs)

    def _advance(self, logits: torch.Tensor, which: Sequence[int] | range) -> None:
        """Sample the next token of rows `which` from their logits (row j of `logits` for the j-th of `which`)."""
        now = time.perf_counter()
        for j, i in enumerate(which):
            s = self.rows[i]
            tok = sample(logits[j], s.params, s.generator)
            if s.params.logprobs is not None:  # the sampled token's record, the end of text included
                s.logprobs.append(token_logprobs(logits[j], tok, s.params.logprobs))
            self.last[i] = tok
            if s.first_token_at is None:
                s.first_token_at = now
            if tok in self.eos:
                self._finish(s, "stop")
                continue
            s.tokens.append(tok)
            self._emit_text(s)
            if s.finish_reason is None and (
                len(s.tokens) >= s.params.max_new_tokens or len(s.prompt_ids) + len(s.tokens) >= self.max_positions
            ):
                self._finish(s, "length")

    def _emit_text(self, s: Request) -> None:
        """Send the text that is certain: not a partial UTF-8 character, not a possible start of a stop string.
        A stop string ends the request there (the text before it is sent, the stop string is not)."""
        text = self._text(s)
        cuts = [at for at in (text.find(x) for x in s.params.stop) if at >= 0]
        if cuts:
            self._send(s, text[: min(cuts)])
            self._finish(s, "stop", flush=False)
            return
        hold = max((len(x) - 1 for x in s.params.stop), default=0)
        self._send(s, (text[: len(text) - hold] if hold else text).rstrip("\ufffd"))

    def _text(self, s: Request) -> str:
        return self.tokenizer.decode(s.tokens, skip_special_tokens=True)

    def _send(self, s: Request, text: str) -> None:
        if len(text) > len(s.emitted) and text.startswith(s.emitted):
            s.emit("text", text[len(s.emitted) :])
            s.emitted = text

    def _finish(self, s: Request, reason: str, flush: bool = True) -> None:
        """End a request: send the text held back (an end of text or the length limit; a stop string's cut was
        sent already), then its usage."""
        if s.finish_reason is not None:
            return
        if flush:
            self._send(s, self._text(s))
        s.finish_reason = reason
        s.emit(
            "done",
            {
                "finish_reason": reason,
                **({"logprobs": s.logprobs} if s.params.logprobs is not None else {}),
                "usage": {
                    "prompt_tokens": len(s.prompt_ids),
                    "completion_tokens": len(s.tokens),
                    "total_tokens": len(s.prompt_ids) + len(s.tokens),
                },
            },
        )


def _one_preference(prefs: list[torch.Tensor]) -> torch.Tensor | None:
    """The preference Tensor[k] every row has, or None when the rows differ."""
    return prefs[0] if all(torch.equal(p, prefs[0]) for p in prefs[1:]) else None


@contextlib.contextmanager
def _swapped(model: nn.Module, attr: str | None, module: nn.Module | None) -> Iterator[None]:
    """`module` in place of `model.<attr>` for the block (nothing when either is None)."""
    if attr is None or module is None:
        yield
        return
    own = getattr(model, attr)
    setattr(model, attr, module)
    try:
        yield
    finally:
        setattr(model, attr, own)


def _cast_head(model: nn.Module, dtype: torch.dtype | None) -> tuple[str | None, nn.Module | None]:
    """(attribute name, frozen copy in `dtype`) of the model's output layer when it is a plain Linear child of the
    model and autocast computes in `dtype`; (None, None) otherwise (fp32, an upcycled or unusual head)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    attr = next((n for n, c in model.named_children() if c is head), None) if head is not None else None
    if dtype is None or attr is None or type(head) is not nn.Linear:
        return None, None
    cast = nn.Linear(
        head.in_features, head.out_features, bias=head.bias is not None, device=head.weight.device, dtype=dtype
    )
    with torch.no_grad():  # copy_ rounds to nearest even, as autocast's cast does
        cast.weight.copy_(head.weight)
        if head.bias is not None:
            cast.bias.copy_(head.bias)
    return attr, cast.requires_grad_(False)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The next token from logits Tensor[V]: argmax at temperature 0, else nucleus sampling (top_p) from the
    softmax at `temperature`, drawn with the request's own generator."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < params.top_p  # the smallest set whose mass reaches top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[int, float, list[tuple[int, float]]]:
    """(token, its log-probability, the `top` most likely (id, log-probability)) from logits Tensor[V]: the
    model's own distribution (log_softmax in fp32), whatever temperature or top_p sampled from it."""
    lp = torch.log_softmax(logits.float(), -1)
    best = lp.topk(min(top, lp.numel())) if top else None
    alts = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
    return token, float(lp[token]), alts


def context_length(model: nn.Module) -> int:
    """The positions a causal LM takes (its config's max_position_embeddings or n_positions)."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return 1 << 30


def _left_pad(t: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    """t padded with zeros on the left of `dim` to `width`."""
    short = width - t.shape[dim]
    if short <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = short
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)


# --- continuous batching -----------------------------------------------------------------------------
class Handle:
    """A submitted request: its events as they come, and `cancel()` (a client that went away frees its row).

    Events: ("text", delta) ..., then ("done", {finish_reason, usage}) or ("error", message). Read them with
    `events()` (blocking iterator) or `aevents()` (async, when made with an event loop).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop
        self._q: Any = asyncio.Queue() if loop is not None else queue.Queue()
        self.seq: Request | None = None

    def put(self, kind: str, payload: Any) -> None:
        if self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(self._q.put_nowait, (kind, payload))
            except RuntimeError:  # the reader's event loop is gone: nobody is listening any more
                self.cancel()
        else:
            self._q.put((kind, payload))

    def cancel(self) -> None:
        if self.seq is not None:
            self.seq.cancelled = True

    def events(self) -> Iterator[tuple[str, Any]]:
        while True:
            ev = self._q.get()
            yield ev
            if ev[0] in ("done", "error"):
                return

    async def aevents(self):  # -> AsyncIterator[tuple[str, Any]]
        while True:
            ev = await self._q.get()
            yield ev
            if ev[0] in ("done", "error"):
                return

    def result(self) -> dict[str, Any]:
        """Wait for the whole text: {text, finish_reason, usage}."""
        parts, done = [], {}
        for kind, payload in self.events():
            if kind == "text":
                parts.append(payload)
            elif kind == "done":
                done = payload
            else:
                raise RuntimeError(payload)
        return {"text": "".join(parts), **done}


class Scheduler:
    """Continuous batching over one `BatchDecoder`, in a background thread.

    At every decode step the waiting requests join (first come, first served) while the batch has fewer than
    `max_batch` sequences and the tokens they may hold (prompt + max_new_tokens each) fit in `token_budget`;
    finished and cancelled sequences leave after the step. `lock` (if given) is held around each forward, so
    other users of the same model (merges for other endpoints) interleave with decoding between steps.
    """

    def __init__(
        self,
        decoder: BatchDecoder,
        max_batch: int = 8,
        token_budget: int = 16384,
        lock: threading.RLock | None = None,
    ) -> None:
        for name, v in (("max_batch", max_batch), ("token_budget", token_budget)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        self.decoder, self.max_batch, self.token_budget = decoder, max_batch, token_budget
        self.lock = lock or threading.RLock()
        self.waiting: list[Request] = []
        self.cond = threading.Condition()
        self.steps = 0
        self.cancelled = 0  # requests that left before they finished (their client went away)
        self._stop = False
        self._thread: threading.Thread | None = None
        self._closes_at_exit = False

    # --- submitting --------------------------------------------------------------------------------
    def check(self, prompt_ids: list[int], params: SamplingParams) -> list[GenerationError]:
        """What makes a request impossible here (bad sampling fields; empty or too long for the context or the
        budget), each problem typed by what is at fault."""
        errors: list[GenerationError] = list(params.problems())
        if errors:
            return errors
        n, ctx = len(prompt_ids), self.decoder.max_positions
        if n == 0:
            errors.append(EmptyPrompt("the prompt is empty; give at least one token of text"))
        elif n >= ctx:
            errors.append(
                PromptTooLong(f"the prompt has {n} tokens; the model takes {ctx} positions in all: shorten the prompt")
            )
        elif n + params.max_new_tokens > ctx:
            errors.append(
                ContextExceeded(
                    f"the prompt ({n} tokens) and max_tokens ({params.max_new_tokens}) exceed the model's context of "
                    f"{ctx} positions; ask for at most {ctx - n} tokens"
                )
            )
        if n + params.max_new_tokens > self.token_budget:
            errors.append(
                BudgetExceeded(
                    f"the prompt ({n} tokens) and max_tokens ({params.max_new_tokens}) exceed the server's token "
                    f"budget ({self.token_budget}); ask for fewer tokens (or raise --token-budget)"
                )
            )
        return errors

    def submit(
        self,
        prompt_ids: list[int],
        preference: PreferenceLike,
        params: SamplingParams,
        loop: asyncio.AbstractEventLoop | None = None,
        raw: bool = False,
    ) -> Handle:
        """Queue a request; its events come through the returned handle. Bad input: `RequestRefused` (a
        ValueError holding every problem, typed), nothing queued.

        raw: `preference` is lambda itself (per-expert scales, the routers bypassed; `routing.check_scales`)."""
        if params.max_new_tokens is None and not params.problems():
            room = min(self.decoder.max_positions, self.token_budget) - len(prompt_ids)
            params = dataclasses.replace(params, max_new_tokens=max(1, min(OPEN_ENDED_TOKENS, room)))
        errors = self.check(prompt_ids, params)
        if errors:
            raise RequestRefused(errors)
        pref = check_scales(preference, self.decoder.k) if raw else normalize_preference(preference, self.decoder.k)
        handle = Handle(loop)
        seq = Request(prompt_ids, pref, params, handle.put, raw)
        handle.seq = seq
        with self.cond:
            self.waiting.append(seq)
            self.cond.notify()
        self._ensure_thread()
        return handle

    def stats(self) -> dict[str, int]:
        return {
            "running": len(self.decoder.rows),
            "waiting": len(self.waiting),
            "max_batch": self.max_batch,
            "token_budget": self.token_budget,
            "steps": self.steps,
            "plain_forwards": self.decoder.plain_forwards,
            "cancelled": self.cancelled,
        }

    def close(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # --- the loop ------------------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, daemon=True, name="pwemoe-generate")
            self._thread.start()
            if not self._closes_at_exit:  # a decoding thread left running into interpreter shutdown aborts there
                atexit.register(_close_scheduler, weakref.ref(self))
                self._closes_at_exit = True

    def _admit(self) -> list[Request]:
        """Waiting requests that join now (FIFO; the first that does not fit waits, and so do those after it)."""
        with self.cond:
            self.cancelled += sum(s.cancelled for s in self.waiting)
            self.waiting = [s for s in self.waiting if not s.cancelled]
            used = sum(s.budget for s in self.decoder.rows)
            out = []
            while self.waiting and len(self.decoder.rows) + len(out) < self.max_batch:
                nxt = self.waiting[0]
                if used + nxt.budget > self.token_budget:
                    break
                out.append(self.waiting.pop(0))
                used += nxt.budget
            return out

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self._stop and not self.waiting and not self.decoder.rows:
                    self.cond.wait()
                if self._stop:
                    return
            new: list[Request] = []
            try:
                new = self._admit()
                with self.lock:
                    if self.decoder.rows:  # the running rows first, so a join never delays them by a prefill
                        self.decoder.step()
                    self.decoder.join(new)
                self.steps += 1
            except Exception as e:  # noqa: BLE001 - every request in flight is told, and the loop goes on
                msg = f"{type(e).__name__}: {e}"
                for s in [*self.decoder.rows, *new]:
                    if s.finish_reason is None:
                        s.finish_reason = "error"
                        s.emit("error", msg)
                self.decoder.rows, self.decoder.cache, self.decoder.mask, self.decoder.last = [], None, None, None
                continue
            gone = self.decoder.drop_finished()
            self.cancelled += sum(s.cancelled and s.finish_reason is None for s in gone)


def _close_scheduler(ref: weakref.ref) -> None:
    sched = ref()
    if sched is not None:
        sched.close()


# --- prompts -------------------------------------------------------------------------------------------
ROLES = ("system", "user", "assistant")


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Chat messages [{"role", "content"}] as the chat template takes them; every malformed one named at once."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} objects, got {messages!r:.80}")
    bad = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            bad.append(f"messages[{i}] is a {type(m).__name__}, not an object")
            continue
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            bad.append(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if isinstance(content, list):  # the OpenAI content-part form: text parts only
            parts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None for p in content]
            if not parts or any(not isinstance(p, str) for p in parts):
                bad.append(f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) are supported")
            else:
                m = {**m, "content": "".join(parts)}
                content = m["content"]
        if not isinstance(content, str):
            bad.append(f"messages[{i}].content must be a string, got {type(content).__name__}")
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            bad.append(f"messages[{i}] has unsupported fields {extra} (tool calls are not supported)")
    if bad:
        raise ValueError("; ".join(bad))
    return [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else ""} for m in messages]


def prompt_ids(tokenizer: Any, prompt: str | list[dict[str, Any]]) -> list[int]:
    """Token ids of a prompt: a text as the tokenizer encodes it (with its special tokens), or chat messages
    through the tokenizer's chat template with the assistant's turn opened (`add_generation_prompt`)."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("the prompt is empty; give some text")
        return list(tokenizer(prompt)["input_ids"])
    messages = check_messages(prompt)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this model's tokenizer has no chat template; send a plain prompt (/v1/completions) instead")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


__all__ = [
    "BatchDecoder",
    "Handle",
    "Request",
    "SamplingParams",
    "Scheduler",
    "check_messages",
    "context_length",
    "prompt_ids",
    "sample",
    "token_logprobs",
]
