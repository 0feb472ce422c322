"""Preference vectors r on the probability simplex: validation, grids and sampling."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from math import comb
from typing import Any

import torch

KEY_DECIMALS = 6  # a preference as pwemoe records it: its normalised weights rounded to 6 decimals


class Preference:
    """A validated preference: k non-negative weights summing to 1, made once where a preference enters pwemoe (the
    CLI, a config, an HTTP body, a model name, a Python call) and passed down as it is: code below the edge accepts
    it without validating again (`normalize_preference` returns its tensor).

    Its value is its `key`, the normalised weights rounded to 6 decimals (what results rows record and caches are
    keyed by); it hashes and compares by that key. `tensor` (Tensor[k], float32) is the key normalised: every
    computation at this preference uses it, so equal preferences compute identically.
    """

    __slots__ = ("key", "_tensor")

    def __init__(self, key: tuple[float, ...]) -> None:
        """Use `Preference.of`; this constructor trusts `key` (a tuple of k rounded weights summing to ~1)."""
        self.key = key
        self._tensor: torch.Tensor | None = None

    @classmethod
    def of(cls, r: PreferenceLike | Preference, k: int) -> Preference:
        """The validated preference of `r` (k non-negative finite numbers with a positive sum; a list, tuple,
        tensor or Preference) for k tasks. A key keys to itself: weights that already are a key (6 decimals, summing
        to 1 within the rounding) are kept as they are, so a key sent back by a client finds its row."""
        if isinstance(r, Preference):
            if r.k != k:
                raise ValueError(f"preference must have length k={k} (one weight per task), got {r.k}: {list(r.key)}")
            return r
        t = _validated(r, k)
        raw = torch.as_tensor(r, dtype=torch.float64).flatten().tolist()
        if abs(sum(raw) - 1.0) <= k * 10.0**-KEY_DECIMALS and all(round(x, KEY_DECIMALS) == x for x in raw):
            return cls(tuple(round(x, KEY_DECIMALS) for x in raw))
        return cls(tuple(round(x, KEY_DECIMALS) for x in (t / t.sum()).tolist()))

    @property
    def k(self) -> int:
        return len(self.key)

    @property
    def tensor(self) -> torch.Tensor:
        """Tensor[k] (float32, CPU): the key normalised to sum 1. Shared: do not modify it in place."""
        if self._tensor is None:
            t = torch.tensor(self.key, dtype=torch.float32)
            self._tensor = t / t.sum()
        return self._tensor

    def tolist(self) -> list[float]:
        """The key as a list (JSON)."""
        return list(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Preference) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __len__(self) -> int:
        return len(self.key)

    def __iter__(self):  # noqa: ANN204 - as a sequence of floats (json.dumps needs tolist)
        return iter(self.key)

    def __repr__(self) -> str:
        return f"Preference({list(self.key)})"


PreferenceLike = Sequence[float] | torch.Tensor | Preference

# How many times a raw preference was validated (tests count the validations of a request).
VALIDATIONS = {"count": 0}


def _validated(r: Any, k: int) -> torch.Tensor:
    """The raw weights of `r` as Tensor[k] float32, validated (every check of a preference, in one place)."""
    VALIDATIONS["count"] += 1
    try:
        t = torch.as_tensor(r, dtype=torch.float32).detach().flatten().cpu()
    except (TypeError, ValueError) as e:
        raise TypeError(f"preference must be a sequence of {k} numbers, got {r!r} ({e})") from None
    shown = [float(f"{x:.6g}") for x in t.tolist()]  # what the user typed, not float32 noise
    if t.numel() != k:
        raise ValueError(
            f"preference must have length k={k} (one weight per task), got {t.numel()} values: "
            f"{shown}. Pass one non-negative weight per task, e.g. {[round(1 / k, 3)] * k}."
        )
    if not torch.isfinite(t).all():
        raise ValueError(f"preference must be finite, got {shown}")
    if (t < 0).any():
        raise ValueError(f"preference must be non-negative, got {shown}")
    if t.sum() <= 0:
        raise ValueError(f"preference must have a positive sum, got {shown}; at least one task needs weight > 0")
    return t


def normalize_preference(r: PreferenceLike, k: int) -> torch.Tensor:
    """Validate a preference and return it normalised to sum 1.

    Args:
        r: k non-negative, finite numbers with a positive sum (list, tuple or tensor), or a `Preference` (already
            validated: its tensor is returned as it is).
        k: the number of tasks.

    Returns:
        Tensor[k] (float32) on the simplex.
    """
    if isinstance(r, Preference):
        if r.k != k:
            raise ValueError(f"preference must have length k={k} (one weight per task), got {r.k}: {list(r.key)}")
        return r.tensor
    t = _validated(r, k)
    return t / t.sum()


def parse_preference(text: str) -> list[float]:
    """Parse '0.2,0.8' (or '0.2 0.8') into a list of floats, with a clear error."""
    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"preference must be comma-separated numbers like '0.2,0.8', got {text!r}") from None


def simplex_grid_size(k: int, m: int) -> int:
    """Number of points of the simplex grid: C(m + k - 2, k - 1)."""
    return comb(m + k - 2, k - 1)


def simplex_grid(k: int, m: int) -> torch.Tensor:
    """Every r whose components are multiples of 1/(m-1), on the k-simplex.

    Returns:
        Tensor[n, k] with n = C(m+k-2, k-1), rows in lexicographic order of the
        integer compositions (for k=2: (0,1), (0.1,0.9), ..., (1,0)).
    """
    if not isinstance(k, int) or k < 2:
        raise ValueError(f"grid needs k >= 2 tasks, got k={k!r}")
    if not isinstance(m, int) or m < 2:
        raise ValueError(f"grid needs M >= 2 levels per axis (M=2 gives the {k} vertices), got M={m!r}")
    n = m - 1
    rows = []
    # Stars and bars: choose k-1 bar positions among n+k-1 slots.
    for bars in itertools.combinations(range(n + k - 1), k - 1):
        prev = -1
        comp = []
        for b in bars:
            comp.append(b - prev - 1)
            prev = b
        comp.append(n + k - 1 - prev - 1)
        rows.append(comp)
    return torch.tensor(rows, dtype=torch.float32) / n


class DirichletSampler:
    """Seeded r ~ Dirichlet(alpha * 1_k) sampler with a resumable state.

    Uses its own torch.Generator, never the global RNG, so sampling is reproducible
    and independent of anything else that draws random numbers.
    """

    def __init__(self, k: int, alpha: float = 1.0, seed: int = 0) -> None:
        if k < 2:
            raise ValueError(f"need k >= 2 tasks, got {k}")
        if not alpha > 0:
            raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
        self.k, self.alpha = k, float(alpha)
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, n: int = 1) -> torch.Tensor:
        """Returns Tensor[n, k] of preferences (rows sum to 1)."""
        # Gamma(alpha) / sum is a Dirichlet draw; torch's _standard_gamma takes no generator,
        # so go through exponential (alpha=1) or the Marsaglia-Tsang-free route below.
        if self.alpha == 1.0:
            g = torch.empty(n, self.k).exponential_(1.0, generator=self.generator)
        else:
            g = _gamma(torch.full((n, self.k), self.alpha), self.generator)
        return g / g.sum(dim=1, keepdim=True)

    def state_dict(self) -> dict:
        return {"k": self.k, "alpha": self.alpha, "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["rng"])


def _gamma(alpha: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gamma(alpha, 1) samples with an explicit generator (Marsaglia & Tsang, 2000)."""
    boost = alpha < 1
    a = torch.where(boost, alpha + 1, alpha)
    d = a - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.empty_like(a)
    todo = torch.ones_like(a, dtype=torch.bool)
    while todo.any():
        x = torch.randn(a.shape, generator=generator)
        v = (1 + c * x) ** 3
        u = torch.rand(a.shape, generator=generator)
        ok = (v > 0) & (torch.log(u.clamp_min(1e-30)) < 0.5 * x**2 + d - d * v + d * torch.log(v.clamp_min(1e-30)))
        take = ok & todo
        out[take] = (d * v)[take]
        todo &= ~ok
    if boost.any():
        u = torch.rand(a.shape, generator=generator)
        out = torch.where(boost, out * u ** (1.0 / alpha), out)
    return out
