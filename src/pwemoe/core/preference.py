"""Preference vectors r on the probability simplex: validation, grids and sampling."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from math import comb

import torch

PreferenceLike = Sequence[float] | torch.Tensor


def normalize_preference(r: PreferenceLike, k: int) -> torch.Tensor:
    """Validate a preference and return it normalised to sum 1.

    Args:
        r: k non-negative, finite numbers with a positive sum (list, tuple or tensor).
        k: the number of tasks.

    Returns:
        Tensor[k] (float32) on the simplex. This normalised vector is what pwemoe records.
    """
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
    s = t.sum()
    if s <= 0:
        raise ValueError(f"preference must have a positive sum, got {shown}; at least one task needs weight > 0")
    return t / s


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
