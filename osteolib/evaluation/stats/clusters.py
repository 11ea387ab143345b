"""The cluster (patient) bootstrap: resample patients with replacement and take all their images.

Images of one patient are not independent: two views of the same shoulder agree far more often than two patients
do, so resampling images treats a 55-image, 10-patient test set as if it held 55 independent cases and gives an
interval that is much too narrow (measured on a knee set: AUC 0.848, image-level bootstrap CI [0.73, 0.94],
patient-level [0.54, 0.99]). Resampling the patients keeps each patient's images together.

With one image per patient the cluster bootstrap *is* the ordinary paired percentile bootstrap: the resampling
indices are drawn exactly as ``scipy.stats.bootstrap`` draws them (``rng.integers(0, n, (n_boot, n))`` from
``numpy.random.default_rng(seed)``) and the interval is the same linear-interpolation quantile, so
:func:`cluster_bootstrap_ci` reproduces :func:`osteolib.evaluation.stats.bootstrap_ci` (``paired=True``,
``method="percentile"``) number for number.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from osteolib.evaluation.stats.intervals import critical_z

# a CI needs most resamples to define the statistic (an AUC is undefined on a resample holding one class)
MIN_DEFINED_SHARE = 0.5


@dataclass(frozen=True)
class ClusterBootstrapResult:
    """A percentile bootstrap CI over clusters (patients), with how many resamples defined the statistic."""

    estimate: float
    ci_low: float
    ci_high: float
    se: float
    n_boot: int
    n_defined: int
    n_clusters: int
    n_cases: int
    method: str = "percentile"


def cluster_ids(groups: Any) -> tuple[np.ndarray, list[np.ndarray]]:
    """The distinct cluster ids in order of first appearance, and the row positions of each."""
    groups = np.asarray(groups)
    if groups.ndim != 1 or groups.size == 0:
        raise ValueError(f"groups must be a non-empty one-dimensional array of cluster ids, got shape {groups.shape}")
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # clusters in order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    positions = [[] for _ in range(order.size)]
    for row, cluster in enumerate(rank[inverse.ravel()]):
        positions[cluster].append(row)
    return groups[np.sort(first)], [np.asarray(p, dtype=np.int64) for p in positions]


def one_per_cluster(groups: Any) -> bool:
    """True when no cluster id repeats (every patient has exactly one image)."""
    groups = np.asarray(groups)
    return np.unique(groups).size == groups.size


def cluster_bootstrap_ci(statistic: Callable[..., float], groups: Any, *arrays: Any, n_boot: int = 2000,
                         seed: int = 0, alpha: float = 0.05) -> ClusterBootstrapResult:
    """Percentile bootstrap CI of ``statistic(*arrays)`` resampling whole clusters (``groups``: a patient id per row).

    Each resample draws as many clusters as there are, with replacement, and takes all rows of each drawn cluster
    (a cluster drawn twice contributes its rows twice). Resamples on which the statistic is undefined (non-finite,
    e.g. an AUC of a resample holding one class) are left out and counted in ``n_defined``; fewer than half defined
    is an error. With one row per cluster this is the paired percentile bootstrap of :func:`bootstrap_ci`.
    """
    if n_boot < 100:
        raise ValueError(f"n_boot={n_boot} is too few resamples for a CI; use at least 1000")
    critical_z(alpha)
    data = [np.asarray(a) for a in arrays]
    if not data:
        raise ValueError("cluster_bootstrap_ci needs at least one data array after the groups")
    _, positions = cluster_ids(groups)
    n = int(np.asarray(groups).size)
    if any(a.ndim != 1 or a.size != n for a in data):
        raise ValueError(f"every array must be one-dimensional with one value per row of groups ({n}); got shapes "
                         f"{[a.shape for a in data]}")
    estimate = float(statistic(*data))
    if not math.isfinite(estimate):
        raise ValueError(f"the statistic is {estimate} on the full data; check the inputs")
    draws = np.random.default_rng(seed).integers(0, len(positions), (int(n_boot), len(positions)))
    distribution = np.empty(int(n_boot))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Only one class")  # sklearn's AUC of one class: counted below
        for b, drawn in enumerate(draws):
            rows = np.concatenate([positions[c] for c in drawn])
            try:
                distribution[b] = float(statistic(*(a[rows] for a in data)))
            except ValueError:  # older sklearn refuses an AUC of one class: an undefined resample
                distribution[b] = math.nan
    defined = distribution[np.isfinite(distribution)]
    if defined.size < MIN_DEFINED_SHARE * n_boot:
        raise ValueError(f"the statistic was defined on only {defined.size} of {n_boot} cluster resamples (e.g. "
                         f"resamples holding one class); {len(positions)} clusters are too few for this interval")
    low, high = np.quantile(defined, [alpha / 2.0, 1.0 - alpha / 2.0])
    return ClusterBootstrapResult(estimate=estimate, ci_low=float(low), ci_high=float(high),
                                  se=float(np.std(defined, ddof=1)), n_boot=int(n_boot), n_defined=int(defined.size),
                                  n_clusters=len(positions), n_cases=n)
