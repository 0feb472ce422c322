"""Non-dominated filtering and hypervolume (pymoo) for accuracies, where larger is better."""

from __future__ import annotations

import numpy as np


def non_dominated(points: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows of points [n, m] that no other row dominates (maximisation).

    A dominates B when A >= B everywhere and A > B somewhere. Duplicates are all kept.
    """
    p = np.asarray(points, dtype=float)
    n = len(p)
    mask = np.ones(n, dtype=bool)
    for i in range(n):
        ge = (p >= p[i]).all(axis=1)
        gt = (p > p[i]).any(axis=1)
        if (ge & gt).any():
            mask[i] = False
    return mask


def hypervolume(points: np.ndarray, reference: float | np.ndarray = 0.0) -> float:
    """Volume dominated by points [n, m] above the reference point (maximisation), via pymoo's HV.

    pymoo minimises, so both the points and the reference are negated. Points that do not
    strictly dominate the reference contribute nothing.
    """
    from pymoo.indicators.hv import HV

    p = np.atleast_2d(np.asarray(points, dtype=float))
    ref = np.broadcast_to(np.asarray(reference, dtype=float), (p.shape[1],))
    keep = (p > ref).all(axis=1)
    if not keep.any():
        return 0.0
    return float(HV(ref_point=-ref)(-p[keep]))
