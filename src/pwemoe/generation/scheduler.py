"""Continuous batching (`Scheduler`): requests join a running `BatchDecoder` at any step and leave when they finish,
in a background thread."""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import threading
import weakref

from ..core.checks import positive_int
from ..core.preference import Preference, PreferenceLike
from ..routing import check_scales
from .decoder import BatchDecoder
from .errors import BudgetExceeded, ContextExceeded, EmptyPrompt, GenerationError, PromptTooLong, RequestRefused
from .requests import Handle, Request
from .sampling import OPEN_ENDED_TOKENS, SamplingParams


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
        positive_int("max_batch", max_batch)
        positive_int("token_budget", token_budget)
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
        # validated once here (a Preference made at the edge passes as it is); the steps use its tensor and key
        key = None if raw else Preference.of(preference, self.decoder.k)
        pref = check_scales(preference, self.decoder.k) if raw else key.tensor
        handle = Handle(loop)
        seq = Request(prompt_ids, pref, params, handle.put, raw)
        seq.key = key
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


__all__ = ["Scheduler"]
