"""Image + clinical data: three models compared honestly, with a guard against covariates that give the label away.

* **clinical only**: an L2-regularised logistic regression on the covariates, fitted on the *training* split;
* **image only**: the fine-tuned model's probability (notebook 04's predictions of the selected run);
* **image + clinical**: late fusion, a logistic regression on two scores -- the image model's logit and the clinical
  model's -- fitted on the *validation* split. The image model was trained on the training split, so its logits there
  are overconfident and a fusion fitted on them would learn to trust the image too much; on validation they are
  honest. Validation sets are small, so the fusion learns only two weights and an intercept there; the covariates'
  own effects come from the training split (out-of-fold training logits would need k more fine-tunings).

Missing values are imputed from the training split only (median / a "missing" level) with a missingness indicator;
numeric covariates are standardised with the training split's mean and SD, so an odds ratio is per SD. Only after
both models are fixed are the test rows taken: AUC with DeLong CIs for each model, paired DeLong tests of the fused
model against each of the others, and the odds ratios (unpenalised fit of the same design on the training split,
Wald CIs).

**The guard** (:func:`check_label_covariates`) runs before anything is fitted: a covariate whose name says it
measures the label (T-score, Z-score, BMD, DXA, diagnosis, label, class) or that alone separates the classes on the
training split (single-variable AUC >= ``leak_auc``, 0.95) stops the stage naming it and why -- unless it is listed in
``allow_label_covariates``, and then it is reported, first, by whoever shows the result.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from osteolib.data.clinical import covariate_kind
from osteolib.evaluation.calibration import logit
from osteolib.evaluation.stats.delong import delong_auc, delong_paired, rank_auc

__all__ = ["FusionConfig", "FusionResult", "LabelCovariateError", "LABEL_NAME", "check_label_covariates",
           "single_variable_auc", "clinical_fusion"]

# names that say a column measures the label itself
LABEL_NAME = re.compile(r"t[\s_.-]*score|z[\s_.-]*score|bmd|dxa|dexa|diagnos|label|class", re.IGNORECASE)
MODELS = ("clinical", "image", "image+clinical")
FITTED_ON = {"clinical": "train", "image": "train (04)", "image+clinical": "val"}  # the split each model learnt from


class LabelCovariateError(ValueError):
    """A covariate measures (or all but gives away) the label; the message names it, why, and the way out."""


@dataclass
class FusionConfig:
    """The fusion stage's options. ``covariates``: manifest columns (patient-level); ``allow_label_covariates``:
    covariates the guard would stop but the analyst keeps on purpose (the result says so first); ``leak_auc``: the
    single-variable training AUC from which a covariate counts as the label; ``C``: inverse L2 strength of both
    logistic regressions."""

    covariates: Sequence[str]
    allow_label_covariates: Sequence[str] = ()
    leak_auc: float = 0.95
    C: float = 1.0

    def __post_init__(self) -> None:
        self.covariates = [str(c) for c in self.covariates]
        self.allow_label_covariates = [str(c) for c in self.allow_label_covariates]
        problems = []
        if not self.covariates:
            problems.append("covariates is empty: name the clinical columns to use (e.g. [age, sex, bmi]), or set "
                            "notebook 00's clinical_columns (the synthetic shoulder set has age, sex and bmi with "
                            "dataset_options clinical_signal)")
        unknown = sorted(set(self.allow_label_covariates) - set(self.covariates))
        if unknown:
            problems.append(f"allow_label_covariates names {unknown}, which are not in covariates")
        if not (isinstance(self.leak_auc, (int, float)) and 0.5 < self.leak_auc <= 1):
            problems.append(f"leak_auc must be in (0.5, 1] (got {self.leak_auc!r})")
        if not (isinstance(self.C, (int, float)) and self.C > 0):
            problems.append(f"C must be > 0 (got {self.C!r})")
        if problems:
            raise ValueError("invalid FusionConfig: " + "; ".join(problems))


@dataclass
class FusionResult:
    """The three models on the test split and what the guard let through."""

    aucs: pd.DataFrame  # model, auc, ci_low, ci_high, n, n_positive (DeLong)
    comparisons: pd.DataFrame  # image+clinical vs image / vs clinical: paired DeLong
    odds_ratios: pd.DataFrame  # covariate term, odds ratio per SD (numeric) or vs reference level, Wald CI, p
    test_scores: pd.DataFrame  # image_id, patient_id, target and each model's probability
    allowed_label_covariates: list[dict[str, Any]] = field(default_factory=list)
    coefficients: dict[str, Any] = field(default_factory=dict)


def single_variable_auc(values: pd.Series, y: np.ndarray) -> float:
    """How well one covariate alone separates the classes: the AUC of its values (numeric) or of each level's
    positive share (otherwise), folded so that 0.5 is none and 1 perfect; rows missing the value are left out."""
    present = values.notna().to_numpy()
    if present.sum() < 2 or len(set(y[present])) < 2:
        return math.nan
    kept, target = values[present], y[present]
    if covariate_kind(kept) == "numeric":
        score = pd.to_numeric(kept, errors="coerce").to_numpy(dtype=float)
    else:
        share = pd.Series(target, index=kept.index).groupby(kept.astype(str)).mean()
        score = kept.astype(str).map(share).to_numpy(dtype=float)
    auc = rank_auc(target, score)
    return max(auc, 1.0 - auc)


def check_label_covariates(train: pd.DataFrame, covariates: Sequence[str], y: np.ndarray,
                           allow: Sequence[str] = (), leak_auc: float = 0.95) -> list[dict[str, Any]]:
    """Stop (:class:`LabelCovariateError`) on a covariate that measures the label, by its name or by separating the
    training classes alone; return those of them the profile allows, with why, for the report's first lines."""
    caught = []
    for column in covariates:
        reasons = []
        named = LABEL_NAME.search(column)
        if named:
            reasons.append(f"its name says it measures the label ({named.group(0)!r})")
        auc = single_variable_auc(train[column], y)
        if auc == auc and auc >= leak_auc:
            reasons.append(f"alone it separates the training classes with AUC {auc:.3f} (>= {leak_auc})")
        if reasons:
            caught.append({"covariate": column, "why": " and ".join(reasons), "single_variable_auc": auc})
    blocking = [c for c in caught if c["covariate"] not in allow]
    if blocking:
        lines = "; ".join(f"{c['covariate']}: {c['why']}" for c in blocking)
        raise LabelCovariateError(
            f"covariate(s) that give the label away: {lines}. A model fed the measurement that defines the diagnosis "
            f"learns it instead of the image. Drop them from covariates, or, if they are meant (e.g. to show what the "
            f"image adds to them), list them under allow_label_covariates: the report then says so in its first lines")
    return caught


def _design(train: pd.DataFrame, covariates: Sequence[str]) -> Any:
    """The covariate design fitted on the training rows only: numeric columns imputed with the training median plus a
    missingness indicator, then standardised; binary and categorical ones one-hot with a "missing" level."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    numeric = [c for c in covariates if covariate_kind(train[c]) == "numeric"]
    other = [c for c in covariates if c not in numeric]
    parts = []
    if numeric:
        parts.append(("num", make_pipeline(SimpleImputer(strategy="median", add_indicator=True), StandardScaler()),
                      numeric))
    if other:
        parts.append(("cat", make_pipeline(SimpleImputer(strategy="constant", fill_value="missing"),
                                           OneHotEncoder(handle_unknown="ignore", drop="first",
                                                         sparse_output=False)), other))
    design = ColumnTransformer(parts, verbose_feature_names_out=False)
    design.fit(_as_features(train, numeric, other))
    design.numeric_, design.other_ = numeric, other
    return design


def _as_features(rows: pd.DataFrame, numeric: Sequence[str], other: Sequence[str]) -> pd.DataFrame:
    out = pd.DataFrame(index=rows.index)
    for c in numeric:
        out[c] = pd.to_numeric(rows[c], errors="coerce").astype(float)
    for c in other:
        out[c] = rows[c].map(lambda v: np.nan if pd.isna(v) else str(v))  # levels as text, missing as NaN
    return out


def _transform(design: Any, rows: pd.DataFrame) -> np.ndarray:
    return design.transform(_as_features(rows, design.numeric_, design.other_))


def _odds_ratios(X: np.ndarray, y: np.ndarray, names: Sequence[str]) -> pd.DataFrame:
    """Unpenalised logistic regression of the same design (statsmodels), its odds ratios with Wald CIs."""
    import statsmodels.api as sm

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # non-convergence is checked below and said in the table
            fit = sm.Logit(y, sm.add_constant(X, has_constant="add")).fit(disp=0, maxiter=200)
        if not fit.mle_retvals.get("converged", True):
            raise RuntimeError("the fit did not converge (a covariate separating the classes?)")
        params, ci, p = fit.params[1:], fit.conf_int()[1:], fit.pvalues[1:]
        return pd.DataFrame({"term": list(names), "odds_ratio": np.exp(params), "ci_low": np.exp(ci[:, 0]),
                             "ci_high": np.exp(ci[:, 1]), "p_value": p})
    except Exception as error:  # perfect separation, singular design: say so instead of printing infinities
        return pd.DataFrame({"term": list(names), "odds_ratio": np.nan, "ci_low": np.nan, "ci_high": np.nan,
                             "p_value": np.nan, "note": f"no unpenalised fit: {type(error).__name__}: {error}"})


def clinical_fusion(manifest: pd.DataFrame, image_predictions: pd.DataFrame, config: FusionConfig,
                    positive: str) -> FusionResult:
    """The three models: the guard on the training split, the clinical model fitted on train, the fusion on the
    validation rows of ``image_predictions`` (one run's val + test rows, prediction-table contract), and only then
    the test rows scored. ``manifest`` holds the covariates (one value per patient) and the splits."""
    from sklearn.linear_model import LogisticRegression

    missing = [c for c in config.covariates if c not in manifest.columns]
    if missing:
        raise ValueError(f"covariate(s) {missing} are not manifest columns (it has {list(manifest.columns)}); join "
                         f"the clinical table in notebook 00 (dataset spec `clinical:`) or name existing columns")
    column = f"prob_{positive}"
    if column not in image_predictions.columns:
        raise ValueError(f"the image predictions have no {column!r}; give one run's prediction table")
    train = manifest[manifest["split"].astype(str) == "train"]
    y_train = (train["label"].astype(str) == positive).to_numpy(dtype=int)
    allowed = check_label_covariates(train, config.covariates, y_train, config.allow_label_covariates,
                                     config.leak_auc)

    design = _design(train, config.covariates)
    names = list(design.get_feature_names_out())
    X_train = _transform(design, train)
    clinical = LogisticRegression(C=config.C, max_iter=2000).fit(X_train, y_train)

    covariates_of = manifest.drop_duplicates("image_id").set_index("image_id")
    val = image_predictions[image_predictions["split"] == "val"]
    val_rows = covariates_of.loc[val["image_id"].astype(str)]
    y_val = (val["label"].astype(str) == positive).to_numpy(dtype=int)
    # the fusion weighs two scores, the image model's logit and the clinical model's: the covariates' effects come
    # from the (larger) training split, and the validation split only has to learn two weights and an intercept
    X_val = np.column_stack([logit(val[column].to_numpy()), clinical.decision_function(_transform(design, val_rows))])
    fusion = LogisticRegression(C=config.C, max_iter=2000).fit(X_val, y_val)
    # both models are fixed: only now are the test rows taken
    test = image_predictions[image_predictions["split"] == "test"]
    test_rows = covariates_of.loc[test["image_id"].astype(str)]
    y_test = (test["label"].astype(str) == positive).to_numpy(dtype=int)
    X_test = _transform(design, test_rows)
    scores = {"clinical": clinical.predict_proba(X_test)[:, 1], "image": test[column].to_numpy(dtype=float),
              "image+clinical": fusion.predict_proba(np.column_stack([logit(test[column].to_numpy()),
                                                                      clinical.decision_function(X_test)]))[:, 1]}

    aucs = []
    for model in MODELS:
        result = delong_auc(y_test, scores[model])
        aucs.append({"model": model, "auc": result.auc, "ci_low": result.ci_low, "ci_high": result.ci_high,
                     "n": len(y_test), "n_positive": int(y_test.sum()),
                     "fitted_on": FITTED_ON[model]})
    comparisons = []
    for other in ("image", "clinical"):
        paired = delong_paired(y_test, scores["image+clinical"], scores[other])
        comparisons.append({"model": "image+clinical", "versus": other, "auc": paired.auc_a, "auc_versus": paired.auc_b,
                            # a difference of AUCs lies in [-1, 1]; the normal interval is clipped there
                            "difference": paired.diff, "ci_low": max(paired.ci_low, -1.0),
                            "ci_high": min(paired.ci_high, 1.0),
                            "p_value": paired.p_value})
    test_scores = pd.DataFrame({"image_id": test["image_id"].astype(str).to_numpy(),
                                "patient_id": test_rows["patient_id"].astype(str).to_numpy(), "target": y_test,
                                **{f"prob_{m}": s for m, s in scores.items()}})
    coefficients = {"clinical": dict(zip(names, clinical.coef_[0].tolist())),
                    "image+clinical": {"image_logit": float(fusion.coef_[0][0]),
                                       "clinical_logit": float(fusion.coef_[0][1]),
                                       "intercept": float(fusion.intercept_[0])}}
    return FusionResult(aucs=pd.DataFrame(aucs), comparisons=pd.DataFrame(comparisons),
                        odds_ratios=_odds_ratios(X_train, y_train, names), test_scores=test_scores,
                        allowed_label_covariates=allowed, coefficients=coefficients)


# --------------------------------------------------------------------------------------------
# The run's files


def write_fusion_outputs(run: Any, result: FusionResult, image_run: str, config: FusionConfig) -> dict[str, Any]:
    """``tables/04b_fusion_auc.csv`` (the three models' test AUCs with DeLong CIs), ``tables/04b_fusion_tests.csv``
    (paired DeLong: image + clinical vs image, vs clinical), ``tables/04b_odds_ratios.csv``,
    ``tables/04b_fusion_scores.csv`` (per test image), ``tables/04b_fusion.json`` (what was fused, on which split,
    and any label covariate the profile allowed) and ``figures/04b_fusion_roc.png|pdf``."""
    import json

    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    from osteolib.plotting import save_figure

    tables, paths = run.tables, {}
    for stem, table in (("04b_fusion_auc", result.aucs), ("04b_fusion_tests", result.comparisons),
                        ("04b_odds_ratios", result.odds_ratios), ("04b_fusion_scores", result.test_scores)):
        paths[stem] = tables / f"{stem}.csv"
        table.to_csv(paths[stem], index=False)
    paths["04b_fusion"] = tables / "04b_fusion.json"
    paths["04b_fusion"].write_text(json.dumps({
        "image_run": image_run, "covariates": list(config.covariates), "C": config.C, "leak_auc": config.leak_auc,
        "fitted_on": FITTED_ON,
        "allowed_label_covariates": result.allowed_label_covariates, "coefficients": result.coefficients}, indent=1,
        default=float))
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    for row in result.aucs.itertuples():
        fpr, tpr, _ = roc_curve(result.test_scores["target"], result.test_scores[f"prob_{row.model}"])
        ax.plot(fpr, tpr, linewidth=1.4, label=f"{row.model}: {row.auc:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}]")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"test · image model {image_run}", fontsize=8)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    for path in save_figure(fig, run.figures, "04b_fusion_roc"):
        paths[f"04b_fusion_roc_{path.suffix[1:]}"] = path
    plt.close(fig)
    return paths
