"""The weight-ensembling module: theta(r) = theta_0 + sum_i lambda_i(r) tau_i, then run the module.

Pure torch; no transformers import. The wrapped module keeps theta_0 as its own (frozen)
parameters, as peft keeps the original layer as `base_layer`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from .merge import lambda_grad, lambda_grads, merge_weights
from .router import Router


class EnsemblingModule(nn.Module):
    """What every upcycled module shares: a router, the current preference r, and lambda(r).

    Subclasses say how theta(r) is held and run: `WeightEnsemblingModule` (dense task vectors,
    one merge per preference) and `core.factored.FactoredEnsemblingModule` (low-rank task vectors,
    applied to the activations, never densified). Both are driven by the same functions in
    `pwemoe.routing`, `pwemoe.training` and `pwemoe.export` (set_preference, shared_merge, merge_and_unload, router
    state dicts).
    """

    # Per-step state: plain values, never a parameter, buffer or module. They skip nn.Module.__setattr__'s
    # checks, which a step's dozen writes per module made a measurable part of a small model's step.
    _STEP_STATE = frozenset(
        {
            "_cache",
            "share_under_grad",
            "_segments",
            "_shared",
            "_shared_lam",
            "_segment_leaves",
            "_lam_leaf",
            "_segment_lam_leaves",
            "_slots",
            "_rows",
            "row_lambda_runs",
        }
    )

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._STEP_STATE:
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_slots"] = None  # weak references do not pickle; the slots are found again on first use
        for key in self._ROW_CACHE:  # serving's row state holds closures; it is made again on first use
            state.pop(key, None)
        return state

    def _init_router(self, router: Router, task_names: list[str] | None, device: torch.device) -> None:
        self.router = router
        self.k = router.k
        self.task_names = list(task_names) if task_names else [f"task_{i}" for i in range(self.k)]
        self.register_buffer("preference", torch.full((self.k,), 1.0 / self.k, device=device), persistent=False)
        self._override: torch.Tensor | None = None
        self._cache: tuple[tuple, Any] | None = None
        self.share_under_grad = False
        self._segments: list[int] | None = None
        self._shared_lam: torch.Tensor | None = None
        self._slots: tuple[list, list] | None = None  # see _param_slots
        self._rows: RowPreferences | None = None  # see set_row_preferences
        self.row_lambda_runs = 0  # preferences whose lambda a router computed for rows (row_lambdas)

    # --- preference and lambda -------------------------------------------------------------
    @torch.no_grad()
    def set_preference(self, r: torch.Tensor) -> None:
        """r: Tensor[k], already validated and normalised (see core.preference)."""
        self.preference.copy_(r.to(self.preference))

    def set_row_preferences(self, rows: RowPreferences | None) -> None:
        """One preference per example of the next forwards (`RowPreferences`), or None: back to the one
        preference of `set_preference`. Merges (`merged_weights`) always use that one preference."""
        self._rows = rows

    ROW_LAMBDAS = 256  # lambda of distinct row preferences kept per module (least recently used out)

    def row_lambdas(self) -> torch.Tensor:
        """lambda of each distinct row preference: Tensor[G, k] (the router on `RowPreferences.unique`; a row
        marked raw gives its lambda itself, the router bypassed).

        Without autograd, each preference's lambda is computed once and kept (keyed by the preference, and by the
        override and router versions, so a changed router or override never reuses a stale one): a request decoding
        for many steps runs the routers once, when it joins. `row_lambda_runs` counts the preferences routed."""
        rows = self._rows
        if rows is None:
            raise ValueError("no row preferences are set; call pwemoe.set_row_preferences(model, R) first")
        if self._override is not None:
            return self._override.expand(rows.unique.shape[0], -1)
        if self._router_grad():
            return self._route_rows(rows.unique, rows.raw)
        version = self._cache_key()[2:]
        cached = self.__dict__.get("_lam_rows")
        if cached is None or cached[0] != version:
            cached = (version, OrderedDict())
            self.__dict__["_lam_rows"] = cached
        table: OrderedDict = cached[1]
        missing = [g for g, key in enumerate(rows.keys) if key not in table]
        if missing:
            idx = torch.tensor(missing)
            raw = None if rows.raw is None else rows.raw[idx]
            lam = self._route_rows(rows.unique[idx], raw)
            for j, g in enumerate(missing):
                table[rows.keys[g]] = lam[j]
            while len(table) > self.ROW_LAMBDAS:
                table.popitem(last=False)
        for key in rows.keys:
            table.move_to_end(key)
        return torch.stack([table[key] for key in rows.keys])

    def _route_rows(self, prefs: torch.Tensor, raw: torch.Tensor | None) -> torch.Tensor:
        """lambda Tensor[G, k] of preferences Tensor[G, k]: the router, or the row itself where `raw` marks it."""
        unique = prefs.to(self.preference.device, self.router_dtype)
        routed = None if raw is None else ~raw.to(unique.device)
        if routed is not None and not bool(routed.any()):
            return unique
        self.row_lambda_runs += int(unique.shape[0] if routed is None else routed.sum())
        with self._full_precision():
            lam = self.router(unique)
        return lam if routed is None else torch.where(routed[:, None], lam, unique)

    def set_lambda_override(self, lam: torch.Tensor | None) -> None:
        """Bypass the router with fixed lambda (Tensor[k]); None restores the router.

        Used for baselines (task arithmetic, one-hot experts) on the same module.
        """
        self._override = None if lam is None else lam.detach().clone().to(self.preference)
        self._cache = None

    def routing_weights(self) -> torch.Tensor:
        """lambda(r) for the current preference: Tensor[k]."""
        if self._override is not None:
            return self._override
        return self.router(self.preference.to(self.router_dtype))

    @property
    def router_dtype(self) -> torch.dtype:
        return next(self.router.parameters()).dtype

    def _cache_key(self) -> tuple:
        # Tensor._version changes on every in-place update (optimizer step, copy_, load_state_dict),
        # so the key is stale exactly when the preference or any router weight changed.
        over = None if self._override is None else id(self._override)  # no device sync; set anew on change
        return (
            self.preference._version,
            self.preference.data_ptr(),
            over,
            tuple((p._version, p.data_ptr()) for p in self.router.parameters()),
        )

    def _router_grad(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.router.parameters())

    def _full_precision(self) -> contextlib.AbstractContextManager:
        """Autocast off for the router and the merge (they run in their own dtypes); a no-op context when
        autocast is off anyway, since entering torch.autocast costs about 10 us, twice per module per step."""
        dev = self.preference.device.type
        if torch.is_autocast_enabled(dev):
            return torch.autocast(device_type=dev, enabled=False)
        return contextlib.nullcontext()

    def _param_slots(self) -> list[tuple[dict, str, str]]:
        """(owner's parameter dict, attribute, canonical name) of every parameter of base_layer, tied
        aliases included, in named_parameters order.

        Found once and reused while base_layer holds the same submodules and the same Parameter
        objects (compared by identity through weak references, so a replaced module or a reassigned,
        untied or converted Parameter is noticed, and nothing replaced is kept alive); a check of a
        few modules, cheap next to functional_call's walk and checks on every call.
        """
        mods = list(self.base_layer.modules())
        cached = self._slots
        if not (
            cached is not None
            and len(cached[0]) == len(mods)
            and all(ref() is m for ref, m in zip(cached[0], mods))
            and all(owner()._parameters.get(attr) is param() for owner, attr, _, param in cached[1])
        ):
            canonical = {id(p): n for n, p in self.base_layer.named_parameters()}
            slots = []
            for path, p in self.base_layer.named_parameters(remove_duplicate=False):
                owner_path, _, attr = path.rpartition(".")
                owner = self.base_layer.get_submodule(owner_path)
                slots.append((weakref.ref(owner), attr, canonical[id(p)], weakref.ref(p)))
            cached = self._slots = ([weakref.ref(m) for m in mods], slots)
        return [(owner()._parameters, attr, name) for owner, attr, name, _ in cached[1]]

    def _theta0(self) -> dict[str, torch.Tensor]:
        """base_layer's parameters by name, without walking the module tree."""
        return {name: params[attr] for params, attr, name in self._param_slots()}

    def _call_base(self, weights: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
        """base_layer's forward with its parameters replaced by `weights` for this call.

        What `torch.func.functional_call` does, minus its per-call checks and module walk (about
        0.1 ms per module, more than a small layer's math; a small model's step on a GPU is bound
        by such host work). Parameters missing from `weights` keep theta_0.
        """
        todo = [(params, attr, weights[name]) for params, attr, name in self._param_slots() if name in weights]
        saved = []
        try:
            for params, attr, w in todo:
                saved.append((params, attr, params[attr]))
                params[attr] = w
            return self.base_layer(*args, **kwargs)
        finally:
            for params, attr, old in reversed(saved):
                params[attr] = old

    # --- what subclasses provide --------------------------------------------------------------
    def merged_weights(self) -> dict[str, torch.Tensor]:
        """theta(r), dense, for every parameter of base_layer (export, `merge_into`)."""
        raise NotImplementedError

    def stored_tensors(self) -> list[torch.Tensor]:
        """The task-vector storage, which a plain copy (`merge_and_unload`) must not duplicate."""
        raise NotImplementedError

    def begin_shared(self) -> None:
        """Entering `shared_merge` under autograd: compute what the block's forwards share."""
        raise NotImplementedError

    def shared_roots(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(tensors with a graph to the router, the gradients their leaves accumulated) in `shared_merge`."""
        raise NotImplementedError

    def segment_lambda_grads(self, tasks: int) -> torch.Tensor | None:
        """Tensor[tasks, k]: dL_i/dlambda per task segment (`task_segments`), or None."""
        raise NotImplementedError

    def zero_shared_grad(self) -> None:
        raise NotImplementedError

    def clear_cache(self) -> None:
        raise NotImplementedError

    _ROW_CACHE = ("_lam_rows", "_row_state", "_factors_in")

    def take_row_cache(self) -> dict[str, Any]:
        """Remove and return what serving derived for row preferences (lambda per preference, column scales, cast
        factors), for `put_row_cache`: a copy of the module (`merge_and_unload`) must not carry it. Never needed
        for correctness: each part is keyed by the router, override and factor versions it was made from."""
        return {key: self.__dict__.pop(key) for key in self._ROW_CACHE if key in self.__dict__}

    def put_row_cache(self, cache: dict[str, Any]) -> None:
        """Give back what `take_row_cache` took."""
        self.__dict__.update(cache)


class RowPreferences:
    """One preference per example (row) of a batch, as the upcycled modules use it.

    prefs: Tensor[B, k], each row on the simplex. unique: Tensor[G, k], the distinct rows; inverse:
    LongTensor[B], the index in `unique` of each row; groups: for each distinct preference, the rows that
    have it (LongTensor each), on `device`. Made once per batch composition (`pwemoe.set_row_preferences`)
    and shared by every module, so no module recomputes them per forward.

    raw: optional BoolTensor[B]; a marked row's `prefs` row is lambda itself (per-expert scales, the same in
    every module: task arithmetic), not a preference for the routers. `raw` of the distinct rows is BoolTensor[G]
    (None when no row is marked); a raw row's key starts with "raw", so it never shares a merge with a preference.
    """

    def __init__(
        self, prefs: torch.Tensor, device: torch.device | str | None = None, raw: torch.Tensor | None = None
    ) -> None:
        if prefs.dim() != 2:
            raise ValueError(f"row preferences must be Tensor[B, k], got shape {tuple(prefs.shape)}")
        if raw is not None and tuple(raw.shape) != (prefs.shape[0],):
            raise ValueError(f"raw must be BoolTensor[B={prefs.shape[0]}], got shape {tuple(raw.shape)}")
        self.prefs = prefs
        marked = raw is not None and bool(raw.any())
        rows = torch.cat([prefs, raw[:, None].to(prefs.dtype)], 1) if marked else prefs
        unique, inverse = torch.unique(rows, dim=0, return_inverse=True)
        self.unique = unique[:, : prefs.shape[1]]
        self.raw = unique[:, -1].bool() if marked else None
        dev = torch.device(device) if device is not None else prefs.device
        self.device = dev
        self._raw_rows = raw if marked else None
        self.inverse = inverse.to(dev)
        self.groups = [torch.nonzero(inverse == g).flatten().to(dev) for g in range(self.unique.shape[0])]
        self.keys = [
            ("raw", *key) if self.raw is not None and bool(self.raw[g]) else key
            for g, key in enumerate(tuple(round(float(x), 6) for x in u.tolist()) for u in self.unique)
        ]

    @property
    def batch_size(self) -> int:
        return int(self.prefs.shape[0])

    def to(self, device: torch.device | str) -> RowPreferences:
        """The same rows with their indices on `device` (modules on several devices)."""
        return RowPreferences(self.prefs, device, self._raw_rows)


class WeightEnsemblingModule(EnsemblingModule):
    """A module whose weights are theta_0 + sum_i lambda_i(r) tau_i for the current preference r.

    Attributes:
        base_layer: the original module; its parameters are theta_0 and stay frozen.
        task_vectors: buffers `T_<param>` of shape [k, *param_shape] in the storage dtype.
        router: preference -> lambda (the only trainable part).
        preference: Tensor[k] buffer, set through `set_preference`.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        task_vectors: dict[str, torch.Tensor],
        router: Router,
        task_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        params = dict(base_layer.named_parameters())
        if set(task_vectors) != set(params):
            raise ValueError(
                f"task vectors must cover exactly the module's parameters; module has {sorted(params)}, "
                f"task vectors have {sorted(task_vectors)}"
            )
        k = router.k
        for n, t in task_vectors.items():
            if tuple(t.shape) != (k, *params[n].shape):
                raise ValueError(f"task vector {n!r} must have shape {(k, *params[n].shape)}, got {tuple(t.shape)}")
        self.base_layer = base_layer.requires_grad_(False)
        self._param_names = list(params)  # read through `param_names`
        for n, t in task_vectors.items():
            self.register_buffer(self._tv_name(n), t)
        # on the base layer's device, as the task vectors are
        self._init_router(router, task_names, next(iter(params.values())).device)
        # Set by `pwemoe.shared_merge`: {param: theta(r) as a leaf}; lambda(r), with its graph, is `_shared_lam`.
        self._shared: dict[str, torch.Tensor] | None = None
        # Set by `pwemoe.training.task_segments` (inside shared_merge): rows per task of the next forwards,
        # in task order. Task i's rows then run on their own leaf view of theta(r) (no copy), so one
        # forward over all tasks yields each task's dL_i/dW (EPO) as the leaves' separate gradients.
        self._segment_leaves: list[dict[str, torch.Tensor]] | None = None

    @property
    def param_names(self) -> list[str]:
        """Names of base_layer's parameters, each with a task-vector buffer (`task_vector(name)`)."""
        return list(self._param_names)

    @staticmethod
    def _tv_name(param: str) -> str:
        return "T_" + param.replace(".", "__")

    def task_vector(self, param: str) -> torch.Tensor:
        """Tensor[k, *shape] of the stored task vectors for one parameter of base_layer."""
        return getattr(self, self._tv_name(param))

    def stored_tensors(self) -> list[torch.Tensor]:
        return [self.task_vector(n) for n in self._param_names]

    def begin_shared(self) -> None:
        self.merged_weights()

    # --- merging ------------------------------------------------------------------------------
    def merged_weights(self) -> dict[str, torch.Tensor]:
        """theta(r) for every parameter of base_layer, for the current preference.

        Without autograd the result is cached until the preference or router changes. Under
        autograd it is rebuilt at each call (the previous graph is freed by its backward), unless
        `share_under_grad` is set (`pwemoe.shared_merge`): then lambda(r) keeps its graph to the
        router, theta(r) is merged once without one, and the step's forwards run on it as leaves.
        Their backwards stop at the leaves; `SharedMerge.backward` turns the summed leaf gradients
        into dL/dlambda (`lambda_grads`, one pass over T) and backpropagates that through the router.
        No autograd node per parameter: on a fast GPU their launches cost more than their math.
        The merge is summed in the weights' own dtype, never in autocast's lower precision.
        """
        grad = self._router_grad()
        if grad and self.share_under_grad:
            if self._shared is None:
                with self._full_precision():
                    lam = self.routing_weights()  # with its graph to the router
                with torch.no_grad():
                    merged = self._merge(lam)
                self._shared = {n: w.requires_grad_(True) for n, w in merged.items()}
                self._shared_lam = lam
            return self._shared
        if not grad:
            key = self._cache_key()
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
        self._cache = None  # free the old copy before building the new one
        merged = self._merge()
        if not grad:
            self._cache = (key, merged)
        return merged

    def _merge(self, lam: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        with self._full_precision():
            lam = self.routing_weights() if lam is None else lam
            params = self._theta0()
            return {n: merge_weights(lam, params[n], self.task_vector(n)) for n in self._param_names}

    def shared_roots(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """([lambda(r)], [dL/dlambda from the leaves' summed gradients]), or ([], []) when no leaf has one."""
        if self._shared is None or self._shared_lam is None:
            return [], []
        glam, dtype = None, self._shared_lam.dtype
        # In the order and dtypes autograd uses with one merge node per parameter, so the router gradients equal
        # that graph's bit for bit: each part cast to lambda's dtype (the router's, often fp32 over bf16 or fp16
        # weights) before it is added, last parameter first.
        with torch.no_grad():
            for n, leaf in reversed(list(self._shared.items())):
                if leaf.grad is not None:
                    part = lambda_grad(self.task_vector(n), leaf.grad).to(dtype)
                    glam = part if glam is None else glam + part
        if glam is None:
            return [], []
        return [self._shared_lam], [glam]

    def segment_lambda_grads(self, tasks: int) -> torch.Tensor | None:
        """Tensor[tasks, k]: row i = dL_i/dlambda from task i's leaf gradients (`task_segments`), T read
        from memory once (`lambda_grads`); None when no per-task leaf received a gradient."""
        if self._shared is None or self._segment_leaves is None:
            return None
        out, dtype = None, self._shared_lam.dtype  # set with _shared by the same merge
        with torch.no_grad():  # as in shared_roots: each part in lambda's dtype before it is added
            for n in self._shared:
                gs = [leaves[n].grad for leaves in self._segment_leaves]
                if all(g is None for g in gs):
                    continue
                part = lambda_grads(self.task_vector(n), gs).to(dtype)
                out = part if out is None else out + part
        return out

    def zero_shared_grad(self) -> None:
        for leaf in (self._shared or {}).values():
            leaf.grad = None
        for leaves in self._segment_leaves or []:
            for leaf in leaves.values():
                leaf.grad = None

    def clear_cache(self) -> None:
        self._cache = None
        self._shared = None
        self._segment_leaves = None
        self._shared_lam = None
        self.__dict__.pop("_row_cache", None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._rows is not None and not self.share_under_grad:
            return self._row_forward(args, kwargs)
        weights = self.merged_weights()
        if self._segments is not None and self._shared is not None:
            return self._segmented_forward(args, kwargs)
        return self._call_base(weights, args, kwargs)

    # --- one preference per row (serving) ---------------------------------------------------------
    ROW_MERGES = 8  # merges theta(r) of distinct row preferences kept per module (least recently used out)

    def _row_merge(self, key: tuple, lam: torch.Tensor) -> dict[str, torch.Tensor]:
        """theta(r) for one distinct row preference (lambda Tensor[k]), from a small per-module LRU."""
        cache = self.__dict__.setdefault("_row_cache", OrderedDict())
        full = (key, self._cache_key()[2:])  # the preference, and the override / router versions
        hit = cache.get(full)
        if hit is not None:
            cache.move_to_end(full)
            return hit
        with torch.no_grad():
            merged = self._merge(lam)
        cache[full] = merged
        while len(cache) > self.ROW_MERGES:
            cache.popitem(last=False)
        return merged

    def _row_forward(self, args: tuple, kwargs: dict) -> Any:
        """A batch whose rows have their own preferences: one merge per distinct preference (cached), and each
        linear layer of the module computes every group of rows with its group's weights. Grouping happens at
        the linear layers, not the module, so an attention block's KV cache sees the whole batch at once."""
        rows = self._rows
        lam = self.row_lambdas()  # [G, k]
        merges = [self._row_merge(key, lam[g]) for g, key in enumerate(rows.keys)]
        if len(merges) == 1:
            return self._call_base(merges[0], args, kwargs)
        linear = _linear_layers(self.base_layer)
        covered = {f"{p}{'.' if p else ''}{n}" for p in linear for n in ("weight", "bias")}
        other = [n for n in self._param_names if n not in covered]
        if other:
            raise ValueError(
                f"one preference per row needs every changed parameter of an upcycled module to belong to a linear "
                f"layer, but {other[:3]} do not; give the rows one preference at a time (set_preference), or upcycle "
                "modules without them (e.g. model.targets naming the linear layers)"
            )
        handles = []
        try:
            for path, conv1d in linear.items():
                pre = f"{path}." if path else ""
                ws = [(m[pre + "weight"], m.get(pre + "bias")) for m in merges]
                child = self.base_layer.get_submodule(path)
                handles.append(child.register_forward_hook(_grouped_linear(ws, rows, conv1d), with_kwargs=True))
            return self.base_layer(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()

    def _segmented_forward(self, args: tuple, kwargs: dict) -> Any:
        """Each task's rows through the module on that task's leaf view of the shared merge.

        Tensors of rank >= 2 whose first dimension is the batch size are split by rows; everything
        else (masks broadcast over the batch, position tables) is passed whole. Outputs are joined back.
        """
        sizes = self._segments or []
        if self._segment_leaves is None:
            self._segment_leaves = [
                {name: w.detach().requires_grad_(True) for name, w in self._shared.items()} for _ in sizes
            ]
        outs = [self._call_base(self._segment_leaves[j], a, kw) for j, a, kw in _segments(sizes, args, kwargs)]
        return _join(outs)

    def extra_repr(self) -> str:
        return f"k={self.k}, tasks={self.task_names}, tv_dtype={self.task_vector(self._param_names[0]).dtype}"


def _linear_layers(module: nn.Module) -> dict[str, bool]:
    """{path: is GPT-2's Conv1D (weight stored [in, out])} of the linear layers inside `module` ("" for itself)."""
    return {
        p: type(m).__name__ == "Conv1D"
        for p, m in module.named_modules()
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
    }


def _rows_input(args: tuple, kwargs: dict, rows: RowPreferences) -> torch.Tensor:
    """A layer's input Tensor[B, ..., in] (rows first), checked against the row preferences' batch size."""
    x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
    if x.shape[0] != rows.batch_size:
        raise ValueError(
            f"row preferences were set for a batch of {rows.batch_size}, but a layer received {x.shape[0]} rows; "
            "set them again for this batch (pwemoe.set_row_preferences)"
        )
    return x


def _grouped_linear(weights: list[tuple[torch.Tensor, torch.Tensor | None]], rows: RowPreferences, conv1d: bool):
    """A forward hook giving each group of rows the output of the linear layer with its own weights."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        x = _rows_input(args, kwargs, rows)
        out = torch.empty_like(output)
        for (w, b), idx in zip(weights, rows.groups):
            xs = x.index_select(0, idx)
            y = (xs @ w.to(xs.dtype)) if conv1d else xs @ w.to(xs.dtype).t()
            if b is not None:
                y = y + b.to(y.dtype)
            out.index_copy_(0, idx, y.to(out.dtype))
        return out

    return hook


def _segments(sizes: list[int], args: tuple, kwargs: dict) -> list[tuple[int, tuple, dict]]:
    """(task index, its args, its kwargs) for every task segment with rows: the forward's inputs cut by
    rows (`_split_rows`) into the non-empty segments of `sizes` (task order)."""
    used = [j for j, size in enumerate(sizes) if size]
    cut = [sizes[j] for j in used]
    n = sum(sizes)
    return list(zip(used, _split_rows(args, cut, n), _split_rows(kwargs, cut, n)))


def _split_rows(x: Any, sizes: list[int], n: int) -> list[Any]:
    """x cut into len(sizes) consecutive row blocks: every batch-leading tensor (rank >= 2, first dim n)
    is split by rows, anything else is repeated. `split` rather than slicing: its backward is one
    concatenation, where each slice's backward would fill a zero tensor of the whole input."""
    m = len(sizes)
    if isinstance(x, torch.Tensor):
        return list(x.split(sizes)) if x.dim() >= 2 and x.shape[0] == n else [x] * m
    if isinstance(x, (tuple, list)):
        cols = [_split_rows(v, sizes, n) for v in x]
        kind = tuple if isinstance(x, tuple) else list
        return [kind(c[j] for c in cols) for j in range(m)]
    if isinstance(x, dict):
        cols = {k: _split_rows(v, sizes, n) for k, v in x.items()}
        return [{k: c[j] for k, c in cols.items()} for j in range(m)]
    return [x] * m


def _join(outs: list[Any]) -> Any:
    """Concatenate per-segment outputs along the batch (tensors, or tuples / lists of them)."""
    first = outs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outs) if len(outs) > 1 else first
    if isinstance(first, (tuple, list)):
        return type(first)(_join([o[i] for o in outs]) for i in range(len(first)))
    return first  # None, or anything that is not per-row
