"""The label-efficiency curve's statistics: AUC per (backbone, initialisation, label fraction) with patient-level
intervals, the pretraining effect at each fraction with Holm-corrected p-values, and a mixed model of test AUC on
initialisation x log2(label fraction) with the seed as a random effect.

A point of the curve is the test AUC **averaged over the seeds** (each seed draws its own nested label subset and its
own initialisation of the head), its interval a cluster bootstrap over test patients: the patients are resampled
and every seed's AUC recomputed on the same resample, so the interval is about the test population the curve is
measured on. The effect of an initialisation at a fraction is the same seed-averaged AUC minus that of the
reference (random initialisation) on the same resampled patients -- a paired comparison, since both were scored on
the same test images -- with the p-value of the bootstrap's normal approximation (z = effect / bootstrap SE), Holm
over every effect of the table.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.stats as sps

from osteolib.evaluation.stats.clusters import cluster_bootstrap_ci
from osteolib.evaluation.stats.delong import rank_auc
from osteolib.evaluation.stats.mixed import ModelResult, mixed_model
from osteolib.evaluation.stats.multiple import holm
from osteolib.evaluation.stats.views import require_columns

__all__ = ["curve_points", "pretraining_effects", "efficiency_models", "model_table"]

KEYS = ("backbone", "scenario", "label_fraction")


def _seed_scores(rows: pd.DataFrame, positive: str) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[int]]:
    """One run group's test rows as aligned arrays: image order, labels, patient ids and one score column per seed.
    Every seed must have scored the same images (a curve point compares like with like)."""
    seeds = sorted(int(s) for s in rows["seed"].unique())
    by_seed = {s: rows[rows["seed"] == s].set_index("image_id") for s in seeds}
    images = sorted(by_seed[seeds[0]].index)
    for s in seeds[1:]:
        if sorted(by_seed[s].index) != images:
            raise ValueError(f"seeds {seeds[0]} and {s} of {rows.iloc[0][list(KEYS)].to_dict()} scored different "
                             f"test images; a curve point needs every seed on the same test split")
    first = by_seed[seeds[0]].loc[images]
    labels = (first["label"].astype(str) == positive).to_numpy()
    patients = first["patient_id"].astype(str).to_numpy()
    scores = [by_seed[s].loc[images, f"prob_{positive}"].to_numpy(dtype=float) for s in seeds]
    return labels, patients, scores, seeds


def _mean_auc(y: np.ndarray, *scores: np.ndarray) -> float:
    return float(np.mean([rank_auc(y, s) for s in scores]))


def curve_points(test: pd.DataFrame, positive: str, n_boot: int = 2000, alpha: float = 0.05,
                 seed: int = 0) -> pd.DataFrame:
    """One row per (backbone, scenario, label_fraction): the test AUC averaged over seeds, its patient-bootstrap
    interval, the seeds and the number of test images and patients. ``test``: test prediction rows with
    ``patient_id`` (:func:`osteolib.evaluation.stats.with_patients`)."""
    require_columns(test, [*KEYS, "seed", "image_id", "label", "patient_id", f"prob_{positive}"], "test predictions")
    rows = []
    for key, group in test.groupby(list(KEYS), sort=True):
        y, patients, scores, seeds = _seed_scores(group, positive)
        ci = cluster_bootstrap_ci(_mean_auc, patients, y, *scores, n_boot=n_boot, seed=seed, alpha=alpha)
        rows.append({**dict(zip(KEYS, key)), "seeds": len(seeds),
                     "auc_per_seed": " ".join(f"{rank_auc(y, s):.3f}" for s in scores), "auc": ci.estimate,
                     "ci_low": ci.ci_low, "ci_high": ci.ci_high, "test_images": int(y.size),
                     "test_patients": ci.n_clusters})
    return pd.DataFrame(rows)


def pretraining_effects(test: pd.DataFrame, positive: str, reference: str = "random", n_boot: int = 2000,
                        alpha: float = 0.05, seed: int = 0) -> pd.DataFrame:
    """The effect of each initialisation against ``reference`` at each (backbone, label_fraction): difference of
    seed-averaged test AUCs, its paired patient-bootstrap CI, the bootstrap-z p-value and Holm's adjustment over all
    rows. Only seeds both initialisations ran are compared."""
    require_columns(test, [*KEYS, "seed", "image_id", "label", "patient_id", f"prob_{positive}"], "test predictions")
    if not (test["scenario"].astype(str) == reference).any():
        raise ValueError(f"no run of the reference initialisation {reference!r}; the effects need it at every fraction")
    rows = []
    for (backbone, fraction), group in test.groupby(["backbone", "label_fraction"], sort=True):
        base = group[group["scenario"] == reference]
        for scenario in [s for s in group["scenario"].unique() if s != reference]:
            other = group[group["scenario"] == scenario]
            seeds = sorted(set(base["seed"]) & set(other["seed"]))
            if base.empty or not seeds:
                continue
            y, patients, ref_scores, _ = _seed_scores(base[base["seed"].isin(seeds)], positive)
            y2, _, scores, _ = _seed_scores(other[other["seed"].isin(seeds)], positive)
            if y.size != y2.size or (y != y2).any():
                raise ValueError(f"{scenario} and {reference} of {backbone} at {fraction} scored different test images")
            k = len(seeds)

            def effect(labels: np.ndarray, *columns: np.ndarray) -> float:
                return _mean_auc(labels, *columns[:k]) - _mean_auc(labels, *columns[k:])

            ci = cluster_bootstrap_ci(effect, patients, y, *scores, *ref_scores, n_boot=n_boot, seed=seed,
                                      alpha=alpha)
            p = 2.0 * sps.norm.sf(abs(ci.estimate) / ci.se) if ci.se > 0 else (1.0 if ci.estimate == 0 else 0.0)
            rows.append({"backbone": backbone, "label_fraction": float(fraction), "scenario": scenario,
                         "reference": reference, "seeds": k, "auc": _mean_auc(y, *scores),
                         "reference_auc": _mean_auc(y, *ref_scores), "effect": ci.estimate, "ci_low": ci.ci_low,
                         "ci_high": ci.ci_high, "se": ci.se, "p_value": float(p), "test_patients": ci.n_clusters})
    table = pd.DataFrame(rows)
    if len(table):
        table["p_holm"] = holm(table["p_value"].to_numpy(), alpha=alpha).p_adjusted
    return table


def efficiency_models(per_run: pd.DataFrame, reference: str = "random", alpha: float = 0.05) -> dict[str, ModelResult]:
    """Per backbone: test AUC ~ scenario * log2(label_fraction), the seed a random intercept (statsmodels MixedLM,
    REML; with three seeds the variance is rough, and where MixedLM is not usable the model falls back to OLS with the
    seed as a fixed factor, and says so). The slope on log2(fraction) is the AUC gained per doubling of the labels for
    the reference; ``scenario[T.x]`` is x's effect at 100 % of the labels (log2 = 0); ``scenario[T.x]:log2_fraction``
    how that effect changes per doubling."""
    require_columns(per_run, ["backbone", "scenario", "label_fraction", "seed", "auc"], "per-run results")
    data = per_run.assign(log2_fraction=np.log2(per_run["label_fraction"].astype(float)))
    models: dict[str, ModelResult] = {}
    for backbone, rows in data.groupby("backbone", sort=False):
        if rows["scenario"].nunique() < 2 or rows["label_fraction"].nunique() < 2 or rows["seed"].nunique() < 2:
            continue  # nothing to compare, or (one seed) no seed effect to model
        models[str(backbone)] = mixed_model(rows, "auc", fixed="scenario * log2_fraction", group="seed",
                                            reference={"scenario": reference}, alpha=alpha, few_groups=3)
    return models


def model_table(models: dict[str, ModelResult]) -> pd.DataFrame:
    """The models' fixed effects in one table, a row per (backbone, term), with the method and why it was used."""
    parts = []
    for backbone, result in models.items():
        coefficients = result.coefficients.copy()
        coefficients.insert(0, "backbone", backbone)
        # the intercept is a level (the reference's AUC at 100 % of the labels), not a comparison: no p-value
        coefficients.loc[coefficients["term"] == "Intercept", ["p_value", "p_holm"]] = float("nan")
        coefficients["method"] = result.method
        coefficients["n_runs"] = result.n_obs
        coefficients["reason"] = result.reason
        parts.append(coefficients)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()

