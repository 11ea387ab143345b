"""Multiple testing: Holm's step-down adjustment over a family of p-values (statsmodels)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from osteolib.evaluation.stats.intervals import critical_z


@dataclass(frozen=True)
class HolmResult:
    """Holm-adjusted p-values (in the input order) and whether each hypothesis is rejected at ``alpha``."""

    p_adjusted: np.ndarray
    reject: np.ndarray
    alpha: float


def holm(p_values: Any, alpha: float = 0.05) -> HolmResult:
    """Holm step-down adjustment over a family of p-values (statsmodels ``multipletests(method="holm")``)."""
    from statsmodels.stats.multitest import multipletests

    critical_z(alpha)
    p = np.asarray(p_values, dtype=float).ravel()
    if p.size == 0:
        return HolmResult(p_adjusted=p.copy(), reject=np.zeros(0, dtype=bool), alpha=alpha)
    bad = ~np.isfinite(p) | (p < 0) | (p > 1)
    if bad.any():
        raise ValueError(f"p-values must lie in [0, 1]; position(s) {np.flatnonzero(bad)[:10].tolist()} hold "
                         f"{p[bad][:10].tolist()}")
    reject, adjusted, _, _ = multipletests(p, alpha=alpha, method="holm")
    return HolmResult(p_adjusted=np.asarray(adjusted, dtype=float), reject=np.asarray(reject, dtype=bool),
                      alpha=alpha)
