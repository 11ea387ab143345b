"""Models across seeds and images: a linear mixed model with a random intercept per group, or OLS with the group
as a fixed factor where that is the better choice (statsmodels)."""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from osteolib.evaluation.stats.intervals import critical_z
from osteolib.evaluation.stats.multiple import holm
from osteolib.evaluation.stats.views import require_columns

# a random-effect variance estimated from fewer groups than this is too unstable to be worth a mixed model
FEW_GROUPS = 5


@dataclass
class ModelResult:
    """A fitted model of one response across runs: which model was used and why, and its fixed effects.

    ``coefficients`` has one row per fixed-effect term: ``term, estimate, se, ci_low, ci_high, p_value,
    p_holm`` (Holm over the non-intercept terms shown) and ``std_effect`` (estimate divided by the residual
    standard deviation, a Cohen's-d-like effect size). Seed dummies of the OLS fallback are nuisance terms and
    are left out of the table (their number is in ``n_nuisance_terms``).
    """

    response: str
    method: str  # "MixedLM" or "OLS"
    reason: str
    formula: str
    group: str
    n_obs: int
    n_groups: int
    n_dropped_missing: int
    coefficients: pd.DataFrame
    group_variance: float | None = None  # random-intercept variance (MixedLM only)
    residual_sd: float = math.nan
    n_nuisance_terms: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form for JSON: model facts plus the coefficient rows."""
        return {
            "response": self.response, "method": self.method, "reason": self.reason, "formula": self.formula,
            "group": self.group, "n_obs": self.n_obs, "n_groups": self.n_groups,
            "n_dropped_missing": self.n_dropped_missing, "group_variance": self.group_variance,
            "residual_sd": self.residual_sd, "n_nuisance_terms": self.n_nuisance_terms,
            "warnings": list(self.warnings), "coefficients": self.coefficients.to_dict(orient="records"),
        }


_FUNCTION_OR_STRING = re.compile(r"'[^']*'|\"[^\"]*\"|[A-Za-z_][A-Za-z0-9_.]*\s*\(")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _formula_variables(fixed: str) -> list[str]:
    """Column names used by a right-hand-side formula (function names and quoted levels removed)."""
    stripped = _FUNCTION_OR_STRING.sub(" ", fixed)
    return list(dict.fromkeys(_IDENTIFIER.findall(stripped)))


def _is_balanced(df: pd.DataFrame, group: str, factors: Sequence[str]) -> bool:
    """Every group holds every cell of the factors, each the same number of times."""
    if not factors:
        sizes = df.groupby(group, observed=True).size()
        return sizes.nunique() == 1
    counts = df.groupby([group, *factors], observed=False).size()
    return counts.nunique() == 1 and int(counts.iloc[0]) > 0


def _term_table(estimates: pd.Series, se: pd.Series, ci: pd.DataFrame, p: pd.Series, terms: Sequence[str],
                residual_sd: float, alpha: float) -> pd.DataFrame:
    table = pd.DataFrame({
        "term": list(terms),
        "estimate": [float(estimates[t]) for t in terms],
        "se": [float(se[t]) for t in terms],
        "ci_low": [float(ci.loc[t].iloc[0]) for t in terms],
        "ci_high": [float(ci.loc[t].iloc[1]) for t in terms],
        "p_value": [float(p[t]) for t in terms],
    })
    # Holm and standardised effects over the effects of interest; the intercept is a level, not a comparison
    is_effect = table["term"] != "Intercept"
    table["std_effect"] = math.nan
    if residual_sd > 0:
        table.loc[is_effect, "std_effect"] = table.loc[is_effect, "estimate"] / residual_sd
    table["p_holm"] = math.nan
    if is_effect.any():
        table.loc[is_effect, "p_holm"] = holm(table.loc[is_effect, "p_value"].to_numpy(), alpha=alpha).p_adjusted
    return table


def _model_data(df: pd.DataFrame, response: str, fixed: str, group: str,
                reference: Mapping[str, str] | None) -> tuple[pd.DataFrame, list[str], int, int]:
    """The rows ``mixed_model`` fits, with its factors as categoricals whose first level is the baseline:
    ``(data, factors, n_dropped_missing, n_groups)``; refuses tables that leave nothing to model."""
    variables = _formula_variables(fixed)
    require_columns(df, [response, group, *variables], "table")
    if not variables:
        raise ValueError(f"fixed={fixed!r} names no column; give factors such as 'scenario + backbone'")
    data = df[[response, group, *variables]].copy()
    try:
        data[response] = pd.to_numeric(data[response], errors="raise").astype(float)
    except (TypeError, ValueError) as error:
        raise ValueError(f"response column {response!r} must be numeric (or True/False): {error}") from None
    missing = data[[response, group, *variables]].isna().any(axis=1)
    n_dropped = int(missing.sum())
    data = data[~missing].reset_index(drop=True)
    if data.empty:
        raise ValueError(f"no row of the table has a value for {response!r} (all {n_dropped} rows missing)")
    if data[response].nunique() < 2:
        raise ValueError(f"{response!r} takes a single value ({data[response].iloc[0]}) in every row; there is "
                         "nothing to model")

    # factors become ordered categoricals so that the baseline (treatment reference) level is chosen, not alphabetic
    baselines = dict(reference) if reference is not None else {}
    if reference is None and "scenario" in variables and (data["scenario"].astype(str) == "random").any():
        baselines["scenario"] = "random"
    factors = []
    for name in variables:
        if pd.api.types.is_numeric_dtype(data[name]) and name not in baselines:
            continue
        levels = sorted(data[name].astype(str).unique().tolist())
        if name in baselines:
            if baselines[name] not in levels:
                raise ValueError(f"reference level {baselines[name]!r} of {name!r} does not occur (levels: {levels})")
            levels.remove(baselines[name])
            levels.insert(0, baselines[name])
        if len(levels) < 2:
            raise ValueError(f"factor {name!r} has a single level {levels}; a model needs at least two levels to "
                             "compare (drop it from fixed)")
        data[name] = pd.Categorical(data[name].astype(str), categories=levels)
        factors.append(name)
    data[group] = data[group].astype(str)
    n_groups = int(data[group].nunique())
    if n_groups < 2:
        raise ValueError(f"{group!r} has a single value; a model across {group}s needs at least two")
    return data, factors, n_dropped, n_groups


def _fit_mixedlm(data: pd.DataFrame, response: str, formula: str,
                 group: str) -> tuple[Any, float, float, list[str], str | None]:
    """MixedLM (random intercept per ``group``, REML) of a standardised ``response``: ``(fit, centre, spread,
    convergence warnings, problem)``, where ``problem`` says why the fit is not usable (None when it is)."""
    import statsmodels.formula.api as smf

    caught: list[str] = []
    centre = spread = math.nan
    try:
        from statsmodels.tools.sm_exceptions import ConvergenceWarning

        # MixedLM's optimiser starts from unit-scale variances and stops on the boundary when the response
        # varies by ~0.01 (AUCs, Dice): fit a standardised response and scale the estimates back exactly
        centre, spread = float(data[response].mean()), float(data[response].std(ddof=1))
        scaled = data.assign(**{response: (data[response] - centre) / spread})
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            fit = smf.mixedlm(formula, scaled, groups=scaled[group]).fit(reml=True)
        caught = [str(r.message) for r in records if issubclass(r.category, ConvergenceWarning)]
        problem = None
        if not fit.converged:
            problem = "the optimiser did not converge"
        elif caught:
            problem = "statsmodels warned: " + "; ".join(dict.fromkeys(caught))
        elif not np.all(np.isfinite(fit.bse_fe)):
            problem = "the fixed-effect standard errors are not finite"
    except (np.linalg.LinAlgError, ValueError) as error:
        problem, fit = f"MixedLM failed: {error}", None
    return fit, centre, spread, caught, problem


def mixed_model(df: pd.DataFrame, response: str, fixed: str = "scenario + backbone", group: str = "seed",
                reference: Mapping[str, str] | None = None, method: str = "auto", alpha: float = 0.05,
                few_groups: int = FEW_GROUPS) -> ModelResult:
    """Model ``response ~ fixed`` across runs with ``group`` as the grouping factor.

    ``method="auto"``: a balanced design with fewer than ``few_groups`` groups is fitted by OLS with
    ``C(group)`` as a fixed factor (in a balanced design the fixed effects are the same as the mixed
    model's, without an unstable variance estimate); otherwise statsmodels MixedLM (random intercept per
    group, REML), falling back to the OLS model when MixedLM fails or does not converge. ``"mixedlm"`` and
    ``"ols"`` force one (a forced MixedLM that fails raises). ``result.method`` and ``result.reason`` say
    which was used and why. ``reference`` maps factor columns to their baseline level (default
    ``{"scenario": "random"}`` where that level exists). Rows with a missing response are counted in
    ``n_dropped_missing`` and left out.
    """
    import statsmodels.formula.api as smf

    if method not in ("auto", "mixedlm", "ols"):
        raise ValueError(f"method must be 'auto', 'mixedlm' or 'ols', got {method!r}")
    critical_z(alpha)
    data, factors, n_dropped, n_groups = _model_data(df, response, fixed, group, reference)

    balanced = _is_balanced(data, group, factors)
    # the response must be addressable in the formula whatever its name
    lhs = response if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", response) else f"Q('{response}')"
    ols_formula = f"{lhs} ~ {fixed} + C({group})"
    mixed_formula = f"{lhs} ~ {fixed}"

    caught: list[str] = []
    if method == "ols" or (method == "auto" and balanced and n_groups < few_groups):
        reason = ("forced by method='ols'" if method == "ols" else
                  f"balanced design with only {n_groups} {group} groups (< {few_groups}): a random-effect variance "
                  f"from so few groups is unstable, and with balance OLS with C({group}) gives the same fixed effects")
    else:
        fit, centre, spread, caught, problem = _fit_mixedlm(data, response, mixed_formula, group)
        if problem is None:
            terms = list(fit.fe_params.index)
            shift = pd.Series([centre if t == "Intercept" else 0.0 for t in terms], index=terms)
            estimates = fit.fe_params * spread + shift
            ci = fit.conf_int(alpha=alpha).loc[terms].mul(spread).add(shift, axis=0)
            residual_sd = math.sqrt(float(fit.scale)) * spread
            table = _term_table(estimates, fit.bse_fe * spread, ci, fit.pvalues, terms, residual_sd, alpha)
            why = ("forced by method='mixedlm'" if method == "mixedlm" else
                   ("unbalanced design" if not balanced else f"{n_groups} {group} groups (>= {few_groups})")
                   + f": random intercept per {group} (REML)")
            return ModelResult(response=response, method="MixedLM", reason=why, formula=f"{mixed_formula} "
                               f"+ (1 | {group})", group=group, n_obs=int(len(data)), n_groups=n_groups,
                               n_dropped_missing=n_dropped, coefficients=table,
                               group_variance=float(np.asarray(fit.cov_re)[0, 0]) * spread ** 2,
                               residual_sd=residual_sd,
                               warnings=caught)
        if method == "mixedlm":
            raise RuntimeError(f"MixedLM of {response!r} on {fixed!r} with groups {group!r} is not usable: {problem}; "
                               "use method='auto' to fall back to OLS")
        reason = f"MixedLM not usable ({problem}); fell back to OLS with C({group}) as a fixed factor"

    fit = smf.ols(ols_formula, data).fit()
    nuisance = [t for t in fit.params.index if t.startswith(f"C({group})")]
    terms = [t for t in fit.params.index if t not in nuisance]
    residual_sd = math.sqrt(float(fit.scale))
    table = _term_table(fit.params, fit.bse, fit.conf_int(alpha=alpha), fit.pvalues, terms, residual_sd, alpha)
    return ModelResult(response=response, method="OLS", reason=reason, formula=ols_formula, group=group,
                       n_obs=int(len(data)), n_groups=n_groups, n_dropped_missing=n_dropped, coefficients=table,
                       residual_sd=residual_sd, n_nuisance_terms=len(nuisance), warnings=caught)


def agreement_model(agreement_df: pd.DataFrame, measure: str, fixed: str = "scenario", group: str = "image_id",
                    cam_method: str | None = None, reference: Mapping[str, str] | None = None,
                    method: str = "auto", alpha: float = 0.05) -> ModelResult:
    """Per-image agreement (e.g. ``dice``) compared between scenarios, with the image as the grouping factor.

    The same image seen by every scenario is the pairing: a random intercept per image removes how easy each
    image is. ``cam_method`` keeps the rows of one explanation method (column ``method``); a table mixing
    several methods must either choose one or put ``method`` into ``fixed``.
    """
    require_columns(agreement_df, [measure, group], "agreement table")
    df = agreement_df
    if "method" in df.columns:
        methods = sorted(df["method"].astype(str).unique().tolist())
        if cam_method is not None:
            if cam_method not in methods:
                raise ValueError(f"cam_method {cam_method!r} does not occur in the agreement table "
                                 f"(methods: {methods})")
            df = df[df["method"].astype(str) == cam_method]
        elif len(methods) > 1 and "method" not in _formula_variables(fixed):
            raise ValueError(f"the agreement table mixes CAM methods {methods}; pass cam_method=<one of them> or add "
                             "'+ method' to fixed")
    elif cam_method is not None:
        raise ValueError("cam_method was given but the agreement table has no 'method' column")
    return mixed_model(df, measure, fixed=fixed, group=group, reference=reference, method=method, alpha=alpha)
