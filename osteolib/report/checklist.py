"""The reporting-guideline items a run can answer (CLAIM 2024, TRIPOD+AI 2024), each with where the report answers
it, and the items only the authors can answer, listed as such.

Items are named by topic, not by number: CLAIM's numbering changed between its 2020 (42 items) and 2024 versions,
and a wrong number is worse than none -- check the numbers against the version a journal asks for.
"""
from __future__ import annotations

import pandas as pd

__all__ = ["ITEMS", "AUTHORS", "checklist_table"]

# (guideline(s), item topic, report section, the run-folder file that answers it)
ITEMS = (
    ("CLAIM · TRIPOD+AI", "data sources; eligibility (inclusion and exclusion) criteria", "1 · Data and flow",
     "tables/00_flow.csv"),
    ("CLAIM · TRIPOD+AI", "flow of participants / images, with exclusions and their reasons (diagram)",
     "1 · Data and flow", "figures/00_flow.png"),
    ("CLAIM · TRIPOD+AI", "demographic and clinical characteristics of each partition", "1 · Data and flow",
     "tables/00_partitions.csv"),
    ("CLAIM", "how data were assigned to partitions; level of the split (patient)", "1 · Data and flow",
     "data/audit.json"),
    ("CLAIM", "data pre-processing steps (resizing, normalisation) and checks (copies, label conflicts)",
     "1 · Data and flow", "data/audit.json"),
    ("CLAIM · TRIPOD+AI", "detailed model description and training (initialisation, hyper-parameters)",
     "9 · Reproducibility", "run.json"),
    ("CLAIM", "method of selecting the final model (on the validation split only)", "2 · Discrimination",
     "tables/selection.csv"),
    ("CLAIM · TRIPOD+AI", "performance metrics with measures of uncertainty (confidence intervals)",
     "2 · Discrimination", "tables/results_runs_ci.csv"),
    ("CLAIM", "statistical tests of differences between models, corrected for multiple comparisons",
     "2 · Discrimination", "tables/05_significance.csv"),
    ("CLAIM", "hyper-parameter tuning of every compared model, on the validation split", "3 · A fair comparison",
     "tables/recipe_search.csv"),
    ("TRIPOD+AI", "predictors besides the image (clinical covariates) and the handling of missing data",
     "4 · Image + clinical data", "tables/04b_fusion.json"),
    ("TRIPOD+AI", "calibration (calibration plot, slope and intercept, Brier score)", "5 · Calibration",
     "tables/*_calibration.csv"),
    ("CLAIM · TRIPOD+AI", "performance in subgroups (fairness: sex, age, view, site)", "6 · Subgroups",
     "tables/subgroups.csv"),
    ("CLAIM · TRIPOD+AI", "evaluation on external data (another population or site)", "7 · External validation",
     "tables/results_external_runs.csv"),
    ("CLAIM", "methods of explainability or interpretability, and how they were validated", "8 · Explanations",
     "tables/05_agreement_ci.csv"),
    ("CLAIM", "failure analysis of incorrectly classified cases", "8 · Explanations",
     "tables/05_confident_errors.csv"),
    ("CLAIM · TRIPOD+AI", "software, versions and code to reproduce the results", "9 · Reproducibility",
     "run.json"),
)

# What no run can answer: for the authors to write.
AUTHORS = (
    ("CLAIM · TRIPOD+AI", "title and structured abstract identifying an AI study"),
    ("CLAIM · TRIPOD+AI", "clinical background, intended use and role of the model in the care pathway"),
    ("CLAIM · TRIPOD+AI", "study design (retrospective or prospective), setting, dates of data collection"),
    ("CLAIM", "reference standard: definition, who annotated (qualifications), annotation tools, inter-rater agreement"),
    ("CLAIM", "de-identification and data-use approvals (ethics board, consent)"),
    ("TRIPOD+AI", "sample size rationale"),
    ("CLAIM · TRIPOD+AI", "handling of missing data beyond what the audit reports"),
    ("CLAIM · TRIPOD+AI", "limitations, generalisability and implications for practice"),
    ("TRIPOD+AI", "patient and public involvement; fairness considerations beyond the measured subgroups"),
    ("CLAIM · TRIPOD+AI", "registration, protocol, data and code availability statements, funding, conflicts of interest"),
)


def checklist_table(present: dict[str, bool]) -> pd.DataFrame:
    """The items with ``where`` (report section) and ``status``: answered by this run when ``present[file]`` is
    True, otherwise "not in this run" (the stage that writes it did not run); then the authors' items."""
    rows = [{"guideline": g, "item": item, "where": section,
             "status": "answered by this run" if present.get(source, False) else "not in this run"}
            for g, item, section, source in ITEMS]
    rows += [{"guideline": g, "item": item, "where": "-", "status": "for the authors"} for g, item in AUTHORS]
    return pd.DataFrame(rows)
