import pytest
import torch
from torch import nn

from pwemoe.core import (
    DirichletSampler,
    Router,
    WeightEnsemblingModule,
    merge_weights,
    normalize_preference,
    simplex_grid,
    simplex_grid_size,
    stack_task_vectors,
    task_arithmetic,
)


@pytest.mark.parametrize("k", [2, 3, 8])
def test_router_parameter_count_and_init(k):
    r = Router(k, hidden_layers=2, init_lambda=0.3)
    assert sum(p.numel() for p in r.parameters()) == 4 * k * k + 3 * k
    lam = r(torch.full((k,), 1.0 / k))
    # N(0, 0.01) weights: the untrained router is task arithmetic up to tiny noise.
    assert torch.allclose(lam, torch.full((k,), 0.3), atol=0.01)
    assert sum(p.numel() for p in Router(k, 1).parameters()) == k * k + k
    assert sum(p.numel() for p in Router(k, 0).parameters()) == 2 * k


def test_router_rejects_bad_depth():
    with pytest.raises(ValueError, match="hidden_layers"):
        Router(3, hidden_layers=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_weights_value_and_gradient(dtype):
    g = torch.Generator().manual_seed(0)
    theta0 = torch.randn(5, 4, generator=g)
    T = torch.randn(3, 5, 4, generator=g).to(dtype)
    lam = torch.tensor([0.2, -0.5, 1.5], requires_grad=True)
    out = merge_weights(lam, theta0, T)
    ref = theta0 + (lam[:, None, None] * T.float()).sum(0)
    assert out.dtype == torch.float32
    assert torch.allclose(out, ref, atol=1e-5)
    w = torch.randn(5, 4, generator=g)
    (out * w).sum().backward()
    expected = (T.float() * w).flatten(1).sum(1)
    assert torch.allclose(lam.grad, expected, atol=1e-4)


def test_ensembling_module_onehot_and_cache():
    torch.manual_seed(0)
    base = nn.Linear(4, 3)
    experts = [nn.Linear(4, 3) for _ in range(2)]
    tv = stack_task_vectors(
        dict(base.named_parameters()), {f"e{i}": dict(e.named_parameters()) for i, e in enumerate(experts)}
    )
    m = WeightEnsemblingModule(base, tv, Router(2))
    x = torch.randn(6, 4)
    for i, e in enumerate(experts):
        m.set_lambda_override(torch.eye(2)[i])
        with torch.no_grad():
            assert torch.allclose(m(x), e(x), atol=1e-5)
    m.set_lambda_override(None)
    with torch.no_grad():
        y1 = m(x)
        assert m(x) is not None and m._cache is not None
        cached = m._cache[1]
        m(x)
        assert m._cache[1] is cached  # same preference, same router: no recompute
        m.router.net[-1].bias.add_(1.0)  # router changed in place, as an optimizer step does
        y2 = m(x)
    assert not torch.allclose(y1, y2), "stale merged weights were served after a router update"
    with torch.no_grad():
        m.set_preference(torch.tensor([1.0, 0.0]))
        y3 = m(x)
    assert m._cache[1] is not cached
    assert torch.isfinite(y3).all()


def test_ensembling_module_validates_shapes():
    base = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="cover exactly"):
        WeightEnsemblingModule(base, {"weight": torch.zeros(2, 3, 4)}, Router(2))
    with pytest.raises(ValueError, match="shape"):
        WeightEnsemblingModule(base, {"weight": torch.zeros(2, 3, 4), "bias": torch.zeros(3, 3)}, Router(2))


def test_merge_methods_are_pure_functions():
    from pwemoe.core import preference_weighted_task_arithmetic, simple_average

    base = {"w": torch.tensor([1.0, 1.0]), "step": torch.tensor(3)}
    experts = {
        "a": {"w": torch.tensor([2.0, 1.0]), "step": torch.tensor(3)},
        "b": {"w": torch.tensor([1.0, 3.0]), "step": torch.tensor(3)},
    }
    assert torch.allclose(task_arithmetic(base, experts, 0.5)["w"], torch.tensor([1.5, 2.0]))
    assert torch.allclose(simple_average(base, experts)["w"], torch.tensor([1.5, 2.0]))  # mean of the experts
    out = preference_weighted_task_arithmetic(base, experts, torch.tensor([0.25, 0.75]), c=2.0)
    assert torch.allclose(out["w"], torch.tensor([1.5, 4.0]))  # 1 + 2 * (0.25 * tau_a + 0.75 * tau_b)
    assert out["step"].item() == 3 and torch.equal(base["w"], torch.tensor([1.0, 1.0]))  # inputs untouched
    with pytest.raises(ValueError, match="one weight per expert"):
        preference_weighted_task_arithmetic(base, experts, torch.tensor([1.0]), c=1.0)


def test_normalize_preference():
    assert torch.allclose(normalize_preference([1, 3], 2), torch.tensor([0.25, 0.75]))
    with pytest.raises(ValueError, match="length k=3"):
        normalize_preference([0.5, 0.5], 3)
    with pytest.raises(ValueError, match="non-negative"):
        normalize_preference([-0.1, 1.1], 2)
    with pytest.raises(ValueError, match="finite"):
        normalize_preference([float("nan"), 1.0], 2)
    with pytest.raises(ValueError, match="positive sum"):
        normalize_preference([0.0, 0.0], 2)
    with pytest.raises(TypeError):
        normalize_preference("ab", 2)


@pytest.mark.parametrize("k,m,n", [(2, 11, 11), (3, 11, 66), (8, 2, 8), (8, 3, 36)])
def test_simplex_grid_counts(k, m, n):
    g = simplex_grid(k, m)
    assert g.shape == (n, k) == (simplex_grid_size(k, m), k)
    assert torch.allclose(g.sum(1), torch.ones(n))
    assert (g >= 0).all()
    steps = g * (m - 1)
    assert torch.allclose(steps, steps.round(), atol=1e-5)
    assert len({tuple(row) for row in steps.round().int().tolist()}) == n


def test_simplex_grid_points_and_errors():
    assert simplex_grid(2, 3).tolist() == [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
    assert torch.equal(simplex_grid(8, 2), torch.eye(8).flip(0))
    with pytest.raises(ValueError, match="M >= 2"):
        simplex_grid(3, 1)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 3.0])
def test_dirichlet_sampler_seeded_and_resumable(alpha):
    a = DirichletSampler(3, alpha, seed=7)
    b = DirichletSampler(3, alpha, seed=7)
    x = a.sample(4)
    assert torch.equal(x, b.sample(4))
    assert torch.allclose(x.sum(1), torch.ones(4)) and (x >= 0).all()
    state = a.state_dict()
    y = a.sample(2)
    c = DirichletSampler(3, alpha, seed=0)
    c.load_state_dict(state)
    assert torch.equal(c.sample(2), y)
    mean = DirichletSampler(3, alpha, seed=1).sample(4000).mean(0)
    assert torch.allclose(mean, torch.full((3,), 1 / 3), atol=0.03)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lambda_grads_equal_the_merge_backward_per_loss(dtype):
    from pwemoe.core.merge import lambda_grads, merge_weights

    g = torch.Generator().manual_seed(0)
    T = torch.randn(3, 4, 5, generator=g).to(dtype)
    theta0 = torch.randn(4, 5, generator=g)
    grads = torch.randn(2, 4, 5, generator=g)
    want = []
    for j in range(2):
        lam = torch.tensor([0.2, 0.3, 0.5], requires_grad=True)
        merge_weights(lam, theta0, T).backward(grads[j])
        want.append(lam.grad)
    torch.testing.assert_close(lambda_grads(T, list(grads)), torch.stack(want), rtol=1e-5, atol=1e-5)
    # a task without a gradient (no rows in this forward) contributes a zero row
    got = lambda_grads(T, [grads[0], None])
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], torch.zeros(3, dtype=got.dtype))


@pytest.mark.parametrize("hidden", [0, 1, 2])
def test_preference_init_router_starts_at_preference_weighted_task_arithmetic(hidden):
    torch.manual_seed(0)
    router = Router(3, hidden, init_lambda=0.4, init_std=0.0, init="preference")
    for r in (torch.tensor([0.2, 0.3, 0.5]), torch.tensor([1.0, 0.0, 0.0])):
        torch.testing.assert_close(router(r), 0.4 * 3 * r)
    with pytest.raises(ValueError, match="router init"):
        Router(3, hidden, init="uniform")


class _Tied(nn.Module):
    """A layer with nested children and a tied weight (b.weight is a.weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor, fail: bool = False) -> torch.Tensor:
        if fail:
            raise RuntimeError("boom")
        return self.b(torch.tanh(self.a(x)))


def test_parameter_swap_runs_the_merged_weights_and_restores_theta0():
    """The forward's lean parameter swap equals functional_call (tied alias included), restores the
    original Parameters even when the forward raises, and looks again when the layer is restructured."""
    from torch.func import functional_call

    torch.manual_seed(0)
    base, experts = _Tied(), [_Tied() for _ in range(2)]
    tv = stack_task_vectors(
        dict(base.named_parameters()), {f"e{i}": dict(e.named_parameters()) for i, e in enumerate(experts)}
    )
    m = WeightEnsemblingModule(base, tv, Router(2))
    m.set_lambda_override(torch.tensor([0.7, 0.4]))
    originals = {n: p for n, p in base.named_parameters(remove_duplicate=False)}
    x = torch.randn(5, 4)
    want = functional_call(base, m.merged_weights(), (x,), tie_weights=True)
    assert not torch.allclose(want, base(x))  # the merge changes the output
    assert torch.equal(m(x), want)
    assert all(p is originals[n] for n, p in base.named_parameters(remove_duplicate=False))
    with pytest.raises(RuntimeError, match="boom"):
        m(x, fail=True)
    assert all(p is originals[n] for n, p in base.named_parameters(remove_duplicate=False))
    fresh = nn.Linear(4, 4)  # restructured: a new `a` with theta_0's values; b keeps the old tied weight
    fresh.load_state_dict(base.a.state_dict())
    base.a = fresh
    m.clear_cache()
    want = functional_call(base, m.merged_weights(), (x,), tie_weights=True)
    assert not torch.allclose(want, base(x))
    torch.testing.assert_close(m(x), want, rtol=0, atol=0)
    for _ in range(5):  # replaced again and again: a new module may reuse a freed one's address
        base.a = nn.Linear(4, 4)
        m.clear_cache()
        assert torch.equal(m(x), functional_call(base, m.merged_weights(), (x,), tie_weights=True))
    base.b.weight = base.a.weight  # tied again, then untied by assigning a state dict
    m(x)
    base.load_state_dict(base.state_dict(), assign=True)
    assert base.a.weight is not base.b.weight
    m.clear_cache()
    assert torch.equal(m(x), functional_call(base, m.merged_weights(), (x,), tie_weights=True))


def test_router_forward_is_its_net():
    """The 2-hidden-layer router's direct ops compute exactly what its nn.Sequential does."""
    torch.manual_seed(0)
    router = Router(4, 2, init_std=0.3)
    for r in (torch.rand(4), torch.rand(7, 4)):
        assert torch.equal(router(r), router.net(r))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_without_autograd_is_the_same_merge(dtype):
    g = torch.Generator().manual_seed(0)
    theta0, T = torch.randn(4, 5, generator=g), torch.randn(3, 4, 5, generator=g).to(dtype)
    lam = torch.tensor([0.2, -0.3, 0.9], requires_grad=True)
    with_graph = merge_weights(lam, theta0, T)
    assert with_graph.requires_grad
    with torch.no_grad():
        plain = merge_weights(lam, theta0, T)
    assert not plain.requires_grad
    assert torch.equal(plain, with_graph.detach())
    assert torch.equal(merge_weights(lam.detach(), theta0, T), plain)


def test_ensembling_modules_walk_in_model_order_once_each():
    import pwemoe
    from pwemoe.core.ensembling import EnsemblingModule

    torch.manual_seed(0)

    def layer() -> WeightEnsemblingModule:
        base = nn.Linear(3, 3)
        experts = {f"e{i}": dict(nn.Linear(3, 3).named_parameters()) for i in range(2)}
        tv = stack_task_vectors(dict(base.named_parameters()), experts)
        return WeightEnsemblingModule(base, tv, Router(2))

    shared = layer()
    model = nn.Sequential(
        nn.Linear(3, 3), nn.Sequential(layer(), nn.ReLU(), shared), nn.ModuleDict({"x": layer(), "y": shared})
    )
    want = [n for n, mod in model.named_modules() if isinstance(mod, EnsemblingModule)]
    assert [n for n, _ in pwemoe.ensembling_modules(model)] == want == ["1.0", "1.2", "2.x"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shared_merge_router_gradient_is_the_per_forward_one_exactly(dtype):
    """The shared merge's dL/dlambda (summed per parameter, each part cast to the router's fp32) equals
    backpropagating through the merge at the forward, bit for bit, also over bf16 / fp16 weights."""
    import pwemoe

    g = torch.Generator().manual_seed(0)
    mods = []
    for _ in range(2):
        base = nn.Linear(16, 16)
        experts = {
            f"e{i}": {n: p + 0.1 * torch.randn(p.shape, generator=g) for n, p in base.named_parameters()}
            for i in range(3)
        }
        tv = {n: t.to(dtype) for n, t in stack_task_vectors(dict(base.named_parameters()), experts).items()}
        router = Router(3, 2, init_std=0.3)
        mods.append(WeightEnsemblingModule(base.to(dtype), tv, router))  # router stays fp32
    model = nn.Sequential(*mods)
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(32, 16, generator=g).to(dtype)
    pwemoe.set_preference(model, [0.2, 0.3, 0.5])
    plain = torch.autograd.grad(model(x).float().pow(2).mean(), params)
    with pwemoe.shared_merge(model) as merge:
        model(x).float().pow(2).mean().backward()
        merge.backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(plain, params))


def test_positive_int_refuses_bools_other_types_and_values_out_of_bounds():
    from pwemoe.core.checks import positive_int, positive_int_problem

    assert positive_int("steps", 3) == 3 and positive_int("rank", 7, maximum=7) == 7
    assert positive_int_problem("k", 2, minimum=2) is None
    for bad in (True, False, 0, -1, 2.0, "2", None):
        assert positive_int_problem("steps", bad) == f"steps must be an integer >= 1, got {bad!r}"
    with pytest.raises(ValueError, match=r"^rank must be an integer in \[1, 4\], got 5; at 4 it is exact$"):
        positive_int("rank", 5, maximum=4, hint="; at 4 it is exact")
