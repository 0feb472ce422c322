"""LoRA experts never densified, SVD task vectors, and PEFT adapter export, against peft itself.

Tiny Llama and GPT-2 causal LMs built from configs; the adapters are written by peft in the test.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

import pwemoe
from pwemoe import save_lora_adapter
from pwemoe.core.factored import FactoredEnsemblingModule, truncated_svd
from pwemoe.lora import read_lora_adapter
from pwemoe.training import shared_merge, task_segments
from tests.conftest import tiny_llama

peft = pytest.importorskip("peft")

IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4], [3, 3, 8, 1, 0, 6, 2, 9]])


def tiny_gpt2_lm() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=48, n_positions=64)).eval()


# different ranks, targets, alphas and rsLoRA across experts: what pwemoe must read as peft does
LLAMA_ADAPTERS = [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
    dict(r=2, lora_alpha=5, target_modules=["q_proj", "down_proj"], use_rslora=True),
    dict(r=3, lora_alpha=3, target_modules=["v_proj", "gate_proj"], rank_pattern={"gate_proj": 5}),
]


def _write_adapters(base_dir, specs, root, **extra) -> dict[str, str]:
    out = {}
    for i, spec in enumerate(specs):
        torch.manual_seed(100 + i)
        cfg = peft.LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **spec, **extra)
        pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), cfg)
        with torch.no_grad():  # peft's random init of B is small: make the experts clearly different
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3)
        d = root / f"adapter_{i}"
        pm.save_pretrained(d)
        out[f"task_{i}"] = str(d)
    return out


@pytest.fixture(scope="module")
def llama_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base_dir = root / "base"
    tiny_llama().save_pretrained(base_dir)
    return base_dir, _write_adapters(base_dir, LLAMA_ADAPTERS, root)


def _upscale(base_dir, experts, seed=0, **kw):
    torch.manual_seed(seed)
    return pwemoe.upcycle(str(base_dir), experts, model_class=AutoModelForCausalLM, **kw)


def _peft_logits(base_dir, adapter) -> torch.Tensor:
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()
    with torch.no_grad():
        return pm(input_ids=IDS).logits


def _randomize_routers(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".router." in f".{n}":
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def test_reads_adapters_as_peft_scales_them(llama_setup):
    base_dir, adapters = llama_setup
    for i in range(len(LLAMA_ADAPTERS)):
        ad = read_lora_adapter(adapters[f"task_{i}"])
        pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapters[f"task_{i}"])
        theirs = {
            n.removeprefix("base_model.model."): m.scaling["default"]
            for n, m in pm.named_modules()
            if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling
        }
        assert set(ad.layers) == set(theirs)
        for n, layer in ad.layers.items():
            assert layer.scaling == pytest.approx(theirs[n])
    assert read_lora_adapter(adapters["task_2"]).ranks["model.layers.0.mlp.gate_proj"] == 5


def test_one_hot_reproduces_each_peft_adapter_and_nothing_is_densified(llama_setup):
    base_dir, adapters = llama_setup
    model = _upscale(base_dir, adapters)
    mods = list(pwemoe.ensembling_modules(model))
    assert mods and all(isinstance(m, FactoredEnsemblingModule) for _, m in mods)
    assert model.pwemoe_info.expert_format == "lora"
    # one router per attention / MLP block that an adapter touches (2 layers x 2 blocks)
    assert len(mods) == 4
    stored = sum(t.numel() for _, m in mods for t in m.stored_tensors() if t.is_floating_point())
    lora = sum(read_lora_adapter(a).num_parameters() for a in adapters.values())
    assert stored == lora + sum(m.factors(p).rank for _, m in mods for p in m.factored_paths)  # + one scale per column
    for i in range(3):
        with torch.no_grad(), pwemoe.fixed_lambda(model, torch.eye(3)[i]):
            ours = model(input_ids=IDS).logits
        torch.testing.assert_close(ours, _peft_logits(base_dir, adapters[f"task_{i}"]), rtol=1e-5, atol=1e-5)


def _dense_reference(base_dir, adapters, lam) -> torch.nn.Module:
    """W_0 + sum_i lam_i * delta_i with delta_i = s_i B_i A_i from peft's own get_delta_weight."""
    ref = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    sd = ref.state_dict()
    for i, path in enumerate(adapters.values()):
        pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), path)
        for n, m in pm.named_modules():
            if hasattr(m, "get_delta_weight") and "default" in getattr(m, "lora_A", {}):
                key = n.removeprefix("base_model.model.") + ".weight"
                sd[key] = sd[key] + float(lam[i]) * m.get_delta_weight("default").detach()
    ref.load_state_dict(sd)
    return ref


def test_factored_module_equals_dense_merge_of_the_adapters(llama_setup):
    base_dir, adapters = llama_setup
    model = _upscale(base_dir, adapters)
    lam = torch.tensor([0.7, -0.2, 0.45])
    with torch.no_grad(), pwemoe.fixed_lambda(model, lam):
        ours = model(input_ids=IDS).logits
        plain = pwemoe.merge_and_unload(model)(input_ids=IDS).logits
    ref = _dense_reference(base_dir, adapters, lam)
    with torch.no_grad():
        theirs = ref(input_ids=IDS).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, theirs, rtol=1e-5, atol=1e-5)


def test_exported_adapter_loads_in_peft_and_matches(llama_setup, tmp_path):
    base_dir, adapters = llama_setup
    model = _upscale(base_dir, adapters)
    _randomize_routers(model)
    r = torch.tensor([0.2, 0.5, 0.3])
    with torch.no_grad(), pwemoe.preference(model, r):
        ours = model(input_ids=IDS).logits
    out = save_lora_adapter(model, tmp_path / "export", r, base_model_name_or_path=str(base_dir))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == str(base_dir)
    theirs = _peft_logits(base_dir, out)  # plain peft, pwemoe not involved in the load
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    # the rank of each layer is the sum of the experts' ranks on it
    q0 = read_lora_adapter(out).ranks["model.layers.0.self_attn.q_proj"]
    assert q0 == 4 + 2
    assert read_lora_adapter(out).ranks["model.layers.0.mlp.gate_proj"] == 5
    # and the dense export equals it too
    dense = pwemoe.merge_and_unload(model, r)
    with torch.no_grad():
        torch.testing.assert_close(dense(input_ids=IDS).logits, ours, rtol=1e-5, atol=1e-5)


def _merged_experts(base_dir, adapters, root) -> dict[str, str]:
    out = {}
    for name, path in adapters.items():
        pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), path)
        d = root / f"dense_{name}"
        pm.merge_and_unload().save_pretrained(d)
        out[name] = str(d)
    return out


def test_router_gradients_factored_equal_dense(llama_setup, tmp_path):
    base_dir, adapters = llama_setup
    lora = _upscale(base_dir, adapters)
    dense = _upscale(base_dir, _merged_experts(base_dir, adapters, tmp_path), targets=lora.pwemoe_info.targets)
    assert not any(isinstance(m, FactoredEnsemblingModule) for _, m in pwemoe.ensembling_modules(dense))
    r = torch.tensor([0.5, 0.3, 0.2])
    grads = []
    for model in (lora, dense):
        _randomize_routers(model)
        pwemoe.set_preference(model, r)
        logits = model(input_ids=IDS).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 48), IDS[:, 1:].reshape(-1)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        assert all(g.abs().sum() > 0 for g in grads[-1].values())
        # only routers get gradients
        assert all(".router." in f".{n}" for n, p in model.named_parameters() if p.requires_grad)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6)


def test_shared_merge_and_task_segments_give_the_same_router_gradients(llama_setup):
    base_dir, adapters = llama_setup
    model = _upscale(base_dir, adapters)
    _randomize_routers(model)
    params = [p for p in model.parameters() if p.requires_grad]
    pwemoe.set_preference(model, torch.tensor([0.2, 0.3, 0.5]))

    def loss_rows(rows):
        logits = model(input_ids=IDS[rows]).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 48), IDS[rows, 1:].reshape(-1))

    # reference: plain autograd, one task (row) at a time
    ref = []
    for i in range(2):
        ref.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_rows([i]), params)]))
    # shared merge: two forwards, one backward each, summed through the router once
    with shared_merge(model) as merge:
        for i in range(2):
            loss_rows([i]).backward()
        merge.backward()
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in params]), ref[0] + ref[1])
    # task segments: one forward over both rows, per-task rows of G
    with shared_merge(model) as merge, task_segments(model, [1, 1, 0]):
        logits = model(input_ids=IDS).logits
        per = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, 48), IDS[:, 1:].reshape(-1), reduction="none"
        ).view(2, -1)
        per.mean(1).sum().backward()
        G = merge.task_router_grads(params, 3)
    torch.testing.assert_close(G[0], ref[0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(G[1], ref[1], rtol=1e-4, atol=1e-7)
    assert G[2].abs().sum() == 0


@pytest.fixture(scope="module")
def dense_llama_experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    out = {}
    for i in range(2):
        e = copy.deepcopy(base)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in e.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        e.save_pretrained(root / f"e{i}")
        out[f"task_{i}"] = str(root / f"e{i}")
    return root / "base", out


def test_svd_task_vectors_at_full_rank_equal_the_dense_path(dense_llama_experts):
    base_dir, experts = dense_llama_experts
    dense = _upscale(base_dir, experts)
    full = _upscale(base_dir, experts, task_vector_rank=48)
    low = _upscale(base_dir, experts, task_vector_rank=2)
    assert full.pwemoe_info.task_vector_rank == 48
    mods = dict(pwemoe.ensembling_modules(full))
    assert all(isinstance(m, FactoredEnsemblingModule) for m in mods.values())
    ranks = {m.factors(p).ranks(2)[0] for m in mods.values() for p in m.factored_paths}
    assert ranks == {32}  # min(out, in) of every MLP matrix
    for model in (dense, full, low):
        _randomize_routers(model)
    r = torch.tensor([0.3, 0.7])
    outs = []
    for m in (dense, full, low):
        pwemoe.set_preference(m, r)
        with torch.no_grad():
            outs.append(m(input_ids=IDS).logits)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    assert (outs[2] - outs[0]).abs().max() > 1e-3  # rank 2 is an approximation, and a visible one
    # the memory of the factored model grows with the rank
    size = lambda m: sum(t.numel() for _, e in pwemoe.ensembling_modules(m) for t in e.stored_tensors())  # noqa: E731
    assert size(low) < size(full) / 8


def test_truncated_svd_energy_and_rank():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(20, 20, generator=g))
    v, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    s = torch.tensor([10.0, 5.0, 1.0] + [0.01] * 9)
    tau = u[:, :12] @ torch.diag(s) @ v.t()
    B, A = truncated_svd(tau, energy=0.99)
    assert A.shape == (2, 12) and B.shape == (20, 2)  # 100 + 25 = 125 of 126.0009 kept
    B, A = truncated_svd(tau, rank=3)
    assert (B @ A - tau).norm() < 0.05
    B, A = truncated_svd(tau, rank=100)
    torch.testing.assert_close(B @ A, tau, rtol=1e-4, atol=1e-5)


def test_gpt2_conv1d_lora_reproduces_peft_and_exports(tmp_path):
    base_dir = tmp_path / "gpt2"
    tiny_gpt2_lm().save_pretrained(base_dir)
    specs = [
        dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
        dict(r=3, lora_alpha=3, target_modules=["c_proj"], fan_in_fan_out=True),
    ]
    adapters = _write_adapters(base_dir, specs, tmp_path)
    model = _upscale(base_dir, adapters)
    for i in range(2):
        with torch.no_grad(), pwemoe.fixed_lambda(model, torch.eye(2)[i]):
            ours = model(input_ids=IDS).logits
        torch.testing.assert_close(ours, _peft_logits(base_dir, adapters[f"task_{i}"]), rtol=1e-5, atol=1e-5)
    _randomize_routers(model)
    r = torch.tensor([0.6, 0.4])
    with torch.no_grad(), pwemoe.preference(model, r):
        ours = model(input_ids=IDS).logits
    out = save_lora_adapter(model, tmp_path / "export", r, base_model_name_or_path=str(base_dir))
    torch.testing.assert_close(_peft_logits(base_dir, out), ours, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(pwemoe.merge_and_unload(model, r)(input_ids=IDS).logits, ours, rtol=1e-5, atol=1e-5)


# --- bad input ------------------------------------------------------------------------------------
def _edit_config(path, **changes):
    p = path / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


def test_bad_adapters_are_refused_by_name(llama_setup, tmp_path):
    import shutil

    base_dir, adapters = llama_setup
    # DoRA
    dora = tmp_path / "dora"
    shutil.copytree(adapters["task_0"], dora)
    _edit_config(dora, use_dora=True)
    with pytest.raises(ValueError, match=r"expert 'a'.*use_dora=True.*DoRA.*train the adapter without it"):
        _upscale(base_dir, {"a": str(dora), "b": adapters["task_1"]})
    # another base by name
    other = tmp_path / "other"
    shutil.copytree(adapters["task_0"], other)
    _edit_config(other, base_model_name_or_path="org/another-model")
    with pytest.raises(ValueError, match=r"expert 'a'.*org/another-model.*the base is"):
        _upscale(base_dir, {"a": str(other), "b": adapters["task_1"]}, base_names=[str(base_dir)])
    # another base by shape
    big = tmp_path / "big_base"
    cfg = tiny_llama().config
    cfg.hidden_size, cfg.intermediate_size = 64, 96
    LlamaForCausalLM(cfg).save_pretrained(big)
    big_adapter = _write_adapters(big, LLAMA_ADAPTERS[:1], tmp_path / "bigad")["task_0"]
    with pytest.raises(ValueError, match=r"expert 'a'.*model.layers.0.self_attn.q_proj.*another size"):
        _upscale(base_dir, {"a": big_adapter, "b": adapters["task_1"]})
    # a LoRA layer on a module the model does not have
    from safetensors.torch import load_file, save_file

    missing = tmp_path / "missing"
    shutil.copytree(adapters["task_1"], missing)
    sd = load_file(str(missing / "adapter_model.safetensors"))
    sd = {k.replace("layers.1.", "layers.7."): v for k, v in sd.items()}
    save_file(sd, str(missing / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"expert 'b'.*layers.7.*does not have"):
        _upscale(base_dir, {"a": adapters["task_0"], "b": str(missing)})
    # LoRA and full experts mixed
    with pytest.raises(ValueError, match="one form"):
        _upscale(base_dir, {"a": adapters["task_0"], "b": str(base_dir)})
    # task_vector_rank on LoRA experts
    with pytest.raises(ValueError, match="task_vector_rank"):
        _upscale(base_dir, {"a": adapters["task_0"], "b": adapters["task_1"]}, task_vector_rank=4)
    with pytest.raises(ValueError, match="task_vector_rank"):
        _upscale(base_dir, {"a": adapters["task_0"], "b": adapters["task_1"]}, task_vector_rank=0)


def test_adapter_export_refused_for_dense_changes(dense_llama_experts, tmp_path):
    base_dir, experts = dense_llama_experts
    model = _upscale(base_dir, experts, task_vector_rank=4)
    with pytest.raises(ValueError, match="plain model instead"):
        save_lora_adapter(model, tmp_path / "x")
