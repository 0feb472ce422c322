"""Tasks: data + frozen head + metric. A new task type is one class added to TASK_TYPES."""

from .base import Task
from .causal_lm import CausalLMChoiceTask, CausalLMTask
from .clip import CLIPZeroShotTask
from .sequence_classification import SequenceClassificationTask

TASK_TYPES: dict[str, type[Task]] = {
    "sequence_classification": SequenceClassificationTask,
    "clip_zero_shot": CLIPZeroShotTask,
    "causal_lm_choice": CausalLMChoiceTask,
    "causal_lm": CausalLMTask,
}

__all__ = ["TASK_TYPES", "CLIPZeroShotTask", "CausalLMChoiceTask", "CausalLMTask", "SequenceClassificationTask", "Task"]
