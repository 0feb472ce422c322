"""The preference API on an upcycled model: set r, read lambda(r), fix lambda, and the routers' state.

Every function walks the model's upcycled modules (`ensembling_modules`), dense or factored alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from .core.ensembling import EnsemblingModule, RowPreferences
from .core.preference import Preference, PreferenceLike, normalize_preference


def ensembling_modules(model: nn.Module) -> Iterator[tuple[str, EnsemblingModule]]:
    """(name, module) for every upcycled module (dense or factored), in model order.

    `named_modules` order, without descending into the upcycled modules themselves (they hold only
    theta_0's layer and the router): a training step walks the model once, and the walk showed.
    """
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        if isinstance(m, EnsemblingModule):
            yield name, m
            continue
        stack.extend((f"{name}.{n}" if name else n, c) for n, c in reversed(m._modules.items()) if c is not None)


def modules_or_raise(model: nn.Module) -> list[tuple[str, EnsemblingModule]]:
    mods = list(ensembling_modules(model))
    if not mods:
        raise ValueError(f"{type(model).__name__} has no upcycled modules; build it with pwemoe.upcycle first")
    return mods


def num_tasks(model: nn.Module) -> int:
    return modules_or_raise(model)[0][1].k


def set_preference(model: nn.Module, r: PreferenceLike) -> torch.Tensor:
    """Validate r, normalise it to sum 1 and set it on every upcycled module. Returns the normalised r."""
    mods = modules_or_raise(model)
    rn = normalize_preference(r, mods[0][1].k)
    set_on([m for _, m in mods], rn)
    return rn


def set_on(mods: list[EnsemblingModule], rn: torch.Tensor) -> None:
    """rn on every module, copied to each device once (not once per module: a host-to-device copy each)."""
    on: dict[torch.device, torch.Tensor] = {}
    for m in mods:
        dev = m.preference.device
        if dev not in on:
            on[dev] = rn.to(dev)
        m.set_preference(on[dev])


def normalize_rows(r: PreferenceLike | Sequence[Preference], k: int) -> torch.Tensor:
    """Preferences Tensor[B, k], each row validated and normalised to sum 1 (errors name the row). r may be a
    list of `Preference`s (validated where they entered): their tensors are stacked as they are."""
    if isinstance(r, (list, tuple)) and r and all(isinstance(x, Preference) for x in r):
        return torch.stack([normalize_preference(x, k) for x in r])
    t = torch.as_tensor(r, dtype=torch.float32) if not isinstance(r, torch.Tensor) else r.detach().float().cpu()
    if t.dim() != 2 or t.shape[0] == 0:
        raise ValueError(
            f"row preferences must be a non-empty [B, k={k}] table (one preference per example), got shape "
            f"{tuple(t.shape)}"
        )
    rows = []
    for b, row in enumerate(t):
        try:
            rows.append(normalize_preference(row, k))
        except (TypeError, ValueError) as e:
            raise type(e)(f"row {b}: {e}") from None
    return torch.stack(rows)


def check_scales(lam: PreferenceLike, k: int) -> torch.Tensor:
    """Per-expert scales (lambda itself, the routers bypassed) as Tensor[k] fp32: k finite numbers >= 0."""
    t = torch.as_tensor(lam, dtype=torch.float32) if not isinstance(lam, torch.Tensor) else lam.detach().float().cpu()
    if t.dim() != 1 or t.shape[0] != k:
        raise ValueError(f"scales must be {k} numbers (one per expert), got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError(f"scales must be finite and >= 0, got {t.tolist()}")
    return t


def row_preferences_table(
    model: nn.Module, r: PreferenceLike, raw: Sequence[bool] | torch.Tensor | None = None
) -> RowPreferences:
    """r Tensor[B, k] validated (rows normalised; rows flagged `raw` checked as per-expert scales) into the
    `RowPreferences` every upcycled module reads, made on the first module's device. r may also be a list of rows,
    each a `Preference` (validated already: taken as it is) or, for a raw row, its scales.

    Make it once per batch composition and give it to `set_row_preferences` at every forward: the modules keep what
    they derive from it (lambda per row, per-layer column scales) while the same table is set."""
    mods = [m for _, m in modules_or_raise(model)]
    k = mods[0].k
    flags = None if raw is None else torch.as_tensor(raw, dtype=torch.bool).flatten()
    if flags is None or not bool(flags.any()):
        rn, flags = normalize_rows(r, k), None
    else:
        if isinstance(r, (list, tuple)) and any(isinstance(x, Preference) for x in r):
            t = list(r)  # rows of their own kinds: a Preference (taken as it is) or a raw row's scales
            if len(t) != flags.shape[0]:
                raise ValueError(f"raw needs one flag per row of r: {flags.shape[0]} flags for {len(t)} rows")
        else:
            t = torch.as_tensor(r, dtype=torch.float32) if not isinstance(r, torch.Tensor) else r.detach().float()
            t = t.cpu()
            if t.dim() != 2 or t.shape[0] != flags.shape[0]:
                raise ValueError(f"raw needs one flag per row of r: {flags.shape[0]} flags for shape {tuple(t.shape)}")
        rows = []
        for b, row in enumerate(t):
            try:
                rows.append(check_scales(row, k) if flags[b] else normalize_preference(row, k))
            except (TypeError, ValueError) as e:
                raise type(e)(f"row {b}: {e}") from None
        rn = torch.stack(rows)
    return RowPreferences(rn, mods[0].preference.device, flags)


def set_row_preferences(
    model: nn.Module,
    r: PreferenceLike | RowPreferences | None,
    raw: Sequence[bool] | torch.Tensor | None = None,
) -> torch.Tensor | None:
    """One preference per example of the next forwards: r Tensor[B, k] (rows normalised), row b of every batch
    input runs at r[b]; None returns to the one preference of `set_preference`. Returns the normalised rows.

    raw: optionally one flag per row; a flagged row of r is lambda itself (per-expert scales, the routers
    bypassed: task arithmetic with those scales in every upcycled module), checked by `check_scales`, not normalised.
    r may also be a table made by `row_preferences_table` (raw then comes from the table): set as it is, so the
    modules reuse what they derived from it at the previous forward (a decoding batch sets the same table each step).

    Factored modules (LoRA experts, `task_vector_rank`) run the whole batch in one forward, each row's rank
    columns scaled by its own lambda; dense modules merge once per distinct preference (cached) and group rows
    at each linear layer. Merges and exports keep using the one preference of `set_preference`.
    """
    mods = [m for _, m in modules_or_raise(model)]
    if r is None:
        for m in mods:
            m.set_row_preferences(None)
        return None
    if isinstance(r, RowPreferences):
        if raw is not None:
            raise ValueError("raw comes with a RowPreferences table (row_preferences_table(model, r, raw)); give one")
        if r.prefs.shape[1] != mods[0].k:
            raise ValueError(f"the row table has {r.prefs.shape[1]} columns, the model {mods[0].k} experts")
        table = r
    else:
        table = row_preferences_table(model, r, raw)
    made: dict[torch.device, RowPreferences] = {table.device: table}
    for m in mods:
        dev = m.preference.device
        if dev not in made:
            made[dev] = table.to(dev)
        m.set_row_preferences(made[dev])
    return table.prefs


@contextlib.contextmanager
def row_preferences(
    model: nn.Module, r: PreferenceLike | RowPreferences, raw: Sequence[bool] | torch.Tensor | None = None
) -> Iterator[torch.Tensor]:
    """Context manager: run with one preference per example (`set_row_preferences`), then back to one."""
    try:
        yield set_row_preferences(model, r, raw)
    finally:
        set_row_preferences(model, None)


def get_preference(model: nn.Module) -> torch.Tensor:
    return modules_or_raise(model)[0][1].preference.detach().cpu().clone()


@contextlib.contextmanager
def preference(model: nn.Module, r: PreferenceLike) -> Iterator[torch.Tensor]:
    """Context manager: run with preference r, then restore the previous one."""
    old = get_preference(model)
    try:
        yield set_preference(model, r)
    finally:  # the state it had, as it was: set again without validating it
        set_on([m for _, m in modules_or_raise(model)], old)


def routing_weights(model: nn.Module, r: PreferenceLike | None = None) -> dict[str, torch.Tensor]:
    """lambda(r) for every upcycled module: {module_name: Tensor[k]} (current preference if r is None)."""
    ctx = preference(model, r) if r is not None else contextlib.nullcontext()
    with ctx, torch.no_grad():
        return {n: m.routing_weights().detach().clone() for n, m in modules_or_raise(model)}


@contextlib.contextmanager
def fixed_lambda(model: nn.Module, lam: PreferenceLike) -> Iterator[None]:
    """Bypass every router with fixed lambda (Tensor[k]); used for baselines and the expert test."""
    mods = modules_or_raise(model)
    t = torch.as_tensor(lam, dtype=torch.float32)
    try:
        for _, m in mods:
            m.set_lambda_override(t)
        yield
    finally:
        for _, m in mods:
            m.set_lambda_override(None)


def router_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Router parameters only: {'<module>.router.<param>': tensor} (a few hundred numbers per module)."""
    return {
        f"{n}.router.{pn}": p.detach().clone()
        for n, m in modules_or_raise(model)
        for pn, p in m.router.named_parameters()
    }


@torch.no_grad()
def load_router_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load router parameters; missing, unexpected and mis-shaped keys are all named."""
    own = {f"{n}.router.{pn}": p for n, m in modules_or_raise(model) for pn, p in m.router.named_parameters()}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(p.shape)}"
        for k, p in own.items()
        if k in state and state[k].shape != p.shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            "router state dict does not match the model: "
            + "; ".join(
                s
                for s in (
                    f"missing {missing}" if missing else "",
                    f"unexpected {unexpected}" if unexpected else "",
                    f"shape mismatch {shapes}" if shapes else "",
                )
                if s
            )
            + ". Was it saved from a model upcycled with the same targets, k and router_hidden_layers?"
        )
    for k, p in own.items():
        p.copy_(state[k].to(p))


__all__ = [
    "check_scales",
    "ensembling_modules",
    "fixed_lambda",
    "get_preference",
    "load_router_state_dict",
    "modules_or_raise",
    "num_tasks",
    "preference",
    "router_state_dict",
    "routing_weights",
    "row_preferences",
    "row_preferences_table",
    "set_preference",
    "set_row_preferences",
]
