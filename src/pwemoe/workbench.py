"""The workbench: base + experts upcycled, tasks with heads and data, and the batched forward.

Shared by training, evaluation, export and serving, so that all of them see exactly the same model.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import Config, ConfigError
from .devices import autocast, move, resolve_device
from .modalities import MODALITIES, Modality
from .modalities.causal_lm import HEAD_ONLY_PREFIX
from .models import check_local_sources
from .tasks import TASK_TYPES, Task
from .upcycle import UpcycleOptions, upcycle

log = logging.getLogger(__name__)

_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ForwardBatch:
    """One backbone forward's inputs: examples of one or more tasks, concatenated and collated (CPU).

    inputs: collated backbone inputs (Tensor[n, ...] each). segments: (task index, example count)
    in the order of the rows. labels: Tensor[n_s] per segment. Built by `Workbench.encode`, in
    input-pipeline worker processes; `pin_memory` is called by a DataLoader with pin_memory=True.
    """

    inputs: dict[str, torch.Tensor]
    segments: list[tuple[int, int]]
    labels: list[torch.Tensor] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # model rows per segment (examples x rows_per_example)

    def segment_rows(self) -> list[int]:
        """Model rows per segment (see `segment_rows`)."""
        return segment_rows(self)

    def pin_memory(self) -> ForwardBatch:
        return ForwardBatch(
            {k: v.pin_memory() for k, v in self.inputs.items()},
            self.segments,
            [y.pin_memory() for y in self.labels],
            self.rows,
        )

    @property
    def size(self) -> int:
        return sum(n for _, n in self.segments)

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in [*self.inputs.values(), *self.labels])


class Workbench:
    """Everything a run needs, built from a Config.

    Attributes:
        modality: the Modality object (loading, batching, export) shared by all tasks.
        model: the object holding the upcycled modules (text: the backbone; CLIP: the CLIPModel).
        backbone: what the batched inputs go through (text: the backbone; CLIP: `vision_model`).
        tasks: one Task per expert, in config order.
        info: the `UpcycleInfo` of the upcycled model (None with upcycle=False).
    """

    def __init__(
        self,
        cfg: Config,
        load_train: bool = True,
        load_test: bool = True,
        max_test_samples: int | None = None,
        upcycle: bool = True,
        eval_split: str = "test",
    ) -> None:
        if eval_split not in ("test", "validation"):
            raise ValueError(f"eval_split must be test or validation, got {eval_split!r}")
        self.cfg = cfg
        self.eval_split = eval_split  # what `test_data` holds: the test split, or the validation data
        self.max_test_samples = max_test_samples
        try:  # a GPU that is not there is a config error, found before any model loads
            self.device = resolve_device(cfg.device)
        except ValueError as e:
            raise ConfigError([str(e)]) from None
        self.precision = cfg.precision
        errors = check_local_sources(
            {
                "model.base": self.resolve(cfg.model.base),
                **{f"tasks[{i}].expert": self.resolve(t.expert) for i, t in enumerate(cfg.tasks)},
            }
        )
        if errors:  # every missing model at once, before any is loaded
            raise ConfigError(errors)
        self.tasks: list[Task] = [TASK_TYPES[t.type](t) for t in cfg.tasks]
        kinds = {t.modality for t in self.tasks}
        if len(kinds) != 1:
            raise ConfigError([f"tasks: all tasks must share one modality (one backbone), got {sorted(kinds)}"])
        self.modality: Modality = MODALITIES[kinds.pop()](self.resolve(cfg.model.base))
        # the data, the tokenizer and the model's config first: what contradicts itself is refused before any
        # weights load (`Task.check_before_load`)
        self.modality.load_preprocessing()
        errors = self._read_data(load_train, load_test, max_test_samples)
        for i, t in enumerate(self.tasks):
            if not any(e.startswith(f"tasks[{i}].") for e in errors):
                t.check_before_load(self.modality, errors, i)
        if errors:
            raise ConfigError(errors)
        self.modality.load()
        self.model, self.backbone = self.modality.model, self.modality.backbone
        self.info = None
        self._eval_batches: dict[tuple, list[list[int]]] = {}
        self.encoded = EncodedCache()  # encoded evaluation batches, kept across the models of a sweep
        if upcycle:
            self._upcycle()  # builds the task vectors on the device, experts streamed from disk
        self.model.to(self.device)  # the rest (e.g. CLIP's text tower and projections) joins it
        self._check_data()  # class names may come from the experts (their id2label)
        for t in self.tasks:  # heads that need the class names (which may come from the data) are built here
            t.attach(self.modality)
            t.to(self.device)
            if self.info is not None:  # a changed head must change the run's provenance too
                self.info.hashes[f"{t.name}:head"] = t.head_fingerprint()

    def set_eval_split(self, split: str, max_samples: int | None = None) -> None:
        """Make `test_data` hold `split` ("test" or "validation"; its first `max_samples` per task): an open
        run then evaluates on the other data without loading any model again (validation to choose,
        test to report). The encoded-batch caches are keyed by split, so nothing of one is used for the other.
        """
        if split not in ("test", "validation"):
            raise ValueError(f"eval_split must be test or validation, got {split!r}")
        if (split, max_samples) == (self.eval_split, self.max_test_samples) and all(
            t.test_data is not None for t in self.tasks
        ):
            return
        self.eval_split, self.max_test_samples = split, max_samples
        self._load_data(False, True, max_samples)

    def resolve(self, path: str) -> str:
        """Map hub ids to local mirrors (model.path_map), for offline use and tests."""
        return self.cfg.model.path_map.get(path, path)

    def expert_loaders(self) -> dict[str, Any]:
        """Task name -> zero-argument loader of that expert's backbone (streamed one at a time)."""
        return {t.name: functools.partial(t.load_expert_backbone, self.resolve(t.cfg.expert)) for t in self.tasks}

    def _upcycle(self) -> None:
        m = self.cfg.model
        options = UpcycleOptions(
            targets=m.targets,
            init_lambda=m.init_lambda,
            router_hidden_layers=m.router_hidden_layers,
            include_attention=m.include_attention,
            task_vector_dtype=_DTYPES[m.task_vector_dtype],
            device=self.device,
            task_vector_rank=m.task_vector_rank,
            base_names=[m.base, self.resolve(m.base)],
            router_init=m.router_init,
        )
        upcycle(self.backbone, self.expert_loaders(), options)
        info = self.backbone.pwemoe_info
        info.base_id = m.base
        info.expert_ids = {t.name: t.cfg.expert for t in self.tasks}
        if self.backbone is not self.model:
            self.model.pwemoe_info = info
        self.info = info

    def _load_data(self, load_train: bool, load_test: bool, max_test: int | None) -> None:
        """Load and check each task's data; every problem of every task in one ConfigError."""
        errors = self._read_data(load_train, load_test, max_test)
        if errors:
            raise ConfigError(errors)
        self._check_data()

    def _read_data(self, load_train: bool, load_test: bool, max_test: int | None) -> list[str]:
        """Read each task's splits (`train_data`, `test_data`); the problems, one per task."""
        from .tasks.data import first_n, load_task_data

        errors: list[str] = []
        pm = self.cfg.model.path_map
        for i, t in enumerate(self.tasks):
            d = t.cfg.data
            try:
                if load_train:
                    t.train_data = load_task_data(d, "train", pm)
                if load_test:
                    t.test_data = first_n(load_task_data(d, self.eval_split, pm), max_test)
            except (ValueError, FileNotFoundError) as e:
                errors.append(f"tasks[{i}].data: {e}")
        return errors

    def _check_data(self) -> None:
        """Class names from the data where neither the config nor the expert gave them, and each task's data
        checked against them (`Task.validate_data`); every problem in one ConfigError."""
        from .tasks.data import load_task_data

        errors: list[str] = []
        pm = self.cfg.model.path_map
        for i, t in enumerate(self.tasks):
            d = t.cfg.data
            if not t.class_names and t.has_labels:  # e.g. CLIP zero-shot: the names of a ClassLabel column
                ds = t.train_data if t.train_data is not None else t.test_data
                if ds is None:  # nothing loaded (export): read the features of the test split
                    try:
                        ds = load_task_data(d, "test", pm)
                    except (ValueError, FileNotFoundError) as e:
                        errors.append(f"tasks[{i}].data: {e}")
                        continue
                feat = ds.features.get(d.label_column)
                if getattr(feat, "names", None):
                    t.class_names = list(feat.names)
                else:
                    errors.append(
                        f"tasks[{i}].class_names: required for task {t.name!r}; its label column "
                        f"{d.label_column!r} carries no class names"
                    )
                    continue
            t.validate_data(errors, i)
        if errors:
            raise ConfigError(errors)

    # --- batched forward -----------------------------------------------------------------------
    def encode(self, parts: Sequence[tuple[int, dict[str, list]]], with_labels: bool = True) -> ForwardBatch:
        """Tokenise / preprocess and collate the examples of several tasks into one ForwardBatch (CPU).

        parts: [(task index, rows)] where rows is a column dict (`dataset[indices]`). Pure CPU work
        with no model access, so the input pipeline runs it in worker processes. `with_labels=False`
        (inference on unlabelled inputs) leaves `labels` empty.
        """
        feats, segments, labels, counts = [], [], [], []
        for i, rows in parts:
            t = self.tasks[i]
            f = t.encode(rows)
            feats.extend(f)
            segments.append((i, len(f) // t.rows_per_example))
            counts.append(len(f))
            if with_labels:
                labels.append(t.labels(rows))
        return ForwardBatch(dict(self.modality.collate(feats)), segments, labels, counts)

    def forward(self, batch: ForwardBatch, backbone: nn.Module | None = None) -> list[torch.Tensor]:
        """Per-segment logits Tensor[n_s, C_s] from one forward of `batch` on the device, in `precision`.

        `backbone` replaces the upcycled one (baselines, plain merged copies).
        """
        inputs = move(batch.inputs, self.device)
        model_inputs = {k: v for k, v in inputs.items() if not k.startswith(HEAD_ONLY_PREFIX)}
        with autocast(self.device, self.precision):
            out = self.modality.run(backbone or self.backbone, model_inputs, inputs)
            logits, start = [], 0
            for i, n in zip((i for i, _ in batch.segments), segment_rows(batch)):
                sl = slice(start, start + n)
                sub = type(out)(**{k: v[sl] for k, v in out.items() if isinstance(v, torch.Tensor)})
                logits.append(self.tasks[i].head(sub, {k: v[sl] for k, v in inputs.items()}))
                start += n
        return logits

    def segment_losses(self, batch: ForwardBatch) -> torch.Tensor:
        """Summed loss of each segment, Tensor[len(segments)] (fp32, on the device), from one forward."""
        logits = self.forward(batch)
        return torch.stack(
            [
                self.tasks[i].loss(lg.float(), y.to(self.device, non_blocking=True), reduction="sum")
                for (i, _), lg, y in zip(batch.segments, logits, batch.labels)
            ]
        )

    def logits(
        self, parts: list[tuple[Task, dict[str, list]]], backbone: nn.Module | None = None
    ) -> list[torch.Tensor]:
        """One backbone forward on the concatenated examples of several tasks; per-task logits.

        parts: [(task, rows)] where rows is a column dict (`dataset[indices]`). Returns logits
        Tensor[n_t, C_t] per part. `backbone` replaces the upcycled one (baselines, plain copies).
        """
        return self.forward(self.encode([(self.tasks.index(t), rows) for t, rows in parts]), backbone)

    def losses(self, parts: list[tuple[Task, dict[str, list]]]) -> torch.Tensor:
        """Per-task mean loss, Tensor[len(parts)], from one concatenated forward."""
        batch = self.encode([(self.tasks.index(t), rows) for t, rows in parts])
        return self.segment_losses(batch) / torch.tensor([n for _, n in batch.segments], device=self.device)

    def eval_batches(self, task: Task, batch_size: int) -> list[list[int]]:
        """Index batches of the task's test split, sorted by input length (less padding); cached."""
        key = (task.name, self.eval_split, batch_size, len(task.test_data))
        if key not in self._eval_batches:
            lengths = self.modality.lengths(task, task.test_data)
            self._eval_batches[key] = length_sorted_batches(lengths, batch_size)
        return self._eval_batches[key]

    def eval_data(self, task: Task, batch_size: int, num_workers: int | None = None) -> Iterator[ForwardBatch]:
        """The task's test split as ForwardBatches (in `eval_batches` order), encoded by worker processes
        (`num_workers`, default eval.num_workers; 0 encodes in this thread, as a threaded server must).

        Encoded batches are kept for the next model of a sweep (`encoded`: all tasks within one byte budget);
        token ids always fit, images of a large test set do not and are encoded again, prefetched.
        """
        key = (task.name, self.eval_split, batch_size, len(task.test_data))
        kept = self.encoded.get(key)
        if kept is not None:
            yield from kept
            return
        i = self.tasks.index(task)
        batches = self.eval_batches(task, batch_size)
        workers = self.cfg.eval.num_workers if num_workers is None else num_workers
        yield from self.encoded.keep(key, self.loader(_EvalBatches(self, i, batches), workers), len(batches))

    def loader(self, dataset: Any, num_workers: int | None, sampler: Any = None) -> torch.utils.data.DataLoader:
        """A DataLoader of whole items (no re-batching): worker processes, pinned memory on GPUs, prefetch."""
        n = default_workers(self.device) if num_workers is None else num_workers
        if n > 0:
            import os

            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are the parallelism
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            sampler=sampler,
            num_workers=n,
            collate_fn=_identity,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if n > 0 else None,
        )

    @torch.no_grad()
    def correct(
        self,
        task: Task,
        batch_size: int,
        backbone: nn.Module | None = None,
        data: Iterable[ForwardBatch] | None = None,
        on_batch: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """The task's metric per example (CPU, test-split order) through `backbone` (default: the upcycled
        one); what the bootstrap intervals resample. Accuracy tasks: BoolTensor[n] (correct or not);
        others (`task.metric`, e.g. a causal LM's loss): FloatTensor[n].

        data: the encoded `eval_batches` (default: `eval_data`, encoded by loader workers);
        on_batch() is called after each batch (progress).
        """
        out = torch.zeros(len(task.test_data), dtype=torch.float32, device=self.device)
        for idx, b in zip(
            self.eval_batches(task, batch_size), data if data is not None else self.eval_data(task, batch_size)
        ):
            val = task.example_scores(self.forward(b, backbone=backbone)[0], b.labels[0])
            out[torch.as_tensor(idx, device=self.device)] = val.float()
            if on_batch is not None:
                on_batch()
        out = out.cpu()  # the one device sync of the sweep point
        return out.bool() if task.metric == "accuracy" else out

    def accuracy(self, task: Task, batch_size: int, backbone: nn.Module | None = None) -> float:
        """The task's metric on its test split through `backbone` (default: the upcycled one): top-1 accuracy,
        or the mean per-example value of another metric (a causal LM's loss)."""
        c = self.correct(task, batch_size, backbone)
        return float(c.double().sum()) / len(c)

    def directions(self) -> dict[str, str]:
        """{task: "max" | "min"}: which metrics are higher- or lower-is-better (hypervolume, dominance, plots)."""
        return {t.name: "max" if self.higher_is_better(t) else "min" for t in self.tasks}

    def scored_by_lmeval(self, task: Task) -> bool:
        """Whether the evaluation split of `task` is scored by an lm-eval task: its test split, when its config has
        an `lm_eval` block (validation keeps the task's own metric on its own validation data)."""
        return self.eval_split == "test" and getattr(task.cfg, "lm_eval", None) is not None

    def higher_is_better(self, task: Task) -> bool:
        """The direction of the metric the evaluation split of `task` is scored by (its own, or its lm-eval's)."""
        return task.cfg.lm_eval.higher_is_better if self.scored_by_lmeval(task) else task.higher_is_better

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


class EncodedCache:
    """Encoded batches kept for reuse, keyed by what they encode, within one byte budget for all keys.

    `keep` passes batches through and keeps them while the budget allows; a key whose batches do not all
    fit is not kept (its batches are encoded again next time). The batches are stored before the last one
    is yielded: a consumer zipping them with their index batches stops there, and a generator's code after
    its last yield would never run.
    """

    def __init__(self, budget_bytes: int = 1 << 30) -> None:
        self.budget = budget_bytes
        self.kept: dict[Any, list[ForwardBatch]] = {}
        self.bytes = 0

    def get(self, key: Any) -> list[ForwardBatch] | None:
        return self.kept.get(key)

    def keep(self, key: Any, batches: Iterable[ForwardBatch], count: int) -> Iterator[ForwardBatch]:
        """Yield `batches` (`count` of them), keeping them under `key` if they all fit in what is left."""
        kept: list[ForwardBatch] | None = []
        size = 0
        for n, b in enumerate(batches, 1):
            if kept is not None:
                size += b.nbytes()
                if self.bytes + size <= self.budget:
                    kept.append(b)
                    if n == count:
                        self.kept[key] = kept
                        self.bytes += size
                else:
                    kept = None  # too big to keep: encoded again next time
            yield b


def segment_rows(batch: Any) -> list[int]:
    """Model rows of each segment of a batch: its `rows` (`Workbench.encode` always sets them: examples x
    the task's rows_per_example), else one row per example (batches built by hand, one row each)."""
    return list(getattr(batch, "rows", None) or [n for _, n in batch.segments])


def default_workers(device: torch.device) -> int:
    """Input-pipeline workers when the config leaves it open: GPUs get 4; CPUs (which the workers
    would take from the model's own threads) get 1 to overlap pre-processing with the step."""
    return 4 if device.type == "cuda" else 1


def _identity(x: Any) -> Any:
    return x


class _EvalBatches(torch.utils.data.Dataset):
    """Item j: the j-th length-sorted test batch of one task, encoded (run in loader workers)."""

    def __init__(self, wb: Workbench, task_index: int, batches: list[list[int]]) -> None:
        self.wb, self.i, self.batches = wb, task_index, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, j: int) -> ForwardBatch:
        t = self.wb.tasks[self.i]
        return self.wb.encode([(self.i, t.test_data[self.batches[j]])])


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Index batches in order of length, so each batch pads to a similar length (less wasted compute)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
