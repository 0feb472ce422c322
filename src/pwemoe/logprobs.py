"""Prompt log-probabilities at any preference: every token's log p(token | the tokens before it), in batches.

What harnesses ask a completions server for (lm-evaluation-harness's log-likelihood tasks: `echo` with
`logprobs`): a prompt scored whole, position by position, at one preference. `PromptScorer` runs the prompts
of concurrent requests together in one forward of the upcycled causal LM, each row at its own preference
(`routing.set_row_preferences`) or at its own per-expert scales (raw lambda, the routers bypassed); when every
row of a forward shares one preference the forward may run on a merged copy of the backbone instead, as the
decoder's steps do (`generation.BatchDecoder`). The model's own forward computes the logits (its head, any
final logit scaling), under the same autocast as decoding; log-probabilities are taken in fp32.

A row may also ask for the token that follows its prompt (a completion of one token): it is sampled from the
last position's logits with the request's own sampling parameters and generator, as the decoder samples.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch import nn

from .core.preference import Preference
from .devices import PRECISIONS, autocast
from .generation import MAX_LOGPROBS, SamplingParams, context_length, sample, token_logprobs
from .generation.errors import (
    BadTokens,
    EmptyPrompt,
    GenerationError,
    PromptTooLong,
    RequestRefused,
    SamplingFieldError,
)
from .generation.weights import serving_weights
from .routing import ensembling_modules, set_row_preferences

Alternatives = list[tuple[int, float]]  # (token id, log-probability), most likely first


@dataclass
class ScoreRow:
    """One prompt to score. preference: Tensor[k], normalised (or, with raw, lambda itself); top: alternatives
    listed per position (0 to MAX_LOGPROBS); params: sample the token after the prompt with these (or None)."""

    ids: list[int]
    preference: torch.Tensor
    raw: bool = False
    top: int = 0
    params: SamplingParams | None = None
    generator: torch.Generator = field(default_factory=torch.Generator)
    key: Preference | None = None  # the validated preference `preference` is the tensor of, passed down as it is

    def __post_init__(self) -> None:  # the request's own draws: seeded by params.seed, else at random
        seed = self.params.seed if self.params is not None else None
        self.generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))


@dataclass
class Scored:
    """A scored prompt: token_logprobs[t] = log p(ids[t] | ids[:t]) (None at t = 0, nothing precedes it);
    top[t]: the `top` most likely tokens at position t (None at t = 0); next: the sampled next token as
    (token, log-probability, alternatives), when asked for."""

    token_logprobs: list[float | None]
    top: list[Alternatives | None]
    next: tuple[int, float, Alternatives] | None = None


class PromptScorer:
    """Scores prompts in batches, in a background thread: `submit(rows)` returns a Future of `Scored` per row.

    model: an AutoModelForCausalLM whose modules are upcycled. lock: held around each forward (the one that
    guards the model's preference state, shared with the decoder). merged: optional `merged(r, merge)`, the
    decoder's context manager giving a plain merged copy of the backbone for r, or None. Forwards hold at most
    `max_tokens` tokens (rows x longest row) and `max_logits` logits (rows x longest row x vocabulary); a row
    longer than that runs alone.
    """

    MERGE_AFTER = 2  # forwards in a row at one preference before a merged copy is made for it
    MAX_LOGITS = 1 << 26  # 256 MiB of fp32 log-probabilities per forward

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        precision: str = "fp32",
        lock: threading.RLock | None = None,
        merged: Callable[[torch.Tensor, bool], AbstractContextManager[nn.Module | None]] | None = None,
        max_tokens: int = 8192,
        pad_id: int = 0,
    ) -> None:
        self.model, self.device, self.precision = model, device, precision
        self.lock = lock or threading.RLock()
        prefix = getattr(model, "base_model_prefix", "")
        backbone = getattr(model, prefix, None) if prefix else None
        inside = isinstance(backbone, nn.Module) and len(list(ensembling_modules(backbone))) == len(
            list(ensembling_modules(model))
        )
        self.merged = merged if inside else None  # a merged copy stands in for the backbone only
        self._backbone_attr = prefix
        self.max_tokens, self.pad_id = max_tokens, pad_id
        self.vocab = int(model.get_input_embeddings().num_embeddings)
        self.max_positions = context_length(model)
        self.forwards = self.plain_forwards = 0
        self._last: torch.Tensor | None = None  # the one preference of the previous forward, if one
        self._streak = 0
        self._waiting: list[tuple[list[ScoreRow], concurrent.futures.Future]] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._closes_at_exit = False

    # --- submitting --------------------------------------------------------------------------------
    def check(self, row: ScoreRow) -> list[GenerationError]:
        """What makes a row impossible here (no tokens, ids outside the vocabulary, too long for the context, too many
        alternatives asked for), each problem typed by what is at fault."""
        n, errors = len(row.ids), []
        if n == 0:
            errors.append(EmptyPrompt("the prompt is empty; give at least one token"))
        bad = [t for t in row.ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab]
        if bad:
            errors.append(BadTokens(f"token ids must be integers in [0, {self.vocab}), got {bad[:3]}"))
        room = self.max_positions - (1 if row.params is not None else 0)
        if n > room:
            errors.append(
                PromptTooLong(
                    f"the prompt has {n} tokens; the model takes {self.max_positions} positions in all: shorten the "
                    "prompt"
                )
            )
        if not 0 <= row.top <= MAX_LOGPROBS:
            errors.append(SamplingFieldError(f"top must be in [0, {MAX_LOGPROBS}], got {row.top}", "logprobs"))
        return errors

    def submit(self, rows: list[ScoreRow]) -> concurrent.futures.Future:
        """Queue rows to score together with whatever else is waiting; a Future of list[Scored] (one per row).
        Bad rows: `RequestRefused` naming each problem, typed, nothing queued."""
        errors = [e.prefixed(f"prompt {i}: ") for i, r in enumerate(rows) for e in self.check(r)]
        if not rows:
            errors.append(EmptyPrompt("no prompt to score"))
        if errors:
            raise RequestRefused(errors)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._waiting.append((rows, fut))
            self._cond.notify()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, daemon=True, name="pwemoe-score")
            self._thread.start()
            if not self._closes_at_exit:  # a thread left running into interpreter shutdown aborts there
                atexit.register(_close, weakref.ref(self))
                self._closes_at_exit = True
        return fut

    def score(self, rows: list[ScoreRow]) -> list[Scored]:
        """`submit` and wait."""
        return self.submit(rows).result()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # --- the loop ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting:
                    self._cond.wait()
                if self._stop:
                    return
                jobs, self._waiting = self._waiting, []
            try:
                flat = [(j, i, row) for j, (rows, _) in enumerate(jobs) for i, row in enumerate(rows)]
                out: list[list[Scored | None]] = [[None] * len(rows) for rows, _ in jobs]
                flat.sort(key=lambda x: -len(x[2].ids))  # longest first: rows of like length share a forward
                for chunk in self._chunks([row for _, _, row in flat]):
                    for (j, i, _), scored in zip(flat[: len(chunk)], self._forward(chunk)):
                        out[j][i] = scored
                    flat = flat[len(chunk) :]
                for (_, fut), res in zip(jobs, out):
                    fut.set_result(res)
            except Exception as e:  # noqa: BLE001 - every waiting caller is told, and the loop goes on
                for _, fut in jobs:
                    if not fut.done():
                        fut.set_exception(e)

    def _chunks(self, rows: list[ScoreRow]) -> Iterator[list[ScoreRow]]:
        """Consecutive rows (longest first) within the token and logits limits of one forward."""
        i = 0
        while i < len(rows):
            longest, j = len(rows[i].ids), i + 1
            while j < len(rows) and (j - i + 1) * longest <= min(self.max_tokens, self.MAX_LOGITS // self.vocab):
                j += 1
            yield rows[i:j]
            i = j

    @torch.no_grad()
    def _forward(self, rows: list[ScoreRow]) -> list[Scored]:
        n = max(len(r.ids) for r in rows)
        ids = torch.tensor([r.ids + [self.pad_id] * (n - len(r.ids)) for r in rows])
        mask = torch.tensor([[1] * len(r.ids) + [0] * (n - len(r.ids)) for r in rows])
        pos = torch.arange(n).expand(len(rows), -1)  # right padding: each row's positions count from 0
        prefs, raw = torch.stack([r.preference for r in rows]), [r.raw for r in rows]
        one = None if any(raw) or not bool((prefs == prefs[0]).all()) else prefs[0]
        same = one is not None and self._last is not None and torch.equal(one, self._last)
        self._streak, self._last = (self._streak + 1 if same else int(one is not None)), one
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with (
            self.lock,
            self.merged(rows[0].key if rows[0].key is not None else one, self._streak >= self.MERGE_AFTER)
            if self.merged is not None and one is not None
            else contextlib.nullcontext() as plain,
        ):
            if plain is not None:  # the model's own forward (its head, any logit scaling) around the merged copy
                with _swapped(self.model, self._backbone_attr, plain):
                    logits = self._logits(inputs)
                self.plain_forwards += 1
            else:
                keyed = [r.key if r.key is not None else r.preference for r in rows]  # validated rows as they are
                table = keyed if any(r.key is not None for r in rows) else prefs
                set_row_preferences(self.model, table, raw if any(raw) else None)
                try:
                    weights = serving_weights(self.model, PRECISIONS[self.precision])  # frozen weights cast once
                    with weights.swapped() if weights is not None else contextlib.nullcontext():
                        logits = self._logits(inputs)
                finally:
                    set_row_preferences(self.model, None)
            self.forwards += 1
        return _read(logits, ids, rows)

    def _logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast(self.device, self.precision):
            out = self.model(**inputs, use_cache=False)
        return out.logits.float().cpu()  # Tensor[B, S, V]


def _read(logits: torch.Tensor, ids: torch.Tensor, rows: list[ScoreRow]) -> list[Scored]:
    """Each row's token log-probabilities, alternatives and sampled next token from logits Tensor[B, S, V]."""
    lp = torch.log_softmax(logits, -1)
    given = lp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, S-1]: log p(ids[t+1] | ids[:t+1])
    most = min(max(r.top for r in rows), lp.shape[-1])
    best = lp.topk(most, -1) if most else None
    out = []
    for b, r in enumerate(rows):
        n = len(r.ids)
        top: list[Alternatives | None] = [None]
        if best is not None and r.top:
            idx, val = best.indices[b, : n - 1, : r.top].tolist(), best.values[b, : n - 1, : r.top].tolist()
            top += [list(zip(i, v)) for i, v in zip(idx, val)]
        else:
            top += [[] for _ in range(n - 1)]
        nxt = None
        if r.params is not None:
            last = logits[b, n - 1]
            nxt = token_logprobs(last, sample(last, r.params, r.generator), r.top)
        out.append(Scored([None, *given[b, : n - 1].tolist()], top, nxt))
    return out


@contextlib.contextmanager
def _swapped(model: nn.Module, attr: str, module: nn.Module) -> Iterator[None]:
    """`module` in place of `model.<attr>` for the block."""
    own = getattr(model, attr)
    setattr(model, attr, module)
    try:
        yield
    finally:
        setattr(model, attr, own)


def _close(ref: weakref.ref) -> None:
    scorer = ref()
    if scorer is not None:
        scorer.close()


__all__ = ["PromptScorer", "ScoreRow", "Scored"]
