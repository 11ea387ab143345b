"""Statistics for comparing pretraining scenarios: DeLong, McNemar, Wilson, bootstrap, Holm, mixed models.

Everything works on plain arrays and on two kinds of per-image tables, so this package depends on no other
part of osteolib:

* a **prediction table**: one row per (run, image) with ``image_id, label, target, prob_<class>...,
  split, scenario, backbone, seed`` and optionally ``threshold`` (the run's decision threshold);
* an **agreement table**: one row per (run, image, CAM method) with ``image_id, scenario, backbone, seed,
  method`` and measure columns (``hit, energy_in_region, iou, dice, auc_region`` ...).

Per run: AUC with a DeLong CI and accuracy with a Wilson CI (:func:`auc_table`). Per pair of runs on the
same test images: paired DeLong and McNemar tests with effect sizes, Holm-adjusted over the whole family
(:func:`compare_scenarios`, worded by :func:`significance_summary`). Across seeds: a linear mixed model
with seed as the grouping factor, or OLS with seed as a fixed factor where that is the better choice
(:func:`mixed_model`); per-image agreement between scenarios with the image as the grouping factor
(:func:`agreement_model`).

DeLong is implemented here (the fast midrank algorithm of Sun & Xu 2014, IEEE Signal Processing Letters
21:1389) because no maintained library provides it; the tests check it against scikit-learn's AUC and a
direct O(n²) computation of the structural components. McNemar, Wilson, Holm, the mixed models and the
bootstrap are statsmodels' and scipy's.

One idea per module: :mod:`.intervals` (Wilson, bootstrap), :mod:`.delong`, :mod:`.mcnemar`, :mod:`.multiple`
(Holm), :mod:`.clusters` (the patient cluster bootstrap), :mod:`.patients` (predictions averaged per patient),
:mod:`.patient_tables` (per-run results and paired tests that count patients, not images), :mod:`.classes`
(per-class one-vs-rest and macro AUCs, confusion counts), :mod:`.views` (a run of a prediction table as the tests see it), :mod:`.comparisons` (per-run table and
paired comparisons), :mod:`.summary` (the comparisons in words), :mod:`.subgroups` (results by sex, age band, view, source, site), :mod:`.errors` (a run's most confident errors) and :mod:`.mixed` (models across seeds and images).
Everything the single ``stats`` module offered is re-exported here, so attribute use such as ``stats.delong_auc(...)``
keeps working.
"""
from __future__ import annotations

from osteolib.evaluation.stats.classes import MACRO, class_auc_table, confusion_table
from osteolib.evaluation.stats.clusters import ClusterBootstrapResult, cluster_bootstrap_ci, one_per_cluster
from osteolib.evaluation.stats.comparisons import COMPARISON_COLUMNS, auc_table, compare_scenarios
from osteolib.evaluation.stats.delong import AUCResult, PairedResult, delong_auc, delong_paired, rank_auc
from osteolib.evaluation.stats.errors import confident_errors
from osteolib.evaluation.stats.intervals import BootstrapResult, bootstrap_ci, critical_z, wilson_ci
from osteolib.evaluation.stats.mcnemar import MCNEMAR_EXACT_BELOW, McNemarResult, mcnemar_paired
from osteolib.evaluation.stats.label_efficiency import curve_points, efficiency_models, model_table, \
    pretraining_effects
from osteolib.evaluation.stats.mixed import FEW_GROUPS, ModelResult, agreement_model, mixed_model
from osteolib.evaluation.stats.multiple import HolmResult, holm
from osteolib.evaluation.stats.patient_tables import compare_patients, patient_auc_table
from osteolib.evaluation.stats.patients import (PATIENT_COLUMN, images_per_patient, patient_predictions,
                                                with_patients)
from osteolib.evaluation.stats.subgroups import (AGE_BANDS, MIN_PER_CLASS, SUBGROUP_COLUMNS, age_bands,
                                                auc_heterogeneity, subgroup_columns, subgroup_table)
from osteolib.evaluation.stats.summary import significance_summary
from osteolib.evaluation.stats.views import DEFAULT_THRESHOLD, PROB_PREFIX, RUN_KEYS

__all__ = [
    "MACRO",
    "class_auc_table",
    "confusion_table",
    "ClusterBootstrapResult",
    "cluster_bootstrap_ci",
    "one_per_cluster",
    "compare_patients",
    "patient_auc_table",
    "PATIENT_COLUMN",
    "images_per_patient",
    "patient_predictions",
    "with_patients",
    "COMPARISON_COLUMNS",
    "auc_table",
    "compare_scenarios",
    "AUCResult",
    "PairedResult",
    "delong_auc",
    "delong_paired",
    "rank_auc",
    "BootstrapResult",
    "bootstrap_ci",
    "critical_z",
    "wilson_ci",
    "MCNEMAR_EXACT_BELOW",
    "McNemarResult",
    "mcnemar_paired",
    "curve_points",
    "pretraining_effects",
    "efficiency_models",
    "model_table",
    "FEW_GROUPS",
    "ModelResult",
    "agreement_model",
    "mixed_model",
    "HolmResult",
    "holm",
    "significance_summary",
    "confident_errors",
    "AGE_BANDS",
    "MIN_PER_CLASS",
    "SUBGROUP_COLUMNS",
    "age_bands",
    "auc_heterogeneity",
    "subgroup_columns",
    "subgroup_table",
    "DEFAULT_THRESHOLD",
    "PROB_PREFIX",
    "RUN_KEYS",
]
