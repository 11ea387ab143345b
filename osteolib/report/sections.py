"""The sections of a run's report (notebook 07), each read from the run folder's own tables and figures.

Nothing here recomputes a number a stage wrote: every value comes from a file in ``tables/``, ``figures/``,
``data/`` or ``run.json`` (one source of truth). A section returns a list of blocks -- Markdown strings, tables
(DataFrames) and figure paths -- that :func:`show` displays. A file the report needs from a stage the run executed
but that is missing stops the report with :class:`MissingReportInput`, naming the file and the notebook that
writes it; a stage the profile did not run is said in words instead.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from osteolib.report.checklist import ITEMS, checklist_table
from osteolib.report.results import BACKBONE_LABELS, SCENARIO_LABELS
from osteolib.runs import Run
from osteolib.stages.finetune_config import run_name_of
from osteolib.study import notebook_matches

__all__ = ["MissingReportInput", "ReportInputs", "show", "overview", "data_and_flow", "discrimination",
           "fair_comparison", "clinical_data", "calibration", "subgroups", "external_validation", "explanations", "reproducibility",
           "checklist"]

Block = Any  # str (Markdown) | pd.DataFrame | Path (a figure)


class MissingReportInput(FileNotFoundError):
    """A table or figure the report needs is not in the run folder (or its parents)."""


@dataclass
class ReportInputs:
    """The run folder as the report reads it."""

    run: Run

    def __post_init__(self) -> None:
        self.info = self.run.info()
        if not self.info:
            raise MissingReportInput(f"{self.run.path}: no run.json; the report reads a run folder made by `osteo run`")
        self.notebooks = self._notebooks()

    def _notebooks(self) -> set[str]:
        """The notebooks this run and its parents executed (or planned to). A run gathered from grid cells (`osteo
        collect`) has executions but no plan."""
        names: set[str] = set()
        current: Run | None = self.run
        while current is not None:
            info = current.info()
            names |= {str(e.get("notebook")) for e in info.get("plan", []) + info.get("executions", [])}
            current = current.parent
        return names

    def ran(self, notebook: str) -> bool:
        """Whether the run's plan holds notebook ``notebook`` (a name or number prefix, e.g. "05"). A folder without
        a plan (notebooks stepped through in JupyterLab) counts a notebook as run when its first output is there."""
        if self.notebooks:
            return any(notebook_matches(name, notebook) for name in self.notebooks)
        marker = {"00": "data/audit.json", "04": "predictions", "05": "tables/05_auc_per_run.csv"}.get(notebook[:2])
        found = self.optional(marker) if marker else None
        return found is not None and (found.is_file() or any(found.glob("*.csv")))

    def path(self, relative: str, stage: str) -> Path:
        try:
            return self.run.find(relative)
        except FileNotFoundError:
            raise MissingReportInput(
                f"the report needs {relative}, which notebook {stage} writes, but it is not in {self.run.path} (or "
                f"its parents): that notebook did not finish, or ran with an older osteolib. Rerun it (`osteo run "
                f"--from {stage[:2]} --parent {self.run.path}`), then the report (`osteo report <new run>`)") from None

    def optional(self, relative: str) -> Path | None:
        return self.run.find_optional(relative)

    def table(self, relative: str, stage: str) -> pd.DataFrame:
        return pd.read_csv(self.path(relative, stage))

    def text(self, relative: str, stage: str) -> str:
        return self.path(relative, stage).read_text().strip()

    def audit(self) -> dict[str, Any]:
        return json.loads(self.path("data/audit.json", "00_data_audit").read_text())

    def glob(self, pattern: str) -> list[Path]:
        """Files matching ``pattern`` in the run and its parents (the run's own first, by name)."""
        return self.run.find_all(pattern)

    def selected(self) -> pd.Series:
        """The model chosen on validation AUC (``tables/selection.csv``, written after notebook 04)."""
        selection = self.table("tables/selection.csv", "04_finetune (its results_tables step)")
        return selection[selection["selected"].astype(bool)].iloc[0]

    def selected_name(self) -> str:
        best = self.selected()
        return run_name_of(best["scenario"], best["backbone"], best["seed"], best.get("label_fraction", 1.0))


def show(blocks: Iterable[Block]) -> None:
    """Display a section's blocks in the notebook (figures embedded, so the HTML export carries them)."""
    import base64
    import html

    from IPython.display import HTML, Markdown, display

    for block in blocks:
        if isinstance(block, Path):
            # an <img> with alternative text (the figure's name), the PNG inlined so the exported file stands alone
            data = base64.b64encode(block.read_bytes()).decode()
            alt = html.escape(block.stem.replace("_", " "))
            display(HTML(f'<img src="data:image/png;base64,{data}" alt="figure: {alt}" style="max-width: 100%">'))
        elif isinstance(block, pd.DataFrame):
            text = [c for c in block.columns if not pd.api.types.is_numeric_dtype(block[c])]
            display(block.style.hide(axis="index").format(precision=3, na_rep="-")
                    .set_properties(subset=text, **{"text-align": "left"}))
        else:
            display(Markdown(str(block)))


def _model(backbone: str, scenario: str) -> str:
    return f"{BACKBONE_LABELS.get(backbone, backbone)} · {SCENARIO_LABELS.get(scenario, scenario)}"


def _ci(estimate: float, low: float, high: float, digits: int = 3) -> str:
    if estimate is None or (isinstance(estimate, float) and math.isnan(estimate)):
        return "-"
    return f"{estimate:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _p(p: float) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "-"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


# --------------------------------------------------------------------------------------------------------------
def overview(inputs: ReportInputs) -> list[Block]:
    info, env = inputs.info, inputs.info.get("environment") or {}
    audit = inputs.audit()
    settings = audit.get("settings", {})
    status = inputs.run.status
    status = "running (this report is its last step)" if status == "running" else status
    allowed = allowed_label_covariates(inputs)
    lines = [f"**Warning: the image + clinical models use covariate(s) that measure the label**, kept on purpose by the "
             f"profile's allow_label_covariates: " + "; ".join(f"`{c['covariate']}` ({c['why']})" for c in allowed)
             + ". Their results say what the image adds to the diagnosis's own measurement, not how well it "
               "diagnoses."] if allowed else []
    lines += [f"**Run** `{inputs.run.path.name}` · profile **{info.get('profile')}** · created {info.get('created')} · "
             f"status **{status}**",
             f"**Data set** {_dataset_name(settings.get('dataset'))} · classes {', '.join(audit.get('classes', []))} "
             f"(positive: **{audit.get('classes', ['?'])[-1]}**)",
             f"**Machine** {env.get('cpu_model', env.get('processor', '?'))}, {env.get('cpu_count', '?')} cores · "
             f"git commit `{env.get('git_commit')}`"]
    if inputs.ran("04"):
        best = inputs.selected()
        lines.append(f"**Model chosen on validation AUC**: {_model(best['backbone'], best['scenario'])}, seed "
                     f"{int(best['seed'])} (validation AUC {best['valid_auc']:.3f}; mean over its seeds "
                     f"{best['mean_valid_auc']:.3f}). Calibration, subgroups and the failure analysis show this model.")
    return ["\n\n".join(lines)]


def _dataset_name(dataset: Any) -> str:
    if isinstance(dataset, dict):
        return f"your own data ({dataset.get('kind')}: {dataset.get('root') or dataset.get('table')})"
    return f"`{dataset}`"


def data_and_flow(inputs: ReportInputs) -> list[Block]:
    audit = inputs.audit()
    flow = inputs.table("tables/00_flow.csv", "00_data_audit")
    partitions = inputs.table("tables/00_partitions.csv", "00_data_audit")
    included = flow[flow["box"] == "included"].iloc[0]
    excluded = flow[flow["box"] == "excluded"]
    text = (f"{int(included['images'])} images of {int(included['patients'])} patients were included"
            + (f"; {int(excluded['images'].sum())} were excluded ("
               + "; ".join(f"{r.images}: {r.detail}" for r in excluded.itertuples()) + ")" if len(excluded)
               else "; none was excluded")
            + f". The split is by patient ({', '.join(str(r) for r in audit['settings'].get('split_ratios', []))}, "
            f"seed {audit['settings'].get('split_seed')}). Copies of one radiograph: {audit.get('copy_pairs', 0)} "
            f"pair(s), {audit.get('copy_pairs_across_splits', 0)} across splits (policy "
            f"{audit['settings'].get('near_duplicates', 'stop')}); label conflicts: "
            f"{_count(audit.get('label_conflicts'))}; near-duplicates by perceptual hash: "
            f"{_count(audit.get('near_duplicate_pairs'))}.")
    external = flow[flow["box"] == "external"]
    if len(external):
        text += (f" The external test set ({external.iloc[0]['detail']}) was built in the same notebook; every image of "
                 f"its patients was kept out of the chest pretraining pool.")
    return [text, inputs.path("figures/00_flow.png", "00_data_audit"),
            "**Partitions.** Counts with their share of the partition's images; age, sex, view and source where the "
            "data set records them.", partitions]


def _count(value: Any) -> int:
    return len(value) if isinstance(value, (list, dict)) else int(value or 0)


def discrimination(inputs: ReportInputs) -> list[Block]:
    if not inputs.ran("04"):
        return ["Notebook 04 (fine-tuning) is not part of this run's profile: there are no models to report."]
    stage = "04_finetune (its results_tables step)"
    summary = inputs.table("tables/results_summary.csv", stage)
    per_run = inputs.table("tables/results_runs_ci.csv", stage)
    every = "**Every run** with its 95 % confidence intervals (test split; AUC: DeLong, the others: Wilson)"
    if "label_fraction" in per_run.columns and per_run["label_fraction"].nunique() > 1:
        largest = per_run["label_fraction"].max()
        per_run = per_run[per_run["label_fraction"] == largest]
        every += f", at {largest:.0%} of the training labels (the other shares: section 3)"
    blocks: list[Block] = [
        "**Table 1.** Test ROC AUC, accuracy, sensitivity and specificity, mean ± standard deviation over seeds (n = "
        "runs), each run at the threshold chosen on its own validation split.", table1(summary), every + ":",
        intervals_table(per_run)]
    blocks += ["**ROC curves** of the test split, one line per seed; dots mark each run's validation-chosen "
               "operating point.", inputs.path("figures/roc_test.png", "04_finetune (results_tables)")]
    if inputs.ran("05"):
        summary = inputs.optional("tables/05_significance_summary.md")
        if summary is not None:
            blocks += ["**Paired tests against random initialisation** (DeLong for AUC, McNemar for accuracy, "
                       "Holm-corrected over the whole family): " + summary.read_text().strip()]
            blocks.append(paired_tests_table(inputs.table("tables/05_significance.csv", "05_gradcam_statistics")))
        else:
            blocks.append("No paired tests: the grid has no random-initialisation baseline to compare with.")
    return blocks


def fair_comparison(inputs: ReportInputs) -> list[Block]:
    """The recipe search (each initialisation's recipe chosen on validation) and the label-efficiency curve with its
    pretraining effects and mixed model, where the run has them."""
    search = inputs.optional("tables/recipe_search.csv")
    curve = inputs.optional("tables/label_efficiency_ci.csv")
    if search is None and curve is None:
        return ["This run has neither a recipe search nor a label-efficiency curve: every initialisation was trained "
                "with the profile's one recipe at one share of the labels (the `label_efficiency` profile runs both)."]
    blocks: list[Block] = []
    if search is not None:
        table = pd.read_csv(search)
        cost = json.loads(inputs.path("tables/recipe_choice.json", "04a_recipe_search (recipe_search)").read_text())
        blocks += ["**Recipe search** (notebook 04a, validation split only; the test split was not read). Each "
                   "initialisation and backbone was trained with every candidate recipe; the one with the best "
                   "validation AUC averaged over its seeds is marked and is the recipe its fine-tuning runs used. "
                   + cost.get("cost", ""), recipe_table(table)]
    else:
        blocks.append("No recipe search in this run: every initialisation used the profile's recipe.")
    if curve is not None:
        points = pd.read_csv(curve)
        blocks += ["**Label efficiency.** Test AUC against the share of training patients whose labels were used "
                   "(nested, label-stratified subsets; validation and test unchanged): the mean over seeds, the band "
                   "its 95 % interval from resampling test patients.",
                   inputs.path("figures/label_efficiency.png", "04_finetune (results_tables)"), curve_table(points)]
        effects = inputs.optional("tables/label_efficiency_effects.csv")
        if effects is not None:
            effects = pd.read_csv(effects)
            significant = effects[effects["p_holm"] < 0.05]
            blocks += [f"**The pretraining effect at each share** (seed-averaged test AUC minus random "
                       f"initialisation's on the same test patients, paired patient bootstrap; Holm over all "
                       f"{len(effects)} comparisons): {len(significant)} of {len(effects)} differ from zero after "
                       f"correction" + ("." if significant.empty else ": " + "; ".join(
                           f"{_model(r.backbone, r.scenario)} at {r.label_fraction:.0%} ({r.effect:+.3f})"
                           for r in significant.itertuples()) + "."), effects_table(effects)]
        model = inputs.optional("tables/label_efficiency_model.csv")
        if model is not None:
            model = pd.read_csv(model)
            blocks += ["**Mixed model** of test AUC on initialisation × log2(share of labels), the seed a random "
                       "intercept, per backbone. `log2_fraction` is the AUC gained per doubling of the labels from "
                       "random initialisation; an initialisation's term is its difference at 100 % of the labels; "
                       "its `:log2_fraction` term how that difference changes per doubling (negative: pretraining "
                       "helps more with fewer labels). " + "; ".join(
                           f"{BACKBONE_LABELS.get(b, b)}: {g['method'].iloc[0]} ({g['reason'].iloc[0]})"
                           for b, g in model.groupby("backbone", sort=False)) + ".", model_table(model)]
    return blocks


def clinical_data(inputs: ReportInputs) -> list[Block]:
    """Image + clinical data (notebook 04b): the three models' test AUCs, the paired tests and the odds ratios."""
    if not inputs.ran("04b"):
        return ["Notebook 04b (image + clinical data) is not part of this run's profile: no clinical covariates were "
                "used."]
    stage = "04b_clinical_fusion"
    info = json.loads(inputs.text("tables/04b_fusion.json", stage))
    aucs = inputs.table("tables/04b_fusion_auc.csv", stage)
    tests = inputs.table("tables/04b_fusion_tests.csv", stage)
    odds = inputs.table("tables/04b_odds_ratios.csv", stage)
    blocks: list[Block] = [
        f"Covariates {', '.join(f'`{c}`' for c in info['covariates'])} beside the image model `{info['image_run']}`. "
        "The clinical model was fitted on the training split; the fusion, weighing the image model's logit and "
        "the clinical model's, on the validation split (the image model's training logits are overconfident); "
        "missing values imputed from the training split with missingness indicators; the test split read once, "
        "afterwards. AUC with DeLong 95 % intervals:",
        pd.DataFrame({"model": aucs["model"], "fitted on": aucs["fitted_on"], "n": aucs["n"],
                      "test AUC [95 % CI]": [_ci(a, lo, hi) for a, lo, hi in
                                             zip(aucs["auc"], aucs["ci_low"], aucs["ci_high"])]}),
        "**Paired DeLong tests** of the fused model:",
        pd.DataFrame({"comparison": [f"{r.model} vs {r.versus}" for r in tests.itertuples()],
                      "AUC": [f"{r.auc:.3f} vs {r.auc_versus:.3f}" for r in tests.itertuples()],
                      "difference [95 % CI]": [_ci(r.difference, r.ci_low, r.ci_high) for r in tests.itertuples()],
                      "p": tests["p_value"].map(_p)}),
        inputs.path("figures/04b_fusion_roc.png", stage),
        "**Odds ratios** of the clinical model (per SD for a numeric covariate; unpenalised fit on the training "
        "split, Wald 95 % intervals):",
        pd.DataFrame({"term": odds["term"], "odds ratio [95 % CI]": [
            _ci(o, lo, hi, digits=2) for o, lo, hi in zip(odds["odds_ratio"], odds["ci_low"], odds["ci_high"])],
            "p": odds["p_value"].map(_p)})]
    return blocks


def allowed_label_covariates(inputs: ReportInputs) -> list[dict[str, Any]]:
    """Covariates the fusion's guard would have stopped but the profile allowed (they lead the report)."""
    found = inputs.optional("tables/04b_fusion.json")
    return json.loads(found.read_text()).get("allowed_label_covariates", []) if found is not None else []


def recipe_table(table: pd.DataFrame) -> pd.DataFrame:
    """``recipe_search.csv`` narrowed for a page: model, recipe, its settings, validation AUC per seed and mean."""
    return pd.DataFrame({
        "model": [_model(b, s) for b, s in zip(table["backbone"], table["scenario"])], "recipe": table["recipe"],
        "peak lr": [f"{v:.2g}" for v in table["peak_lr"]],
        "layer decay": table["layer_decay"].map(lambda v: "-" if pd.isna(v) else f"{v:g}"),
        "RandAugment": table["randaug_magnitude"].map(lambda v: "-" if pd.isna(v) else f"{int(v)}"),
        "epochs": table["epochs"].astype(int), "validation AUC per seed": table["valid_auc_per_seed"],
        "mean": table["valid_auc_mean"], "chosen": table["chosen"].map({True: "chosen", False: ""})})


def curve_table(points: pd.DataFrame) -> pd.DataFrame:
    """The curve's points: model, share of labels, seeds, AUC [95 % CI]."""
    return pd.DataFrame({"model": [_model(b, s) for b, s in zip(points["backbone"], points["scenario"])],
                         "labels": [f"{f:.0%}" for f in points["label_fraction"]], "seeds": points["seeds"],
                         "test AUC [95 % CI]": [_ci(a, lo, hi) for a, lo, hi in
                                                zip(points["auc"], points["ci_low"], points["ci_high"])]})


def effects_table(effects: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"model": [_model(b, s) for b, s in zip(effects["backbone"], effects["scenario"])],
                         "labels": [f"{f:.0%}" for f in effects["label_fraction"]],
                         "AUC vs random": [f"{a:.3f} vs {r:.3f}" for a, r in
                                           zip(effects["auc"], effects["reference_auc"])],
                         "difference [95 % CI]": [_ci(e, lo, hi) for e, lo, hi in
                                                  zip(effects["effect"], effects["ci_low"], effects["ci_high"])],
                         "p": effects["p_value"].map(_p), "p (Holm)": effects["p_holm"].map(_p)})


def model_table(model: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"backbone": [BACKBONE_LABELS.get(b, b) for b in model["backbone"]],
                         "term": model["term"].str.replace("scenario[T.", "", regex=False).str.replace("]", "",
                                                                                                       regex=False),
                         "estimate [95 % CI]": [_ci(e, lo, hi) for e, lo, hi in
                                                zip(model["estimate"], model["ci_low"], model["ci_high"])],
                         "p": model["p_value"].map(_p), "p (Holm)": model["p_holm"].map(_p)})


TEST_LABELS = {"delong_auc": "AUC (DeLong)", "mcnemar_accuracy": "accuracy (McNemar)"}


def paired_tests_table(tests: pd.DataFrame) -> pd.DataFrame:
    """The paired tests of notebook 05 in seven columns, narrow enough for an A4 page: model, seed, measure, the
    model's value beside its reference's, the difference with its CI, raw and Holm p."""
    rows = []
    for _, r in tests.iterrows():
        rows.append({"model": _model(r["backbone"], r["scenario"]), "seed": r["seed"],
                     "measure": TEST_LABELS.get(r["test"], r["test"]),
                     "value vs reference": f"{r['value']:.3f} vs {r['value_reference']:.3f} ({r['reference']})",
                     "difference [95 % CI]": _ci(r["effect"], r["effect_ci_low"], r["effect_ci_high"]),
                     "p": _p(r["p_value"]), "p (Holm)": _p(r["p_holm"])})
    return pd.DataFrame(rows)


def table1(summary: pd.DataFrame) -> pd.DataFrame:
    """Table 1 from ``results_summary.csv`` (or the external one): one row per model, "mean ± sd" per measure."""
    from osteolib.evaluation import format_mean_std

    if "label_fraction" in summary.columns:
        summary = summary[summary["label_fraction"] == summary["label_fraction"].max()]
    out = pd.DataFrame({"model": [_model(b, s) for b, s in zip(summary["backbone"], summary["scenario"])],
                        "runs": summary["n_runs"].astype(int)})
    for measure, title in (("auc", "AUC"), ("accuracy", "accuracy"), ("sensitivity", "sensitivity"),
                           ("specificity", "specificity")):
        if f"{measure}_mean" in summary.columns:
            out[title] = [format_mean_std(m, sd, n) for m, sd, n in
                          zip(summary[f"{measure}_mean"], summary[f"{measure}_std"], summary[f"{measure}_n"])]
    return out.reset_index(drop=True)


def intervals_table(per_run: pd.DataFrame) -> pd.DataFrame:
    """``results_runs_ci.csv`` as "estimate [low, high]" cells, one row per run."""
    out = pd.DataFrame({"model": [_model(b, s) for b, s in zip(per_run["backbone"], per_run["scenario"])],
                        "seed": per_run["seed"].astype(int), "n": per_run["n"], "n positive": per_run["n_positive"]})
    for measure in ("auc", "accuracy", "sensitivity", "specificity"):
        if measure in per_run.columns:
            out[measure if measure != "auc" else "AUC"] = [
                _ci(e, lo, hi) for e, lo, hi in
                zip(per_run[measure], per_run[f"{measure}_ci_low"], per_run[f"{measure}_ci_high"])]
    return out


def calibration(inputs: ReportInputs) -> list[Block]:
    if not inputs.ran("04"):
        return ["No fine-tuned models in this run."]
    files = inputs.glob("tables/04_*_calibration.csv")
    if not files:
        raise MissingReportInput(f"no tables/04_<run>_calibration.csv in {inputs.run.path}: notebook 04 writes one per "
                                 f"model; rerun it with this osteolib")
    rows = []
    for path in files:
        name = path.name[len("04_"):-len("_calibration.csv")]
        table = pd.read_csv(path).set_index("measure")
        rows.append({"run": name, **{m: _ci(table.loc[m, "estimate"], table.loc[m, "ci_low"], table.loc[m, "ci_high"])
                                     for m in ("brier", "ece", "calibration_slope", "calibration_intercept")
                                     if m in table.index}})
    best = inputs.selected_name()
    return ["Per model (test split; 95 % patient cluster-bootstrap intervals). A calibration slope below 1 means "
            "over-confident probabilities, above 1 under-confident; the intercept is calibration-in-the-large "
            "(0 is ideal).", pd.DataFrame(rows),
            f"**Reliability diagram** of the selected model `{best}`:",
            inputs.path(f"figures/04_{best}_reliability.png", "04_finetune")]


def subgroups(inputs: ReportInputs) -> list[Block]:
    if not inputs.ran("04"):
        return ["No fine-tuned models in this run."]
    path = inputs.optional("tables/subgroups.csv")
    if path is None:
        return ["The manifest records no subgroup (sex, age, view, source or site with two levels or more among the "
                "test images), so there is no subgroup table."]
    table = pd.read_csv(path)
    best = inputs.selected()
    rows = table[(table["scenario"] == best["scenario"]) & (table["backbone"] == best["backbone"])
                 & (table["seed"] == best["seed"])]
    if rows.empty:
        return ["The selected model has no subgroup rows."]
    shown = pd.DataFrame({
        "split": rows["split"], "variable": rows["variable"], "level": rows["level"], "n": rows["n"],
        "positive / negative": [f"{p} / {q}" for p, q in zip(rows["n_positive"], rows["n_negative"])],
        "AUC [95 % CI]": [_ci(a, lo, hi) for a, lo, hi in zip(rows["auc"], rows["auc_ci_low"], rows["auc_ci_high"])],
        "accuracy [95 % CI]": [_ci(a, lo, hi) for a, lo, hi in
                               zip(rows["accuracy"], rows["accuracy_ci_low"], rows["accuracy_ci_high"])],
        "note": ["too small to say anything" if t else "" for t in rows["too_small"]],
        "heterogeneity p (AUC / accuracy)": [f"{_p(a)} / {_p(b)}" for a, b in
                                             zip(rows["auc_heterogeneity_p"], rows["accuracy_heterogeneity_p"])]})
    return [f"The selected model by subgroup. Subgroups with fewer than 5 images of either class are marked *too "
            f"small* and left out of the heterogeneity tests (Cochran's Q over the levels' DeLong AUCs; chi-square "
            f"of correct-by-level for accuracy), never dropped. {largest_difference(rows)}", shown]


def largest_difference(rows: pd.DataFrame) -> str:
    """The largest AUC gap between two levels of one variable (levels not too small), in words."""
    usable = rows[~rows["too_small"].astype(bool) & rows["auc"].notna() & (rows["level"] != "unknown")]
    best = None
    for (split, variable), group in usable.groupby(["split", "variable"]):
        if len(group) < 2:
            continue
        gap = group["auc"].max() - group["auc"].min()
        if best is None or gap > best[0]:
            hi, lo = group.loc[group["auc"].idxmax()], group.loc[group["auc"].idxmin()]
            best = (gap, split, variable, hi, lo, group["auc_heterogeneity_p"].iloc[0])
    if best is None:
        return "No variable has two subgroups large enough to compare."
    gap, split, variable, hi, lo, p = best
    verdict = "significant" if p < 0.05 else "not significant"
    return (f"Largest difference ({split}): {variable} {hi['level']} AUC {hi['auc']:.3f} vs {lo['level']} "
            f"{lo['auc']:.3f} (gap {gap:.3f}; heterogeneity p {_p(p)}, {verdict} at 0.05).")


def external_validation(inputs: ReportInputs) -> list[Block]:
    internal_path = inputs.optional("tables/results_summary.csv")
    external_path = inputs.optional("tables/results_external_summary.csv")
    if external_path is None:
        return ["This run has no external test set. Name one with notebook 00's `external_test` parameter (a built-in "
                "data set, or a spec of your own) to have every fine-tuned model scored on it after selection."]
    internal, external = table1(pd.read_csv(internal_path)), table1(pd.read_csv(external_path))
    shown = internal[["model", "AUC", "accuracy"]].merge(external[["model", "AUC", "accuracy"]], on="model",
                                                         suffixes=(" internal test", " external test"))
    shown = shown[["model", "AUC internal test", "AUC external test", "accuracy internal test",
                   "accuracy external test"]]
    flow = inputs.table("tables/00_flow.csv", "00_data_audit")
    detail = flow.loc[flow["box"] == "external", "detail"]
    return [f"Every fine-tuned model was scored once on the external test set after selection, at the threshold "
            f"chosen on the internal validation split ({detail.iloc[0] if len(detail) else ''}). Mean ± sd over seeds:",
            shown, "Every run on the external test set, with its 95 % confidence intervals:",
            intervals_table(inputs.table("tables/results_external_runs_ci.csv", "04_finetune (results_tables)")),
            inputs.path("figures/roc_external.png", "04_finetune (results_tables)")]


def explanations(inputs: ReportInputs) -> list[Block]:
    if not inputs.ran("05"):
        return ["Notebook 05 (Grad-CAM statistics) is not part of this run's profile."]
    stage = "05_gradcam_statistics"
    agreement = inputs.table("tables/05_agreement_ci.csv", stage)
    measure = next((m for m in ("energy_in_region", "pointing_game") if m in set(agreement["measure"])),
                   agreement["measure"].iloc[0])
    chosen = agreement[agreement["measure"] == measure]
    cells = [f"{_ci(m, lo, hi)} · n {int(n)}" if n else "no map scored (n 0)"
             for m, lo, hi, n in zip(chosen["mean"], chosen["ci_low"], chosen["ci_high"], chosen["n"])]
    wide = chosen.assign(model=[_model(b, s) for b, s in zip(chosen["backbone"], chosen["scenario"])], value=cells
                         ).pivot_table(index="model", columns="method", values="value", aggfunc="first", sort=False)
    blocks: list[Block] = [
        f"**Agreement of the maps with the expert regions**: {measure.replace('_', ' ')} (mean [95 % bootstrap CI] over "
        f"the n scored maps of the test images that carry a region; a flat map is counted, not scored), per model (seeds "
        f"pooled) and CAM method; every measure is in `tables/05_agreement_ci.csv`.", wide.reset_index(),
        "**Randomisation check** (Adebayo et al. 2018): " + inputs.text("tables/05_randomisation_summary.md", stage)]
    confounder = inputs.optional("tables/05_confounder_check_summary.md")
    if confounder is not None:
        blocks.append("**Confounder check** (synthetic shortcut): " + confounder.read_text().strip())
    blocks += ["**Example maps** (Grad-CAM, expert region outlined):",
               inputs.path("figures/05_gradcam_overlays.png", stage)]
    errors = inputs.table("tables/05_confident_errors.csv", stage)
    blocks.append(f"**Failure analysis**: the most confident false positives and false negatives of the selected model "
                  f"`{inputs.selected_name()}` on the test split ({len(errors)} images), with their Grad-CAM maps.")
    if len(errors):
        blocks += [errors.round(3), inputs.path("figures/05_confident_errors.png", stage)]
    return blocks


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def reproducibility(inputs: ReportInputs) -> list[Block]:
    info, env = inputs.info, inputs.info.get("environment") or {}
    packages = env.get("packages") or {}
    data_files = [p for p in (inputs.optional("data/manifest.csv"), inputs.optional("data/split.csv"),
                              inputs.optional("data/external_manifest.csv"), inputs.optional("data/audit.json")) if p]
    executions = pd.DataFrame([{"execution": e.get("name"), "status": e.get("status"),
                                "seconds": round(e["seconds"]) if e.get("seconds") is not None else None,
                                "peak memory (MiB)": round(e["peak_rss_mb"]) if e.get("peak_rss_mb") else None,
                                "cores": ",".join(str(c) for c in e.get("cores") or [])}
                               for e in info.get("executions", [])])
    parameters = pd.DataFrame([{"execution": e.get("name"), "parameters": json.dumps(e.get("parameters"), default=str)}
                               for e in info.get("plan", [])])
    return [f"Profile `{info.get('profile_file')}`{' with overrides ' + json.dumps(info.get('overrides')) if info.get('overrides') else ''}; "
            f"git commit `{env.get('git_commit')}`; Python {env.get('python')} on {env.get('platform')}; CPU "
            f"{env.get('cpu_model', '?')} ({env.get('cpu_count')} cores, bf16 {'yes' if env.get('cpu_bf16') else 'no'}); "
            + ", ".join(f"{k} {v}" for k, v in packages.items() if v) + ".",
            "**Data files** of this run (sha256, first 16 hex digits): "
            + "; ".join(f"`{p.relative_to(p.parents[1])}` {_sha256(p)}" for p in data_files) + ".",
            "**Timings** per execution, with the peak resident memory of its notebook kernel:", executions,
            "**Parameters** of every execution (from the profile, as papermill received them):", parameters]


def checklist(inputs: ReportInputs) -> list[Block]:
    present = {}
    for _, _, _, source in ITEMS:
        present[source] = bool(inputs.glob(source)) if "*" in source else inputs.optional(source) is not None
    return ["Each item of the reporting guidelines (CLAIM 2024, TRIPOD+AI 2024) this run can answer, and where; the "
            "items only the authors can answer are listed as such. Items are named by topic, not number (the "
            "numbering differs between guideline versions).", checklist_table(present)]
