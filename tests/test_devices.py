"""Devices, precision, micro-batching, gradient checkpointing and multi-rank evaluation.

CPU CI runs everything except the `cuda`-marked tests; benchmarks/gpu_check.sh runs those on a GPU.
They use no `datasets` (absent on the GPU machine): tiny models from configs and the core API.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import yaml

import pwemoe
from pwemoe.config import ConfigError
from pwemoe.devices import resolve_device
from pwemoe.objectives import EPO, LinearScalarization, Tchebycheff
from pwemoe.recipes.train import train
from pwemoe.training import accumulate_router_gradients, forward_groups
from tests.conftest import make_expert, tiny_clip_vision, tiny_gpt2

cuda = pytest.mark.cuda
DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]


@dataclass
class Part:
    """A forward of tiny-model inputs: segments [(task, n)] as ForwardBatch has them."""

    x: torch.Tensor
    segments: list[tuple[int, int]]


def _upcycled(builder, k: int = 3, device: str = "cpu", **kw) -> torch.nn.Module:
    base = builder()
    experts = {f"t{i}": make_expert(base, seed=i + 1) for i in range(k)}
    return pwemoe.upcycle(base, experts, device=device, **kw)


def _loss_fn(model, heads, key: str):
    def f(part: Part) -> torch.Tensor:
        out = model(**{key: part.x}).last_hidden_state.mean(1)
        sums, lo = [], 0
        for i, n in part.segments:
            sums.append(((out[lo : lo + n] @ heads[i]) ** 2).sum())
            lo += n
        return torch.stack(sums)

    return f


def _data(arch: str, k: int, n: int, device: str) -> tuple[list[torch.Tensor], str]:
    g = torch.Generator().manual_seed(5)
    if arch == "clip":
        return [torch.randn(n, 3, 32, 32, generator=g).to(device) for _ in range(k)], "pixel_values"
    return [torch.randint(0, 101, (n, 7), generator=g).to(device) for _ in range(k)], "input_ids"


def _router_grads(model, objective, parts_per_ray, loss_fn, rays):
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    losses, _ = accumulate_router_gradients(model, params, objective, rays, parts_per_ray, loss_fn)
    return torch.cat([p.grad.reshape(-1) for p in params]).cpu(), losses


def _groups(xs: list[torch.Tensor], micro: int | None, split: bool) -> list[Part]:
    parts = [(i, list(range(len(x)))) for i, x in enumerate(xs)]
    return [
        Part(torch.cat([xs[i][ix] for i, ix in g]), [(i, len(ix)) for i, ix in g])
        for g in forward_groups(parts, micro, split)
    ]


def test_forward_groups_split_examples_not_tasks_order():
    parts = [(0, [0, 1, 2]), (1, [3, 4]), (2, [5, 6, 7, 8])]
    assert forward_groups(parts, None, False) == [[(0, [0, 1, 2]), (1, [3, 4]), (2, [5, 6, 7, 8])]]
    assert forward_groups(parts, 4, False) == [[(0, [0, 1, 2]), (1, [3])], [(1, [4]), (2, [5, 6, 7])], [(2, [8])]]
    assert forward_groups(parts, None, True) == [[(0, [0, 1, 2])], [(1, [3, 4])], [(2, [5, 6, 7, 8])]]
    assert forward_groups(parts, 2, True) == [[(0, [0, 1])], [(0, [2])], [(1, [3, 4])], [(2, [5, 6])], [(2, [7, 8])]]


@pytest.mark.parametrize("objective", [LinearScalarization(), EPO(), Tchebycheff()], ids=["ls", "epo", "tch"])
@pytest.mark.parametrize("device", DEVICES)
def test_micro_batches_give_the_same_router_gradient(objective, device):
    """Forwards of 3, 5 or all examples sharing one merge: one gradient (fp32 summation order only)."""
    if objective.needs_task_gradients:
        pytest.importorskip("scipy")  # EPO's LP (the GPU machine may lack scipy)
    torch.manual_seed(0)
    model = _upcycled(tiny_gpt2, device=device)
    heads = [torch.randn(32, 4, generator=torch.Generator().manual_seed(i)).to(device) for i in range(3)]
    xs, key = _data("gpt2", 3, 8, device)
    rays = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]], device=device)
    f = _loss_fn(model, heads, key)
    split = objective.needs_task_gradients
    ref, ref_losses = _router_grads(model, objective, [_groups(xs, None, split)] * 2, f, rays)
    assert ref.abs().sum() > 0
    for micro in (3, 5):
        g, losses = _router_grads(model, objective, [_groups(xs, micro, split)] * 2, f, rays)
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-7)


def test_shared_merge_gradient_equals_plain_autograd():
    """Leaves + one merge backward == backprop through the merge at every forward."""
    model = _upcycled(tiny_clip_vision, k=2)
    params = [p for p in model.parameters() if p.requires_grad]
    x, _ = _data("clip", 1, 6, "cpu")
    pwemoe.set_preference(model, [0.3, 0.7])
    loss = model(pixel_values=x[0]).pooler_output.pow(2).sum()
    plain = torch.autograd.grad(loss, params)
    with pwemoe.shared_merge(model) as merge:
        for xi in x[0].split(2):
            model(pixel_values=xi).pooler_output.pow(2).sum().backward()
        assert all(p.grad is None for p in params)  # gradients stop at the merged weights ...
        merge.backward()  # ... until they are carried through the merge once
    for a, b in zip(plain, [p.grad for p in params]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("scope", ["layers", "upcycled"])
@pytest.mark.parametrize("arch", ["clip", "gpt2"])
@pytest.mark.parametrize("objective", [LinearScalarization(), EPO()], ids=["ls", "epo"])
@pytest.mark.parametrize("device", DEVICES)
def test_gradient_checkpointing_keeps_router_gradients(arch, objective, device, scope):
    """Recomputed activations, same router gradient: rtol 1e-5 (the recompute is the same fp32 arithmetic)."""
    if objective.needs_task_gradients:
        pytest.importorskip("scipy")
    builder = tiny_clip_vision if arch == "clip" else tiny_gpt2
    model = _upcycled(builder, device=device)
    heads = [torch.randn(32, 4, generator=torch.Generator().manual_seed(i)).to(device) for i in range(3)]
    xs, key = _data(arch, 3, 4, device)
    rays = torch.tensor([[0.2, 0.5, 0.3]], device=device)
    f = _loss_fn(model, heads, key)
    parts = [_groups(xs, 5, objective.needs_task_gradients)]
    ref, _ = _router_grads(model, objective, parts, f, rays)
    n = pwemoe.gradient_checkpointing(model, scope=scope)
    assert n == 2  # both transformer layers, or both upcycled MLPs, wrapped
    calls = []  # the recompute must really happen: an upcycled MLP's layer runs twice per forward
    mlp = next(m for _, m in pwemoe.ensembling_modules(model)).base_layer
    h = mlp.register_forward_pre_hook(lambda *a: calls.append(1))  # (the replay may stop early, before a post-hook)
    g, _ = _router_grads(model, objective, parts, f, rays)
    h.remove()
    assert len(calls) == 2 * len(parts[0]), (len(calls), len(parts[0]))
    torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-8)
    assert pwemoe.gradient_checkpointing(model, enable=False) == 2
    calls.clear()
    h = mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    g2, _ = _router_grads(model, objective, parts, f, rays)
    h.remove()
    assert len(calls) == len(parts[0])  # unwrapped: no recompute
    torch.testing.assert_close(g2, ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("scope", ["layers", "upcycled"])
def test_checkpointed_models_copy_export_and_pickle_as_themselves(scope, tmp_path):
    """The checkpoint wrapper holds its module, not a closure over it: a deepcopy runs its own layers
    and routers, a merge_and_unload copy is plain (no wrapper) and equals the upcycled model at r, and
    the model pickles after a forward. (A closure once made every plain copy of a `layers`-checkpointed
    model run the original's layers, so training validation scored one preference at every point.)"""
    model = _upcycled(tiny_clip_vision, k=2)
    pwemoe.gradient_checkpointing(model, scope=scope)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def out(m: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return m(pixel_values=x).last_hidden_state

    plain = pwemoe.merge_and_unload(model, [1.0, 0.0])
    assert not any("forward" in m.__dict__ for m in plain.modules())
    for r in ([1.0, 0.0], [0.0, 1.0]):
        pwemoe.merge_into(model, plain, r)
        with pwemoe.preference(model, r):
            assert torch.equal(out(plain), out(model))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            if p.requires_grad:
                p.add_(0.5)  # the copy's routers only
    pwemoe.set_preference(model, [0.5, 0.5])
    pwemoe.set_preference(twin, [0.5, 0.5])
    assert not torch.allclose(out(twin), out(model))
    torch.save(model, tmp_path / "model.pt")  # after a forward: the slot cache must not be pickled
    again = torch.load(tmp_path / "model.pt", weights_only=False)  # our own file, written just above
    assert torch.equal(out(again), out(model))


@pytest.mark.parametrize("device", DEVICES)
def test_upscale_builds_everything_on_the_device(device):
    model = _upcycled(tiny_clip_vision, device=device, task_vector_dtype=torch.bfloat16)
    want = torch.device(device).type
    assert {p.device.type for p in model.parameters()} == {want}
    assert {b.device.type for b in model.buffers()} == {want}
    for _, m in pwemoe.ensembling_modules(model):
        assert m.task_vector(m.param_names[0]).dtype == torch.bfloat16
        assert next(m.router.parameters()).dtype == torch.float32  # routers stay fp32


def test_cuda_requested_without_cuda_is_a_config_error(text_setup, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _, base_cfg = text_setup
    from pwemoe.configfile import build_config
    from pwemoe.workbench import Workbench

    with pytest.raises(ConfigError, match=r"device: 'cuda' requested but CUDA is not available.*device=cpu"):
        Workbench(build_config({**base_cfg, "device": "cuda"}))
    with pytest.raises(ValueError, match="cuda:3"):
        resolve_device("cuda:3")
    with pytest.raises(ConfigError) as e:  # malformed settings: all reported at once, with the choices
        build_config({**base_cfg, "device": "gpu", "precision": "half"})
    assert "device: must be auto | cpu | cuda | cuda:N, got 'gpu'" in str(e.value)
    assert "precision: must be one of fp32, bf16, fp16, got 'half'" in str(e.value)
    assert resolve_device("auto") == torch.device("cpu")
    for value in (True, False, "layers", "upcycled"):  # true means layers, as before
        cfg = build_config({**base_cfg, "train": {**base_cfg.get("train", {}), "gradient_checkpointing": value}})
        assert cfg.train.gradient_checkpointing == value
    with pytest.raises(ConfigError, match="gradient_checkpointing: must be one of layers, upcycled, got 'mlp'"):
        build_config({**base_cfg, "train": {**base_cfg.get("train", {}), "gradient_checkpointing": "mlp"}})


def test_one_named_gpu_for_several_launched_processes_is_an_error(monkeypatch):
    """cuda:N under a multi-process launch would put every rank on the same GPU: refused by the
    setting's form, before any hardware is probed (so it is tested on any machine)."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"device: 'cuda:1' names one GPU, but 2 processes .* device=cuda"):
        resolve_device("cuda:1")
    assert resolve_device("cpu") == torch.device("cpu")


def test_bf16_run_on_the_configured_device_end_to_end(text_setup, tmp_path):
    """device=cpu, precision=bf16: train, evaluate and export; every tensor of a step on the device,
    and the forward really computed in bf16 (autocast), with fp32 routers and optimizer state."""
    _, base_cfg = text_setup
    cfg = {
        **base_cfg,
        "device": "cpu",
        "precision": "bf16",
        "run_dir": str(tmp_path / "run"),
        "train": {**base_cfg["train"], "steps": 4, "save_interval": 2, "micro_batch_size": 12},
    }
    path = tmp_path / "bf16.yaml"
    path.write_text(yaml.safe_dump(cfg))
    seen: dict[str, set] = {"inputs": set(), "linear_out": set(), "state": set()}

    def on_step(recipe, step):
        if step != 1:
            return
        dev = recipe.wb.device
        tensors = [*recipe.model.parameters(), *recipe.model.buffers()]
        for t in recipe.tasks:
            tensors += [*t.shell.parameters(), *t.shell.buffers()]
        seen["state"] = {x.device for x in tensors}
        assert all(p.dtype == torch.float32 for p in recipe.params)
        assert all(v.dtype == torch.float32 for s in recipe.opt.state.values() for v in s.values() if v.dim())
        # one more forward, watched: inputs and a Linear's output
        hooks = [
            recipe.model.register_forward_pre_hook(
                lambda m, a, kw: seen["inputs"].update(v.device for v in kw.values() if torch.is_tensor(v)),
                with_kwargs=True,
            ),
            next(m for m in recipe.model.modules() if isinstance(m, torch.nn.Linear)).register_forward_hook(
                lambda m, a, out: seen["linear_out"].add(out.dtype)
            ),
        ]
        batch = next(recipe.batches()).rays[0][0]
        recipe.wb.segment_losses(batch)
        for h in hooks:
            h.remove()
        assert dev == torch.device("cpu")

    run = train(path, [], on_step=on_step)
    assert seen["state"] == {torch.device("cpu")} and seen["inputs"] == {torch.device("cpu")}
    assert seen["linear_out"] == {torch.bfloat16}
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in lines)
    from pwemoe.recipes.evaluate import evaluate_run
    from pwemoe.runs import export_run

    summary = evaluate_run(run, grid=2, baselines=False, max_test_samples=20)
    assert summary["preferences"] == 2
    out = export_run(run, "0.5,0.5", tmp_path / "export")
    assert json.loads((out / "pwemoe.json").read_text())["preference"] == {"polarity": 0.5, "color": 0.5}


def test_two_launched_ranks_wait_for_each_other_with_every_device_setting(tmp_path):
    """pwemoe's barrier holds rank 1 until rank 0 arrives for every `device` setting a CPU run may carry (accelerate's
    own is a no-op for `auto` on a machine without CUDA), and both ranks exit cleanly."""
    script = tmp_path / "w.py"
    script.write_text(
        "import sys, time\n"
        "from pathlib import Path\n"
        "import torch\n"
        "from pwemoe.devices import join_launch, rank_and_world, wait_for_everyone\n"
        "join_launch(sys.argv[1])\n"
        "rank, world = rank_and_world()\n"
        "assert world == 2, world\n"
        "flag = Path(sys.argv[2])\n"
        "if rank == 0:\n"
        "    time.sleep(1.5)\n"
        "    flag.write_text('here')\n"
        "wait_for_everyone()\n"
        "Path(f'{flag}.rank{rank}').write_text(str(flag.exists()))\n"  # a file each: the ranks share one stdout
    )
    settings = ["cpu"] + (["auto"] if not torch.cuda.is_available() else [])
    for i, device in enumerate(settings):
        flag = tmp_path / f"flag{i}"
        res = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29543"]
            + [str(script), device, str(flag)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        saw = [(tmp_path / f"flag{i}.rank{rank}").read_text() for rank in (0, 1)]
        assert saw == ["True", "True"], (device, saw)  # rank 1 left the barrier after rank 0 wrote the flag


def test_two_rank_evaluation_writes_the_rows_of_one_process(text_setup, tmp_path):
    _, base_cfg = text_setup
    cfg = {**base_cfg, "run_dir": str(tmp_path / "run"), "train": {**base_cfg["train"], "steps": 3}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = train(path, [])
    import shutil

    shutil.copytree(run, tmp_path / "run2")
    from pwemoe.recipes.evaluate import evaluate_run

    evaluate_run(run, grid=3, max_test_samples=30)  # one process
    script = tmp_path / "ev.py"
    script.write_text(
        "from pwemoe.recipes.evaluate import evaluate_run\n"
        f"evaluate_run({str(tmp_path / 'run2')!r}, grid=3, max_test_samples=30)\n"
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541"]
    res = subprocess.run(torchrun + [str(script)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]

    def rows(d):
        return sorted(
            (json.dumps([r["method"], r["preference"], r["param"], r["inputs"]]), r["accuracy"])
            for r in json.loads((d / "results.json").read_text())
        )

    one, two = rows(run), rows(tmp_path / "run2")
    assert [a for a, _ in one] == [a for a, _ in two] and len(one) >= 3 + 2 + 10 + 1 + 2
    for (_, x), (_, y) in zip(one, two):
        assert x.keys() == y.keys() and all(abs(x[t] - y[t]) < 1e-9 for t in x)
    # re-running on two ranks computes nothing: every row is reused
    res = subprocess.run(torchrun + [str(script)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "0 computed" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]


@cuda
def test_cuda_step_matches_cpu_step():
    """The same router gradient on the GPU as on the CPU (fp32, TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    grads = []
    for device in ("cpu", "cuda"):
        model = _upcycled(tiny_clip_vision, device=device)
        heads = [torch.randn(32, 4, generator=torch.Generator().manual_seed(i)).to(device) for i in range(3)]
        xs, key = _data("clip", 3, 4, device)
        rays = torch.tensor([[0.2, 0.5, 0.3]], device=device)
        g, _ = _router_grads(
            model, LinearScalarization(), [_groups(xs, None, False)], _loss_fn(model, heads, key), rays
        )
        grads.append(g)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-6)


@cuda
def test_cuda_upscale_streams_experts_within_theta0_plus_T():
    """GPU memory while upcycling: theta_0 + T + at most one expert parameter, never a whole expert."""
    base = tiny_clip_vision()
    src = copy.deepcopy(base)  # upcycle moves `base` itself to the GPU; experts come from a CPU copy
    experts = {f"t{i}": (lambda i=i: make_expert(src, seed=i + 1)) for i in range(4)}  # loaded on demand
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    model = pwemoe.upcycle(base, experts, device="cuda")
    held = torch.cuda.memory_allocated() - start
    peak = torch.cuda.max_memory_allocated() - start
    biggest = max(p.numel() * 4 for p in base.parameters())
    assert peak <= held + 2 * biggest + (1 << 20), (peak, held, biggest)
    assert {p.device.type for p in model.parameters()} == {"cuda"}


@pytest.mark.parametrize("arch", ["gpt2", "bert", "clip"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "ckpt"])
def test_epo_task_gradients_from_one_forward_across_tasks(arch, checkpointing):
    """EPO's per-task gradients from forwards across tasks (each task's rows on its own leaf view of the
    merge) equal those of one forward per task: attention and MLPs upcycled, padding masks split by rows."""
    pytest.importorskip("scipy")
    from tests.conftest import tiny_bert

    builder = {"gpt2": tiny_gpt2, "bert": tiny_bert, "clip": tiny_clip_vision}[arch]
    torch.manual_seed(0)
    model = _upcycled(builder, include_attention=True)
    if checkpointing:
        pwemoe.gradient_checkpointing(model)
    heads = [torch.randn(32, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    xs, key = _data("clip" if arch == "clip" else arch, 3, 6, "cpu")
    masks = [torch.ones(x.shape[0], x.shape[1], dtype=torch.long) for x in xs] if key == "input_ids" else None
    if masks:
        for m in masks:
            m[::2, -2:] = 0  # padded rows: the mask must follow its rows through the split

    @dataclass
    class MPart(Part):
        mask: torch.Tensor | None = None

    def groups(micro, split):
        parts = [(i, list(range(len(x)))) for i, x in enumerate(xs)]
        return [
            MPart(
                torch.cat([xs[i][ix] for i, ix in g]),
                [(i, len(ix)) for i, ix in g],
                torch.cat([masks[i][ix] for i, ix in g]) if masks else None,
            )
            for g in forward_groups(parts, micro, split)
        ]

    def f(part):
        kw = {key: part.x, **({"attention_mask": part.mask} if part.mask is not None else {})}
        out = model(**kw).last_hidden_state.mean(1)
        sums, lo = [], 0
        for i, n in part.segments:
            sums.append(((out[lo : lo + n] @ heads[i]) ** 2).sum())
            lo += n
        return torch.stack(sums)

    rays = torch.tensor([[0.2, 0.5, 0.3], [0.0, 0.4, 0.6]])
    ref, ref_losses = _router_grads(model, EPO(), [groups(None, True)] * 2, f, rays)
    assert ref.abs().sum() > 0
    for micro in (None, 5):
        g, losses = _router_grads(model, EPO(), [groups(micro, False)] * 2, f, rays)
        assert any(len(p.segments) > 1 for p in groups(micro, False))  # really across tasks
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-7)


def test_numerics_description_names_the_cpu_its_kernels_and_the_kernel_variables(monkeypatch):
    """What the demos print beside their tables: the CPU, ATen's kernel level, the threads, and each variable of
    NUMERICS_ENV that is set (and none that is not)."""
    from pwemoe.devices import NUMERICS_ENV, cpu_name, numerics_description

    for k in NUMERICS_ENV:
        monkeypatch.delenv(k, raising=False)
    cpu = torch.device("cpu")
    plain = numerics_description(cpu)
    assert plain.startswith(cpu_name()) and torch.backends.cpu.get_cpu_capability() in plain
    assert f"{torch.get_num_threads()} thread" in plain and not any(k in plain for k in NUMERICS_ENV)
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    assert numerics_description(cpu).endswith("; MKL_CBWR=COMPATIBLE)")
