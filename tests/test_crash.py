"""Crash consistency: a kill at any file operation of `train`, `evaluate`, `export --overwrite` and
`finetune --overwrite` leaves the previous complete output or the new complete one, and the next run
completes from there (or refuses with a message).

A hook in `pwemoe.files` runs before every step that changes a file (a write made visible, an append, a
rename, a removal). Here it copies the directory the command writes into: each copy is what a SIGKILL at
that instant leaves on disk (a kill stops the process between two such steps, or inside a write, whose
temporary file no reader opens). Every copy is checked, then put back in place for the next run.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from pwemoe import files
from pwemoe.checkpoint import load_routers, load_state
from pwemoe.cli import main
from tests.fixtures import write_short_run_config

# a user's files inside an output: at its top, inside one of pwemoe's folders, in a folder of their own
USER = {"notes.txt": b"mine", "polarity/mine.txt": b"mine too", "logs/run.txt": b"mine as well"}


class Kills:
    """Copies of `area` taken before every file step of pwemoe.files: the states a kill there leaves."""

    def __init__(self, area: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.area, self.states, self.mp = area, [], monkeypatch
        monkeypatch.setattr(files.writes, "_before_step", self)

    def __call__(self, kind: str, path: Path) -> None:
        d = self.area.parent / f"kill{len(self.states):03d}"
        shutil.copytree(self.area, d, symlinks=True)
        self.states.append(d)

    def off(self) -> None:
        self.mp.setattr(files.writes, "_before_step", None)

    def restore(self, state: Path) -> None:
        shutil.rmtree(self.area)
        shutil.copytree(state, self.area, symlinks=True)


def _tree(d: Path) -> dict[str, bytes]:
    """Every file under d (relative path -> bytes); a link as its target. {} when d does not exist."""
    if not d.is_dir():
        return {}
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_symlink():
            out[p.relative_to(d).as_posix()] = b"link:" + str(p.readlink()).encode()
        elif p.is_file():
            out[p.relative_to(d).as_posix()] = p.read_bytes()
    return out


def _ours(tree: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in tree.items() if k not in USER and k != files.STAGED}


def _cfg(text_setup, where: Path, run: Path | None = None, **train) -> Path:
    """A config file in `where` for a 6-step run in `run` (default where/run)."""
    base = copy.deepcopy(text_setup[1])
    base["tasks"][0]["class_names"] = ["negative", "positive"]  # finetune needs them (the CSV has no names)
    return write_short_run_config(base, where / "run.yaml", run or where / "run", **train)


@pytest.fixture(scope="module")
def trained_run(text_setup, tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("crash")
    assert main(["train", str(_cfg(text_setup, where))]) == 0
    return where / "run"


def _check_output_state(state: Path, name: str, a: dict, b: dict) -> str:
    """The output `name` in a killed state is the whole previous output (a) or the whole new one (b), or,
    between the two renames of a swap without renameat2, absent with both whole beside it; a user's file
    is in the output or in the displaced previous one. Returns which of "a", "b", "gap" it was."""
    out, tmp, old = _tree(state / name), _tree(state / f".{name}.pwemoe-tmp"), _tree(state / f".{name}.pwemoe-old")
    if not out:
        assert _ours(old) == a and _ours(tmp) == b, "out missing: both sides must be whole"
        seen = "gap"
    else:
        assert _ours(out) in (a, b), sorted(set(_ours(out)) ^ set(a))
        seen = "a" if _ours(out) == a else "b"
    for rel, data in USER.items():
        assert data in (out.get(rel), old.get(rel), tmp.get(rel)), f"{rel} lost"
    return seen


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_killed_export_overwrite_leaves_the_old_or_the_new_export_whole(trained_run, tmp_path, monkeypatch, exchange):
    if not exchange:  # a filesystem without RENAME_EXCHANGE: two renames, finished by the next run
        monkeypatch.setattr(files.outputs, "_exchange", lambda a, b: False)
    area = tmp_path / "area"
    out = area / "out"

    def export(pref: str) -> int:
        return main(["export", str(trained_run), "--preference", pref, "--out", str(out), "--overwrite"])

    assert export("0.8,0.2") == 0
    for rel, data in USER.items():
        (out / rel).parent.mkdir(exist_ok=True)
        (out / rel).write_bytes(data)
    a = _ours(_tree(out))
    kills = Kills(area, monkeypatch)
    assert export("0.2,0.8") == 0
    kills.off()
    new = _tree(out)
    b = _ours(new)
    assert a != b and all(new[rel] == data for rel, data in USER.items())
    assert json.loads(new["pwemoe.json"])["preference"]["color"] == pytest.approx(0.8)
    assert len(kills.states) >= 6
    seen = []
    for state in kills.states:
        seen.append(_check_output_state(state, "out", a, b))
        kills.restore(state)
        assert export("0.2,0.8") == 0  # the next run finishes the job
        assert _tree(out) == new and [p.name for p in area.iterdir()] == ["out"]
    assert {"a", "b"} <= set(seen) and ("gap" in seen) == (not exchange), seen


def test_killed_finetune_overwrite_leaves_the_old_or_the_new_expert_whole(text_setup, tmp_path, monkeypatch, capsys):
    cfg = _cfg(text_setup, tmp_path)
    area = tmp_path / "area"
    out = area / "expert"

    def finetune(seed: int) -> int:
        args = ["finetune", str(cfg), "--task", "polarity", "--out", str(out), "--overwrite"]
        return main([*args, "--epochs", "0.1", "--batch-size", "8", "--seed", str(seed)])

    assert finetune(0) == 0
    for rel, data in USER.items():
        (out / rel).parent.mkdir(exist_ok=True)
        (out / rel).write_bytes(data)
    a = _ours(_tree(out))
    kills = Kills(area, monkeypatch)
    assert finetune(1) == 0
    kills.off()
    new = _tree(out)
    b = _ours(new)
    assert a != b and json.loads(new["pwemoe_finetune.json"])["seed"] == 1
    seen = []
    for state in kills.states:
        seen.append(_check_output_state(state, "expert", a, b))
        # what the next finetune does before any work: finish or undo the swap, carry the user's files home
        kills.restore(state)
        files.prepare_output(out, True, "finetune")
        assert _ours(_tree(out)) in (a, b) and [p.name for p in area.iterdir()] == ["expert"]
        assert all(_tree(out)[rel] == data for rel, data in USER.items())
    assert {"a", "b"} <= set(seen)
    # and the whole next run, from the state where the previous expert (with the user's files) waits beside
    # the new one: the same expert as the uninterrupted run, bit for bit
    displaced = next(s for s in kills.states if (s / ".expert.pwemoe-old" / "notes.txt").is_file())
    kills.restore(displaced)
    assert finetune(1) == 0
    assert _tree(out) == new and [p.name for p in area.iterdir()] == ["expert"]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_killed_train_resumes_to_the_uninterrupted_result(text_setup, tmp_path, monkeypatch, capsys):
    run = tmp_path / "area" / "run"
    cfg = _cfg(text_setup, tmp_path, run, steps=4)
    run.parent.mkdir()
    kills = Kills(run.parent, monkeypatch)
    assert main(["train", str(cfg)]) == 0
    kills.off()
    want_routers, want_meta = load_routers(run / files.ROUTERS)
    want_metrics = _metrics(run)
    assert len(kills.states) >= 10  # lock, marker, config, metrics lines, two checkpoints of two files
    # every state is readable; states with the same checkpoints resume alike: the latest of each is resumed
    latest: dict[tuple, Path] = {}
    for state in kills.states:
        r = state / "run"
        if (r / files.CONFIG).is_file():
            yaml.safe_load((r / files.CONFIG).read_text())
        steps = [m["step"] for m in _metrics(r)] if (r / files.METRICS).is_file() else []
        assert steps == list(range(1, len(steps) + 1))  # whole lines, in order
        state_step = load_state(r / files.STATE)["step"] if (r / files.STATE).is_file() else None
        routers_step = load_routers(r / files.ROUTERS)[1]["step"] if (r / files.ROUTERS).is_file() else None
        assert routers_step is None or routers_step <= state_step  # the trainer state is saved first
        latest[((r / files.CONFIG).is_file(), state_step, routers_step)] = state
    assert len(latest) == 5, list(latest)  # (config?, trainer state step, routers step) before the end
    for (has_config, state_step, _), state in latest.items():
        kills.restore(state)
        if state_step is not None:
            assert main(["train", "--resume", str(run)]) == 0
        else:  # nothing to resume: said so, and a new run starts there without --overwrite
            assert main(["train", "--resume", str(run)]) == 2
            err = capsys.readouterr().err
            assert ("cannot be resumed" if has_config else "is not a run directory") in err, err
            assert main(["train", str(cfg), "--overwrite" if has_config else "train.steps=4"]) == 0
        routers, meta = load_routers(run / files.ROUTERS)
        assert meta["step"] == 4 and all((routers[k] == want_routers[k]).all() for k in want_routers)
        assert _metrics(run) == want_metrics
        assert not list(run.rglob("*.tmp")), "a killed write's temporary file is removed by the next run"


def test_killed_evaluate_is_completed_by_the_next_run(trained_run, tmp_path, monkeypatch, capsys):
    area = tmp_path / "area"
    run = area / "run"
    shutil.copytree(trained_run, run)
    evaluate = ["evaluate", str(run), "--grid", "2", "--no-baselines"]
    kills = Kills(area, monkeypatch)
    assert main(evaluate) == 0
    kills.off()
    want_rows = json.loads((run / files.RESULTS).read_text())
    want_hv = json.loads((run / "summary.json").read_text())["methods"]
    assert len(kills.states) >= 15
    latest: dict[int, Path] = {}
    for state in kills.states:
        r = state / "run"
        rows = json.loads((r / files.RESULTS).read_text()) if (r / files.RESULTS).is_file() else []
        correct = json.loads((r / files.CORRECT).read_text()) if (r / files.CORRECT).is_file() else {}
        assert isinstance(rows, list) and isinstance(correct, dict)
        for row in rows:  # a stored row always has its per-example correctness (bootstrap intervals)
            key = f"{row['method']}|{','.join(f'{x:.6f}' for x in row['preference'])}|"
            assert correct[key]["inputs"] == row["inputs"]
        for p in r.rglob("*"):  # a figure or table there is whole
            if p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".png":
                assert p.read_bytes().startswith(b"\x89PNG") and p.read_bytes().endswith(b"IEND\xaeB`\x82")
            elif p.suffix in (".svg", ".html"):
                assert p.read_text().rstrip().endswith("</svg>" if p.suffix == ".svg" else "</html>")
        latest[len(rows)] = state
    assert sorted(latest) == list(range(len(want_rows) + 1))
    for n in (0, len(want_rows) // 2, len(want_rows)):  # before any row, halfway, during the tables and figures
        state = latest[n]
        kills.restore(state)
        assert main(evaluate) == 0
        rows = json.loads((run / files.RESULTS).read_text())
        assert [(r["method"], r["preference"], r["accuracy"]) for r in rows] == [
            (r["method"], r["preference"], r["accuracy"]) for r in want_rows
        ]
        assert json.loads((run / "summary.json").read_text())["methods"] == want_hv
        assert not list(run.rglob("*.tmp"))
    capsys.readouterr()


class Syncs:
    """What pwemoe.files does, in order: ("fsync", path) for every os.fsync (the path the descriptor has then), and
    ("replace" | "rename" | "create" | ..., path) before every step that changes a file."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, str]] = []
        real = os.fsync

        def fsync(fd: int) -> None:
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(files.writes, "_before_step", lambda kind, p: self.events.append((kind, str(p))))

    def index(self, kind: str, path: Path | str, start: int = 0) -> int:
        """The first event (kind, path) at or after `start`; a clear failure when there is none."""
        for i in range(start, len(self.events)):
            if self.events[i] == (kind, str(path)):
                return i
        raise AssertionError(f"no ({kind}, {path}) after event {start} in {self.events[start:]}")

    def synced_before_published(self, path: Path) -> None:
        """An atomic write of `path`: its temporary file synced, then the rename, then the directory synced."""
        publish = self.index("replace", path)
        temp = [
            i
            for i, (k, p) in enumerate(self.events[:publish])
            if k == "fsync" and p.startswith(f"{path.parent}/.{path.name}.")
        ]
        assert temp, f"{path}: the written file was not synced before the rename: {self.events[:publish]}"
        self.index("fsync", path.parent, publish)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names a descriptor's file through /proc")
def test_every_publish_syncs_the_files_then_the_directory(tmp_path, monkeypatch):
    """A power loss after a write returns keeps it: the data is synced before the rename that publishes it,
    the directory after it (routers, trainer state, results, metrics, selections, exports, a replaced export)."""
    import torch

    from pwemoe.checkpoint import save_routers, save_state

    syncs = Syncs(monkeypatch)
    run = tmp_path / "new" / "run"
    files.make_dirs(run)  # a new directory's entry is synced in its parent
    assert syncs.events[:2] == [("fsync", str(tmp_path)), ("fsync", str(tmp_path / "new"))]
    save_routers(run / files.ROUTERS, {"w": torch.ones(2)}, {"step": 1})  # safetensors does not sync its file
    save_state(run / files.STATE, {"step": 1})
    files.atomic_write_json(run / files.RESULTS, [])
    start = len(syncs.events)
    files.atomic_write_json(run / files.SELECTIONS / "pick.json", {"pwemoe_selection": 1})
    for name in (files.ROUTERS, files.STATE, files.RESULTS):
        syncs.synced_before_published(run / name)
    syncs.synced_before_published(run / files.SELECTIONS / "pick.json")
    assert syncs.index("fsync", run, start) < syncs.index("replace", run / files.SELECTIONS / "pick.json")  # made
    start = len(syncs.events)
    files.append_line(run / files.METRICS, "{}")  # a new file: its line, then its entry in the directory
    syncs.index("fsync", run, syncs.index("fsync", run / files.METRICS, start))

    out = tmp_path / "export"
    start = len(syncs.events)
    with files.staged_dir(out, False, "export") as d:
        (d / "model").mkdir()
        (d / "model" / "weights.bin").write_bytes(b"v1")  # as save_pretrained writes: no sync of its own
    publish = syncs.index("rename", out, start)
    built = {p for k, p in syncs.events[start:publish] if k == "fsync"}
    tmp = tmp_path / ".export.pwemoe-tmp"
    assert {str(tmp / "model" / "weights.bin"), str(tmp / "model"), str(tmp)} <= built, built
    syncs.index("fsync", tmp_path, publish)  # the rename, in the directory that holds the output
    (out / "notes.txt").write_text("mine")
    start = len(syncs.events)
    with files.staged_dir(out, True, "export") as d:
        (d / "model").mkdir()
        (d / "model" / "weights.bin").write_bytes(b"v2")
    swap = syncs.index("rename", out, start)  # the exchange (or the first of two renames)
    assert str(tmp / "model" / "weights.bin") in {p for k, p in syncs.events[start:swap] if k == "fsync"}
    old = str(tmp_path / ".export.pwemoe-old")
    last = max(i for i, (k, p) in enumerate(syncs.events) if i >= swap and k == "rename" and p in (str(out), old))
    syncs.index("fsync", tmp_path, last)  # after the swap's last rename (one exchange and one rename, or two)
    assert (out / "model" / "weights.bin").read_bytes() == b"v2" and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "new"]
