"""`pwemoe select`: the query language, the exact binomial bound, the search and its certificate, on synthetic
per-example values (closed forms) and on a tiny trained run (CLI, Python API, HTTP)."""

from __future__ import annotations

import json
from math import comb
from pathlib import Path

import numpy as np
import pytest
import yaml

from pwemoe.intervals import binomial_bound
from pwemoe.selection import Metric, assess, certification_split, parse_query, search
from pwemoe.selection.certificate import fallback
from pwemoe.selection.search import best

ACC, LOSS = Metric("accuracy", True), Metric("loss", False)


# --- the exact binomial bound against closed forms --------------------------------------------------
def _tail_ge(n: int, x: int, p: float) -> float:
    return sum(comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(x, n + 1))


def _solve(f, target: float) -> float:
    """The p in (0, 1) with f(p) = target, f increasing (bisection; no scipy)."""
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return (lo + hi) / 2


def test_binomial_bound_is_the_exact_clopper_pearson_bound():
    # all correct: P(X >= n | p) = p^n = 0.05 gives p = 0.05^(1/n); none correct: the mirror image
    assert binomial_bound(20, 20, 0.95, "lower") == pytest.approx(0.05 ** (1 / 20), abs=1e-12)
    assert binomial_bound(0, 20, 0.95, "upper") == pytest.approx(1 - 0.05 ** (1 / 20), abs=1e-12)
    assert binomial_bound(0, 20, 0.95, "lower") == 0.0 and binomial_bound(20, 20, 0.95, "upper") == 1.0
    # 14 of 20: the lower bound L solves P(Binomial(20, L) >= 14) = 0.05, the upper U P(Binomial(20, U) <= 14) = 0.05
    lower = _solve(lambda p: _tail_ge(20, 14, p), 0.05)
    upper = _solve(lambda p: _tail_ge(20, 15, p), 0.95)  # P(X <= 14) = 0.05
    assert binomial_bound(14, 20, 0.95, "lower") == pytest.approx(lower, abs=1e-9)
    assert binomial_bound(14, 20, 0.95, "upper") == pytest.approx(upper, abs=1e-9)
    with pytest.raises(ValueError, match="successes"):
        binomial_bound(21, 20, 0.95, "lower")


def test_certificate_of_an_accuracy_threshold_is_the_binomial_bound():
    # a constructed certification part: 14 of its 20 examples correct (the other 20 examples, the search
    # part, all wrong: they must not count)
    q = parse_query({"a": ACC, "b": ACC}, maximize="b", require=["a >= 0.5", "a >= 0.55"])
    a = np.zeros(40, dtype=bool)
    a[20:34] = True
    part = {"a": np.arange(20, 40), "b": np.arange(20, 40)}
    got = assess(q, {"a": a, "b": np.ones(40, bool)}, {}, part, 0.9, 1000, 0)
    lower = _solve(lambda p: _tail_ge(20, 14, p), 0.1)  # = 0.5291
    assert got["values"]["a"] == pytest.approx(0.7) and got["objective"] == 1.0
    for row, threshold in zip(got["constraints"], (0.5, 0.55)):
        assert row["bound"] == pytest.approx(lower, abs=1e-9) and row["estimate"] == pytest.approx(0.7)
        assert row["met"] == (lower >= threshold) and row["shortfall"] == pytest.approx(max(0, threshold - lower))
    assert got["constraints"][0]["met"] and not got["constraints"][1]["met"] and not got["met"]


# --- the query language -----------------------------------------------------------------------------
def test_query_forms_and_every_error_at_once():
    metrics = {"rt": ACC, "bbc": ACC, "lm": LOSS}
    q = parse_query(metrics, maximize="bbc", require=["rt >= 95% expert", "rt>=expert - 0.02", "lm <= 1.1 expert"])
    kinds = [(c.task, c.op, c.kind, c.value) for c in q.constraints]
    assert kinds == [("rt", ">=", "share", 0.95), ("rt", ">=", "difference", -0.02), ("lm", "<=", "share", 1.1)]
    assert q.experts == ["rt", "lm"] and q.sense == "max"
    q = parse_query(metrics, minimize="lm", require=["rt ≥ 80%", "mean >= 0.9"])
    assert [(c.kind, c.value, c.binary) for c in q.constraints] == [("absolute", 0.8, True), ("mean", 0.9, False)]
    assert q.experts == ["rt", "bbc", "lm"]  # the mean share needs every expert

    bad = [
        "nope >= 0.5",  # unknown task
        "mean >= 0.9 expert",  # 'expert' where there is none
        "rt >= 1.5",  # an accuracy beyond [0, 1]
        "lm <= -1",  # a loss threshold below 0
        "rt <= 0.5",  # against the metric's direction
        "bbc > 0.5",  # not >= / <=
        "rt >= banana",
        "",
    ]
    with pytest.raises(ValueError) as e:
        parse_query(metrics, maximize="lm", require=bad)
    msg = str(e.value)
    assert "\n" not in msg  # one line
    for piece in ("'lm' measures loss", "'nope'", "'expert' needs a task", "[0, 1]", "must be > 0", "a minimum"):
        assert piece in msg, piece
    assert "'>'" in msg and "'banana'" in msg and "empty constraint" in msg
    with pytest.raises(ValueError, match="empty query"):
        parse_query(metrics, require=["rt >= 0.5"])


# --- the search and the certificate on synthetic per-example values -------------------------------------
class Synthetic:
    """k = 2 tasks whose per-example values depend on r like a real front: task a is right with probability
    0.5 + 0.45 r_a, task b with 0.5 + 0.45 r_b (fixed uniforms per example, so values are monotone in r);
    a loss task lm = base loss x noise x (1.5 - r_a). The experts: right with probability 0.95, loss = base loss."""

    def __init__(self, n: int = 400, seed: int = 0) -> None:
        g = np.random.default_rng(seed)
        self.u = {"a": g.random(n), "b": g.random(n)}
        self.base = g.gamma(4.0, 0.5, n)
        self.noise = g.lognormal(0.0, 0.2, n)
        self.n = n
        self.calls: list[list[list[float]]] = []

    def values(self, r: list[float]) -> dict[str, np.ndarray]:
        return {
            "a": self.u["a"] < 0.5 + 0.45 * r[0],
            "b": self.u["b"] < 0.5 + 0.45 * r[1],
            "lm": self.base * self.noise * (1.5 - r[0]),
        }

    def experts(self) -> dict[str, np.ndarray]:
        return {"a": self.u["a"] < 0.95, "b": self.u["b"] < 0.95, "lm": self.base}


def _run(q, syn: Synthetic, budget: int, m: int = 3, conf: float = 0.95):
    search_part, cert_part = certification_split({t: [0] * syn.n for t in ("a", "b", "lm")}, 0.5, seed=1)
    ex = {t: v for t, v in syn.experts().items() if t in q.experts}

    def score(prefs):
        syn.calls.append(prefs)
        return [assess(q, syn.values(p), ex, search_part, conf, 500, 0, margin=1.0) for p in prefs]

    return search(q, 2, m, budget, score), ex, cert_part


def test_search_refines_past_the_grid_within_the_budget():
    metrics = {"a": ACC, "b": ACC, "lm": LOSS}
    q = parse_query(metrics, maximize="a", require=["b >= 0.8"])
    syn = Synthetic()
    cands, ex, cert_part = _run(q, syn, budget=12)
    assert len(cands) == 12 == sum(len(c) for c in syn.calls)  # the budget, each candidate evaluated once
    assert len({tuple(c["preference"]) for c in cands}) == 12
    grid = [c for c in cands if c["round"] == 0]
    assert [c["preference"] for c in grid] == [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
    grid_best = max(c["search"]["objective"] for c in grid if c["search"]["met"])
    chosen = best(q, cands)
    assert chosen["search"]["met"] and chosen["round"] > 0
    assert chosen["search"]["objective"] > grid_best  # the refinement found a better feasible point
    assert chosen["search"]["objective"] == max(c["search"]["objective"] for c in cands if c["search"]["met"])
    # feasible on the search part: the estimate clears the constraint by twice the one-sided bound's width
    # (this part's, and the certification part's still to come, as wide with halves of equal size)
    for c in cands:
        row = c["search"]["constraints"][0]
        assert row["planned"] == pytest.approx(2 * row["bound"] - row["estimate"]) and row["bound"] <= row["estimate"]
        assert c["search"]["met"] == (row["planned"] >= 0.8)
    # the certificate: the exact binomial bound of the chosen r on the certification part
    cert = assess(q, syn.values(chosen["preference"]), ex, cert_part, 0.95, 500, 0)
    b = syn.values(chosen["preference"])["b"][cert_part["b"]]
    assert cert["constraints"][0]["bound"] == pytest.approx(binomial_bound(int(b.sum()), len(b), 0.95, "lower"))
    # deterministic: the same query again gives the same candidates and choice
    again, _, _ = _run(q, Synthetic(), budget=12)
    assert [c["preference"] for c in again] == [c["preference"] for c in cands]


def test_certified_choices_meet_the_true_constraint():
    # 30 synthetic data sets whose true values are known (b's accuracy is 0.5 + 0.45 r_b): the chosen point is
    # certified in most, and a certified point truly violating the constraint is rare (at most 1 - confidence
    # in expectation; the search's margin makes it rarer)
    q = parse_query({"a": ACC, "b": ACC, "lm": LOSS}, maximize="a", require=["b >= 0.8"])
    certified = violating = 0
    for seed in range(30):
        syn = Synthetic(seed=seed)
        cands, ex, cert_part = _run(q, syn, budget=12)
        chosen = best(q, cands)
        assert chosen["search"]["met"]
        ok = assess(q, syn.values(chosen["preference"]), ex, cert_part, 0.95, 500, 0)["met"]
        certified += ok
        violating += ok and 0.5 + 0.45 * chosen["preference"][1] < 0.8
    assert certified >= 24 and violating <= 3


def test_loss_constraints_take_upper_bounds_and_loss_objectives_are_minimised():
    metrics = {"a": ACC, "b": ACC, "lm": LOSS}
    q = parse_query(metrics, minimize="lm", require=["b >= 0.7"])
    cands, _, _ = _run(q, Synthetic(), budget=10)
    chosen = best(q, cands)
    feasible = [c for c in cands if c["search"]["met"]]
    assert chosen["search"]["objective"] == min(c["search"]["objective"] for c in feasible)
    q = parse_query(metrics, maximize="b", require=["lm <= 1.3 expert"])  # lm / expert = 1.5 - r_a <= 1.3
    cands, ex, cert_part = _run(q, Synthetic(), budget=10)
    ratio = None  # the loss share is (1.5 - r_a) times one constant of the search part's examples
    for c in cands:
        row = c["search"]["constraints"][0]
        assert row["bound"] > row["estimate"]  # an upper bound: the loss share is at most this
        ratio = ratio or row["estimate"] / (1.5 - c["preference"][0])
        assert row["estimate"] == pytest.approx(ratio * (1.5 - c["preference"][0]), rel=1e-9)
        assert c["search"]["met"] == (row["planned"] <= 1.3) and row["planned"] > row["bound"]
    chosen = best(q, cands)
    assert chosen["search"]["met"] and chosen["preference"][0] > 0.2


def test_infeasible_query_ranks_the_closest_point_first():
    q = parse_query({"a": ACC, "b": ACC, "lm": LOSS}, maximize="a", require=["b >= 0.99", "a >= 0.99"])
    cands, _, _ = _run(q, Synthetic(), budget=8)
    assert not any(c["search"]["met"] for c in cands)
    closest = best(q, cands)
    worst = lambda c: max(r["relative_shortfall"] for r in c["search"]["constraints"])  # noqa: E731
    assert worst(closest) == min(worst(c) for c in cands)


def test_failed_certificate_offers_the_best_point_certified_with_bonferroni():
    # two search-feasible candidates on a constructed split: X looks best on the search part but is right on
    # only 10 of its 20 certification examples; Y is right on all 20 (and 20 search examples)
    q = parse_query({"a": ACC, "b": ACC}, maximize="a", require=["b >= 0.8"])
    search_part, cert_part = {"a": np.arange(20), "b": np.arange(20)}, {"a": np.arange(20, 40), "b": np.arange(20, 40)}
    x = {"a": np.ones(40, bool), "b": np.r_[np.ones(30, bool), np.zeros(10, bool)]}
    y = {"a": np.r_[np.zeros(10, bool), np.ones(30, bool)], "b": np.ones(40, bool)}
    values = {(1.0, 0.0): x, (0.0, 1.0): y}
    cands = [{"preference": list(p), "search": assess(q, v, {}, search_part, 0.95, 500, 0)} for p, v in values.items()]
    assert all(c["search"]["met"] for c in cands) and best(q, cands)["preference"] == [1.0, 0.0]
    assert not assess(q, x, {}, cert_part, 0.95, 500, 0)["met"]
    fb = fallback(q, cands, values, {}, cert_part, 0.95, 500, 0)
    assert fb["preference"] == [0.0, 1.0] and fb["tested"] == 2 and fb["level"] == pytest.approx(0.975)
    assert fb["certification"]["constraints"][0]["bound"] == pytest.approx(0.025 ** (1 / 20))  # 20 of 20 at 97.5%


def test_certification_split_is_stratified_seeded_and_disjoint():
    labels = {"t": [0] * 30 + [1] * 10, "u": [0] * 7}
    s, c = certification_split(labels, 0.5, seed=3)
    assert certification_split(labels, 0.5, seed=3)[1]["t"].tolist() == c["t"].tolist()
    assert certification_split(labels, 0.5, seed=4)[1]["t"].tolist() != c["t"].tolist()
    assert sorted(s["t"].tolist() + c["t"].tolist()) == list(range(40))
    assert [sum(labels["t"][i] == y for i in c["t"]) for y in (0, 1)] == [15, 5]
    with pytest.raises(ValueError, match="too few"):
        certification_split({"t": [0]}, 0.5, seed=0)


# --- on a tiny trained run --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def val_run(text_setup, tmp_path_factory) -> Path:
    """A tiny trained run whose tasks have validation data."""
    from tests.fixtures import train_validation_run

    return train_validation_run(text_setup[1], tmp_path_factory.mktemp("selectrun"))


QUERY = ["--maximize", "color", "--require", "polarity >= 0.9 expert", "--budget", "6"]


def _unpack(run: Path, pref: list[float], task: str) -> np.ndarray:
    from pwemoe.results import unpack_correct

    key = "pwemoe|" + ",".join(f"{x:.6f}" for x in pref) + "|"
    return unpack_correct(json.loads((run / "validation" / "correct.json").read_text())[key]["tasks"][task])


def test_select_cli_certifies_records_and_exports(val_run, tmp_path, capsys):
    from pwemoe.cli import main

    out = tmp_path / "export"
    assert main(["select", str(val_run), *QUERY, "--name", "cli", "--export", str(out)]) == 0
    text = capsys.readouterr().out
    rec = json.loads((val_run / "selections" / "cli.json").read_text())
    assert rec["status"] == "certified" and "CERTIFIED at 95%" in text and "not used for the choice" in text
    r = rec["chosen"]["preference"]
    assert json.loads((out / "pwemoe.json").read_text())["preference"] == dict(zip(["polarity", "color"], r))
    # recomputed from the stored per-example values and the recorded split, independently of the module
    cert = {t: np.array(v) for t, v in rec["split"]["certification_indices"].items()}
    n = {t: len(_unpack(val_run, r, t)) for t in ("polarity", "color")}
    search_idx = {t: np.setdiff1d(np.arange(n[t]), cert[t]) for t in n}
    assert rec["split"]["sizes"]["color"] == {"search": len(search_idx["color"]), "certification": len(cert["color"])}
    for t in ("polarity", "color"):
        assert rec["certification"]["values"][t] == pytest.approx(_unpack(val_run, r, t)[cert[t]].mean())
    expert_rows = json.loads((val_run / "validation" / "results.json").read_text())
    expert = next(x for x in expert_rows if x["method"] == "expert:polarity")
    row = rec["certification"]["constraints"][0]
    assert row["met"] and row["bound"] >= 0.9 and row["bound"] <= row["estimate"] + 1e-12
    # at least as good on the search part as the best feasible point of the starting grid
    grid = [c for c in rec["candidates"] if c["round"] == 0 and c["feasible"]]
    assert grid and rec["chosen"]["search"]["objective"] >= max(c["objective"] for c in grid)
    for c in rec["candidates"]:  # every candidate's search objective is its color accuracy on the search part
        want = _unpack(val_run, c["preference"], "color")[search_idx["color"]].mean()
        assert c["objective"] == pytest.approx(want)
    assert len(rec["candidates"]) <= 6 and rec["evaluation"]["experts"] == ["polarity"]
    assert expert["accuracy"]["polarity"] > 0 and rec["test"]["examples"] == {"polarity": 60, "color": 60}
    assert set(rec["chosen"]["routing_weights"]["mean"]) == {"polarity", "color"}


def test_select_is_repeatable_and_a_changed_router_file_invalidates_candidates(val_run, tmp_path):
    import shutil

    import torch

    from pwemoe.checkpoint import load_routers, save_routers
    from pwemoe.selection import Settings, select_run

    run = Path(shutil.copytree(val_run, tmp_path / "run"))  # the routers change below
    args = dict(maximize="color", require=["polarity >= 0.9 expert"], settings=Settings(budget=6), name="again")
    first = select_run(run, **args, report_test=False)
    second = select_run(run, **args, report_test=False)
    assert second["evaluation"]["computed"] == 0 and second["evaluation"]["reused"] == 6 + 1  # 6 candidates, 1 expert
    for key in ("chosen", "candidates", "certification", "split", "status"):
        assert first[key] == second[key], key
    state, meta = load_routers(run / "routers.safetensors")
    save_routers(run / "routers.safetensors", {k: v + 0.05 * torch.ones_like(v) for k, v in state.items()}, meta)
    third = select_run(run, **args, report_test=False)
    # every candidate computed anew from the new routers; the expert (no routers) is reused
    assert third["evaluation"]["computed"] == len(third["candidates"]) and third["evaluation"]["reused"] == 1
    assert third["evaluation"]["routers_sha256"] != first["evaluation"]["routers_sha256"]
    assert third["evaluation"]["inputs"] != first["evaluation"]["inputs"]


def test_the_test_split_is_read_only_after_the_choice_is_recorded(val_run, monkeypatch):
    from pwemoe.selection import Settings, command, select_run
    from pwemoe.tasks import data as data_mod

    events: list[str] = []
    real_load, real_write = data_mod.load_task_data, command.atomic_write_json
    monkeypatch.setattr(
        data_mod, "load_task_data", lambda d, role, pm=None: events.append(role) or real_load(d, role, pm)
    )
    monkeypatch.setattr(command, "atomic_write_json", lambda p, obj: events.append("record") or real_write(p, obj))
    args = dict(maximize="color", require=["polarity >= 0.8"], settings=Settings(budget=4, seed=5), name="order")
    select_run(val_run, **args, report_test=False)
    assert "test" not in events and "validation" in events and "record" in events
    events.clear()
    rec = select_run(val_run, **args)
    assert "test" in events and events.index("test") > events.index("record")  # recorded before test is read
    assert "validation" not in events[events.index("record") :][: events.index("test") - events.index("record")]
    assert rec["test"]["note"].startswith("not used for the choice")


def test_infeasible_and_malformed_queries(val_run, tmp_path, monkeypatch, capsys):
    from pwemoe.cli import main
    from pwemoe.selection import command

    out = tmp_path / "never"
    code = main(["select", str(val_run), "--maximize", "color", "--require", "polarity >= 1.2 expert",
                 "--budget", "4", "--export", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 1 and not out.exists()
    assert "INFEASIBLE" in text and "binding: polarity >= 1.2 expert" in text
    # malformed queries: one line naming every problem, exit 2, before any model loads
    monkeypatch.setattr(command, "open_run", lambda *a, **k: pytest.fail("a model was loaded"))
    code = main(["select", str(val_run), "--maximize", "colour", "--require", "polarity >= 2",
                 "--require", "mean >= 0.9 expert", "--confidence", "1.5"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "'colour'" in err and "[0, 1]" in err and "'expert' needs a task" in err and "--confidence" in err
    assert main(["select", str(val_run), "--require", "polarity >= 0.5"]) == 2
    assert "empty query" in capsys.readouterr().err
    assert main(["select", str(val_run), "--maximize", "color", "--confidence", "1.5"]) == 2
    assert "--confidence" in capsys.readouterr().err
    # a run without validation data: refused up front, naming the tasks
    cfg = yaml.safe_load((val_run / "config.yaml").read_text())
    cfg["tasks"][1]["data"]["validation_fraction"] = None
    (tmp_path / "noval").mkdir()
    (tmp_path / "noval" / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["select", str(tmp_path / "noval"), "--maximize", "color"]) == 2
    assert "need validation data; tasks ['color']" in capsys.readouterr().err


def test_records_replace_only_what_select_wrote(val_run, tmp_path):
    import shutil

    from pwemoe.recipes.train import train
    from pwemoe.selection import Settings, select_run

    run = Path(shutil.copytree(val_run, tmp_path / "run"))
    (run / "selections").mkdir(exist_ok=True)
    (run / "selections" / "notes.json").write_text('{"mine": true}')
    args = ("color", None, ["polarity >= 0.5"], Settings(budget=4))
    with pytest.raises(ValueError, match="not a pwemoe selection record"):
        select_run(run, *args, name="notes", report_test=False)
    select_run(run, *args, name="mine", report_test=False)
    select_run(run, *args, name="mine", report_test=False)  # its own record is replaced
    train(run / "config.yaml", [f"run_dir={run}"], overwrite=True, verbose=-1)  # new routers: old records go
    assert [p.name for p in (run / "selections").iterdir()] == ["notes.json"]
    assert json.loads((run / "selections" / "notes.json").read_text()) == {"mine": True}


def test_select_through_the_python_api_and_http(val_run):
    from pwemoe import PreferenceModel
    from pwemoe.selection import Settings, select_run
    from pwemoe.serve.app import create_app
    from tests.serving import call, running

    cli = select_run(val_run, "color", None, ["polarity >= 0.9 expert"], Settings(budget=6), "ref", report_test=False)
    model = PreferenceModel(val_run, cache_size=1)
    rec = model.select(maximize="color", require=["polarity >= 0.9 expert"], budget=6, name="api")
    assert rec["chosen"]["preference"] == cli["chosen"]["preference"] and rec["status"] == cli["status"]
    assert model.wb.eval_split == "test" and len(model.wb.tasks[0].test_data) == 60  # restored for serving
    with running(create_app(model)) as url:
        status, body = call(url + "/api/select", {"maximize": "color", "require": ["polarity >= 0.9 expert"],
                                                  "budget": 6, "name": "http"})  # fmt: skip
        assert status == 200 and body["chosen"]["preference"] == rec["chosen"]["preference"]
        assert body["evaluation"]["computed"] == 0  # every candidate reused from RUN/validation
        status, body = call(url + "/api/select", {"maximize": "colour", "require": ["polarity >= 2"]})
        assert status == 400 and "'colour'" in body["error"] and "[0, 1]" in body["error"]
        status, body = call(url + "/api/run")
        assert body["tasks"][0]["validation"] is True and body["tasks"][0]["higher_is_better"] is True
