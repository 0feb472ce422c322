"""Low-rank weight ensembling: W(r) x = W_0 x + sum_i lambda_i(r) s_i B_i (A_i x), never densified.

For LoRA experts (A_i, B_i and scaling s_i as the adapter holds them) and for dense task vectors
compressed by truncated SVD (s_i = 1). Memory grows with the ranks, not with the layer's width, and
dlambda needs no weight gradient: dL/dlambda_i = s_i <dL/dy, B_i A_i x>, from the activations.

Pure torch; no transformers import. The k experts' factors of one linear layer are concatenated
along the rank (R = sum_i r_i) so the forward is two thin matmuls, whatever k is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .ensembling import EnsemblingModule, _join, _rows_input, _segments
from .merge import merge_weights
from .router import Router


@dataclass
class LowRank:
    """One linear layer's low-rank task vectors for k experts, concatenated along the rank.

    A: Tensor[R, in]; B: Tensor[out, R]; owner: LongTensor[R], the expert of each rank column;
    scale: Tensor[R], that expert's scaling s_i (LoRA alpha / r, or 1). transposed: the layer stores
    its weight as [in, out] (GPT-2's Conv1D) instead of nn.Linear's [out, in].
    """

    A: torch.Tensor
    B: torch.Tensor
    owner: torch.Tensor
    scale: torch.Tensor
    transposed: bool = False

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def ranks(self, k: int) -> list[int]:
        """r_i per expert (0 where an expert does not touch this layer)."""
        return torch.bincount(self.owner.cpu(), minlength=k).tolist()


def concat_factors(factors: list[tuple[int, torch.Tensor, torch.Tensor, float]], transposed: bool = False) -> LowRank:
    """LowRank from [(expert index, A_i Tensor[r_i, in], B_i Tensor[out, r_i], s_i)], in expert order."""
    if not factors:
        raise ValueError("a low-rank layer needs at least one expert's factors")
    owner = torch.cat([torch.full((a.shape[0],), i, dtype=torch.long) for i, a, _, _ in factors])
    scale = torch.cat([torch.full((a.shape[0],), float(s), dtype=torch.float32) for _, a, _, s in factors])
    A = torch.cat([a for _, a, _, _ in factors])
    B = torch.cat([b for _, _, b, _ in factors], dim=1)
    return LowRank(A, B, owner.to(A.device), scale.to(A.device), transposed)


def lowrank_columns(lam: torch.Tensor, owner: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """lambda_{owner(j)} * s_{owner(j)} for every rank column j (differentiable in lam): lam Tensor[k] gives
    Tensor[R]; lam Tensor[B, k] (one preference per row) gives Tensor[B, R]."""
    return lam[..., owner] * scale.to(lam.dtype)


def lowrank_apply(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """sum_i lambda_i s_i B_i (A_i x): x Tensor[..., in] -> Tensor[..., out], in x's dtype.

    cols: Tensor[R] (one preference for every row), or Tensor[B, R] with x Tensor[B, ..., in] (a preference
    per row: row b's rank columns are scaled by cols[b], so rows with different preferences share the matmuls).
    """
    dt = x.dtype if x.is_floating_point() else A.dtype
    h = x @ A.to(dt).t()  # [..., R]
    if cols.dim() == 2:  # [B, R] -> [B, 1, ..., 1, R], broadcast over the positions of each row
        cols = cols.reshape(cols.shape[0], *([1] * (h.dim() - 2)), cols.shape[1])
    return (h * cols.to(h.dtype)) @ B.to(h.dtype).t()


def lowrank_dense(lr: LowRank, cols: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense delta sum_i lambda_i s_i B_i A_i in the layer's weight layout ([out, in], or [in, out])."""
    d = (lr.B.to(dtype) * cols.to(dtype)) @ lr.A.to(dtype)
    return d.t() if lr.transposed else d


def truncated_svd(
    tau: torch.Tensor, rank: int | None = None, energy: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B Tensor[out, n], A Tensor[n, in]) with B @ A the best rank-n approximation of tau Tensor[out, in].

    n = `rank` (capped at min(out, in)), or the smallest n whose singular values keep `energy` of
    ||tau||_F^2. Computed in fp32 on tau's device; sqrt(S) goes to both factors, keeping them balanced.
    """
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank (an int >= 1) or energy (a fraction in (0, 1])")
    U, S, Vh = torch.linalg.svd(tau.float(), full_matrices=False)
    if rank is not None:
        n = max(1, min(int(rank), S.numel()))
    else:
        total = (S * S).sum()
        if float(total) == 0.0:
            n = 1
        else:
            kept = torch.cumsum(S * S, 0) / total
            n = int(torch.searchsorted(kept, torch.tensor(float(energy), device=kept.device) - 1e-7)) + 1
            n = max(1, min(n, S.numel()))
    root = S[:n].sqrt()
    return U[:, :n] * root, root[:, None] * Vh[:n]


class FactoredEnsemblingModule(EnsemblingModule):
    """base_layer with theta(r) = theta_0 + sum_i lambda_i(r) tau_i where the linear layers' tau_i are low-rank.

    Attributes:
        base_layer: the original module (theta_0, frozen).
        lowrank: child linear path ("" for base_layer itself) -> LowRank, stored as buffers
            `A_<path>`, `B_<path>`, `owner_<path>`, `scale_<path>`.
        dense: parameter name -> Tensor[k, *shape] buffers `T_<param>` for the parameters that are not a
            factored weight but do change (biases, norms of dense experts); every other parameter stays theta_0.
        router: preference -> lambda, the only trainable part.

    The low-rank terms are added to the child layers' outputs by forward hooks that live only for the
    duration of a forward, so a plain copy of base_layer never carries them.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        lowrank: dict[str, LowRank],
        dense: dict[str, torch.Tensor] | None,
        router: Router,
        task_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        dense = dense or {}
        params = dict(base_layer.named_parameters())
        k = router.k
        errors = []
        for path, lr in lowrank.items():
            try:
                child = base_layer.get_submodule(path)
            except AttributeError:
                errors.append(f"{path!r} is not a submodule of {type(base_layer).__name__}")
                continue
            w = getattr(child, "weight", None)
            if not isinstance(w, torch.Tensor) or w.dim() != 2:
                errors.append(f"{path or type(base_layer).__name__!r} has no 2-d weight to factor")
                continue
            out_f, in_f = (w.shape[1], w.shape[0]) if lr.transposed else (w.shape[0], w.shape[1])
            if lr.A.shape[1] != in_f or lr.B.shape[0] != out_f or lr.B.shape[1] != lr.A.shape[0]:
                errors.append(
                    f"{path!r}: factors A {tuple(lr.A.shape)}, B {tuple(lr.B.shape)} do not fit a layer with "
                    f"in_features={in_f}, out_features={out_f}"
                )
            if int(lr.owner.max()) >= k or int(lr.owner.min()) < 0:
                errors.append(f"{path!r}: expert index out of range for k={k}")
        for n, t in dense.items():
            if n not in params:
                errors.append(f"dense task vector {n!r} names no parameter of {type(base_layer).__name__}")
            elif tuple(t.shape) != (k, *params[n].shape):
                errors.append(f"dense task vector {n!r} must have shape {(k, *params[n].shape)}, got {tuple(t.shape)}")
        if errors:
            raise ValueError("; ".join(errors))
        self.base_layer = base_layer.requires_grad_(False)
        self._paths = list(lowrank)
        self._transposed = {p: lr.transposed for p, lr in lowrank.items()}
        for p, lr in lowrank.items():
            for part in ("A", "B", "owner", "scale"):
                self.register_buffer(self._buf(part, p), getattr(lr, part))
        self._dense = list(dense)
        for n, t in dense.items():
            self.register_buffer("T_" + n.replace(".", "__"), t)
        self._init_router(router, task_names, next(iter(params.values())).device)
        self._lam_leaf: torch.Tensor | None = None  # shared_merge: lambda's detached leaf (backward stops here)
        self._segment_lam_leaves: list[torch.Tensor] | None = None

    @staticmethod
    def _buf(part: str, path: str) -> str:
        return f"{part}_" + (path.replace(".", "__") or "_self")

    # --- stored factors ------------------------------------------------------------------------
    @property
    def factored_paths(self) -> list[str]:
        """Paths (inside base_layer) of the factored linear layers; "" is base_layer itself."""
        return list(self._paths)

    def factors(self, path: str) -> LowRank:
        return LowRank(
            *(getattr(self, self._buf(p, path)) for p in ("A", "B", "owner", "scale")), self._transposed[path]
        )

    @property
    def dense_names(self) -> list[str]:
        return list(self._dense)

    def dense_task_vector(self, param: str) -> torch.Tensor:
        return getattr(self, "T_" + param.replace(".", "__"))

    def stored_tensors(self) -> list[torch.Tensor]:
        out = [self.dense_task_vector(n) for n in self._dense]
        for p in self._paths:
            out += [getattr(self, self._buf(part, p)) for part in ("A", "B", "owner", "scale")]
        return out

    @staticmethod
    def _weight_name(path: str) -> str:
        return f"{path}.weight" if path else "weight"

    # --- merging (dense, for export and merge_into) ---------------------------------------------
    @torch.no_grad()
    def merged_weights(self) -> dict[str, torch.Tensor]:
        """Dense theta(r) of every base_layer parameter (the copy a plain export needs); cached by r."""
        key = self._cache_key()
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        self._cache = None
        with self._full_precision():
            lam = self.routing_weights()
            params = self._theta0()
            out = {n: merge_weights(lam, params[n], self.dense_task_vector(n)) for n in self._dense}
            for p in self._paths:
                wn = self._weight_name(p)
                w = out.get(wn, params[wn])
                lr = self.factors(p)
                out[wn] = w + lowrank_dense(lr, lowrank_columns(lam, lr.owner, lr.scale), w.dtype)
            for n, v in params.items():
                out.setdefault(n, v)
        self._cache = (key, out)
        return out

    # --- shared_merge protocol: lambda's leaf plays the merged weights' part -------------------
    def begin_shared(self) -> None:
        lam = self.routing_weights()
        self._shared_lam = lam
        self._lam_leaf = lam.detach().requires_grad_(True)

    def shared_roots(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self._lam_leaf is None or self._lam_leaf.grad is None:
            return [], []
        return [self._shared_lam], [self._lam_leaf.grad]

    def segment_lambda_grads(self, tasks: int) -> torch.Tensor | None:
        leaves = self._segment_lam_leaves
        if leaves is None or all(v.grad is None for v in leaves):
            return None
        return torch.stack([torch.zeros_like(v) if v.grad is None else v.grad for v in leaves])

    def zero_shared_grad(self) -> None:
        for v in [self._lam_leaf, *(self._segment_lam_leaves or [])]:
            if v is not None:
                v.grad = None

    def clear_cache(self) -> None:
        self._cache = None
        self._lam_leaf = self._shared_lam = None
        self._segment_lam_leaves = None

    # --- forward ---------------------------------------------------------------------------------
    def _lambda(self) -> torch.Tensor:
        if self.share_under_grad and self._lam_leaf is not None and self._router_grad():
            return self._lam_leaf
        return self.routing_weights()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._rows is not None and not self.share_under_grad:
            return self._run_rows(args, kwargs)
        lam = self._lambda()
        if self._segments is not None and self._lam_leaf is not None and self._router_grad():
            sizes = self._segments
            if self._segment_lam_leaves is None:
                self._segment_lam_leaves = [self._shared_lam.detach().requires_grad_(True) for _ in sizes]
            return _join([self._run(self._segment_lam_leaves[j], a, kw) for j, a, kw in _segments(sizes, args, kwargs)])
        return self._run(lam, args, kwargs)

    def _run(self, lam: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        with self._full_precision():
            params = self._theta0()
            dense = {n: merge_weights(lam, params[n], self.dense_task_vector(n)) for n in self._dense}
        return self._hooked_forward(lam, dense, args, kwargs)

    def _hooked_forward(
        self,
        lam: torch.Tensor,
        dense: dict[str, torch.Tensor],
        args: tuple,
        kwargs: dict,
        rows: Any = None,
        shifts: dict[str, torch.Tensor] | None = None,
    ) -> Any:
        """base_layer's forward with `dense` merged parameters swapped in and each factored layer's low-rank term
        added by a hook that lives for this forward only: lam Tensor[k] (one preference), or Tensor[B, k] with
        `rows` (a preference per row; `shifts`: a factored layer's per-row bias delta)."""
        handles = []
        try:
            for p in self._paths:
                A, B = getattr(self, self._buf("A", p)), getattr(self, self._buf("B", p))
                cols = lowrank_columns(lam, getattr(self, self._buf("owner", p)), getattr(self, self._buf("scale", p)))
                hook = _adder(A, B, cols) if rows is None else _row_adder(A, B, cols, (shifts or {}).get(p), rows)
                handles.append(self.base_layer.get_submodule(p).register_forward_hook(hook, with_kwargs=True))
            if dense:
                return self._call_base(dense, args, kwargs)
            return self.base_layer(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()

    def _run_rows(self, args: tuple, kwargs: dict) -> Any:
        """A batch whose rows have their own preferences, in one forward: each row's rank columns are scaled by its
        own lambda (`lowrank_apply` with cols Tensor[B, R]); a dense bias of a factored layer adds each row's own
        merged delta. Other dense parameters (norms of dense experts) need one preference for the whole batch.

        Without autograd (serving) the hooks come from `_row_hooks`, made once per batch composition."""
        rows = self._rows
        if not self._router_grad():
            hooks, dense = self._row_hooks(rows)
            return self._forward_with(hooks, dense, args, kwargs)
        lam_g = self.row_lambdas()  # [G, k]
        lam = lam_g[rows.inverse]  # [B, k]
        dense, shifts = self._row_dense(rows, lam_g, lam)
        return self._hooked_forward(lam, dense, args, kwargs, rows, shifts)

    def _row_dense(
        self, rows: Any, lam_g: torch.Tensor, lam: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(dense merged parameters for the whole batch, {factored path: per-row bias delta Tensor[B, out]})."""
        if not self._dense:
            return {}, {}
        biases = {f"{p}.bias" if p else "bias": p for p in self._paths}
        other = [n for n in self._dense if n not in biases]
        if other and len(rows.groups) > 1:
            raise ValueError(
                f"one preference per row through {type(self.base_layer).__name__} needs its dense parameters to be "
                f"biases of its low-rank layers, but {other[:3]} are not; give the rows one preference at a time"
            )
        with self._full_precision():
            params = self._theta0()
            dense = {n: merge_weights(lam_g[0], params[n], self.dense_task_vector(n)) for n in other}
            shifts = {  # per row: sum_i lambda_i tau_i of a factored layer's bias, Tensor[B, out]
                biases[n]: lam @ self.dense_task_vector(n).reshape(self.k, -1).to(lam.dtype)
                for n in self._dense
                if n in biases
            }
        return dense, shifts

    def _compute_dtype(self) -> torch.dtype:
        """The dtype the factored layers compute in: autocast's when it is on, else the layers' weights'."""
        dev = self.preference.device.type
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        return self.base_layer.get_submodule(self._paths[0]).weight.dtype

    def fused_layers(self, dtype: torch.dtype) -> list[str]:
        """Paths of the factored layers whose serving forward (rows, no autograd, computing in `dtype`) runs on a
        copy [W_0; A] fused in `dtype` (`_serving_factors`): plain nn.Linear layers whose weight is not in `dtype`
        already, so a copy in `dtype` is needed anyway. The caller's own serving copies skip them."""
        out = []
        for p in self._paths:
            child = self.base_layer.get_submodule(p)
            if type(child) is nn.Linear and not self._transposed[p] and child.weight.dtype != dtype:
                out.append(p)
        return out

    def _serving_factors(self, dtype: torch.dtype) -> dict[str, tuple]:
        """Per factored path, the serving copy of its factors in `dtype`, made once (kept while theta_0 and the
        stored factors are the same tensors, unchanged), not cast at every decoding step:
        ("fused", [W_0; A] Tensor[out + R, in], bias padded with R zeros or None, B^T Tensor[R, out]) for
        `fused_layers` (one matmul gives the layer's output and x A^T), else ("apart", A^T Tensor[in, R], B^T)."""
        fused = set(self.fused_layers(dtype))
        parts = []
        for p in self._paths:
            child = self.base_layer.get_submodule(p)
            a, b = getattr(self, self._buf("A", p)), getattr(self, self._buf("B", p))
            ts = [a, b] + ([child.weight] + ([child.bias] if child.bias is not None else []) if p in fused else [])
            parts.append((p in fused, tuple((t.data_ptr(), t._version) for t in ts)))
        key = (dtype, tuple(parts))
        cached = self.__dict__.get("_factors_in")
        if cached is None or cached[0] != key:
            made = {}
            with torch.no_grad():
                for p in self._paths:
                    child = self.base_layer.get_submodule(p)
                    a, b = getattr(self, self._buf("A", p)), getattr(self, self._buf("B", p))
                    bt = b.t().to(dtype).contiguous()
                    if p in fused:
                        w = torch.cat([child.weight.to(dtype), a.to(dtype)])  # each rounded as autocast rounds it
                        bias = child.bias
                        if bias is not None:
                            bias = torch.cat([bias.to(dtype), bias.new_zeros(a.shape[0], dtype=dtype)])
                        made[p] = ("fused", w, bias, bt)
                    else:
                        made[p] = ("apart", a.t().to(dtype).contiguous(), bt)
            cached = self.__dict__["_factors_in"] = (key, made)
        return cached[1]

    def _row_hooks(self, rows: Any) -> tuple[list[tuple[nn.Module, bool, Any]], dict[str, torch.Tensor]]:
        """([(factored layer, is a forward in its place, else a forward hook, the function)], dense merged
        parameters) for a batch of row preferences, without autograd.

        Made once per batch composition (the `RowPreferences` object), compute dtype and router / override version,
        and kept: each layer's rank columns scaled per row (Tensor[B, R], lambda(r_b)[owner] * s, in the compute
        dtype) change only when rows join or leave. The factors' serving copy is cast once (`_serving_factors`)."""
        dtype = self._compute_dtype()
        version = (dtype, self._cache_key()[2:], tuple(id(t) for t in self.stored_tensors()))
        cached = self.__dict__.get("_row_state")
        if cached is not None and cached[0] is rows and cached[1] == version:
            return cached[2]
        self.__dict__["_row_state"] = None
        with torch.no_grad():
            lam_g = self.row_lambdas()  # [G, k], each preference routed once (cached by preference)
            lam = lam_g[rows.inverse]  # [B, k]
            dense, shifts = self._row_dense(rows, lam_g, lam)
            factors = self._serving_factors(dtype)
            hooks = []
            for p in self._paths:
                cols = lowrank_columns(lam, getattr(self, self._buf("owner", p)), getattr(self, self._buf("scale", p)))
                cols, shift, child = cols.to(dtype), shifts.get(p), self.base_layer.get_submodule(p)
                kind, *fs = factors[p]
                if kind == "fused":
                    hooks.append((child, True, _fused_row_forward(*fs, cols, shift, rows)))
                else:
                    hooks.append((child, False, _serving_row_adder(*fs, cols, shift, rows)))
        made = (hooks, dense)
        self.__dict__["_row_state"] = (rows, version, made)
        return made

    def _forward_with(
        self, hooks: list[tuple[nn.Module, bool, Any]], dense: dict[str, torch.Tensor], args: tuple, kwargs: dict
    ) -> Any:
        """base_layer's forward with the serving functions of `_row_hooks` on its factored layers for this forward
        only (a forward set on the layer instance, or a forward hook), `dense` swapped in."""
        handles, replaced = [], []
        try:
            for child, in_place, fn in hooks:
                if in_place:
                    child.__dict__["forward"] = fn
                    replaced.append(child)
                else:
                    handles.append(child.register_forward_hook(fn, with_kwargs=True))
            if dense:
                return self._call_base(dense, args, kwargs)
            return self.base_layer(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
            for child in replaced:
                child.__dict__.pop("forward", None)

    def extra_repr(self) -> str:
        ranks = {p or "(self)": self.factors(p).ranks(self.k) for p in self._paths}
        return f"k={self.k}, tasks={self.task_names}, ranks={ranks}, dense={self._dense}"


def _adder(A: torch.Tensor, B: torch.Tensor, cols: torch.Tensor):
    # The hooks live on the shared child layers for one forward: two threads running forwards through
    # the same upcycled model at once would see each other's. Serving runs plain merged copies instead.
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        return output + lowrank_apply(x, A, B, cols).to(output.dtype)

    return hook


def _row_adder(A: torch.Tensor, B: torch.Tensor, cols: torch.Tensor, shift: torch.Tensor | None, rows: Any):
    """`_adder` with a preference per row: cols Tensor[B, R]; shift Tensor[B, out] (a dense bias's delta) or None."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        x = _rows_input(args, kwargs, rows)
        out = output + lowrank_apply(x, A, B, cols).to(output.dtype)
        if shift is not None:
            out = out + shift.reshape(shift.shape[0], *([1] * (out.dim() - 2)), shift.shape[1]).to(out.dtype)
        return out

    return hook


def _serving_row_adder(at: torch.Tensor, bt: torch.Tensor, cols: torch.Tensor, shift: torch.Tensor | None, rows: Any):
    """`_row_adder` for serving (no autograd): at Tensor[in, R], bt Tensor[R, out] and cols Tensor[B, R] already in
    the compute dtype; the layer's input is cast once, and the low-rank term added to the layer's output in place."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        x = _rows_input(args, kwargs, rows)
        h = x.to(at.dtype) @ at  # [B, ..., R]
        c = cols if h.dim() == 2 else cols.view(cols.shape[0], *([1] * (h.dim() - 2)), cols.shape[1])
        y = (h.mul_(c) @ bt).to(output.dtype)
        if shift is not None:
            y = y + shift.reshape(shift.shape[0], *([1] * (y.dim() - 2)), shift.shape[1]).to(y.dtype)
        return output.add_(y)

    return hook


def _per_position(t: torch.Tensor, n: int) -> torch.Tensor:
    """Rows Tensor[B, C] repeated for the n // B positions of each row (row-major, as Tensor[B, S, C] reshaped)."""
    s = n // t.shape[0]
    return t if s == 1 else t.repeat_interleave(s, 0)


def _fused_row_forward(
    w: torch.Tensor, bias: torch.Tensor | None, bt: torch.Tensor, cols: torch.Tensor, shift: torch.Tensor | None, rows
):
    """A factored nn.Linear's forward for rows with their own preferences, on the fused copy w = [W_0; A]
    (Tensor[out + R, in]): one matmul gives W_0 x (+ bias) and x A^T, then one addmm adds (x A^T * cols) B^T."""
    out_f = bt.shape[1]

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = _rows_input((x,), {}, rows)
        y = torch.nn.functional.linear(x.to(w.dtype), w, bias)  # [B, ..., out + R]
        lead = y.shape[:-1]
        y2 = y.reshape(-1, y.shape[-1])
        h = y2[:, out_f:] * _per_position(cols, y2.shape[0])
        z = torch.addmm(y2[:, :out_f], h, bt)
        if shift is not None:
            z = z + _per_position(shift.to(z.dtype), z.shape[0])
        return z.view(*lead, out_f)

    return forward
