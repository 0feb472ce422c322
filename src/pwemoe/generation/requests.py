"""A request in flight (`Request`: its prompt, preference, sampling and what it generated) and its handle for the
caller (`Handle`: the events as they come, and `cancel()`)."""

from __future__ import annotations

import asyncio
import itertools
import queue
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..core.preference import Preference
from .sampling import SamplingParams


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
        self.key: Preference | None = None  # the validated preference of `preference` (None with raw scales)
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


__all__ = ["Handle", "Request"]
