import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModel, BertConfig, BertModel

import pwemoe
from pwemoe import (
    ensembling_modules,
    fixed_lambda,
    load_router_state_dict,
    merge_and_unload,
    router_state_dict,
    routing_weights,
    set_preference,
    upcycle,
)
from tests.conftest import BUILDERS, make_expert, model_inputs, tiny_bert


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def test_onehot_lambda_reproduces_each_expert_module(arch, base_and_experts):
    base, experts = base_and_experts
    import copy

    expert_copies = {n: copy.deepcopy(e) for n, e in experts.items()}
    model = upcycle(base, experts)
    mods = dict(ensembling_modules(model))
    assert mods, "no modules were upcycled"
    for i, (task, expert) in enumerate(expert_copies.items()):
        with fixed_lambda(model, torch.eye(3)[i]), torch.no_grad():
            for name, m in mods.items():
                ref_module = expert.get_submodule(name)
                ins = _module_input(name, m, model)
                got = m(*ins)
                want = ref_module(*ins)
                got = got[0] if isinstance(got, tuple) else got
                want = want[0] if isinstance(want, tuple) else want
                assert torch.allclose(got, want, atol=1e-5), f"{task}/{name}"


def _module_input(name, module, model):
    hidden = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    g = torch.Generator().manual_seed(5)
    first = next(module.base_layer.parameters())
    if name.endswith(".output") and model.config.model_type == "bert":
        inter = model.config.intermediate_size
        return (torch.randn(2, 5, inter, generator=g), torch.randn(2, 5, hidden, generator=g))
    return (torch.randn(2, 5, hidden, generator=g).to(first.dtype),)


def test_untrained_model_is_task_arithmetic(arch, base_and_experts):
    base, experts = base_and_experts
    ta = BUILDERS[arch]()
    with torch.no_grad():
        for n, p in ta.named_parameters():
            p.add_(sum(dict(e.named_parameters())[n] - p for e in experts.values()), alpha=0.3)
    inputs = model_inputs(base)
    model = upcycle(base, experts, init_lambda=0.3)
    with fixed_lambda(model, torch.full((3,), 0.3)):
        assert torch.allclose(_out(model, inputs), _out(ta, inputs), atol=1e-5)


def test_export_equals_preference_forward_and_reloads_plainly(arch, base_and_experts, tmp_path):
    base, experts = base_and_experts
    cls = type(base)
    model = upcycle(base, experts)
    inputs = model_inputs(model)
    r = [0.2, 0.5, 0.3]
    set_preference(model, r)
    want = _out(model, inputs)
    plain = merge_and_unload(model, r)
    assert type(plain) is cls
    assert not list(ensembling_modules(plain))
    assert torch.allclose(_out(plain, inputs), want, atol=1e-5)
    # The upcycled model is intact: still upcycled, still gives the same outputs.
    assert list(ensembling_modules(model))
    assert torch.allclose(_out(model, inputs), want, atol=1e-6)
    plain.save_pretrained(tmp_path)
    torch.save(inputs, tmp_path / "inputs.pt")
    torch.save(want, tmp_path / "want.pt")
    # Load in a fresh interpreter where importing pwemoe fails: the directory is plain transformers.
    script = (
        textwrap.dedent(
            f"""
        import sys, torch
        sys.modules['pwemoe'] = None
        from transformers import AutoModel
        m = AutoModel.from_pretrained({str(tmp_path)!r}).eval()
        inputs = torch.load({str(tmp_path / "inputs.pt")!r}, weights_only=True)
        want = torch.load({str(tmp_path / "want.pt")!r}, weights_only=True)
        with torch.no_grad():
            got = m(**inputs).last_hidden_state
        err = (got - want).abs().max().item()
        print(err)
        sys.exit(0 if err < 1e-5 else 1)
        """
        )
        if arch == "bert"
        else None
    )
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert torch.allclose(_out(reloaded, inputs), want, atol=1e-5)
    if script:
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr


def test_only_routers_get_gradients(arch, base_and_experts):
    base, experts = base_and_experts
    model = upcycle(base, experts)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".router." in n for n in trainable)
    mods = list(ensembling_modules(model))
    for _, m in mods:
        assert sum(p.numel() for p in m.router.parameters()) == 4 * 3 * 3 + 3 * 3
    assert len(trainable) == 4 * len(mods)
    model.train()
    set_preference(model, [0.1, 0.1, 0.8])
    out = model(**model_inputs(model)).last_hidden_state
    out.pow(2).mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        else:
            assert p.grad is None, n
    for _, m in mods:
        for pn in m.param_names:
            assert m.task_vector(pn).grad is None


def test_training_step_changes_output_no_stale_cache(base_and_experts):
    base, experts = base_and_experts
    model = upcycle(base, experts)
    inputs = model_inputs(model)
    set_preference(model, [1, 1, 1])
    before = _out(model, inputs)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(**inputs).last_hidden_state.sum().backward()
    opt.step()
    after = _out(model, inputs)
    assert not torch.allclose(before, after)


def test_router_state_dict_roundtrip(base_and_experts):
    base, experts = base_and_experts
    model = upcycle(base, experts)
    sd = router_state_dict(model)
    assert all(".router." in k for k in sd)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    lam_random = routing_weights(model, [0.3, 0.3, 0.4])
    load_router_state_dict(model, sd)
    for k, v in router_state_dict(model).items():
        assert torch.equal(v, sd[k])
    assert not all(
        torch.equal(a, b) for a, b in zip(lam_random.values(), routing_weights(model, [0.3, 0.3, 0.4]).values())
    )
    bad = dict(sd)
    key = next(iter(bad))
    bad.pop(key)
    bad["nonsense.router.x"] = torch.zeros(1)
    with pytest.raises(ValueError, match="missing") as e:
        load_router_state_dict(model, bad)
    assert "nonsense.router.x" in str(e.value) and key in str(e.value)


def test_preference_api():
    base = tiny_bert()
    model = upcycle(base, {"a": make_expert(base, 1), "b": make_expert(base, 2)})
    assert torch.allclose(set_preference(model, [1, 3]), torch.tensor([0.25, 0.75]))
    with pwemoe.preference(model, [1, 0]) as r:
        assert r.tolist() == [1.0, 0.0]
        lam = routing_weights(model)
    assert torch.allclose(pwemoe.get_preference(model), torch.tensor([0.25, 0.75]))
    assert set(lam) == {n for n, _ in ensembling_modules(model)}
    for bad, msg in [
        ([0.5, 0.3, 0.2], "length"),
        ([-1, 2], "non-negative"),
        ([float("nan"), 1], "finite"),
        ([0, 0], "positive"),
    ]:
        with pytest.raises(ValueError, match=msg):
            set_preference(model, bad)


def test_bad_experts_are_named():
    base = tiny_bert()
    with pytest.raises(ValueError, match="k >= 2"):
        upcycle(base, {"only": make_expert(base, 1)})
    from tests.conftest import tiny_gpt2

    with pytest.raises(ValueError, match="'other'.*GPT2Model"):
        upcycle(tiny_bert(), {"a": make_expert(base, 1), "other": tiny_gpt2()})
    wide = BertModel(
        BertConfig(hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=101)
    )
    with pytest.raises(ValueError, match=r"expert 'wide'.*shape mismatch.*intermediate.dense.weight \(96, 32\)"):
        upcycle(tiny_bert(), {"a": make_expert(base, 1), "wide": wide})
    fewer = BertModel(
        BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=101)
    )
    with pytest.raises(ValueError, match=r"expert 'short'.*missing keys: encoder.layer.1"):
        upcycle(tiny_bert(), {"a": make_expert(base, 1), "short": fewer})


def test_targets_patterns_and_errors():
    base = tiny_bert()
    assert pwemoe.find_targets(base) == [
        "encoder.layer.0.intermediate",
        "encoder.layer.0.output",
        "encoder.layer.1.intermediate",
        "encoder.layer.1.output",
    ]
    assert pwemoe.find_targets(base, include_attention=True)[0] == "encoder.layer.0.attention"
    assert pwemoe.find_targets(base, ["intermediate.dense"]) == [
        "encoder.layer.0.intermediate.dense",
        "encoder.layer.1.intermediate.dense",
    ]
    assert pwemoe.find_targets(base, r"encoder\.layer\.1\.intermediate") == ["encoder.layer.1.intermediate"]
    assert pwemoe.find_targets(base, ["re:.*layer\\.0\\.output\\.dense"]) == ["encoder.layer.0.output.dense"]
    with pytest.raises(ValueError, match="matched no module"):
        pwemoe.find_targets(base, ["intermediate", "does_not_exist"])
    with pytest.raises(ValueError, match="nest"):
        pwemoe.find_targets(base, ["intermediate", "intermediate.dense"])
    base.config.model_type = "mystery"
    with pytest.raises(ValueError, match="Known model types:.*bert.*targets="):
        pwemoe.find_targets(base)


def test_custom_targets_upcycle_and_attention(base_and_experts):
    base, experts = base_and_experts
    model = upcycle(base, experts, include_attention=True)
    names = [n for n, _ in ensembling_modules(model)]
    assert any("att" in n for n in names) and len(names) >= 4
    inputs = model_inputs(model)
    plain = merge_and_unload(model, [0.6, 0.2, 0.2])
    with pwemoe.preference(model, [0.6, 0.2, 0.2]):
        assert torch.allclose(_out(plain, inputs), _out(model, inputs), atol=1e-5)


def test_settings_by_name_or_as_one_options_object_build_the_same_model(base_and_experts):
    """upcycle(base, experts, init_lambda=...) is upcycle(base, experts, UpcycleOptions(init_lambda=...)); names
    given beside an options object replace its fields; an unknown name or a positional that is not the options
    object is refused with what is known."""
    import copy

    from pwemoe import UpcycleOptions

    base, experts = base_and_experts
    settings = dict(init_lambda=0.6, include_attention=True, router_hidden_layers=1)
    torch.manual_seed(0)  # routers are initialised on the CPU RNG: the same seed for both builds
    by_name = upcycle(copy.deepcopy(base), copy.deepcopy(experts), **settings)
    torch.manual_seed(0)
    options = UpcycleOptions(init_lambda=0.1, include_attention=True, router_hidden_layers=1)
    as_object = upcycle(copy.deepcopy(base), copy.deepcopy(experts), options, init_lambda=0.6)
    assert by_name.pwemoe_info == as_object.pwemoe_info and by_name.pwemoe_info.init_lambda == 0.6
    a, b = by_name.state_dict(), as_object.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    with pytest.raises(TypeError, match=r"unknown settings \['init_lamda'\]; known: .*'init_lambda'"):
        upcycle(base, experts, init_lamda=0.3)
    with pytest.raises(TypeError, match=r"options must be an UpcycleOptions, got list; give settings by name"):
        upcycle(base, experts, ["attention"])


def test_experts_stream_one_at_a_time(base_and_experts):
    """Experts given as loaders are loaded one at a time: each is freed before the next loads (the first one too,
    which upcycle loads first to tell dense from LoRA experts)."""
    import copy
    import gc
    import weakref

    base, experts = base_and_experts
    alive: list[weakref.ref] = []

    def loader(expert):
        def load():
            gc.collect()
            assert all(ref() is None for ref in alive), "an earlier expert is still held"
            e = copy.deepcopy(expert)
            alive.append(weakref.ref(e))
            return e

        return load

    upcycle(base, {name: loader(e) for name, e in experts.items()})
    assert len(alive) == len(experts)


def test_bf16_task_vectors_halve_storage(base_and_experts):
    base, experts = base_and_experts

    def tv_bytes(model):
        return sum(
            m.task_vector(p).numel() * m.task_vector(p).element_size()
            for _, m in ensembling_modules(model)
            for p in m.param_names
        )

    import copy

    fp32 = upcycle(copy.deepcopy(base), experts)
    bf16 = upcycle(base, experts, task_vector_dtype=torch.bfloat16)
    assert tv_bytes(bf16) * 2 == tv_bytes(fp32)
    inputs = model_inputs(base)
    r = [0.3, 0.3, 0.4]
    with pwemoe.preference(fp32, r), pwemoe.preference(bf16, r):
        a, b = _out(fp32, inputs), _out(bf16, inputs)
    assert torch.allclose(a, b, atol=5e-2) and not torch.equal(a, b)


def test_streamed_loading_from_directories(tmp_path):
    base = tiny_bert()
    paths = {}
    for i in range(2):
        e = make_expert(base, i + 1)
        e.save_pretrained(tmp_path / f"e{i}")
        paths[f"e{i}"] = str(tmp_path / f"e{i}")
    base.save_pretrained(tmp_path / "base")
    model = upcycle(str(tmp_path / "base"), paths)
    info = model.pwemoe_info
    assert info.base_id == str(tmp_path / "base") and info.expert_ids == paths
    assert set(info.hashes) == {"base", "e0", "e1"} and len(set(info.hashes.values())) == 3
    with pytest.raises(ValueError, match="is a file"):
        upcycle(str(tmp_path / "base" / "config.json"), paths)


def test_merge_into_reuses_one_plain_copy(base_and_experts):
    base, experts = base_and_experts
    model = upcycle(base, experts)
    inputs = model_inputs(model)
    plain = merge_and_unload(model, [1, 0, 0])
    for r in ([0.2, 0.3, 0.5], [0, 0, 1]):
        same = pwemoe.merge_into(model, plain, r)
        assert same is plain
        with pwemoe.preference(model, r):
            assert torch.allclose(_out(plain, inputs), _out(model, inputs), atol=1e-5)
