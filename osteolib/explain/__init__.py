"""Layer 5, explain: class-activation maps, their agreement with expert regions, randomisation and faithfulness checks.

One idea per module, each usable alone:

- :mod:`~osteolib.explain.cams`: saliency maps through ``grad-cam`` (:func:`compute_cams`) at the right layer of
  every backbone (:func:`target_layers`), and the multi-scale DenseNet's weighted map (:func:`multiscale_cam`).
- :mod:`~osteolib.explain.targets`: checked image batches and the class each map explains (class 1 = evidence
  for the positive class of a single-logit model, class 0 = against it; default: the predicted class).
- :mod:`~osteolib.explain.agreement`: agreement of a map with an expert region (pointing game, energy in the
  region, IoU / Dice, region AUC), per image (:func:`agreement_table`) and summarised.
- :mod:`~osteolib.explain.randomisation`: model-parameter randomisation (Adebayo et al. 2018) and map similarity.
- :mod:`~osteolib.explain.faithfulness`: grad-cam's ROAD and CAM-multiplication metrics (:func:`faithfulness`).
- :mod:`~osteolib.explain.figures`: :func:`overlay` of a map and a region on an X-ray.
- :mod:`~osteolib.explain.checks`: the checks of notebook 05 built on the above (randomisation test and verdict,
  faithfulness table against random maps, bootstrap intervals and scenario comparison of the agreement).

Inside the layer, :mod:`checks` imports the other modules, :mod:`cams` and :mod:`faithfulness` import
:mod:`targets`; agreement, randomisation and figures import nothing of the layer.
"""
from __future__ import annotations

from osteolib.explain import cams, targets
from osteolib.explain.agreement import (
    AGREEMENT_MEASURES,
    DEFAULT_THRESHOLDS,
    agreement_measures,
    agreement_summary,
    agreement_table,
    energy_in_region,
    iou_dice,
    map_threshold,
    pointing_game,
    region_auc,
)
from osteolib.explain.cams import (
    CAM_METHODS,
    MULTISCALE_ARCH,
    TARGET_LAYER_PATHS,
    combine_scale_cams,
    compute_cams,
    model_arch_name,
    multiscale_cam,
    reshape_transform_for,
    target_layers,
    vit_reshape_transform,
)
from osteolib.explain.checks import (
    CI_MEASURES,
    RANDOMISATION_MEASURES,
    RandomisationResult,
    agreement_ci,
    agreement_ci_wide,
    cascade_steps,
    compare_agreement,
    faithfulness_figure,
    faithfulness_table,
    randomisation_check,
    randomisation_figure,
    randomisation_verdict,
)
from osteolib.explain.faithfulness import DEFAULT_ROAD_PERCENTILES, FAITHFULNESS_METHODS, faithfulness
from osteolib.explain.figures import errors_figure, overlay
from osteolib.explain.randomisation import cascade_units, map_similarity, randomise_parameters

__all__ = [
    "errors_figure",
    "cams",
    "targets",
    "CAM_METHODS",
    "TARGET_LAYER_PATHS",
    "MULTISCALE_ARCH",
    "DEFAULT_THRESHOLDS",
    "DEFAULT_ROAD_PERCENTILES",
    "FAITHFULNESS_METHODS",
    "model_arch_name",
    "target_layers",
    "vit_reshape_transform",
    "reshape_transform_for",
    "compute_cams",
    "multiscale_cam",
    "combine_scale_cams",
    "pointing_game",
    "energy_in_region",
    "map_threshold",
    "iou_dice",
    "region_auc",
    "agreement_measures",
    "agreement_table",
    "AGREEMENT_MEASURES",
    "agreement_summary",
    "cascade_units",
    "randomise_parameters",
    "map_similarity",
    "faithfulness",
    "overlay",
    "RANDOMISATION_MEASURES",
    "CI_MEASURES",
    "RandomisationResult",
    "cascade_steps",
    "randomisation_check",
    "randomisation_verdict",
    "randomisation_figure",
    "faithfulness_table",
    "faithfulness_figure",
    "agreement_ci",
    "agreement_ci_wide",
    "compare_agreement",
]
