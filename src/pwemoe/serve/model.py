"""`PreferenceModel`: a trained run as one model that takes a preference with every call.

This is the Python API under `pwemoe serve`: predictions, routing weights, evaluation and export
for any preference r, without HTTP. Merged weights theta(r) are plain copies of the backbone kept
in an LRU cache keyed by the normalised preference (`MergeCache`), so a repeated preference costs
no merge and concurrent callers with different preferences never share weights.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..baselines import Point
from ..core.checks import positive_int
from ..core.preference import Preference, PreferenceLike
from ..devices import PRECISIONS
from ..evaluation import PointEvaluator, stored_front
from ..files import RESULTS, RunLock, subdir
from ..results import ResultStore, row_inputs, summarize
from ..routing import routing_weights
from ..runs import open_run, write_export
from .merge_cache import MergeCache

Key = tuple[float, ...]
EXPORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # the whole name (fullmatch)


def _installed(dist: str) -> str | None:
    """The installed version of a distribution, or None (read from its metadata: nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


class TooLarge(ValueError):
    """A request larger than the configured limit (the server answers 413)."""


class PreferenceModel:
    """A trained run that answers for any preference: `predict`, `routing_weights`, `evaluate`, `export`.

    Args:
        run: a run directory (`pwemoe train` output).
        device: overrides the run's own setting (e.g. serve a GPU-trained run on a CPU).
        precision: overrides the run's own setting (fp32, bf16 or fp16).
        cache_size: merged copies of the backbone kept (each costs one backbone's memory).
        max_test_samples: evaluate on the first N test examples per task (rows record this slice).
        max_batch: the most inputs one `predict` call takes, and the most sequences decoded together
            (causal-LM runs: `generate` batches concurrent requests, each at its own preference).
        token_budget: causal-LM runs: the most tokens (prompt + max_new_tokens of every sequence) in the
            decoding batch at once; a request that would exceed it waits for others to finish.
        default_preference: the preference of a request that gives none (default: uniform, 1/k each).
        merged_decoding: causal-LM runs: a decoding step whose sequences all share one preference runs on a merged
            copy from the cache (no per-row work in the upcycled modules); decoding never waits for a copy and adds
            one only to an empty cache. False: always the upcycled model (no copy's memory).

    Thread-safe: every method may be called from several threads at once.
    """

    def __init__(
        self,
        run: str | Path,
        device: str | None = None,
        precision: str | None = None,
        cache_size: int = 4,
        max_test_samples: int | None = None,
        max_batch: int = 64,
        token_budget: int = 16384,
        default_preference: PreferenceLike | None = None,
        merged_decoding: bool = True,
    ) -> None:
        positive_int("max_batch", max_batch)
        positive_int("token_budget", token_budget)
        if max_test_samples is not None:
            positive_int("max_test_samples", max_test_samples, hint=" (or None: all)")
        self.run = Path(run)
        self.wb, self.meta = open_run(run, True, max_test_samples, device=device, precision=precision)
        self.wb.backbone.requires_grad_(False)
        self.task_names = [t.name for t in self.wb.tasks]
        self.k = len(self.task_names)
        self.max_batch = max_batch
        self.token_budget = token_budget
        self.max_test_samples = max_test_samples
        self.default_preference = Preference.of(
            default_preference if default_preference is not None else [1.0 / self.k] * self.k, self.k
        )
        self._scheduler: Any = None  # generation (causal-LM runs), made on first use
        self._scorer: Any = None  # prompt log-probabilities (causal-LM runs), made on first use
        self.merged_decoding = bool(merged_decoding)
        self.test_examples = {
            t.name: len(t.test_data) for t in self.wb.tasks
        }  # `select` switches to validation a while
        self._lock = threading.RLock()  # the upcycled model's preference state, merges, routing weights
        self._eval_lock = threading.Lock()  # one evaluation at a time (they share the encoded test batches)
        # the copies' linear weights in the autocast dtype: cast once, not at every forward (the same numbers)
        self.cache = MergeCache(self.wb.backbone, cache_size, self._lock, PRECISIONS[self.wb.precision])
        # the provenance of rows this model computes (mergekit's version: its merges' rows, when it is installed)
        self.inputs = {
            **row_inputs(self.meta, self.wb.tasks, self.wb.precision, self.wb.device.type),
            "mergekit": _installed("mergekit"),
        }

    # --- what the run is -------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Tasks, k, upcycled modules, metrics, base and expert ids, and the serving settings."""
        info = self.wb.info
        return {
            "run": str(self.run.resolve()),
            "tasks": [
                {
                    "name": t.name,
                    "type": t.cfg.type,
                    "input": self.wb.modality.input_kind,
                    "text_pair": len(t.input_columns()) == 2 and self.wb.modality.input_kind == "text",
                    "class_names": list(t.class_names),
                    "test_examples": self.test_examples[t.name],
                    "higher_is_better": t.higher_is_better,
                    "validation": t.cfg.data.has_validation,
                }
                for t in self.wb.tasks
            ],
            "k": self.k,
            "targets": list(info.targets) if info is not None else [],
            "metrics": {
                t.name: f"{t.metric}, {'higher' if t.higher_is_better else 'lower'} is better" for t in self.wb.tasks
            },
            "base": self.meta.get("base"),
            "experts": self.meta.get("experts"),
            "step": self.meta.get("step"),
            "routers_sha256": self.meta.get("routers_sha256"),
            "device": str(self.wb.device),
            "precision": self.wb.precision,
            "cache": self.cache.stats(),
            "decoding": self._scheduler.stats() if self._scheduler is not None else None,  # running, waiting
            "max_batch": self.max_batch,
            "max_test_samples": self.max_test_samples,
        }

    def preference(self, r: PreferenceLike) -> Preference:
        """The validated preference (`core.preference.Preference`: its key, 6 decimals, is the cache key). A
        `Preference` passes through as it is: validate once where a request enters, then pass the value down."""
        return Preference.of(r, self.k)

    def routing_weights(self, r: PreferenceLike) -> dict[str, list[float]]:
        """{upcycled module: lambda(r) (k numbers)} in model order."""
        key = self.preference(r)
        with self._lock:
            return {n: v.tolist() for n, v in routing_weights(self.wb.model, key).items()}

    # --- inference ---------------------------------------------------------------------------------
    def logits(self, r: PreferenceLike, task: str, inputs: Sequence[Any]) -> tuple[torch.Tensor, bool]:
        """Logits Tensor[n, C] (fp32, CPU) of `task` for n inputs under preference r; and whether theta(r) was cached.

        inputs: texts (or [text, pair] lists for pair tasks), or images (PIL images, bytes, or base64
        strings, data URLs too) for CLIP tasks.
        """
        key = self.preference(r)
        i = self._task_index(task)
        batch = self.wb.encode([(i, self._rows(i, inputs))], with_labels=False)  # CPU, outside the lock
        with self.cache.lease(key) as (plain, hit), torch.no_grad():
            logits = self.wb.forward(batch, backbone=plain)[0]
        return logits.float().cpu(), hit

    def predict(self, r: PreferenceLike, task: str, inputs: Sequence[Any]) -> dict[str, Any]:
        """Labels and class probabilities of `task` for `inputs` under preference r (for a task whose metric
        is not accuracy, e.g. `causal_lm`, each input's value of that metric)."""
        pref = self.preference(r)
        logits, hit = self.logits(pref, task, inputs)
        t = self.wb.tasks[self._task_index(task)]
        if t.metric != "accuracy":  # e.g. a causal LM's next-token loss: the per-example value is the answer
            return {
                "task": task,
                "preference": pref.tolist(),
                "cache": "hit" if hit else "miss",
                "predictions": [{t.metric: float(v)} for v in logits[:, 0]],
            }
        names = t.class_names
        # causal_lm_choice: log-likelihoods of the label words, renormalised over the labels
        probs = logits.softmax(-1)
        return {
            "task": task,
            "preference": pref.tolist(),
            "cache": "hit" if hit else "miss",
            "predictions": [
                {
                    "label": names[int(p.argmax())],
                    "index": int(p.argmax()),
                    "probabilities": dict(zip(names, p.tolist())),
                }
                for p in probs
            ],
        }

    def _task_index(self, task: str) -> int:
        if task not in self.task_names:
            raise ValueError(f"unknown task {task!r}; this run's tasks are {self.task_names}")
        return self.task_names.index(task)

    def _rows(self, i: int, inputs: Sequence[Any]) -> dict[str, list]:
        """The column dict Task.encode reads, from user inputs, validated."""
        t = self.wb.tasks[i]
        if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence):
            raise TypeError(f"inputs must be a list of examples for task {t.name!r}, got {type(inputs).__name__}")
        if len(inputs) == 0:
            raise ValueError(f"inputs is empty; give 1 to {self.max_batch} examples for task {t.name!r}")
        if len(inputs) > self.max_batch:
            raise TooLarge(
                f"{len(inputs)} inputs in one request; at most {self.max_batch} (split the batch, or raise --max-batch)"
            )
        return self.wb.modality.request_rows(t, inputs)

    # --- generation (causal-LM runs) ----------------------------------------------------------------
    @property
    def can_generate(self) -> bool:
        """Whether this run's model generates text (a causal-LM run)."""
        return self.wb.modality.generates

    def scheduler(self) -> Any:
        """The continuous-batching scheduler of this run's upcycled causal LM (`generation.Scheduler`)."""
        if not self.can_generate:
            types = sorted({t.cfg.type for t in self.wb.tasks})
            raise ValueError(
                f"generation needs a causal-LM run (tasks of type causal_lm or causal_lm_choice); {self.run} has "
                f"{', '.join(types)} tasks"
            )
        if self._scheduler is not None:  # made once; not under the model's lock, which decoding steps hold
            return self._scheduler
        with self._lock:
            if self._scheduler is None:
                from ..generation import BatchDecoder, Scheduler

                decoder = BatchDecoder(
                    self.wb.modality.model,
                    self.wb.modality.tokenizer,
                    self.wb.device,
                    self.wb.precision,
                    merged=self._merged_for_decoding if self.merged_decoding else None,
                )
                self._scheduler = Scheduler(decoder, self.max_batch, self.token_budget, self._lock)
            return self._scheduler

    def scorer(self) -> Any:
        """The batched prompt scorer of this run's upcycled causal LM (`logprobs.PromptScorer`)."""
        if self._scorer is None:
            sched = self.scheduler()  # a causal-LM run (or its error), and the decoder's merged copies
            with self._lock:
                if self._scorer is None:
                    from ..logprobs import PromptScorer

                    self._scorer = PromptScorer(
                        self.wb.modality.model,
                        self.wb.device,
                        self.wb.precision,
                        self._lock,
                        merged=self._merged_for_decoding if self.merged_decoding else None,
                        max_tokens=self.token_budget,
                        pad_id=sched.decoder.pad,
                    )
        return self._scorer

    def score(
        self,
        prompts: Sequence[Sequence[int]],
        preference: PreferenceLike | None = None,
        scales: Sequence[float] | None = None,
        top: int = 0,
        params: Any = None,
    ) -> Any:
        """Queue token-id prompts to score at `preference` (default: `default_preference`), or at per-expert
        `scales` (raw lambda, the routers bypassed); returns a Future of one `logprobs.Scored` per prompt
        (each token's log-probability and its `top` alternatives; with `params`, the sampled next token)."""
        from ..logprobs import ScoreRow

        scorer = self.scorer()
        pref, raw = self._weights(preference, scales)
        key = pref if isinstance(pref, Preference) else None
        t = key.tensor if key is not None else pref
        return scorer.submit([ScoreRow(list(ids), t, raw, top, params, key=key) for ids in prompts])

    def _weights(
        self, preference: PreferenceLike | None, scales: Sequence[float] | None
    ) -> tuple[Preference | torch.Tensor, bool]:
        """(the validated preference, False), or (the per-expert scales Tensor[k] (raw lambda), True); not both."""
        from ..routing import check_scales

        if scales is not None:
            if preference is not None:
                raise ValueError("give a preference or per-expert scales, not both")
            return check_scales(scales, self.k), True
        return self.preference(self.default_preference if preference is None else preference), False

    @contextlib.contextmanager
    def _merged_for_decoding(self, r: torch.Tensor, merge: bool) -> Iterator[nn.Module | None]:
        """The cache's merged copy for r while a decoding step uses it, or None. Never waits (the decoder's
        upcycled model serves any preference without a copy), and adds a copy only to an empty cache: decoding
        alone holds at most one backbone's memory more than the upcycled model."""
        with self.cache.lease(self.preference(r), wait=False, merge=merge, grow=False) as (plain, _):
            yield plain

    def submit(
        self,
        prompt: str | list[dict[str, Any]] | list[int],
        preference: PreferenceLike | None = None,
        params: Any = None,
        loop: Any = None,
        scales: Sequence[float] | None = None,
    ) -> Any:
        """Queue one generation (a text prompt, token ids, or chat messages through the chat template) at
        `preference` (default: `default_preference`) or at per-expert `scales` (raw lambda: task arithmetic with
        those scales, the routers bypassed); returns its `generation.Handle` (events as they come, `cancel()`)."""
        from ..generation import SamplingParams, prompt_ids

        sched = self.scheduler()
        tokens = isinstance(prompt, list) and bool(prompt) and all(type(t) is int for t in prompt)
        ids = list(prompt) if tokens else prompt_ids(self.wb.modality.tokenizer, prompt)
        vocab = self.wb.modality.model.get_input_embeddings().num_embeddings
        if tokens and not all(0 <= t < vocab for t in ids):
            raise ValueError(f"token ids must be integers in [0, {vocab}), got {prompt!r:.80}")
        pref, raw = self._weights(preference, scales)
        return sched.submit(ids, pref, params or SamplingParams(), loop, raw=raw)

    def generate(
        self,
        inputs: str | list[Any],
        preference: PreferenceLike | Sequence[PreferenceLike] | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Generate text at any preference; all inputs are decoded together, each at its own preference.

        inputs: a prompt (str), chat messages (a list of {"role", "content"}), or a list of prompts / chats.
        preference: one preference for all, one per input (a list of them), or None (`default_preference`).
        temperature 0 (the default) decodes greedily, as `transformers` generate does without sampling.
        Returns {text, finish_reason, usage, preference} (a list of them for a list of inputs).
        """
        from ..generation import SamplingParams

        one = isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], dict))
        items = [inputs] if one else inputs
        if not isinstance(items, list) or not items:
            raise TypeError("inputs must be a prompt, chat messages, or a non-empty list of prompts or chats")
        per_input = (
            preference.dim() == 2
            if isinstance(preference, torch.Tensor)
            else preference is not None and len(preference) > 0 and isinstance(preference[0], (list, tuple))
        )
        if not per_input:
            prefs = [preference] * len(items)
        else:
            prefs = list(preference)
            if len(prefs) != len(items):
                raise ValueError(
                    f"give one preference for all inputs or one per input ({len(items)}), got {len(prefs)}"
                )
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        params = SamplingParams(max_new_tokens, temperature, top_p, seed, stops)
        errors = params.errors()
        if errors:
            raise ValueError("; ".join(errors))
        handles = [self.submit(x, r, params) for x, r in zip(items, prefs)]
        out = [{**h.result(), "preference": h.seq.preference.tolist()} for h in handles]
        return out[0] if one else out

    # --- evaluation and export ---------------------------------------------------------------------
    def evaluate(
        self, r: PreferenceLike, progress: Callable[[int, int], None] | None = None, store: bool = True
    ) -> dict[str, Any]:
        """Accuracy of PWEMoE at r on each task's test split (the slice given at start), as `pwemoe evaluate`
        computes it; the row is added to results.json (`store`), or reused from there when it was
        computed from the same models, routers and test data.

        progress(done, total) is called after every evaluated batch. Returns the row, plus `reused`.
        """
        point = Point.at(self.preference(r).tolist())
        bs = self.wb.cfg.eval.batch_size
        with self._eval_lock, RunLock(self.run, "pwemoe serve (evaluate)") if store else contextlib.nullcontext():
            total, done = sum(len(self.wb.eval_batches(t, bs)) for t in self.wb.tasks), 0

            def tick() -> None:
                nonlocal done
                done += 1
                if progress is not None:
                    progress(done, total)

            # the cache's merged copies; encoded in this thread (no loader processes are forked from a threaded
            # server), kept for later evaluations as a sweep's are (Workbench.encoded)
            evaluator = PointEvaluator(
                self.wb,
                self.inputs,
                bs,
                ResultStore(self.run) if store else None,
                workers=0,
                sources={"preference": _CachedCopies(self.cache)},
                on_batch=tick,
            )
            row, reused = evaluator.row(point)
        return {**row, "reused": reused}

    def export(self, r: PreferenceLike, name: str | None = None, overwrite: bool = False) -> dict[str, Any]:
        """Write the plain models for r under RUN/exports/<name> (default: from r); returns pwemoe.json."""
        key = self.preference(r)
        name = name or "r-" + "-".join(f"{x:.3f}" for x in key)
        if not isinstance(name, str) or not EXPORT_NAME.fullmatch(name):
            raise ValueError(
                f"export name must be 1-100 letters, digits, '.', '_' or '-' (a folder under "
                f"{self.run / 'exports'}), not starting with '.' or '-', got {name!r}"
            )
        with self._lock:
            out = subdir(self.run, "exports") / name  # a link planted as exports/ is refused
            write_export(self.wb, self.meta, self.run, key, out, overwrite)
        import json

        return {"path": str(out.resolve()), **json.loads((out / "pwemoe.json").read_text())}

    def select(
        self,
        maximize: str | None = None,
        minimize: str | None = None,
        require: Sequence[str] = (),
        confidence: float = 0.95,
        budget: int = 24,
        grid: int | None = None,
        seed: int = 0,
        certify_fraction: float = 0.5,
        name: str | None = None,
    ) -> dict[str, Any]:
        """Choose a preference by constraints, as `pwemoe select` does (see `pwemoe.selection`): search and
        certificate on the validation data, then the chosen point's test values (not used for the choice).

        Returns the record (also RUN/selections/<name>.json); `status` is "certified", "not_certified" or
        "infeasible". Runs one at a time with `evaluate`; predictions go on meanwhile.
        """
        from ..selection import Settings, select_open

        s = Settings(confidence, budget, grid, seed, certify_fraction)
        with self._eval_lock, RunLock(self.run, "pwemoe serve (select)"):
            return select_open(
                self.wb,
                self.meta,
                self.run,
                maximize,
                minimize,
                require,
                s,
                name,
                test_samples=self.max_test_samples,
                lock=self._lock,
                workers=0,
            )

    def results(self) -> dict[str, Any]:
        """The rows of results.json computed from this model's inputs (the rows `pwemoe evaluate` would reuse),
        their summary (hypervolumes), and how many stored rows were left out because they came from other
        models, routers, data or settings."""
        path = self.run / RESULTS
        store = ResultStore(self.run) if path.exists() else None
        rows = store.rows if store else []
        current = stored_front(store, self.wb.cfg, self.task_names, self.inputs) if store else []
        e = self.wb.cfg.eval
        summary = None
        if current:
            correct = store.correctness(current, self.task_names) if store else None
            # fewer resamples than `pwemoe evaluate`: this runs on every page load
            summary = summarize(
                current,
                self.task_names,
                e.reference_point,
                correct,
                min(200, e.bootstrap_resamples),
                e.confidence,
                e.bootstrap_seed,
                directions=self.wb.directions(),
                loss_reference=e.loss_reference,
            )
        return {"tasks": self.task_names, "rows": current, "other_rows": len(rows) - len(current), "summary": summary}


class _CachedCopies:
    """The evaluator's model source for preferences: the server's `MergeCache` (a copy is leased while scored)."""

    def __init__(self, cache: MergeCache) -> None:
        self.cache = cache

    @contextlib.contextmanager
    def model(self, point: Point) -> Iterator[nn.Module]:
        with self.cache.lease(tuple(point.preference)) as (plain, _):
            yield plain

    def release(self) -> None:  # the cache is the server's
        pass


__all__ = ["MergeCache", "PreferenceModel", "TooLarge"]
