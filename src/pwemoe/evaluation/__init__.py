"""Evaluation: preference grids, baselines, Pareto fronts and hypervolumes."""

from .pareto import hypervolume, non_dominated

__all__ = ["hypervolume", "non_dominated"]
