import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pwemoe.checkpoint import load_routers
from pwemoe.config import ConfigError, load_config
from pwemoe.configfile import build_config as config_from_dict
from pwemoe.objectives import EPO, epo_adjustments, epo_lp
from pwemoe.recipes.train import train


def _write(root: Path, cfg: dict, name: str) -> Path:
    p = root / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_ls_training_lowers_weighted_loss_and_writes_run(text_setup, tmp_path):
    root, base_cfg = text_setup
    cfg = {**base_cfg, "run_dir": str(tmp_path / "run"), "train": {**base_cfg["train"], "steps": 40}}
    run = train(_write(tmp_path, cfg, "ls"), [])
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 41))
    # The weighted loss on fixed data at fixed preferences, before and after training.
    from pwemoe import load_router_state_dict, set_preference, simplex_grid
    from pwemoe.workbench import Workbench

    torch.manual_seed(0)
    wb = Workbench(config_from_dict(cfg), load_test=False)

    def weighted_loss() -> float:
        parts = [(t, t.train_data[:96]) for t in wb.tasks]
        total = 0.0
        with torch.no_grad():
            for r in simplex_grid(2, 5):
                set_preference(wb.model, r)
                total += float((r * wb.losses(parts)).sum())
        return total

    before = weighted_loss()
    load_router_state_dict(wb.model, load_routers(run / "routers.safetensors")[0])
    after = weighted_loss()
    assert after < before * 0.9, (before, after)
    state, meta = load_routers(run / "routers.safetensors")
    assert meta["step"] == 40 and meta["task_names"] == ["polarity", "color"]
    assert set(meta["hashes"]) == {"base", "polarity", "color", "polarity:head", "color:head"}
    assert meta["targets"] and meta["init_lambda"] == 0.3 and meta["pwemoe_version"]
    assert all(".router." in k for k in state)
    assert (run / "routers.safetensors").stat().st_size < 50_000  # kilobytes: routers only
    assert load_config(run / "config.yaml").train.steps == 40


def _routers(run):
    return load_routers(Path(run) / "routers.safetensors")[0]


@pytest.mark.parametrize(
    "objective,pipeline",
    [
        ("ls", {"num_workers": 2, "micro_batch_size": 5}),  # worker processes prefetch ahead of the checkpoint
        # batches encoded in the training process; EPO's warm-up loss scales are state to resume
        ("epo", {"num_workers": 0, "objective_args": {"normalize": "initial", "warmup": 3}}),
    ],
)
def test_killed_and_resumed_run_equals_uninterrupted(text_setup, tmp_path, objective, pipeline):
    root, base_cfg = text_setup
    cfg = {
        **base_cfg,
        "train": {
            **base_cfg["train"],
            "steps": 12,
            "save_interval": 4,
            "objective": objective,
            "rays_per_step": 2,
            **pipeline,
        },
    }
    full = train(_write(tmp_path, {**cfg, "run_dir": str(tmp_path / "full")}, "full"), [])
    cfg_path = _write(tmp_path, {**cfg, "run_dir": str(tmp_path / "killed")}, "killed")
    # a real SIGKILL from the recipe's step callback, after the optimizer step of step 10
    script = tmp_path / "kill.py"
    script.write_text(
        "import os, signal\nfrom pwemoe.recipes.train import train\n"
        "def on_step(recipe, step):\n    if step == 10:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
        f"train({str(cfg_path)!r}, [], on_step=on_step)\n"
    )
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert res.returncode == -9, res.stderr[-2000:]  # SIGKILL at step 10, last checkpoint at step 8
    assert load_routers(tmp_path / "killed" / "routers.safetensors")[1]["step"] == 8
    train(None, [], resume=tmp_path / "killed")
    a, b = _routers(full), _routers(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m_full = (full / "metrics.jsonl").read_text().splitlines()
    m_res = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in m_res] == list(range(1, 13))
    assert [json.loads(x)["loss"] for x in m_res] == [json.loads(x)["loss"] for x in m_full]


def test_existing_run_dir_is_not_overwritten(text_setup, tmp_path):
    root, base_cfg = text_setup
    cfg = {**base_cfg, "run_dir": str(tmp_path / "r"), "train": {**base_cfg["train"], "steps": 2}}
    p = _write(tmp_path, cfg, "c")
    train(p, [])
    with pytest.raises(ValueError, match="--resume"):
        train(p, [])


def test_non_finite_loss_stops_with_step_and_task(text_setup, tmp_path):
    root, base_cfg = text_setup
    cfg = {
        **base_cfg,
        "run_dir": str(tmp_path / "nan"),
        "train": {**base_cfg["train"], "steps": 6, "lr": 1e30, "save_interval": 1},
    }
    from pwemoe.training import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match=r"at step \d+: loss is not finite for task") as e:
        train(_write(tmp_path, cfg, "nan"), [])
    assert "last good checkpoint" in str(e.value)
    state, meta = load_routers(tmp_path / "nan" / "routers.safetensors")
    assert all(torch.isfinite(v).all() for v in state.values())


def test_config_errors_are_all_reported_with_paths():
    bad = {
        "model": {"base": "x", "init_lambda": "high"},
        "tasks": [
            {"name": "a", "expert": "e", "data": {"path": "p"}, "colour": 1},
            {"name": "b", "expert": "e", "data": {"path": "p"}},
        ],
        "train": {"objective": "nope"},
    }
    with pytest.raises(ConfigError) as e:
        config_from_dict(bad)
    msg = str(e.value)
    assert "model.init_lambda: expected float" in msg
    assert "tasks[0].colour: unknown key" in msg
    assert "train.objective: unknown objective 'nope'" in msg
    assert len(e.value.errors) == 3


def test_data_errors_collected(text_setup, tmp_path):
    root, base_cfg = text_setup
    import copy

    cfg = copy.deepcopy(base_cfg)
    cfg["tasks"][0]["data"]["text_column"] = "sentence"
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("text,label\nred movie,7\nblue film,1\n")
    cfg["tasks"][1]["data"]["files"]["train"] = str(bad_csv)
    from pwemoe.workbench import Workbench

    with pytest.raises(ConfigError) as e:
        Workbench(config_from_dict(cfg), load_test=False)
    msg = str(e.value)
    assert "tasks[0].data: train split of task 'polarity' has no column 'sentence'" in msg
    assert "tasks[1].data.label_column" in msg and "[7]" in msg


def test_expert_count_must_match_tasks():
    with pytest.raises(ConfigError, match="at least 2 tasks"):
        config_from_dict({"model": {"base": "x"}, "tasks": [{"name": "a", "expert": "e", "data": {"path": "p"}}]})


# --- EPO against a direct reference ------------------------------------------------------------
def _reference_lp(c, A_ub, b_ub, k):
    """Maximise c.x over {x >= 0, sum x = 1, A_ub x <= b_ub} by enumerating vertices (k small)."""
    import itertools

    rows = [(-np.eye(k)[i], 0.0) for i in range(k)] + [(A_ub[i], b_ub[i]) for i in range(len(b_ub))]
    best, arg = -np.inf, None
    for act in itertools.combinations(range(len(rows)), k - 1):
        A = np.vstack([np.ones(k)] + [rows[i][0] for i in act])
        b = np.array([1.0] + [rows[i][1] for i in act])
        try:
            x = np.linalg.solve(A, b)
        except np.linalg.LinAlgError:
            continue
        if (x >= -1e-9).all() and all(r @ x <= bb + 1e-9 for r, bb in rows):
            if c @ x > best + 1e-12:
                best, arg = c @ x, x
    return arg, best


def _reference_epo(l, r, C, eps=1e-4):
    k = len(l)
    rl = r * l
    lh = rl / rl.sum()
    mu = np.sum(lh * np.log(lh * k))
    a = r * (np.log(lh * k) - mu)
    Ca = C @ a
    if mu > eps:
        rhs = Ca.copy()
        if (Ca > 0).any():
            rhs[Ca > 0] = -np.inf
            rhs[np.argmax(rl)] = 0
        else:
            rhs[:] = 0
        keep = np.isfinite(rhs)
        return ("bal",) + _reference_lp(Ca, -C[keep], -rhs[keep], k)
    A = np.vstack([-Ca[None], -C])
    b = np.concatenate([[-min(Ca.max(), 0)], np.zeros(k)])
    return ("dom",) + _reference_lp(C.sum(0), A, b, k)


@pytest.mark.parametrize("seed", range(6))
def test_epo_matches_reference_lp(seed):
    rng = np.random.default_rng(seed)
    k = 3
    G = rng.normal(size=(k, 5))
    C = G @ G.T
    r = rng.dirichlet(np.ones(k))
    l_bal = rng.uniform(0.2, 2.0, size=k)  # generic losses: unbalanced -> balance LP
    l_dom = (1 / r) / np.sum(1 / r) * 3.0  # r*l uniform -> mu = 0 -> descent LP
    for l, expected_move in ((l_bal, "bal"), (l_dom, "dom")):
        move_ref, x_ref, best = _reference_epo(l, r, C)
        alpha, move = epo_lp(l, r, C)
        assert move == move_ref == expected_move
        assert alpha is not None and abs(alpha.sum() - 1) < 1e-8
        obj = C @ epo_adjustments(l, r)[2] if move == "bal" else C.sum(0)
        assert abs(obj @ alpha - best) < 1e-6  # same optimum value (the argmax may not be unique)
        if x_ref is not None and np.linalg.matrix_rank(C) == k:
            assert np.allclose(alpha, x_ref, atol=1e-5)


def test_epo_objective_counts_fallbacks():
    epo = EPO()
    losses = torch.tensor([1.0, 2.0])
    G = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w = epo.weights(losses, torch.tensor([0.5, 0.5]), G)
    assert w.shape == (2,) and abs(float(w.sum()) - 2) < 1e-6 and epo.fallbacks == 0
    G_bad = torch.tensor([[float("nan"), 0.0], [0.0, 1.0]])
    w = epo.weights(losses, torch.tensor([0.25, 0.75]), G_bad)
    assert epo.fallbacks == 1 and torch.allclose(w, torch.tensor([0.5, 1.5]))
    assert epo.stats()["epo_fallbacks"] == 1


def test_tchebycheff_objectives():
    from pwemoe.objectives import SmoothTchebycheff, Tchebycheff

    L = torch.tensor([1.0, 3.0], requires_grad=True)
    r = torch.tensor([0.8, 0.2])
    assert float(Tchebycheff().loss(L, r).detach()) == pytest.approx(0.8)
    s = SmoothTchebycheff(mu=0.01).loss(L, r).detach()
    assert float(s) == pytest.approx(0.8, abs=0.01) and float(s) >= 0.8 - 1e-6


@pytest.mark.parametrize("objective,args", [("tchebycheff", {}), ("stch", {"mu": 0.5})])
def test_cli_train_other_objectives(text_setup, tmp_path, objective, args):
    from pwemoe.cli import main

    root, base_cfg = text_setup
    cfg = {
        **base_cfg,
        "run_dir": str(tmp_path / objective),
        "train": {**base_cfg["train"], "steps": 3, "objective": objective, "objective_args": args},
    }
    assert main(["train", str(_write(tmp_path, cfg, objective)), "train.lr=0.02"]) == 0
    state, meta = load_routers(tmp_path / objective / "routers.safetensors")
    assert meta["step"] == 3
    assert load_config(tmp_path / objective / "config.yaml").train.lr == 0.02


def test_cli_reports_config_errors(tmp_path, capsys):
    from pwemoe.cli import main

    p = tmp_path / "bad.yaml"
    p.write_text("model: {base: x}\ntasks: []\ntrain: {steps: 0, bogus: 1}\n")
    assert main(["train", str(p)]) == 2
    err = capsys.readouterr().err
    assert "train.bogus: unknown key" in err


def test_read_preferences_file(tmp_path):
    from pwemoe.recipes.evaluate import read_preferences

    p = tmp_path / "prefs.txt"
    p.write_text("# comment\n1,1\n0.2 0.8\n")
    assert [r.tolist() for r in read_preferences(p, 2)] == [[0.5, 0.5], [0.2, 0.8]]
    p.write_text("1,1\n0.2 0.8\n0.5,0.5\n2,8\n")  # the same preferences again, once normalised
    assert [r.tolist() for r in read_preferences(p, 2)] == [[0.5, 0.5], [0.2, 0.8]]
    p.write_text("1,1\n0.5,0.2,0.3\n")
    with pytest.raises(ValueError, match="line 2: preference must have length k=2"):
        read_preferences(p, 2)


def test_epo_normalisation_leaves_a_balanced_problem_unchanged():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(3, 20, generator=g)
    r = torch.tensor([0.5, 0.3, 0.2])
    for losses in (torch.tensor([0.7, 0.7, 0.7]), torch.tensor([0.2, 0.9, 0.5])):
        plain = EPO().weights(losses, r, G)
        # scales equal across tasks (the first call's losses when they are balanced, or any common scale)
        norm = EPO(normalize="initial", warmup=1)
        norm.weights(torch.full((3,), 1.3), r, G)  # the start: every task's loss 1.3
        assert torch.allclose(norm.weights(losses, r, G), plain, atol=1e-6)
    # unequal scales change the problem: the 5-class task's larger loss no longer dominates
    norm = EPO(normalize="initial", warmup=1)
    norm.weights(torch.tensor([0.7, 1.6, 1.1]), r, G)
    w = norm.weights(torch.tensor([0.7, 1.6, 1.1]), r, G)
    assert torch.isfinite(w).all() and not torch.allclose(w, EPO().weights(torch.tensor([0.7, 1.6, 1.1]), r, G))


def test_epo_floor_gives_finite_deterministic_weights_on_the_boundary():
    g = torch.Generator().manual_seed(1)
    G = torch.randn(3, 12, generator=g)
    losses = torch.tensor([0.4, 1.2, 0.9])
    for r in (torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.5, 0.5])):
        a, b = EPO(floor=0.05), EPO(floor=0.05)
        wa, wb = a.weights(losses, r, G), b.weights(losses, r, G)
        assert torch.isfinite(wa).all() and torch.equal(wa, wb) and a.fallbacks == 0
        assert float(wa.sum()) == pytest.approx(3.0) and (wa >= 0).all()
        assert a.effective_preference(r.double().numpy()).min() == pytest.approx(0.05)
    assert "below 1/k" in EPO(floor=0.4).check(3)
    with pytest.raises(ValueError, match="normalize"):
        EPO(normalize="expert")


def test_epo_normalisation_state_resumes(tmp_path):
    from pwemoe.checkpoint import load_state, save_state

    a = EPO(normalize="initial", warmup=3)
    G = torch.randn(2, 5, generator=torch.Generator().manual_seed(2))
    for v in ([0.5, 1.5], [0.7, 1.1]):
        a.weights(torch.tensor(v), torch.tensor([0.5, 0.5]), G)
    save_state(tmp_path / "state.pt", {"objective": a.state_dict()})  # through the trainer state's own file
    b = EPO(normalize="initial", warmup=3)
    b.load_state_dict(load_state(tmp_path / "state.pt")["objective"])
    x = torch.tensor([0.6, 1.2])
    assert torch.equal(a.weights(x, torch.tensor([0.3, 0.7]), G), b.weights(x, torch.tensor([0.3, 0.7]), G))
