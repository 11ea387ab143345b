"""Tests of osteolib.evaluation.stats against independent computations (sklearn, scipy, hand formulas, O(n²) loops)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from osteolib.evaluation import stats as st


# ----------------------------------------------------------------------------------------------------------
# helpers: simulated data and a plain O(n²) DeLong


def _scores(n: int, separation: float, seed: int, ties: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and two correlated scores; with ``ties`` the scores are rounded onto a coarse grid."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    a = separation * y + rng.normal(size=n)
    b = 0.5 * separation * y + 0.7 * a + rng.normal(scale=0.7, size=n)
    if ties:
        a, b = np.round(a * 2) / 2, np.round(b)
    return y, a, b


def _structural_components(y: np.ndarray, s: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """DeLong's V10 (per positive) and V01 (per negative) straight from the definition, pair by pair."""
    positives = [x for x, label in zip(s, y) if label == 1]
    negatives = [x for x, label in zip(s, y) if label == 0]

    def psi(x: float, z: float) -> float:
        return 1.0 if x > z else 0.5 if x == z else 0.0

    v10 = np.array([sum(psi(x, z) for z in negatives) / len(negatives) for x in positives])
    v01 = np.array([sum(psi(x, z) for x in positives) / len(positives) for z in negatives])
    auc = sum(psi(x, z) for x in positives for z in negatives) / (len(positives) * len(negatives))
    return auc, v10, v01


def _slow_delong_covariance(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    auc_a, v10_a, v01_a = _structural_components(y, a)
    auc_b, v10_b, v01_b = _structural_components(y, b)
    m, n = len(v10_a), len(v01_a)
    cov = np.zeros((2, 2))
    for i, (p10, p01) in enumerate([(v10_a, v01_a), (v10_b, v01_b)]):
        for j, (q10, q01) in enumerate([(v10_a, v01_a), (v10_b, v01_b)]):
            s10 = sum((p - p10.mean()) * (q - q10.mean()) for p, q in zip(p10, q10)) / (m - 1)
            s01 = sum((p - p01.mean()) * (q - q01.mean()) for p, q in zip(p01, q01)) / (n - 1)
            cov[i, j] = s10 / m + s01 / n
    return cov


def _predictions(n: int = 150, seeds=(0, 1), backbones=("densenet121",), separation=None, seed: int = 0,
                 val_rows: int = 0) -> pd.DataFrame:
    """A prediction table: 'mae' separates the classes much better than 'random'; 'rotation' is like 'random'."""
    separation = separation or {"random": 0.8, "mae": 2.0, "rotation": 0.8}
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    ids = [f"img{i:04d}" for i in range(n)]
    split = ["val"] * val_rows + ["test"] * (n - val_rows)
    frames = []
    for backbone in backbones:
        for run_seed in seeds:
            for scenario, sep in separation.items():
                p = 1 / (1 + np.exp(-(sep * (2 * y - 1) + rng.normal(size=n))))
                frames.append(pd.DataFrame({
                    "image_id": ids, "label": np.where(y == 1, "osteoporosis", "normal"), "target": y,
                    "prob_normal": 1 - p, "prob_osteoporosis": p, "split": split, "scenario": scenario,
                    "backbone": backbone, "seed": run_seed}))
    return pd.concat(frames, ignore_index=True)


def _runs_table(n_seeds: int, seed_sd: float = 0.02, seed: int = 0, zero_between_seed: bool = False) -> pd.DataFrame:
    """AUC per run: 'mae' is 0.05 above 'random', 'rotation' equal to it, vit_small 0.02 below densenet121."""
    rng = np.random.default_rng(seed)
    rows = []
    for run_seed in range(n_seeds):
        shift = rng.normal(scale=seed_sd)
        noise = rng.normal(scale=0.01, size=6)
        if zero_between_seed:
            # every seed has exactly the same mean: the seed variance estimate sits on its boundary (0)
            shift, noise = 0.0, noise - noise.mean()
        cells = itertools.product([("random", 0.0), ("mae", 0.05), ("rotation", 0.0)],
                                  [("densenet121", 0.0), ("vit_small", -0.02)])
        for k, ((scenario, effect), (backbone, backbone_effect)) in enumerate(cells):
            rows.append({"seed": run_seed, "scenario": scenario, "backbone": backbone,
                         "auc": 0.75 + effect + backbone_effect + shift + noise[k]})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------
# DeLong


@pytest.mark.parametrize("ties", [False, True])
def test_delong_auc_equals_sklearn(ties):
    y, a, _ = _scores(300, 1.0, seed=3, ties=ties)
    result = st.delong_auc(y, a)
    assert result.auc == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert result.ci_low < result.auc < result.ci_high
    assert result.n_positive + result.n_negative == 300


@pytest.mark.parametrize("ties", [False, True])
def test_rank_auc_equals_sklearn_and_is_nan_for_one_class(ties):
    y, a, _ = _scores(300, 1.0, seed=3, ties=ties)
    assert st.rank_auc(y, a) == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert st.rank_auc(y.astype(bool), a) == st.rank_auc(y, a)
    assert math.isnan(st.rank_auc(np.ones(5, dtype=int), np.arange(5.0)))
    assert math.isnan(st.rank_auc(np.zeros(5, dtype=int), np.arange(5.0)))


@pytest.mark.parametrize("ties", [False, True])
def test_delong_covariance_equals_direct_structural_components(ties):
    y, a, b = _scores(70, 1.0, seed=5, ties=ties)
    if ties:
        assert len(np.unique(a)) < 20  # the rounded scores really do tie a lot
    slow = _slow_delong_covariance(y, a, b)
    single = st.delong_auc(y, a)
    assert single.se ** 2 == pytest.approx(slow[0, 0], rel=1e-10)
    paired = st.delong_paired(y, a, b)
    assert paired.se ** 2 == pytest.approx(slow[0, 0] + slow[1, 1] - 2 * slow[0, 1], rel=1e-10)
    assert paired.auc_a == pytest.approx(_structural_components(y, a)[0])
    assert paired.auc_b == pytest.approx(_structural_components(y, b)[0])
    assert paired.correlation == pytest.approx(slow[0, 1] / math.sqrt(slow[0, 0] * slow[1, 1]), rel=1e-10)


def test_delong_se_agrees_with_bootstrap_se():
    y, a, b = _scores(400, 0.8, seed=11)
    rng = np.random.default_rng(0)
    single, difference = [], []
    for _ in range(300):
        idx = rng.integers(0, y.size, y.size)
        auc_a, auc_b = roc_auc_score(y[idx], a[idx]), roc_auc_score(y[idx], b[idx])
        single.append(auc_a)
        difference.append(auc_a - auc_b)
    assert st.delong_auc(y, a).se == pytest.approx(np.std(single, ddof=1), rel=0.15)
    assert st.delong_paired(y, a, b).se == pytest.approx(np.std(difference, ddof=1), rel=0.15)


def test_delong_paired_identical_and_different_scores():
    y, a, b = _scores(200, 1.5, seed=2)
    same = st.delong_paired(y, a, a)
    assert same.diff == 0 and same.p_value == 1.0
    noise = np.random.default_rng(1).normal(size=y.size)
    worse = st.delong_paired(y, a, noise)  # a real score against a useless one
    assert worse.diff > 0.2 and worse.p_value < 1e-6
    assert worse.ci_low > 0
    assert worse.p_value == pytest.approx(2 * sps.norm.sf(abs(worse.diff / worse.se)))


def test_delong_rejects_bad_input():
    y, a, b = _scores(50, 1.0, seed=0)
    with pytest.raises(ValueError, match="0/1"):
        st.delong_auc(y + 1, a)
    with pytest.raises(ValueError, match="scores_b has shape"):
        st.delong_paired(y, a, b[:-1])
    bad = a.copy()
    bad[7] = np.nan
    with pytest.raises(ValueError, match="non-finite.*position 7"):
        st.delong_auc(y, bad)
    with pytest.raises(ValueError, match="at least 2 positive"):
        st.delong_auc(np.r_[1, np.zeros(20, int)], np.arange(21.0))


# ----------------------------------------------------------------------------------------------------------
# Wilson and McNemar


def test_wilson_ci_equals_hand_formula():
    k, n, z = 37, 50, sps.norm.ppf(0.975)
    p = k / n
    centre = (p + z ** 2 / (2 * n)) / (1 + z ** 2 / n)
    half = z / (1 + z ** 2 / n) * math.sqrt(p * (1 - p) / n + z ** 2 / (4 * n ** 2))
    assert st.wilson_ci(k, n) == pytest.approx((centre - half, centre + half), abs=1e-12)
    with pytest.raises(ValueError, match="successes"):
        st.wilson_ci(51, 50)


def _correctness(b: int, c: int, both: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    """Paired correctness vectors with b cases only A gets right and c cases only B gets right."""
    a_ok = np.r_[np.ones(both), np.ones(b), np.zeros(c), np.zeros(neither)].astype(bool)
    b_ok = np.r_[np.ones(both), np.zeros(b), np.ones(c), np.zeros(neither)].astype(bool)
    return a_ok, b_ok


def test_mcnemar_exact_matches_binomial_test():
    a_ok, b_ok = _correctness(b=12, c=4, both=60, neither=14)
    result = st.mcnemar_paired(a_ok, b_ok)
    assert result.exact and "exact" in result.method  # 16 discordant pairs < 25
    assert result.p_value == pytest.approx(sps.binomtest(12, 16, 0.5).pvalue, rel=1e-12)
    assert result.table.tolist() == [[60, 12], [4, 14]]
    assert result.diff == pytest.approx((12 - 4) / 90)
    assert result.accuracy_a - result.accuracy_b == pytest.approx(result.diff)
    assert result.odds_ratio == pytest.approx(3.0)
    cp_low, cp_high = sps.binomtest(12, 16).proportion_ci(0.95, method="exact")
    assert result.odds_ratio_ci_low == pytest.approx(cp_low / (1 - cp_low), rel=1e-6)
    assert result.odds_ratio_ci_high == pytest.approx(cp_high / (1 - cp_high), rel=1e-6)


def test_mcnemar_chi_square_matches_hand_computation():
    a_ok, b_ok = _correctness(b=30, c=14, both=120, neither=36)
    result = st.mcnemar_paired(a_ok, b_ok)
    assert not result.exact and "chi-square" in result.method  # 44 discordant pairs >= 25
    statistic = (abs(30 - 14) - 1) ** 2 / (30 + 14)
    assert result.statistic == pytest.approx(statistic, rel=1e-12)
    assert result.p_value == pytest.approx(sps.chi2.sf(statistic, 1), rel=1e-12)
    forced = st.mcnemar_paired(a_ok, b_ok, exact=True)
    assert forced.p_value == pytest.approx(sps.binomtest(30, 44, 0.5).pvalue, rel=1e-12)


def test_mcnemar_without_discordant_pairs_and_bad_input():
    a_ok, b_ok = _correctness(b=0, c=0, both=40, neither=10)
    result = st.mcnemar_paired(a_ok, b_ok)
    assert result.p_value == 1.0 and result.diff == 0 and math.isnan(result.odds_ratio)
    assert result.diff_ci_low <= 0 <= result.diff_ci_high
    with pytest.raises(ValueError, match="same cases"):
        st.mcnemar_paired(a_ok, b_ok[:-1])
    with pytest.raises(ValueError, match="correct_a must hold"):
        st.mcnemar_paired(np.full(50, 2), b_ok)


def test_paired_accuracy_difference_interval_has_nominal_coverage():
    # Newcombe's interval: simulate correlated paired correctness with a known difference of 0.1
    rng = np.random.default_rng(4)
    covered, n = 0, 80
    for _ in range(400):
        latent = rng.random(n)
        a_ok = latent < 0.8  # A is right on the easier 80 % of cases
        flip = rng.random(n) < 0.1  # B: right on the easier 70 %, with 10 % independent flips on top
        b_ok = np.where(flip, latent >= 0.7, latent < 0.7)
        truth = 0.8 - (0.7 * 0.9 + 0.3 * 0.1)
        result = st.mcnemar_paired(a_ok, b_ok)
        assert -1 <= result.diff_ci_low <= result.diff <= result.diff_ci_high <= 1
        covered += result.diff_ci_low <= truth <= result.diff_ci_high
    assert 0.91 <= covered / 400 <= 0.99


# ----------------------------------------------------------------------------------------------------------
# bootstrap and Holm


def _rank_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Mann-Whitney AUC (nan when a resample holds a single class)."""
    m, n = int(y.sum()), int((1 - y).sum())
    if m == 0 or n == 0:
        return math.nan
    ranks = sps.rankdata(s)
    return (ranks[y == 1].sum() - m * (m + 1) / 2) / (m * n)


def test_bootstrap_ci_of_a_mean_matches_normal_theory():
    x = np.random.default_rng(8).normal(loc=3.0, scale=2.0, size=200)
    t_half = sps.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    for method in ("percentile", "bca"):
        result = st.bootstrap_ci(np.mean, x, n_boot=2000, method=method)
        assert result.estimate == pytest.approx(x.mean())
        assert result.ci_low == pytest.approx(x.mean() - t_half, abs=0.08)
        assert result.ci_high == pytest.approx(x.mean() + t_half, abs=0.08)
        assert result.se == pytest.approx(x.std(ddof=1) / math.sqrt(x.size), rel=0.1)
    again = st.bootstrap_ci(np.mean, x, n_boot=2000, method="bca")
    assert again.ci_low == result.ci_low  # seeded: the same interval every time


def test_paired_bootstrap_of_auc_difference_agrees_with_delong():
    y, a, b = _scores(300, 1.0, seed=21)
    boot = st.bootstrap_ci(lambda yy, aa, bb: _rank_auc(yy, aa) - _rank_auc(yy, bb), y, a, b, n_boot=1000)
    delong = st.delong_paired(y, a, b)
    assert boot.estimate == pytest.approx(delong.diff)
    assert boot.se == pytest.approx(delong.se, rel=0.2)
    independent = st.bootstrap_ci(lambda u, v: np.mean(u) - np.mean(v), a[y == 1], a[y == 0], n_boot=1000,
                                  paired=False)
    welch = math.sqrt(a[y == 1].var(ddof=1) / (y == 1).sum() + a[y == 0].var(ddof=1) / (y == 0).sum())
    assert independent.se == pytest.approx(welch, rel=0.15)


def test_bootstrap_refuses_undefined_resamples_and_bad_arguments():
    y = np.r_[1, 1, np.zeros(28, int)]  # most resamples lose both positives
    s = np.arange(30.0)
    with pytest.raises(ValueError, match="undefined on .* bootstrap resamples"):
        st.bootstrap_ci(_rank_auc, y, s, n_boot=500)
    with pytest.raises(ValueError, match="equally long"):
        st.bootstrap_ci(lambda u, v: 0.0, np.arange(5.0), np.arange(6.0))
    with pytest.raises(ValueError, match="percentile"):
        st.bootstrap_ci(np.mean, s, method="studentized")


def test_holm_matches_hand_computation():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> kept monotone at 0.06
    result = st.holm([0.01, 0.04, 0.03, 0.005], alpha=0.05)
    assert result.p_adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert result.reject.tolist() == [True, False, False, True]
    assert st.holm([0.5, 0.9]).p_adjusted == pytest.approx([1.0, 1.0])  # capped at 1
    with pytest.raises(ValueError, match="position"):
        st.holm([0.01, float("nan")])


# ----------------------------------------------------------------------------------------------------------
# prediction tables


def test_auc_table_matches_direct_computation():
    df = _predictions(val_rows=20)
    table = st.auc_table(df)
    assert len(table) == 6 and set(table["n"]) == {130}  # the 20 validation rows are not evaluated
    row = table[(table["scenario"] == "mae") & (table["seed"] == 1)].iloc[0]
    run = df[(df["scenario"] == "mae") & (df["seed"] == 1) & (df["split"] == "test")]
    assert row["positive"] == "osteoporosis"
    assert row["auc"] == pytest.approx(roc_auc_score(run["target"], run["prob_osteoporosis"]))
    correct = int(((run["prob_osteoporosis"] >= 0.5).astype(int) == run["target"]).sum())
    assert row["accuracy"] == pytest.approx(correct / 130)
    assert (row["accuracy_ci_low"], row["accuracy_ci_high"]) == pytest.approx(st.wilson_ci(correct, 130))
    assert (table["auc_ci_low"] <= table["auc"]).all() and (table["auc"] <= table["auc_ci_high"]).all()


def test_compare_scenarios_finds_planted_effect_and_adjusts_over_the_family():
    df = _predictions()
    out = st.compare_scenarios(df, reference="random")
    assert list(out.columns) == st.COMPARISON_COLUMNS
    assert len(out) == 2 * 2 * 2  # 2 seeds x 2 scenarios vs random x 2 tests
    assert out["p_holm"].to_numpy() == pytest.approx(st.holm(out["p_value"].to_numpy()).p_adjusted)
    assert (out["family_size"] == len(out)).all()
    mae = out[out["scenario"] == "mae"]
    assert mae["significant"].all() and (mae["effect"] > 0).all() and (mae["effect_ci_low"] > 0).all()
    assert not out.loc[out["scenario"] == "rotation", "significant"].any()

    # each row is the paired test of the two runs, recomputed here from the raw columns
    row = out[(out["scenario"] == "mae") & (out["seed"] == 0) & (out["test"] == "delong_auc")].iloc[0]
    run = lambda s: df[(df["scenario"] == s) & (df["seed"] == 0)].set_index("image_id")  # noqa: E731
    mae_run, ref_run = run("mae"), run("random").loc[run("mae").index]
    direct = st.delong_paired(mae_run["target"], mae_run["prob_osteoporosis"], ref_run["prob_osteoporosis"])
    assert row["effect"] == pytest.approx(direct.diff) and row["p_value"] == pytest.approx(direct.p_value)
    mc_row = out[(out["scenario"] == "mae") & (out["seed"] == 0) & (out["test"] == "mcnemar_accuracy")].iloc[0]
    direct_mc = st.mcnemar_paired((mae_run["prob_osteoporosis"] >= 0.5) == mae_run["target"].astype(bool),
                                  (ref_run["prob_osteoporosis"] >= 0.5) == ref_run["target"].astype(bool))
    assert mc_row["p_value"] == pytest.approx(direct_mc.p_value)
    assert (mc_row["discordant_b"], mc_row["discordant_c"]) == (direct_mc.b, direct_mc.c)

    pairs = st.compare_scenarios(df, all_pairs=True)
    assert set(zip(pairs["scenario"], pairs["reference"])) == {("mae", "random"), ("rotation", "random"),
                                                             ("mae", "rotation")}


def test_compare_scenarios_uses_each_runs_threshold():
    df = _predictions(seeds=(0,))
    df["threshold"] = np.where(df["scenario"] == "mae", 0.9, 0.5)
    out = st.compare_scenarios(df)
    row = out[(out["scenario"] == "mae") & (out["test"] == "mcnemar_accuracy")].iloc[0]
    mae = df[df["scenario"] == "mae"]
    assert row["value"] == pytest.approx(((mae["prob_osteoporosis"] >= 0.9) == mae["target"].astype(bool)).mean())
    assert "thresholds 0.9 / 0.5" in row["method"]


def test_compare_scenarios_raises_on_mismatched_runs():
    df = _predictions(seeds=(0,))
    dropped = df.drop(df[(df["scenario"] == "mae") & (df["image_id"] == "img0003")].index)
    with pytest.raises(ValueError, match=r"different images: 0 only in the first.*1 only in the second.*img0003"):
        st.compare_scenarios(dropped)
    relabelled = df.copy()
    flip = (relabelled["scenario"] == "mae") & (relabelled["image_id"] == "img0005")
    relabelled.loc[flip, "target"] = 1 - relabelled.loc[flip, "target"]
    relabelled.loc[flip, "label"] = np.where(relabelled.loc[flip, "target"] == 1, "osteoporosis", "normal")
    with pytest.raises(ValueError, match="disagree on the label of 1 image"):
        st.compare_scenarios(relabelled)
    with pytest.raises(ValueError, match="no run of the reference scenario 'imagenet'"):
        st.compare_scenarios(df, reference="imagenet")
    doubled = pd.concat([df, df[df["scenario"] == "mae"].head(2)])
    with pytest.raises(ValueError, match="repeated image_id"):
        st.compare_scenarios(doubled)
    with pytest.raises(ValueError, match="no rows with split == 'test'"):
        st.compare_scenarios(df.assign(split="val"))


def test_multiclass_tables_need_a_positive_class():
    df = _predictions(seeds=(0,))
    df["prob_other"] = 0.0
    df.loc[df.index[:3], "target"] = 2
    df.loc[df.index[:3], "label"] = "other"
    with pytest.raises(ValueError, match="pass positive=<class name>"):
        st.auc_table(df)
    table = st.auc_table(df, positive="osteoporosis")
    assert len(table) == 3


def test_significance_summary_names_significant_and_non_significant_differences():
    out = st.compare_scenarios(_predictions())
    text = st.significance_summary(out)
    assert text.startswith("After Holm correction over the family of 8 tests")
    assert "4 differences are significant" in text
    assert "*mae* vs *random*, AUC: significant in 2 of 2 runs (higher)" in text
    assert "*rotation* vs *random*, AUC: not significant in any of 2 runs" in text
    mae_auc = out[(out["scenario"] == "mae") & (out["test"] == "delong_auc")]["effect"]
    assert f"median {mae_auc.median():+.3f}" in text
    single = st.significance_summary(out[out["seed"] == 0])
    assert "significant (backbone densenet121, seed 0), ΔAUC +" in single and "95 % CI" in single


# ----------------------------------------------------------------------------------------------------------
# models across seeds and images


def test_mixed_model_recovers_planted_scenario_effect():
    result = st.mixed_model(_runs_table(n_seeds=8), "auc", reference={"scenario": "random"})
    assert result.method == "MixedLM" and "8 seed groups" in result.reason
    coef = result.coefficients.set_index("term")
    mae, rotation = coef.loc["scenario[T.mae]"], coef.loc["scenario[T.rotation]"]
    assert mae["ci_low"] < 0.05 < mae["ci_high"] and mae["p_holm"] < 1e-6
    assert rotation["ci_low"] < 0 < rotation["ci_high"] and rotation["p_value"] > 0.05
    assert coef.loc["backbone[T.vit_small]", "estimate"] == pytest.approx(-0.02, abs=0.006)
    assert result.group_variance == pytest.approx(0.02 ** 2, rel=0.9)  # seed spread is modelled, not lost
    assert result.n_obs == 48 and result.n_groups == 8 and result.n_dropped_missing == 0

    # the design is balanced, so OLS with seed as a factor must give the same fixed effects
    ols = st.mixed_model(_runs_table(n_seeds=8), "auc", method="ols").coefficients.set_index("term")
    effects = ["scenario[T.mae]", "scenario[T.rotation]", "backbone[T.vit_small]"]
    assert coef.loc[effects, "estimate"].to_numpy() == pytest.approx(ols.loc[effects, "estimate"].to_numpy(), abs=1e-6)


def test_mixed_model_takes_ols_where_expected():
    balanced = st.mixed_model(_runs_table(n_seeds=3), "auc")
    assert balanced.method == "OLS" and "balanced design with only 3 seed groups" in balanced.reason
    assert balanced.n_nuisance_terms == 2  # two seed dummies, kept out of the coefficient table
    assert balanced.coefficients.set_index("term").loc["scenario[T.mae]", "p_value"] < 1e-3

    unbalanced = st.mixed_model(_runs_table(n_seeds=3).iloc[1:], "auc")
    assert unbalanced.method == "MixedLM" and "unbalanced" in unbalanced.reason

    boundary = st.mixed_model(_runs_table(n_seeds=8, zero_between_seed=True), "auc")
    assert boundary.method == "OLS" and "MixedLM not usable" in boundary.reason and boundary.warnings
    with pytest.raises(RuntimeError, match="not usable"):
        st.mixed_model(_runs_table(n_seeds=8, zero_between_seed=True), "auc", method="mixedlm")


def test_mixed_model_counts_missing_rows_and_rejects_bad_input():
    df = _runs_table(n_seeds=6)
    df.loc[[0, 5], "auc"] = np.nan
    result = st.mixed_model(df, "auc")
    assert result.n_dropped_missing == 2 and result.n_obs == 34
    assert result.coefficients["term"].iloc[1] == "scenario[T.mae]"  # 'random' is the baseline
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['view'\]"):
        st.mixed_model(df, "auc", fixed="scenario + view")
    with pytest.raises(ValueError, match="reference level 'imagenet'"):
        st.mixed_model(df, "auc", reference={"scenario": "imagenet"})
    with pytest.raises(ValueError, match="single level"):
        st.mixed_model(df[df["scenario"] == "mae"], "auc", fixed="scenario")


def _agreement_table(n_images: int = 40, seed: int = 0) -> pd.DataFrame:
    """Dice per image and scenario: images differ a lot in difficulty; 'mae' adds 0.1."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_images):
        difficulty = rng.normal(scale=0.15)
        for scenario, effect in [("random", 0.0), ("mae", 0.1), ("rotation", 0.0)]:
            for method in ("gradcam", "gradcam++"):
                rows.append({"image_id": f"img{i:03d}", "scenario": scenario, "backbone": "densenet121", "seed": 0,
                             "method": method, "dice": 0.4 + difficulty + effect + rng.normal(scale=0.05)})
    return pd.DataFrame(rows)


def test_agreement_model_uses_the_image_as_grouping_factor():
    df = _agreement_table()
    result = st.agreement_model(df, "dice", cam_method="gradcam")
    assert result.method == "MixedLM" and result.group == "image_id" and result.n_groups == 40
    coef = result.coefficients.set_index("term")
    assert coef.loc["scenario[T.mae]", "ci_low"] < 0.1 < coef.loc["scenario[T.mae]", "ci_high"]
    assert coef.loc["scenario[T.mae]", "p_value"] < 1e-6
    assert result.group_variance > 0.01  # image difficulty is absorbed by the grouping factor
    assert result.to_dict()["coefficients"][1]["term"] == "scenario[T.mae]"
    with pytest.raises(ValueError, match="mixes CAM methods"):
        st.agreement_model(df, "dice")
    both = st.agreement_model(df, "dice", fixed="scenario + method")
    assert "method[T.gradcam++]" in set(both.coefficients["term"])


# ----------------------------------------------------------------------------------------------------------
# the label-efficiency curve: seed-averaged points, paired pretraining effects, the mixed model


def _curve_predictions(gain: float, n_patients: int = 60, seed: int = 0) -> pd.DataFrame:
    """Test rows of a (random, chest_mae) x 3 fractions x 3 seeds grid, two images per patient; chest_mae's scores
    carry ``gain`` more signal, and every initialisation gains with the share of labels."""
    rng = np.random.default_rng(seed)
    patients = np.repeat([f"p{k}" for k in range(n_patients)], 2)
    y = np.repeat(np.arange(n_patients) % 2, 2)
    rows = []
    for scenario in ("random", "chest_mae"):
        for fraction in (0.1, 0.5, 1.0):
            for s in (0, 1, 2):
                signal = 0.6 + 0.4 * fraction + (gain if scenario == "chest_mae" else 0.0)
                score = 1 / (1 + np.exp(-(signal * (2 * y - 1) + rng.normal(size=y.size))))
                rows.append(pd.DataFrame({"image_id": [f"{p}-{k % 2}" for k, p in enumerate(patients)],
                                          "patient_id": patients, "label": np.where(y == 1, "pos", "neg"),
                                          "prob_pos": score, "backbone": "densenet121", "scenario": scenario,
                                          "label_fraction": fraction, "seed": s}))
    return pd.concat(rows, ignore_index=True)


def test_curve_points_average_the_seeds_with_a_patient_bootstrap_interval():
    test = _curve_predictions(gain=0.0)
    points = st.curve_points(test, "pos", n_boot=300)
    assert len(points) == 6 and set(points["seeds"]) == {3} and set(points["test_patients"]) == {60}
    one = test[(test["scenario"] == "random") & (test["label_fraction"] == 0.5)]
    expected = np.mean([roc_auc_score(g["label"] == "pos", g["prob_pos"]) for _, g in one.groupby("seed")])
    row = points[(points["scenario"] == "random") & (points["label_fraction"] == 0.5)].iloc[0]
    assert row["auc"] == pytest.approx(expected) and row["ci_low"] < expected < row["ci_high"]
    with pytest.raises(ValueError, match="different test images"):
        st.curve_points(test.drop(index=test.index[(test["seed"] == 1)][:2]), "pos", n_boot=300)


def test_pretraining_effects_find_a_real_gain_and_not_an_absent_one_with_holm_over_all_fractions():
    gained = st.pretraining_effects(_curve_predictions(gain=1.5), "pos", n_boot=400)
    assert len(gained) == 3 and (gained["effect"] > 0.05).all() and (gained["p_holm"] < 0.05).all()
    assert (gained["ci_low"] > 0).all()
    assert (gained["p_holm"] >= gained["p_value"]).all()  # Holm only raises p-values
    null = st.pretraining_effects(_curve_predictions(gain=0.0, seed=1), "pos", n_boot=400)
    assert (null["p_holm"] > 0.05).all() and ((null["ci_low"] < 0) & (null["ci_high"] > 0)).all()
    with pytest.raises(ValueError, match="reference initialisation"):
        st.pretraining_effects(_curve_predictions(gain=0.0), "pos", reference="imagenet")


def test_the_efficiency_model_fits_initialisation_by_log_fraction_with_seed_as_random_effect():
    rows = []
    rng = np.random.default_rng(3)
    for seed in range(3):
        shift = rng.normal(scale=0.02)
        for scenario, effect in (("random", 0.0), ("chest_mae", 0.08)):
            for fraction in (0.05, 0.1, 0.25, 0.5, 1.0):
                auc = 0.8 + 0.03 * np.log2(fraction) + effect + shift + rng.normal(scale=0.01)
                rows.append({"backbone": "vit_small", "scenario": scenario, "label_fraction": fraction,
                             "seed": seed, "auc": auc})
    models = st.efficiency_models(pd.DataFrame(rows))
    table = st.model_table(models).set_index("term")
    assert set(table["method"]) == {"MixedLM"}
    assert table.loc["log2_fraction", "estimate"] == pytest.approx(0.03, abs=0.01)
    assert table.loc["scenario[T.chest_mae]", "estimate"] == pytest.approx(0.08, abs=0.02)
    assert table.loc["scenario[T.chest_mae]", "p_holm"] < 0.05
    assert math.isnan(table.loc["Intercept", "p_value"])  # a level, not a comparison
