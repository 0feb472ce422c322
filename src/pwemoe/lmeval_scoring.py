"""A task's test metric from an lm-evaluation-harness task, in process: lm-eval's Hugging Face model (`HFLM`) over
the model at a preference, its per-example scores read from lm-eval's logged samples.

`LMEvalScorer(wb, task, batch_size)` loads the lm-eval task once (its documents and prompts) and is called with each
point's backbone, as `PointEvaluator.scorer` calls a task's own scorer: the backbone (a merged copy at a preference,
or a baseline's model) goes into a causal-LM shell that shares the run's LM head (`causal_shell`), lm-eval's
`evaluate` runs the task through `HFLM(pretrained=shell)`, and the samples of the configured metric and filter,
ordered by `doc_id`, are the task's per-example values: rows, hypervolumes, bootstrap intervals, the report, the
explorer and `pwemoe select` read them as any task's. Nothing is reloaded per preference and nothing goes over HTTP.
Where the hub is off (HF_HUB_OFFLINE=1, as in the demos) lm-eval's datasets are read offline too
(HF_DATASETS_OFFLINE=1, unless the caller set that variable); otherwise a hub task downloads its data as lm-eval does.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .devices import autocast
from .lmeval import require, task_manager

if TYPE_CHECKING:
    from .tasks import Task
    from .workbench import Workbench

log = logging.getLogger(__name__)


def causal_shell(model: nn.Module, backbone: nn.Module) -> nn.Module:
    """A *ForCausalLM that runs `backbone` (Tensor[b, t] ids -> hidden states) and `model`'s own LM head: a shallow
    copy of `model` whose base model is `backbone`, sharing every tensor (nothing is copied).

    The LM head is a shallow copy too: lm-eval's HFLM ties weights (`tie_weights`), which then re-points the copy's
    weight, never the run's own head.
    """
    shell = copy.copy(model)
    shell._modules = dict(model._modules)  # noqa: SLF001 - the copy's own child table: the swap stays in the copy
    setattr(shell, model.base_model_prefix, backbone)
    head = model.get_output_embeddings()
    if head is not None:
        own = copy.copy(head)
        own._parameters = dict(head._parameters)  # noqa: SLF001
        for name, child in model._modules.items():  # noqa: SLF001
            if child is head:
                shell._modules[name] = own  # noqa: SLF001
    return shell


class LMEvalScorer:
    """Per-example scores of one pwemoe task by its lm-eval task (`tasks[i].lm_eval`): callable on a backbone.

    Args:
        wb: the workbench (its full causal-LM model, tokenizer, device and precision).
        task: the pwemoe task whose config has an `lm_eval` block.
        batch_size: lm-eval's batch size when the block gives none.
    """

    def __init__(self, wb: Workbench, task: Task, batch_size: int) -> None:
        spec = getattr(task.cfg, "lm_eval", None)
        if spec is None:
            raise ValueError(f"task {task.name!r} has no lm_eval block; it is scored by its own metric")
        require()
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        if offline and "HF_DATASETS_OFFLINE" not in os.environ:  # the hub is off: datasets from files and cache
            import datasets

            os.environ["HF_DATASETS_OFFLINE"] = "1"
            datasets.config.HF_DATASETS_OFFLINE = True  # read at import: `datasets` may be imported already
        self.wb, self.task, self.spec = wb, task, spec
        self.batch_size = spec.batch_size or batch_size
        with quiet():
            loaded = task_manager(spec.task, spec.include_path).load([spec.task])
        tasks = loaded["tasks"]
        if len(tasks) != 1 or loaded["groups"]:
            raise ValueError(
                f"task {task.name!r}: lm_eval.task {spec.task!r} loads {len(tasks)} lm-eval tasks; an objective is "
                "one task: name one of them"
            )
        self.name, self.lm_task = next(iter(tasks.items()))
        self.task_dict = loaded
        declared = self.lm_task.higher_is_better().get(spec.metric)
        if declared is not None and bool(declared) != spec.higher_is_better:
            raise ValueError(
                f"task {task.name!r}: lm-eval declares {spec.metric!r} of {self.name!r} "
                f"{'higher' if declared else 'lower'} is better; set lm_eval.higher_is_better: {bool(declared)}"
            )

    def __call__(self, backbone: nn.Module) -> torch.Tensor:
        """Tensor[n_docs] of the metric per lm-eval document (ordered by doc_id): bool when every value is 0 or 1
        (accuracy, exact match), else float32."""
        out = self.evaluate(backbone)
        return per_example(out["samples"][self.name], self.spec.metric, self.spec.filter, f"task {self.task.name!r}")

    def evaluate(self, backbone: nn.Module) -> dict[str, Any]:
        """lm-eval's `evaluate` output of the task through `backbone` (its "results" and logged "samples"), in the
        run's precision (autocast, as pwemoe's own scoring)."""
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM

        wb = self.wb
        shell = causal_shell(wb.modality.model, backbone)
        with quiet():
            lm = HFLM(pretrained=shell, tokenizer=wb.modality.tokenizer, batch_size=self.batch_size)
            with torch.no_grad(), autocast(wb.device, wb.precision):
                return evaluate(lm, self.task_dict, limit=self.spec.limit, log_samples=True, bootstrap_iters=0)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """lm-eval's progress bars (its task, model and HF modules' `tqdm`, and `datasets`' while a task loads) and its
    expected warnings (a model passed as an object) off: a sweep's progress is pwemoe's own. Restored after."""
    import datasets
    import lm_eval.api.model
    import lm_eval.api.task
    import lm_eval.models.huggingface
    from tqdm.auto import tqdm

    def silent(*args: Any, **kwargs: Any) -> Any:
        return tqdm(*args, **{**kwargs, "disable": True})  # over lm-eval's own disable=False

    modules = [lm_eval.api.model, lm_eval.api.task, lm_eval.models.huggingface]
    bars = [m.__dict__.get("tqdm") for m in modules]
    log_ = logging.getLogger("lm_eval")
    level, data_bars = log_.level, datasets.is_progress_bar_enabled()
    log_.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    for m in modules:
        m.tqdm = silent
    try:
        yield
    finally:
        for m, bar in zip(modules, bars):
            m.tqdm = bar
        log_.setLevel(level)
        if data_bars:
            datasets.enable_progress_bars()


def per_example(samples: list[dict[str, Any]], metric: str, filter: str, what: str) -> torch.Tensor:
    """The metric of lm-eval's logged samples of one filter, ordered by doc_id: Tensor[n] (bool when every value is
    0 or 1, else float32); a ValueError naming the metrics and filters the samples have."""
    mine = sorted((s for s in samples if s.get("filter") == filter), key=lambda s: s["doc_id"])
    if not mine:
        filters = sorted({str(s.get("filter")) for s in samples})
        raise ValueError(f"{what}: lm-eval logged no samples of filter {filter!r}; its filters: {filters}")
    if metric not in mine[0]:
        raise ValueError(f"{what}: lm-eval's samples have no metric {metric!r}; they have {mine[0].get('metrics')}")
    several = next((s[metric] for s in mine if not isinstance(s[metric], (int, float))), None)
    if several is not None:
        raise ValueError(
            f"{what}: lm-eval's {metric!r} is not one number per document (e.g. {several!r}); choose a per-document "
            f"metric of its samples: {mine[0].get('metrics')}"
        )
    values = torch.tensor([float(s[metric]) for s in mine], dtype=torch.float32)
    return values.bool() if bool(((values == 0) | (values == 1)).all()) else values


__all__ = ["LMEvalScorer", "causal_shell", "per_example"]
