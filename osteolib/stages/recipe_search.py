"""The recipe search: every initialisation gets its best training recipe, chosen on the validation split only.

A recipe that suits pretrained weights (small learning rate, layer-wise decay, strong augmentation) can leave a
randomly initialised network untrained, and then "pretraining helps" only says "the recipe suits pretrained
weights". So each (scenario, backbone) is trained with a small, declared set of candidate recipes (notebook
04a_recipe_search, one candidate x seed per execution, the grid in the profile), and the runner's ``recipe_search``
collection keeps, per (scenario, backbone), the candidate with the best validation AUC averaged over its seeds
(:func:`write_search_tables`). The fine-tuning grid then asks for ``recipe="searched"`` and gets that choice
(:func:`resolve_recipe`).

Nothing here reads the test split: a candidate run is checked, trained and selected with ``splits_used=("train",
"val")``, so the test rows' ids, labels and pixels are never taken; its files hold validation rows only. Its weights
are deleted once its summary is written: no candidate is ever scored on test, the chosen recipe is trained again
by the fine-tuning grid, which reads the test split once per run.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch

from osteolib.evaluation import to_markdown
from osteolib.runs import Run
from osteolib.utils import cpu_model
from osteolib.stages.finetune import images_per_s, train_and_select
from osteolib.stages.finetune_config import RECIPE_FIELDS, SEARCHED, FinetuneConfig, run_name

__all__ = ["SearchResult", "search_name", "search_candidate", "recipe_settings", "search_runs", "search_table",
           "write_search_tables", "read_choice", "resolve_recipe", "CHOICE_FILE", "SEARCH_FOLDER"]

SEARCH_FOLDER = "recipe_search"  # in the run folder: one summary, history and validation table per candidate run
CHOICE_FILE = "tables/recipe_choice.json"
TIE = 1e-9


@dataclass
class SearchResult:
    """One candidate run: its validation AUC at the epoch chosen on validation; no test number exists."""

    name: str
    config: FinetuneConfig
    history: pd.DataFrame
    chosen_epoch: int
    valid_auc: float
    seconds: float
    summary_path: Path


def search_name(config: FinetuneConfig) -> str:
    """A candidate run's name: the fine-tuning run's name and the recipe's."""
    return f"{run_name(config)}-recipe_{config.recipe}"


def _check_candidate(config: FinetuneConfig) -> None:
    if config.recipe is None or config.recipe == SEARCHED:
        raise ValueError(f"a recipe-search candidate needs a recipe name (the profile's `recipe` of the candidate, "
                         f"e.g. study or plain_low), got recipe={config.recipe!r}")


def search_candidate(run: Run, config: FinetuneConfig, manifest: pd.DataFrame, cache: Any, mean: float, std: float,
                     classes: Sequence[str] | None = None, quiet: bool = False) -> SearchResult:
    """Train one candidate recipe and record its validation AUC in ``<run>/recipe_search/``; the test split is not
    read (its rows are not even taken from the manifest), and the weights are deleted afterwards."""
    _check_candidate(config)
    started = time.perf_counter()
    name = search_name(config)
    folder = run.dir(SEARCH_FOLDER)
    summary_path = folder / f"{name}-summary.json"
    if summary_path.exists():
        raise FileExistsError(f"{summary_path} exists: candidate {name} is already done in {run.path}; a run never "
                              f"overwrites its outputs (two candidates with one recipe name?)")
    out_dir = run.checkpoints / SEARCH_FOLDER / name
    selected = train_and_select(run, config, manifest, cache, mean, std, name, out_dir, classes=classes, quiet=quiet,
                                splits_used=("train", "val"))
    history = selected.fitted.history
    history.to_csv(folder / f"{name}-history.csv", index=False)
    selected.val_table.to_csv(folder / f"{name}-val.csv", index=False)
    result = SearchResult(name=name, config=config, history=history, chosen_epoch=int(selected.fitted.best_epoch),
                          valid_auc=float(selected.fitted.best_value), seconds=time.perf_counter() - started,
                          summary_path=summary_path)
    summary = {"name": name, "scenario": config.scenario, "backbone": config.backbone, "seed": config.seed,
               "label_fraction": float(config.label_fraction), "recipe": config.recipe,
               "settings": recipe_settings(config), "peak_lr": config.train_config().peak_lr,
               "selection": {"split": "val", "chosen_epoch": result.chosen_epoch, "valid_auc": result.valid_auc},
               "train_images": len(selected.inputs.train_ids), "val_images": len(selected.inputs.val_ids),
               "seconds": result.seconds, "torch_threads": torch.get_num_threads(),
               "train_images_per_s": images_per_s(history), "precision": selected.fitted.precision.name,
               "cpu_model": cpu_model(), "splits_read": ["train", "val"]}
    summary_path.write_text(json.dumps(summary, indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)  # never scored on test: the chosen recipe is trained again by 04
    if not quiet:
        print(f"[{name}] selected epoch {result.chosen_epoch}: validation AUC {result.valid_auc:.3f}; "
              f"{result.seconds:.0f} s (test not read)")
    return result


def recipe_settings(config: FinetuneConfig) -> dict[str, Any]:
    """The training settings of ``config`` that a recipe fixes (:data:`RECIPE_FIELDS`), JSON-ready."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items() if k in RECIPE_FIELDS}


# --------------------------------------------------------------------------------------------
# The search's table and choice


def search_runs(run: Run) -> pd.DataFrame:
    """Every candidate run of ``run`` (and its parents): one row per summary, with its settings as columns."""
    rows = []
    for path in run.find_all(f"{SEARCH_FOLDER}/*-summary.json"):
        summary = json.loads(path.read_text())
        rows.append({"scenario": summary["scenario"], "backbone": summary["backbone"], "recipe": summary["recipe"],
                     "seed": summary["seed"], "label_fraction": summary["label_fraction"],
                     "peak_lr": summary["peak_lr"], **summary["settings"],
                     "settings_json": json.dumps(summary["settings"], sort_keys=True),
                     "chosen_epoch": summary["selection"]["chosen_epoch"],
                     "valid_auc": summary["selection"]["valid_auc"], "seconds": summary["seconds"],
                     "torch_threads": summary["torch_threads"], "cpu_model": summary.get("cpu_model", "?")})
    if not rows:
        raise FileNotFoundError(f"no recipe-search candidate in {run.path} (or its parents): run notebook "
                                f"04a_recipe_search (a profile step with its candidates) first")
    return pd.DataFrame(rows)


def search_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (scenario, backbone, recipe): its settings, validation AUC per seed, mean and SD over the seeds,
    the chosen epochs and the seconds spent; ``chosen`` marks the best mean per (scenario, backbone) (ties: the
    smaller SD, then the name)."""
    settings = ["peak_lr", *[f for f in RECIPE_FIELDS if f in runs.columns]]
    keys = ["scenario", "backbone", "recipe"]
    rows = []
    for key, group in runs.groupby(keys, sort=False):
        group = group.sort_values("seed")
        differing = [s for s in settings if group[s].astype(str).nunique() > 1] or \
            (["settings"] if group["settings_json"].nunique() > 1 else [])
        if differing:
            raise ValueError(f"recipe {key[2]!r} of {key[0]} / {key[1]} has different settings {differing} in its "
                             f"runs; give each candidate its own recipe name")
        first = group.iloc[0]
        rows.append({**dict(zip(keys, key)), **{s: first[s] for s in settings}, "runs": len(group),
                     "settings_json": first["settings_json"],
                     "seeds": " ".join(str(int(s)) for s in group["seed"]),
                     "valid_auc_per_seed": " ".join(f"{v:.3f}" for v in group["valid_auc"]),
                     "valid_auc_mean": float(group["valid_auc"].mean()),
                     "valid_auc_sd": float(group["valid_auc"].std(ddof=1)) if len(group) > 1 else float("nan"),
                     "chosen_epochs": " ".join(str(int(e)) for e in group["chosen_epoch"]),
                     "seconds": float(group["seconds"].sum())})
    table = pd.DataFrame(rows)
    table["chosen"] = False
    for _, group in table.groupby(["scenario", "backbone"], sort=False):
        best = group["valid_auc_mean"].max()
        tied = group[group["valid_auc_mean"] >= best - TIE]
        tied = tied.assign(_sd=tied["valid_auc_sd"].fillna(float("inf"))).sort_values(["_sd", "recipe"])
        table.loc[tied.index[0], "chosen"] = True
    return table


def write_search_tables(run: Run) -> dict[str, Path]:
    """The runner's ``recipe_search`` collection: ``tables/recipe_search_runs.csv`` (every candidate run),
    ``tables/recipe_search.csv`` and ``.md`` (per candidate, the choice marked, the cost stated) and
    ``tables/recipe_choice.json`` (the chosen settings per scenario and backbone, which ``recipe="searched"`` reads).
    Reads validation numbers only."""
    runs = search_runs(run)
    table = search_table(runs)
    tables = run.tables
    paths = {"recipe_search_runs": tables / "recipe_search_runs.csv", "recipe_search": tables / "recipe_search.csv",
             "recipe_search_md": tables / "recipe_search.md", "recipe_choice": run.path / CHOICE_FILE}
    runs.to_csv(paths["recipe_search_runs"], index=False)
    table.to_csv(paths["recipe_search"], index=False)
    cost = cost_sentence(runs)
    shown = table.assign(valid_auc=[f"{m:.3f} ± {s:.3f}" if s == s else f"{m:.3f}"
                                    for m, s in zip(table["valid_auc_mean"], table["valid_auc_sd"])],
                         chosen=table["chosen"].map({True: "chosen", False: ""}))
    columns = ["scenario", "backbone", "recipe", "peak_lr", "layer_decay", "randaug_magnitude", "epochs", "seeds",
               "valid_auc_per_seed", "valid_auc", "chosen_epochs", "chosen"]
    paths["recipe_search_md"].write_text(to_markdown(shown[columns].map(_cell)) + f"\n{cost}\n")
    choices = [{"scenario": r.scenario, "backbone": r.backbone, "recipe": r.recipe,
                "settings": json.loads(r.settings_json),
                "valid_auc_mean": float(r.valid_auc_mean), "seeds": r.seeds}
               for r in table[table["chosen"]].itertuples()]
    paths["recipe_choice"].write_text(json.dumps({"selected_on": "validation AUC, mean over seeds",
                                                  "choices": choices, "cost": cost}, indent=1))
    print(f"recipe search: {len(runs)} candidate runs; chosen: " + "; ".join(
        f"{c['scenario']} / {c['backbone']}: {c['recipe']} ({c['valid_auc_mean']:.3f})" for c in choices)
        + f". {cost}", flush=True)
    return paths


def cost_sentence(runs: pd.DataFrame) -> str:
    seconds = float(runs["seconds"].sum())
    threads = sorted(set(int(t) for t in runs["torch_threads"]))
    return (f"Cost of the search: {len(runs)} training runs, {seconds / 60:.1f} minutes of wall time in all, each run "
            f"on {' or '.join(map(str, threads))} thread(s) of {' / '.join(sorted(set(runs['cpu_model'].astype(str))))}.")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if value != value else f"{value:.3g}"
    return "-" if value is None else str(value)


# --------------------------------------------------------------------------------------------
# Using the choice


def read_choice(run: Run) -> list[dict[str, Any]]:
    """The recipe search's choices (``tables/recipe_choice.json`` of the run or its parents)."""
    path = run.find_optional(CHOICE_FILE)
    if path is None:
        raise FileNotFoundError(f"recipe={SEARCHED!r} needs the recipe search's choice ({CHOICE_FILE}) in {run.path} "
                                f"or its parents: run notebook 04a_recipe_search with `after: recipe_search` first")
    return json.loads(path.read_text())["choices"]


def resolve_recipe(config: FinetuneConfig, run: Run) -> FinetuneConfig:
    """``config`` with the searched recipe's settings for its scenario and backbone when ``config.recipe`` is
    ``"searched"``; any other config is returned as it is."""
    if config.recipe != SEARCHED:
        return config
    choices = read_choice(run)
    match = [c for c in choices if c["scenario"] == config.scenario and c["backbone"] == config.backbone]
    if not match:
        searched = sorted({f"{c['scenario']} / {c['backbone']}" for c in choices})
        raise ValueError(f"the recipe search chose no recipe for {config.scenario} / {config.backbone} (it searched "
                         f"{searched}); add them to the 04a_recipe_search step's grid, or give 04 a recipe")
    settings = dict(match[0]["settings"])
    if "crop_scale" in settings:
        settings["crop_scale"] = tuple(settings["crop_scale"])
    return dataclasses.replace(config, recipe=match[0]["recipe"], **settings)
