"""The running batch of an upcycled causal LM (`BatchDecoder`): prefill joiners, decode one token for every row,
drop the rows that finished."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from ..architectures import sliding_window_attention
from ..core.preference import Preference
from ..devices import PRECISIONS, autocast
from ..routing import ensembling_modules, num_tasks, row_preferences_table, set_row_preferences
from .requests import Request
from .sampling import sample, token_logprobs
from .weights import serving_weights


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
        self._rows_table: tuple[tuple, Any, list] | None = None  # see _table
        self._one_pref: torch.Tensor | None = None  # the one preference of the last decode step's rows, if one
        self._one_pref_steps = 0  # consecutive decode steps at that preference
        # the output layer in the autocast dtype: autocast would cast its weight (vocabulary x hidden, often the
        # largest matrix of a small model) at every step; the same bits, cast once
        self._head_attr, self._head = _cast_head(model, PRECISIONS[precision])
        # the upcycled model's frozen linear weights in the autocast dtype, for its forwards here (the same bits)
        self._weights = serving_weights(model, PRECISIONS[precision])
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
        one = None if any(raw) else _one_preference(prefs)
        logits = self._forward(ids, mask, cache, prefs, one, raw=raw, keys=[s.key for s in seqs])
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
            keys=[s.key for s in self.rows],
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
        keys: list[Preference | None] | None = None,
    ) -> torch.Tensor:
        """Logits Tensor[B, V] (fp32, CPU) of each row's last position; the cache grows by ids' length.

        prefs: each row's preference; one: the preference they all share (`_one_preference`), or None;
        raw: which rows' prefs are lambda itself (`Request.raw`); keys: each row's validated preference
        (`Request.key`), passed down as it is so that nothing below validates it again."""
        pos = (mask.cumsum(1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        with (
            self.merged(keys[0] if keys and keys[0] is not None else one, may_merge)
            if self.merged is not None and one is not None
            else contextlib.nullcontext() as plain,
            _swapped(self.model, self._head_attr, self._head),
        ):
            if plain is not None:  # the model's own forward (its head, any logit scaling) around the merged copy
                with _swapped(self.model, self._backbone_attr, plain):
                    logits = self._logits(ids, mask, pos, cache)
                self.plain_forwards += 1
                return logits
            set_row_preferences(self.model, self._table(prefs, raw, keys))
            try:
                with self._weights.swapped() if self._weights is not None else contextlib.nullcontext():
                    return self._logits(ids, mask, pos, cache)
            finally:
                set_row_preferences(self.model, None)

    def _table(self, prefs: list[torch.Tensor], raw: list[bool] | None, keys: list[Any] | None = None) -> Any:
        """The rows' `RowPreferences`, made once per batch composition: the upcycled modules keep what they derive
        from it (lambda per row, column scales) while the same table is set at each step."""
        key = (tuple(id(p) for p in prefs), tuple(raw or ()))
        if self._rows_table is None or self._rows_table[0] != key:
            if keys and any(k is not None for k in keys):  # validated rows as they are, raw rows' scales beside
                rows: Any = [k if k is not None else p for p, k in zip(prefs, keys)]
            else:
                rows = torch.stack(prefs)
            table = row_preferences_table(self.model, rows, raw if raw and any(raw) else None)
            self._rows_table = (key, table, list(prefs))  # the preferences kept alive: their ids stay theirs
        return self._rows_table[1]

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
            if tok in self.eos and not s.params.ignore_eos:
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


__all__ = ["BatchDecoder", "context_length"]
