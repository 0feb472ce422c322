"""2-process CPU data-parallel training (gloo) under torchrun."""

import shutil
import subprocess
import sys

import torch
import yaml

from pwemoe.checkpoint import load_routers


def test_two_process_training_keeps_routers_identical(text_setup, tmp_path):
    root, base_cfg = text_setup
    train_cfg = {"steps": 6, "save_interval": 3, "objective": "epo", "objective_args": {"normalize": "initial"}}
    # device cpu: gloo, as it must be even on a machine with CUDA (NCCL cannot reduce CPU tensors)
    cfg = {**base_cfg, "device": "cpu", "run_dir": str(tmp_path / "ddp"), "train": {**base_cfg["train"], **train_cfg}}
    p = tmp_path / "ddp.yaml"
    p.write_text(yaml.safe_dump(cfg))
    dump = tmp_path / "ranks"
    dump.mkdir()
    script = tmp_path / "ddp_train.py"
    script.write_text(  # each rank dumps its in-memory routers after the run, from the recipe's callback
        "from safetensors.torch import save_file\nfrom pwemoe import router_state_dict\n"
        "from pwemoe.recipes.train import train\n"
        "def on_step(recipe, step):\n    if step == recipe.cfg.train.steps:\n"
        f"        out = {str(dump)!r} + f'/memory_rank{{recipe.rank}}.safetensors'\n"
        "        save_file(router_state_dict(recipe.model), out)\n"
        f"train({str(p)!r}, [], on_step=on_step)\n"
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533"]
    res = subprocess.run(torchrun + [str(script)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    from safetensors.torch import load_file

    mem = [load_file(dump / f"memory_rank{r}.safetensors") for r in range(2)]
    assert mem[0].keys() == mem[1].keys() and all(torch.equal(mem[0][k], mem[1][k]) for k in mem[0])
    saved, meta = load_routers(tmp_path / "ddp" / "routers.safetensors")
    assert all(torch.equal(saved[k], mem[0][k]) for k in saved)
    # written once: one metrics line per step, one config, no stray temporary files
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6
    assert sorted(x.name for x in (tmp_path / "ddp").iterdir() if x.name != ".pwemoe.lock.flock") == [
        "config.yaml",
        "metrics.jsonl",
        "pwemoe_run.json",
        "routers.safetensors",
        "trainer_state.pt",
    ]
    st = torch.load(tmp_path / "ddp" / "trainer_state.pt", weights_only=True)
    assert st["world_size"] == 2 and len(st["ranks"]) == 2
    assert st["ranks"][0]["sampler"]["rng"].tolist() != st["ranks"][1]["sampler"]["rng"].tolist()
    # each rank's own EPO warm-up loss scales (from its own batches), not rank 0's for both
    scales = [st["ranks"][r]["objective"]["scale_sum"] for r in range(2)]
    assert all(len(x) == 2 for x in scales) and scales[0] != scales[1]
    shutil.rmtree(dump)
