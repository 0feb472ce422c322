"""The run configuration's schema: pydantic models of every section, with their defaults, help texts and checks.

The schema knows no registries (task types, objectives): callers that have them pass them in `Registries`, and
the names are checked in the same validation pass as everything else.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ..core.router import ROUTER_INITS
from ..devices import CHECKPOINT_SCOPES, DEVICE_CHOICES, PRECISIONS, check_device_spec
from .errors import key_error, keys_error

# Settings that may change when a run is resumed; any other difference is refused.
# Where and how fast a run computes may change too (resume a CPU run on a GPU), not what it computes.
RESUMABLE = (
    "train.steps",
    "train.lr",
    "train.min_lr_ratio",
    "train.save_interval",
    "train.log_interval",
    "train.num_workers",
    "train.val_interval",
    "train.select",
    "train.task_gradients",
    "train.micro_batch_size",
    "train.gradient_checkpointing",
    "device",
    "precision",
    "eval.",
)


def resumable_keys() -> str:
    """RESUMABLE as users write the keys ("eval.*" for a prefix): for help texts and errors."""
    return ", ".join(k + "*" if k.endswith(".") else k for k in RESUMABLE)


DEFAULT_TASK_TYPE = "sequence_classification"
# Where a task's examples come from (`tasks[i].data.source`); `tasks.data.load_split` reads each.
DATA_SOURCES = ("hub", "csv", "json", "parquet", "imagefolder", "adapter")
TASK_VECTOR_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Registries:
    """What the layers above know: task type -> its config model, and objective name -> a checker of its arguments.

    `check_objective(name, args, k)` returns None when the objective can be built for k tasks, else the reason.
    `check_adapter(path, trust_remote_code)` returns None when a data adapter may be used, else the reason.
    """

    task_configs: Mapping[str, type[BaseModel]] = field(default_factory=dict)
    objectives: tuple[str, ...] = ()
    check_objective: Callable[[str, dict[str, Any], int], str | None] | None = None
    # (eval.baselines, eval.merge_grids, k) -> every problem, each starting with its key
    check_baselines: Callable[[Any, Any, int], list[str]] | None = None
    check_adapter: Callable[[str, bool], str | None] | None = None

    @property
    def task_types(self) -> tuple[str, ...]:
        return tuple(self.task_configs)


def _one_of(v: str, allowed: tuple[str, ...]) -> str:
    """v if it is one of `allowed`, else the field's error naming every allowed value."""
    if v not in allowed:
        raise ValueError(f"must be one of {', '.join(allowed)}, got {v!r}")
    return v


_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_default=False)
# A plain name: used as a directory name on export, so no separators, no '..', no leading dot.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")  # matched whole (fullmatch)


class DataConfig(BaseModel):
    """Where a task's examples come from (through the `datasets` library)."""

    model_config = _STRICT
    source: str = Field("hub", description=" | ".join(DATA_SOURCES))
    path: str = Field(
        "", description="dataset id, file, directory or glob; for source=adapter a registered name or 'module:function'"
    )
    trust_remote_code: bool = Field(
        False,
        description="source=adapter: allow a 'module:function' that no installed package registered as a data "
        "adapter (pwemoe imports and runs that code, as transformers does with trust_remote_code)",
    )
    name: str | None = Field(None, description="the hub dataset's configuration name")
    files: dict[str, str] | None = Field(None, description="split -> file, instead of `path` (local sources)")
    train_split: str = Field("train", description="split the routers (and finetune) train on")
    test_split: str = Field("test", description="split `pwemoe evaluate` measures")
    text_column: str = Field("text", description="text input column (text tasks)")
    text_pair_column: str | None = Field(None, description="second text column for sentence-pair tasks")
    image_column: str = Field("image", description="image column (image tasks)")
    label_column: str = Field("label", description="integer class label column")
    prompt_column: str | None = Field(
        None, description="causal_lm: a prompt column; the loss is then on the text column's tokens after it"
    )
    max_train_samples: int | None = Field(None, ge=1, description="use only the first N training examples")
    max_test_samples: int | None = Field(None, ge=1, description="use only the first N test examples")
    validation_split: str | None = Field(
        None, description="split to choose settings and checkpoints on (pwemoe evaluate --split validation)"
    )
    validation_fraction: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="or carve this seeded, stratified share of the training split as validation data "
        "(removed from what experts and routers train on)",
    )
    validation_seed: int = Field(0, description="seed of the validation carve")
    max_validation_samples: int | None = Field(None, ge=1, description="use only the first N validation examples")

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        return _one_of(v, DATA_SOURCES)

    @model_validator(mode="after")
    def _where(self, info: ValidationInfo) -> DataConfig:
        if not self.path and not self.files:
            raise key_error("path", "required (dataset id, file, or adapter 'module:function')")
        reg = (info.context or {}).get("registries")
        if self.source == "adapter" and reg is not None and reg.check_adapter is not None:
            why = reg.check_adapter(self.path, self.trust_remote_code)
            if why:
                raise key_error("path", why)
        if self.validation_split and self.validation_fraction:
            raise key_error(
                "validation_fraction", "give validation_split or validation_fraction, not both (one validation set)"
            )
        if self.validation_split is not None and self.validation_split in (self.train_split, self.test_split):
            raise key_error(
                "validation_split",
                f"must differ from train_split and test_split, got {self.validation_split!r}; "
                "or carve one from the training split with validation_fraction",
            )
        return self

    @property
    def has_validation(self) -> bool:
        return bool(self.validation_split or self.validation_fraction)


class LMEvalConfig(BaseModel):
    """An lm-evaluation-harness task that scores a task's test split (`pwemoe evaluate`), in process: lm-eval's
    Hugging Face model over the model at each preference (docs/guides/lm-eval.md). The routers still train on the
    task's own training data; validation keeps the task's own metric."""

    model_config = _STRICT
    task: str = Field(description="a registered lm-eval task name, or the path of a task YAML file")
    metric: str = Field("acc", description="the metric of its logged samples that scores each example")
    filter: str = Field("none", description="the lm-eval filter whose samples are read (generate_until tasks)")
    higher_is_better: bool = Field(True, description="the metric's direction (as lm-eval's task declares it)")
    include_path: str | None = Field(None, description="a folder of task YAMLs that lm-eval indexes besides its own")
    limit: int | None = Field(None, ge=1, description="score only the first N documents of the lm-eval task")
    batch_size: int | None = Field(None, ge=1, description="lm-eval's batch size (default: eval.batch_size)")

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("required: a registered lm-eval task name (e.g. arc_easy) or a task YAML file")
        if v.endswith((".yaml", ".yml")) and not Path(v).expanduser().is_file():
            raise ValueError(f"task YAML {v!r} does not exist; give an existing file or a registered task name")
        return v

    @field_validator("metric", "filter")
    @classmethod
    def _plain(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", v):
            raise ValueError(f"must be a plain lm-eval metric or filter name (e.g. acc, exact_match, none), got {v!r}")
        return v

    @field_validator("include_path")
    @classmethod
    def _include(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).expanduser().is_dir():
            raise ValueError(f"{v!r} is not a folder; give the folder that holds the task YAMLs (or leave it out)")
        return v


class TaskConfig(BaseModel):
    """One objective: an expert fine-tuned for it, its data, and the options every task type has.

    A task type's own options live in a subclass next to the task (its `Task.config_class`, e.g.
    `tasks.causal_lm.CausalLMChoiceConfig` adds `prompt_template` and `label_words`); `tasks` is a union of
    them keyed by `type`, so an option of another type is refused by name.
    """

    model_config = _STRICT
    name: str = Field(description="a plain name (letters, digits, _ . -); also the export sub-directory")
    type: str = Field(DEFAULT_TASK_TYPE, description="the task type", json_schema_extra={"registry": "task_types"})
    expert: str = Field(description="hub id or local directory of this task's fine-tuned model")
    data: DataConfig = Field(description="where the examples come from")
    class_names: list[str] | None = Field(None, description="default: the expert's id2label or the ClassLabel names")
    max_length: int = Field(128, ge=1, description="tokens per text input (truncation)")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not _NAME.fullmatch(v) or ".." in v:
            raise ValueError(f"must be a plain name (letters, digits, '_', '.', '-'; no path separators), got {v!r}")
        return v

    @field_validator("expert")
    @classmethod
    def _expert(cls, v: str) -> str:
        if not v:
            raise ValueError("required: hub id or local directory of this task's fine-tuned model")
        return v


class ModelConfig(BaseModel):
    """The pretrained model, what is upcycled, and how."""

    model_config = _STRICT
    base: str = Field(description="hub id or local directory of the pretrained model")
    targets: list[str] | None = Field(None, description="module names, suffixes or 're:' regexes (default: table)")
    include_attention: bool = Field(False, description="upcycle attention blocks as well as MLPs")
    init_lambda: float = Field(0.3, description="task-arithmetic scale of the rest, and the routers' initial output")
    router_hidden_layers: int = Field(2, ge=0, le=2, description="0, 1 or 2 (k -> 2k -> ReLU -> k)")
    router_init: str = Field(
        "constant",
        description="constant (the paper's: lambda = init_lambda, task arithmetic) | preference "
        "(lambda(r) = init_lambda * k * r: starts at preference-weighted task arithmetic)",
    )
    task_vector_dtype: str = Field("float32", description=f"storage of task vectors: {' | '.join(TASK_VECTOR_DTYPES)}")
    path_map: dict[str, str] = Field(default_factory=dict, description="hub id -> local path (offline mirrors)")
    task_vector_rank: int | float | None = Field(
        None,
        description="dense experts: truncated-SVD rank of each linear layer's task vector (int), or the share of "
        "its energy to keep (float in (0, 1]); LoRA experts are low-rank already",
    )

    @field_validator("router_init")
    @classmethod
    def _router_init(cls, v: str) -> str:
        return _one_of(v, ROUTER_INITS)

    @field_validator("task_vector_rank")
    @classmethod
    def _rank(cls, v: int | float | None) -> int | float | None:
        if v is None:
            return v
        if isinstance(v, int) and v < 1:
            raise ValueError(f"must be an int >= 1 (a rank) or a float in (0, 1] (an energy share), got {v}")
        if isinstance(v, float) and not 0.0 < v <= 1.0:
            raise ValueError(f"as an energy share must be in (0, 1], got {v}")
        return v

    @field_validator("base")
    @classmethod
    def _base(cls, v: str) -> str:
        if not v:
            raise ValueError("required: hub id or local directory of the pretrained model")
        return v

    @field_validator("task_vector_dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        return _one_of(v, TASK_VECTOR_DTYPES)


class TrainConfig(BaseModel):
    """Router training: the objective, the schedule and the sampling of preferences."""

    model_config = _STRICT
    objective: str = Field(
        "ls",
        description="the training objective (docs/guides/objectives.md)",
        json_schema_extra={"registry": "objectives"},
    )
    objective_args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the objective")
    steps: int = Field(2000, ge=1, description="optimizer steps (may be raised on --resume)")
    lr: float = Field(1e-2, gt=0, description="Adam learning rate (may change on --resume)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine annealing floor as a fraction of lr")
    batch_size: int = Field(16, ge=1, description="examples per task per step")
    alpha: float = Field(1.0, gt=0, description="Dirichlet concentration of the sampled preferences")
    rays_per_step: int = Field(1, ge=1, description="preferences per step; each gets batch_size/rays examples")
    seed: int = Field(0, description="seed of preferences, batches and router initialisation")
    save_interval: int = Field(100, ge=1, description="steps between checkpoints")
    log_interval: int = Field(10, ge=1, description="steps between metrics.jsonl lines")
    concat_forward: bool = Field(True, description="one forward over all tasks' examples (LS-type objectives)")
    task_gradients: str = Field(
        "forwards",
        description="how EPO gets per-task gradients: forwards (one forward per task; one weight gradient held at a "
        "time) | segments (forwards across tasks, each task's rows on its own view of the merge; the same gradients, "
        "k weight gradients held; within 2% of forwards on the 2-core CPU demo, not measured on GPUs)",
    )

    @field_validator("task_gradients")
    @classmethod
    def _task_gradients(cls, v: str) -> str:
        return _one_of(v, ("forwards", "segments"))

    micro_batch_size: int | None = Field(
        None,
        ge=1,
        description="examples per forward; the step's forwards share one merge and accumulate gradients "
        "(default per device type, chosen by benchmarks/train_step.py: cpu 16, cuda: all at once)",
    )
    gradient_checkpointing: bool | str = Field(
        False,
        description="recompute activations in the backward: true or layers (every transformer layer: least "
        "memory, about 1/3 more compute), upcycled (only the upcycled modules: their hidden activations, "
        "for one more GEMM each), false",
    )

    @field_validator("gradient_checkpointing")
    @classmethod
    def _gradient_checkpointing(cls, v: bool | str) -> bool | str:
        return v if isinstance(v, bool) else _one_of(v, CHECKPOINT_SCOPES)

    num_workers: int | None = Field(
        None, ge=0, description="input-pipeline worker processes (0: in the training process; default per device)"
    )
    val_interval: int | None = Field(
        None,
        ge=1,
        description="every N steps (and at the end), measure the front on the validation split: "
        "hypervolume of PWEMoE on the val_grid, logged as val_hv in metrics.jsonl",
    )
    val_grid: int = Field(3, ge=2, description="simplex grid levels per axis of the validation front")
    select: str = Field(
        "last",
        description="routers that evaluate/export/serve use: last | best_val_hv (the checkpoint with the "
        "best validation hypervolume; needs val_interval)",
    )

    @field_validator("select")
    @classmethod
    def _select(cls, v: str) -> str:
        return _one_of(v, ("last", "best_val_hv"))

    @model_validator(mode="after")
    def _rays(self) -> TrainConfig:
        if self.rays_per_step > self.batch_size:
            raise key_error(
                "rays_per_step", f"must be at most train.batch_size ({self.batch_size}), got {self.rays_per_step}"
            )
        return self

    @field_validator("objective")
    @classmethod
    def _objective(cls, v: str, info: ValidationInfo) -> str:
        reg = (info.context or {}).get("registries")
        if reg is not None and reg.objectives and v not in reg.objectives:
            raise ValueError(f"unknown objective {v!r}; known: {sorted(reg.objectives)}")
        return v


class EvalConfig(BaseModel):
    """Grid evaluation and the baselines drawn beside PWEMoE."""

    model_config = _STRICT
    batch_size: int = Field(64, ge=1, description="examples per forward")
    grid: int = Field(11, ge=2, description="simplex grid levels per axis (M)")
    bootstrap_resamples: int = Field(
        1000, ge=0, description="paired bootstrap resamples of the test examples for every interval (0: none)"
    )
    confidence: float = Field(0.95, gt=0, lt=1, description="level of the bootstrap percentile intervals")
    bootstrap_seed: int = Field(0, description="seed of the bootstrap resamples")
    baselines: bool | list[str] = Field(
        True,
        description="true: task arithmetic, preference-weighted TA and simple averaging; false: none; or a list of "
        "names, which may add the standard merges computed by mergekit (extra 'mergekit'), e.g. [ties, pref_ties]; "
        "the names: docs/guides/baselines.md (an unknown name is refused with the list)",
    )
    merge_grids: dict[str, dict[str, list[float]]] = Field(
        default_factory=dict,
        description="a standard merge's hyper-parameter grid, e.g. {ties: {density: [0.2, 0.5], lambda: [1.0]}}; "
        "parameters as mergekit spells them; unnamed ones keep their defaults (docs/guides/baselines.md)",
    )
    merge_seed: int = Field(0, description="the random seed of the stochastic merges (DARE), recorded with each row")
    pwta_scale: float | None = Field(None, gt=0, description="c of preference-weighted TA (default init_lambda*k)")
    ta_scales: list[float] = Field(
        default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 11)], description="lambda grid of task arithmetic"
    )
    reference_point: float = Field(0.0, description="hypervolume reference point, on every axis")
    loss_reference: float | None = Field(
        None,
        gt=0,
        description="reference point of lower-is-better (loss) tasks; default: 1.1 x the worst loss evaluated",
    )
    num_workers: int | None = Field(
        None, ge=0, description="input-pipeline worker processes (0: in the evaluating process; default per device)"
    )


class Config(BaseModel):
    """A whole run: model, tasks, training and evaluation settings, and where the run lives."""

    model_config = _STRICT
    model: ModelConfig = Field(description="the pretrained model and the upcycling")
    tasks: list[TaskConfig] = Field(description="one entry per expert, at least 2")
    train: TrainConfig = Field(default_factory=TrainConfig, description="router training")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="evaluation")
    run_dir: str = Field("runs/pwemoe", description="the run directory (a new or pwemoe-made directory)")
    device: str = Field("auto", description=f"{DEVICE_CHOICES} (auto: the local rank's GPU if there is one, else CPU)")
    precision: str = Field(
        "fp32", description=f"{' | '.join(PRECISIONS)}: autocast of the forward (routers and optimizer stay fp32)"
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        why = check_device_spec(v)
        if why:
            raise ValueError(why)
        return v

    @field_validator("precision")
    @classmethod
    def _precision(cls, v: str) -> str:
        return _one_of(v, PRECISIONS)

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[TaskConfig]) -> list[TaskConfig]:
        if len(v) < 2:
            raise ValueError(f"need at least 2 tasks (one expert each), got {len(v)}")
        dup = sorted({t.name for t in v if sum(u.name == t.name for u in v) > 1})
        if dup:
            raise ValueError(f"task names must be unique, {dup} repeat")
        return v

    @field_validator("run_dir")
    @classmethod
    def _run_dir(cls, v: str) -> str:
        if not v.strip() or Path(v).resolve() == Path.cwd().resolve():
            raise ValueError(
                f"must name a run directory of its own (e.g. runs/my-run), got {v!r}: a run "
                "directory is written by pwemoe and must not be the working directory"
            )
        return v

    @model_validator(mode="after")
    def _objective_args(self, info: ValidationInfo) -> Config:
        # needs k (the number of tasks): checked here, before any model is loaded
        reg = (info.context or {}).get("registries")
        t = self.train
        if reg is not None and reg.check_objective is not None and t.objective in reg.objectives:
            why = reg.check_objective(t.objective, t.objective_args, len(self.tasks))
            if why:
                raise key_error("train.objective_args", why)
        return self

    @model_validator(mode="after")
    def _baselines(self, info: ValidationInfo) -> Config:
        # the names and grids need the registry and k: checked here, before any model is loaded
        reg = (info.context or {}).get("registries")
        if reg is not None and reg.check_baselines is not None:
            errors = reg.check_baselines(self.eval.baselines, self.eval.merge_grids, len(self.tasks))
            if errors:
                raise keys_error(errors)
        return self

    @model_validator(mode="after")
    def _validation(self) -> Config:
        t = self.train
        if t.select == "best_val_hv" and t.val_interval is None:
            raise key_error("train.select", "best_val_hv needs train.val_interval (how often to validate)")
        losses = [x.name for x in self.tasks if x.type == "causal_lm"]
        if t.val_interval is not None and losses and self.eval.loss_reference is None:
            raise key_error(
                "eval.loss_reference",
                f"validation hypervolumes of lower-is-better (loss) tasks {losses} need a fixed reference point: "
                "set eval.loss_reference (e.g. a little above the base model's loss)",
            )
        missing = [x.name for x in self.tasks if not x.data.has_validation]
        if t.val_interval is not None and missing:
            raise key_error(
                "train.val_interval",
                f"needs validation data for every task; {missing} have none: set tasks.<i>.data.validation_split "
                "or tasks.<i>.data.validation_fraction",
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="python")

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


def submodel(annotation: Any) -> type[BaseModel] | None:
    """The config model inside a field annotation (`DataConfig`, `list[TaskConfig]`), if any."""
    inner = getattr(annotation, "__args__", (annotation,))
    return next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
