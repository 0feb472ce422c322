"""`MergeCache`: plain merged backbones theta(r) for the preferences asked for, least recently used out first.

Each entry is one plain copy of the backbone (`export.PlainCopy`) re-merged in place for a new preference, so a
server holds at most `size` backbones however many preferences its clients send.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..core.checks import positive_int
from ..core.preference import Preference
from ..export import PlainCopy

Key = tuple[float, ...]


@dataclass
class _Entry:
    copy: PlainCopy  # one plain copy of the backbone, re-merged when the entry is reused for another preference
    users: int = 0


class MergeCache:
    """Plain merged backbones theta(r), keyed by the normalised preference, least recently used out first.

    A miss re-merges into the least recently used copy that no caller is using (`PlainCopy.at`: no new
    allocation); only while the cache is filling is a new copy made, and when
    every copy is in use the caller waits for one. A copy is never re-merged while a caller holds it
    (`lease`), so concurrent callers with different preferences never see each other's weights.
    Merges run under `lock`, the lock that guards the upcycled model's preference state. compute_dtype: the autocast
    dtype of the forwards (None for fp32): each copy keeps its linear weights in it (`linear_weights_to`).
    """

    def __init__(
        self, backbone: nn.Module, size: int, lock: threading.RLock, compute_dtype: torch.dtype | None = None
    ) -> None:
        positive_int("cache_size", size, hint=" (merged copies kept)")
        self.backbone, self.size, self.lock = backbone, size, lock
        self.compute_dtype = compute_dtype
        self.freed = threading.Condition(lock)  # a copy's last user left
        self.entries: OrderedDict[Key, _Entry] = OrderedDict()
        self.hits = self.misses = self.reused = self.waits = 0
        self.declined = 0  # leases answered None (wait=False or merge=False)

    @contextlib.contextmanager
    def lease(
        self, key: Key | Preference, wait: bool = True, merge: bool = True, grow: bool = True
    ) -> Iterator[tuple[nn.Module | None, bool]]:
        """Yield (plain model with theta(key), whether it was cached); the copy is held until exit.

        At most `size` copies ever exist: when all are held, a caller with another preference waits
        for one to be released (each copy is a whole backbone; an LLM's would not fit many times).
        For a caller with a cheaper way than a merge (the decoder's upcycled model): wait=False yields (None, False)
        instead of waiting, merge=False unless theta(key) is cached; grow=False makes a new copy only in an empty
        cache (otherwise it re-merges a free one).
        """
        pref = key if isinstance(key, Preference) else None  # validated already: the merge takes it as it is
        key = pref.key if pref is not None else tuple(key)
        at = pref if pref is not None else list(key)
        e: _Entry | None = None
        hit = False
        with self.lock:
            while True:
                e = self.entries.get(key)
                if e is not None:
                    hit = True
                    self.hits += 1
                    self.entries.move_to_end(key)
                    break
                if not merge:
                    break
                if len(self.entries) < self.size and (grow or not self.entries):
                    e = _Entry(PlainCopy(self.backbone))
                    plain = e.copy.at(at).requires_grad_(False)
                    if self.compute_dtype is not None:
                        linear_weights_to(plain, self.compute_dtype)
                    break
                free = next((k for k, v in self.entries.items() if v.users == 0), None)
                if free is not None:
                    e = self.entries.pop(free)
                    e.copy.at(at)
                    self.reused += 1
                    break
                if not wait:
                    break
                self.waits += 1
                self.freed.wait()  # every copy is in use: wait for one, then look again
            if e is None:
                self.declined += 1
            else:
                if not hit:
                    self.misses += 1
                    self.entries[key] = e
                e.users += 1
        if e is None:
            yield None, False
            return
        try:
            yield e.copy.plain, hit
        finally:
            with self.lock:
                e.users -= 1
                if e.users == 0:
                    self.freed.notify_all()

    def stats(self) -> dict[str, int]:
        return {
            "size": self.size,
            "held": len(self.entries),
            "hits": self.hits,
            "misses": self.misses,
            "waits": self.waits,
            "declined": self.declined,
        }


def linear_weights_to(model: nn.Module, dtype: torch.dtype) -> None:
    """Store the weights of `model`'s linear layers in `dtype` (parameters shared with another module excepted).

    Under autocast to `dtype` the outputs are the same bits: autocast would round those fp32 weights to `dtype` at
    every call (round to nearest even, as `Tensor.to` does), and a merged copy's weights are frozen, so the cast is
    done once. Later merges write into them with `copy_`, which rounds the same way. The copy takes half the memory.
    """
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for m in model.modules():
        if isinstance(m, nn.Linear) and all(uses[id(p)] == 1 for p in m.parameters(recurse=False)):
            m.to(dtype)


__all__ = ["MergeCache", "linear_weights_to"]
