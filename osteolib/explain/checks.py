"""The explanation checks of notebook 05, built on the parts of this layer: the cascading randomisation test
(:func:`randomisation_check`, :func:`randomisation_verdict`, :func:`randomisation_figure`), faithfulness of every
CAM method against random maps (:func:`faithfulness_table`, :func:`faithfulness_figure`), and statistics of the
agreement with expert regions (bootstrap intervals :func:`agreement_ci`, scenario comparison
:func:`compare_agreement`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from osteolib.explain.agreement import AGREEMENT_MEASURES, agreement_table
from osteolib.explain.cams import CAM_METHODS, compute_cams
from osteolib.explain.faithfulness import DEFAULT_ROAD_PERCENTILES, faithfulness
from osteolib.explain.figures import overlay
from osteolib.explain.randomisation import cascade_units, map_similarity, randomise_parameters
from osteolib.explain.targets import as_image_batch, num_outputs_of, resolve_targets
from osteolib.utils import eval_mode

RANDOMISATION_MEASURES = ("pointing_game", "energy_in_region", "region_auc")
CI_MEASURES = ("pointing_game", "energy_in_region", "iou_otsu")


@dataclass
class RandomisationResult:
    """The cascading randomisation test of one model.

    ``table``: one row per step (step 0 = the trained model) with how many units were re-initialised, the
    deepest one, the mean agreement with the regions and the median similarity to the trained model's maps.
    ``maps``: the maps of every step, ``(steps, N, H, W)``. ``similarity``: the per-image rows of
    :func:`map_similarity` with a ``step`` column.
    """

    table: pd.DataFrame
    maps: np.ndarray
    similarity: pd.DataFrame
    method: str

    def verdict(self, max_spearman: float = 0.5) -> str:
        return randomisation_verdict(self.table, max_spearman=max_spearman)


def cascade_steps(model: nn.Module, n_steps: int = 5) -> list[int]:
    """Numbers of top units to re-initialise along the cascade: about evenly spaced on a log scale from 1
    (the classifier) to every unit, so that the top of the network, where most change is expected first,
    is sampled densely."""
    if not isinstance(n_steps, int) or n_steps < 2:
        raise ValueError(f"n_steps must be an int >= 2 (the classifier and the whole network), got {n_steps!r}")
    total = len(cascade_units(model))
    return sorted({int(round(v)) for v in np.geomspace(1, total, n_steps)})


def randomisation_check(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    regions: np.ndarray,
    method: str = "gradcam",
    targets: int | Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    seed: int = 0,
    layers: Callable[[nn.Module], Sequence[nn.Module]] | None = None,
) -> RandomisationResult:
    """Model-parameter randomisation test (Adebayo et al. 2018), cascading from the top.

    For each step the top ``k`` units (:func:`cascade_units`) are re-initialised
    (:func:`randomise_parameters`), the maps recomputed for the same ``targets`` (default: each image's
    class predicted by the *trained* model, kept fixed along the cascade) and compared with the trained
    model's maps (:func:`map_similarity`) and with the ``regions`` (N, H, W bool, every one non-empty).
    ``layers``: for models outside the study's registry, a function giving a model's target layers (it is
    called on each randomised copy, whose modules are not the original's).
    """
    images = as_image_batch(images)
    regions = np.asarray(regions).astype(bool)
    if regions.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"regions must be (N, H, W) = {(images.shape[0], *images.shape[-2:])}, got {regions.shape}")
    empty = np.where(~regions.reshape(len(regions), -1).any(axis=1))[0]
    if len(empty):
        raise ValueError(f"regions of images {empty.tolist()[:10]} are empty: pass only images with an expert region")
    total = len(cascade_units(model))
    steps = list(steps) if steps is not None else cascade_steps(model)
    bad = [k for k in steps if not isinstance(k, (int, np.integer)) or not 1 <= k <= total]
    if bad:
        raise ValueError(f"steps must be unit counts in 1..{total} (see cascade_units(model)), got {bad}")
    if targets is None:
        num_outputs = num_outputs_of(model, images[:1].to(next(model.parameters()).device))
        with eval_mode(model):
            targets = resolve_targets(model, images, None, num_outputs, 16)
    ids = [str(i) for i in range(len(images))]
    def maps_of(net: nn.Module) -> np.ndarray:
        return compute_cams(net, images, method, targets=targets, layers=None if layers is None else layers(net))

    trained = maps_of(model)
    all_maps, rows, similarities = [trained], [], []
    for step, count in enumerate([0, *steps]):
        if count == 0:
            maps, deepest = trained, "(trained model)"
        else:
            randomised = randomise_parameters(model, "cascading", layers=int(count), seed=seed)
            maps, deepest = maps_of(randomised), randomised.randomised_units[-1]
            all_maps.append(maps)
        agreement = agreement_table(maps, regions, [True] * len(ids), ids)
        similarity = map_similarity(trained, maps).assign(step=step)
        similarities.append(similarity)
        row: dict[str, Any] = {"step": step, "units_randomised": int(count), "down_to": deepest}
        row.update({f"{m}_mean": float(agreement[m].mean()) for m in RANDOMISATION_MEASURES})
        row["spearman_median"] = float(similarity["spearman"].median())
        row["flat_maps"] = int(sum(float(m.max() - m.min()) == 0.0 for m in maps))
        row["ssim_median"] = float(similarity["ssim"].median())
        rows.append(row)
    return RandomisationResult(table=pd.DataFrame(rows), maps=np.stack(all_maps), method=method,
                               similarity=pd.concat(similarities, ignore_index=True))


def randomisation_verdict(table: pd.DataFrame, max_spearman: float = 0.5, min_trained_auc: float = 0.55) -> str:
    """Whether the randomisation test passed, in one sentence built from its table.

    Passed = the maps changed (the lowest median Spearman correlation with the trained model's maps over the
    randomised steps is below ``max_spearman``; a step whose maps are all flat has no ranking, counts as
    changed and is reported) *and* the agreement with the regions did not survive (the region AUC of the
    fully cascaded model is not above the trained model's). Maps that survive randomisation reflect the
    image or the architecture, not what the model learned. When the trained model's region AUC is itself
    below ``min_trained_auc`` (chance is 0.5) there is no agreement to lose, and the check is reported as
    uninformative rather than passed.
    """
    needed = ["units_randomised", "spearman_median", "ssim_median", "region_auc_mean", "flat_maps"]
    missing = [c for c in needed if c not in table.columns]
    if missing or len(table) < 2 or table["units_randomised"].iloc[0] != 0:
        raise ValueError(f"randomisation_verdict needs randomisation_check's table (step 0 = the trained model and at "
                         f"least one randomised step); missing columns {missing}")
    first, last, randomised = table.iloc[0], table.iloc[-1], table.iloc[1:]
    ranked = randomised["spearman_median"].dropna()
    all_flat = randomised[randomised["spearman_median"].isna()]
    lowest = float(ranked.min()) if len(ranked) else math.nan
    changed = bool((len(ranked) and lowest < max_spearman) or len(all_flat))
    dropped = bool(not last["region_auc_mean"] > first["region_auc_mean"])
    informative = bool(first["region_auc_mean"] >= min_trained_auc)
    outcome = "passed" if changed and dropped else "did not pass"
    flat = (f"; from {int(all_flat['units_randomised'].iloc[0])} units on the maps are flat (no ranking left)"
            if len(all_flat) else "")
    if len(ranked):
        fall = (f"the maps' median Spearman correlation with the trained model's falls to {lowest:.2f} "
                f"({'below' if changed else 'not below'} {max_spearman}){flat}")
    else:  # every randomised step gave flat maps: there is no correlation to report
        fall = f"the maps lose all structure{flat}"
    what_happened = (
        f"as the top units are re-initialised {fall}, and with all "
        f"{int(last['units_randomised'])} units re-initialised their region AUC is {last['region_auc_mean']:.3f} "
        f"against {first['region_auc_mean']:.3f} for the trained model "
        f"({'not higher' if dropped else 'higher: agreement survives randomisation'})."
    )
    if not informative:
        return (f"The randomisation check is uninformative here: the trained model's maps do not agree with the "
                f"regions to begin with (region AUC {first['region_auc_mean']:.3f}, below {min_trained_auc}; chance "
                f"is 0.5), so there is no agreement to destroy. What happened: {what_happened}")
    return f"The randomisation check {outcome}: {what_happened}"


def randomisation_figure(result: RandomisationResult, n_images: int = 3, images: torch.Tensor | np.ndarray | None = None,
                         regions: np.ndarray | None = None):
    """Maps along the cascade: one row per image, one column per step (left: the trained model)."""
    import matplotlib.pyplot as plt

    n_images = min(n_images, result.maps.shape[1])
    steps = result.table
    fig, axes = plt.subplots(n_images, len(steps), figsize=(1.7 * len(steps), 1.8 * n_images), squeeze=False)
    for r in range(n_images):
        for c in range(len(steps)):
            background = (np.asarray(images[r, 0]) if images is not None else np.zeros(result.maps.shape[-2:]))
            region = regions[r] if regions is not None else None
            name = "trained" if c == 0 else f"top {int(steps['units_randomised'].iloc[c])}"
            overlay(background, result.maps[c, r], region=region, ax=axes[r, c], title=name if r == 0 else None)
    fig.tight_layout()
    return fig


def faithfulness_table(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    methods: Sequence[str],
    targets: int | Sequence[int] | None = None,
    *,
    metric: str = "road",
    percentiles: Sequence[int] = DEFAULT_ROAD_PERCENTILES,
    random_baseline: bool = True,
    seed: int = 0,
    layers: Sequence[nn.Module] | None = None,
    **identifiers: Any,
) -> pd.DataFrame:
    """Per-image faithfulness (:func:`faithfulness`) of every CAM method's maps for one model.

    With ``random_baseline`` a row set for uniformly random maps (``method="random map"``) is added: the
    level a method has to beat to be called faithful. ``identifiers`` become columns (scenario, backbone ...);
    ``layers`` overrides the target layers (models outside the study's registry).
    """
    unknown = [m for m in methods if m not in CAM_METHODS]
    if unknown:
        raise ValueError(f"unknown CAM method(s) {unknown}; choose from {sorted(CAM_METHODS)}")
    images = as_image_batch(images)
    maps = {m: compute_cams(model, images, m, targets=targets, layers=layers) for m in methods}
    if random_baseline:
        maps["random map"] = np.random.default_rng(seed).random((len(images), *images.shape[-2:])).astype(np.float32)
    rows = []
    for name, cams in maps.items():
        scores = faithfulness(model, images, cams, targets=targets, method=metric, percentiles=percentiles, seed=seed)
        rows += [{**identifiers, "method": name, "image": i, metric: float(s)} for i, s in enumerate(scores)]
    return pd.DataFrame(rows)


def faithfulness_figure(table: pd.DataFrame, metric: str = "road", by: str = "backbone"):
    """Bars of the mean faithfulness per CAM method (one group of bars per ``by`` value), error bars = SEM."""
    import matplotlib.pyplot as plt

    if metric not in table.columns or "method" not in table.columns or by not in table.columns:
        raise ValueError(f"faithfulness_figure needs columns 'method', {by!r} and {metric!r} (faithfulness_table output)")
    stats_ = table.groupby([by, "method"], sort=False)[metric].agg(["mean", "sem"]).reset_index()
    methods = list(dict.fromkeys(table["method"]))
    groups = list(dict.fromkeys(table[by]))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(1.2 + 1.6 * len(groups) * max(1, len(methods) / 3), 3.2))
    for j, method in enumerate(methods):
        rows = stats_[stats_["method"] == method].set_index(by).reindex(groups)
        ax.bar(np.arange(len(groups)) + (j - (len(methods) - 1) / 2) * width, rows["mean"], width,
               yerr=rows["sem"].fillna(0.0), capsize=2, label=method, color="0.6" if method == "random map" else None)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel(f"{metric} (higher = more faithful)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def agreement_ci(
    table: pd.DataFrame,
    by: Sequence[str] = ("scenario", "backbone", "method"),
    measures: Sequence[str] = CI_MEASURES,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    cluster: str | None = None,
) -> pd.DataFrame:
    """Mean of each agreement measure per group with a percentile-bootstrap CI over images (long format).

    Rows: the ``by`` columns, ``measure``, ``n`` (scored images), ``mean``, ``ci_low``, ``ci_high``. The
    pointing-game mean is the hit rate. Groups with fewer than two scored images get a NaN interval.
    ``cluster`` names a column (e.g. ``"patient_id"``): where a group holds several images of one patient, the
    interval resamples patients with all their images (:func:`osteolib.evaluation.stats.cluster_bootstrap_ci`);
    with one image per patient it is the same interval as without.
    """
    from osteolib.evaluation import stats

    by = list(by)
    missing = [c for c in [*by, *measures, "note", *([cluster] if cluster else [])] if c not in table.columns]
    if missing:
        raise ValueError(f"agreement_ci: the table lacks columns {missing}; pass agreement_table's output "
                         f"(measures available: {[c for c in table.columns if c in AGREEMENT_MEASURES or c.startswith('iou_')]})")
    rows = []
    for key, group in table[table["note"] == ""].groupby(by, sort=True):
        for measure in measures:
            scored = group[group[measure].notna()]
            values = scored[measure].astype(float).to_numpy()
            row = {**dict(zip(by, key if isinstance(key, tuple) else (key,))), "measure": measure, "n": len(values)}
            if len(values) >= 2 and cluster and not stats.one_per_cluster(scored[cluster].astype(str).to_numpy()):
                ci = stats.cluster_bootstrap_ci(np.mean, scored[cluster].astype(str).to_numpy(), values,
                                                n_boot=n_boot, seed=seed, alpha=alpha)
                row.update(mean=ci.estimate, ci_low=ci.ci_low, ci_high=ci.ci_high)
            elif len(values) >= 2:
                ci = stats.bootstrap_ci(np.mean, values, n_boot=n_boot, seed=seed, alpha=alpha)
                row.update(mean=ci.estimate, ci_low=ci.ci_low, ci_high=ci.ci_high)
            else:
                row.update(mean=float(values.mean()) if len(values) else math.nan, ci_low=math.nan, ci_high=math.nan)
            rows.append(row)
    return pd.DataFrame(rows)


def agreement_ci_wide(ci_table: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """:func:`agreement_ci`'s rows as one row per group, one "mean [low, high]" column per measure (for papers)."""
    by = [c for c in ci_table.columns if c not in ("measure", "n", "mean", "ci_low", "ci_high")]
    text = ci_table.assign(value=[f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]" for m, lo, hi in
                                  zip(ci_table["mean"], ci_table["ci_low"], ci_table["ci_high"])])
    wide = text.pivot_table(index=by, columns="measure", values="value", aggfunc="first", sort=False).reset_index()
    counts = ci_table.groupby(by, sort=False)["n"].max().rename("n").reset_index()
    return counts.merge(wide, on=by)


def compare_agreement(
    table: pd.DataFrame,
    measures: Sequence[str] = CI_MEASURES,
    by: Sequence[str] = ("backbone", "method"),
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Per-image agreement compared between scenarios (image = grouping factor), Holm-corrected over all tests.

    For each ``by`` group and measure :func:`osteolib.evaluation.stats.agreement_model` fits ``measure ~ scenario`` with a
    random intercept per image (or OLS with the image as a factor, as it decides); every scenario term
    (against ``random`` where present) is one test of the family. Models that cannot be fitted (e.g. a
    measure constant in the group) are kept as rows with a ``note`` and left out of the family.
    """
    from osteolib.evaluation import stats

    by = list(by)
    missing = [c for c in [*by, *measures, "scenario", "image_id"] if c not in table.columns]
    if missing:
        raise ValueError(f"compare_agreement: the table lacks columns {missing}")
    if table["scenario"].nunique() < 2:
        raise ValueError("compare_agreement needs at least two scenarios in the table")
    rows = []
    scored = table[table["note"] == ""] if "note" in table.columns else table
    for key, group in scored.groupby(by, sort=True):
        ident = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        for measure in measures:
            try:
                fit = stats.agreement_model(group.drop(columns=["method"]) if "method" in by else group,
                                            measure, fixed="scenario", group="image_id", alpha=alpha)
            except (ValueError, RuntimeError) as err:
                rows.append({**ident, "measure": measure, "term": "", "note": str(err)})
                continue
            for _, coef in fit.coefficients.iterrows():
                if coef["term"] == "Intercept":
                    continue
                rows.append({**ident, "measure": measure, "term": coef["term"], "estimate": coef["estimate"],
                             "ci_low": coef["ci_low"], "ci_high": coef["ci_high"], "p_value": coef["p_value"],
                             "model": fit.method, "n_obs": fit.n_obs, "n_images": fit.n_groups, "note": ""})
    out = pd.DataFrame(rows)
    tested = out["note"] == "" if len(out) else pd.Series(dtype=bool)
    out["p_holm"], out["significant"] = math.nan, False
    if tested.any():
        holm = stats.holm(out.loc[tested, "p_value"].to_numpy(), alpha=alpha)
        out.loc[tested, "p_holm"] = holm.p_adjusted
        out.loc[tested, "significant"] = holm.reject
    out["family_size"] = int(tested.sum())
    return out
