"""Pure tensor math of PWEMoE. Nothing here imports transformers."""

from .ensembling import EnsemblingModule, WeightEnsemblingModule
from .factored import FactoredEnsemblingModule, LowRank, truncated_svd
from .merge import (
    add_task_vector_,
    merge_weights,
    preference_weighted_task_arithmetic,
    simple_average,
    task_arithmetic,
    weighted_task_arithmetic,
)
from .preference import DirichletSampler, normalize_preference, parse_preference, simplex_grid, simplex_grid_size
from .router import Router
from .task_vector import check_compatible, stack_task_vectors, task_vector

__all__ = [
    "DirichletSampler",
    "EnsemblingModule",
    "FactoredEnsemblingModule",
    "LowRank",
    "Router",
    "WeightEnsemblingModule",
    "add_task_vector_",
    "check_compatible",
    "merge_weights",
    "normalize_preference",
    "parse_preference",
    "preference_weighted_task_arithmetic",
    "simple_average",
    "simplex_grid",
    "simplex_grid_size",
    "stack_task_vectors",
    "task_arithmetic",
    "task_vector",
    "truncated_svd",
    "weighted_task_arithmetic",
]
