"""An interactive look at the explanations of a run, and copies of the run's paper figures.

:func:`cam_viewer` puts four dropdowns (scenario, backbone, test image, CAM method) above one overlay:
the image, the chosen model's map for the positive class, the expert region's outline, the image's
label and the model's probability of the positive class (the one notebook 04 saved for the image; the viewer
recomputes it in fp32 only for an image without a saved prediction). The logic lives in :class:`CamViewer`, whose
:meth:`CamViewer.update` draws one choice without any widget, so it is tested without a browser; the
widgets only call it. Each (scenario, backbone) shows the model of the lowest seed (and largest label
fraction) of the run; models are loaded once and kept.

:func:`copy_paper_figures` puts the figures a paper uses from a run folder into the repository's top-level
``figures/``, replacing the earlier run's copies of the same figures (git keeps the history; a growing archive of
every run's copies is not what a reader of the repository needs), and records the run in ``figures/SOURCE.md``.
It lives here, beside the viewer, because both only *show* what a run produced.
"""
from __future__ import annotations

import fnmatch
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from osteolib import explain
from osteolib.stages import finetune
from osteolib.stages import pretrain
from osteolib.paths import REPO_ROOT
from osteolib.runs import Run

# Figures of the paper: notebook 05's and the results-table figure of notebook 04's collection step.
PAPER_FIGURES = ("05_*", "label_efficiency.*")


@dataclass(frozen=True)
class ViewerModel:
    """Which fine-tuning run a (scenario, backbone) choice shows."""

    name: str
    scenario: str
    backbone: str
    seed: int
    label_fraction: float


def viewer_models(run: Run) -> dict[tuple[str, str], ViewerModel]:
    """One fine-tuning run per (scenario, backbone): the lowest seed at the largest label fraction."""
    chosen: dict[tuple[str, str], ViewerModel] = {}
    for name in finetune.finetuned_runs(run):
        config = json.loads(run.find(Path("logs") / f"{name}-summary.json").read_text())["config"]
        item = ViewerModel(name, config["scenario"], config["backbone"], int(config["seed"]),
                           float(config["label_fraction"]))
        key = (item.scenario, item.backbone)
        best = chosen.get(key)
        if best is None or (-item.label_fraction, item.seed) < (-best.label_fraction, best.seed):
            chosen[key] = item
    if not chosen:
        raise FileNotFoundError(f"no fine-tuned model in {run.path} (logs/*-summary.json): run notebook 04 first")
    return chosen


class CamViewer:
    """The viewer's state and drawing; :func:`cam_viewer` wraps it in widgets.

    ``image_ids``: the images offered (default: the test images with an expert region). ``mean`` /
    ``std``: the normalisation the models were trained with.
    """

    def __init__(self, run: Run, manifest: pd.DataFrame, cache: Any, mean: float, std: float,
                 image_ids: Sequence[str] | None = None, methods: Sequence[str] = tuple(explain.CAM_METHODS)):
        unknown = [m for m in methods if m not in explain.CAM_METHODS]
        if unknown:
            raise ValueError(f"unknown CAM method(s) {unknown}; choose from {sorted(explain.CAM_METHODS)}")
        self.run, self.manifest, self.cache, self.mean, self.std = run, manifest, cache, float(mean), float(std)
        self.models = viewer_models(run)
        if image_ids is None:
            test = manifest.loc[manifest["split"] == "test", "image_id"].astype(str)
            image_ids = [i for i in test if i in cache.index and cache.has_region[cache.index[i]]]
        image_ids = [str(i) for i in image_ids]
        absent = [i for i in image_ids if i not in cache.index]
        if absent:
            raise KeyError(f"image ids not in the cache: {absent[:5]}; build the cache from the run's manifest")
        if not image_ids:
            raise ValueError("no image to show: the test split has no image with an expert region")
        self.image_ids = image_ids
        self.methods = list(methods)
        self.labels = manifest.set_index(manifest["image_id"].astype(str))["label"].astype(str)
        self._loaded: dict[str, tuple[torch.nn.Module, list[str]]] = {}
        self._predictions: dict[str, pd.DataFrame] = {}

    @property
    def scenarios(self) -> list[str]:
        return sorted({s for s, _ in self.models})

    @property
    def backbones(self) -> list[str]:
        return sorted({b for _, b in self.models})

    def model(self, scenario: str, backbone: str) -> tuple[torch.nn.Module, list[str], ViewerModel]:
        if (scenario, backbone) not in self.models:
            raise KeyError(f"the run has no model for scenario {scenario!r} and backbone {backbone!r}; "
                           f"available: {sorted(self.models)}")
        item = self.models[(scenario, backbone)]
        if item.name not in self._loaded:
            model, _, classes = finetune.load_finetuned(self.run, item.name)
            self._loaded[item.name] = (model, classes)
        model, classes = self._loaded[item.name]
        return model, classes, item

    def update(self, scenario: str, backbone: str, image_id: str, method: str, ax: Any = None) -> dict[str, Any]:
        """Draw one choice on ``ax`` (a new figure if None); returns what was shown (probability, label ...)."""
        if method not in self.methods:
            raise ValueError(f"method {method!r} is not offered; choose one of {self.methods}")
        if image_id not in self.image_ids:
            raise KeyError(f"image {image_id!r} is not offered by this viewer")
        model, classes, item = self.model(scenario, backbone)
        image, region = pretrain.example_images(self.cache, [image_id], self.mean, self.std, with_regions=True)
        positive = len(classes) - 1
        with torch.no_grad():
            computed = float(torch.softmax(model(image).float(), dim=-1)[0, positive])
        saved = self._saved_probability(item.name, image_id, classes[positive])
        probability = computed if saved is None else saved
        cam = explain.compute_cams(model, image, method, targets=[positive])[0]
        label = str(self.labels.get(image_id, "?"))
        title = (f"{item.scenario} / {item.backbone} (seed {item.seed})\n{image_id}: label {label}, "
                 f"p({classes[positive]}) = {probability:.3f}")
        region_mask = region[0, 0].numpy() > 0
        ax = explain.overlay(image[0, 0].numpy(), cam, region=region_mask if region_mask.any() else None, ax=ax,
                             title=title)
        return {"run_name": item.name, "image_id": image_id, "label": label, "positive_class": classes[positive],
                "probability": probability, "probability_recomputed": computed, "method": method, "cam": cam, "ax": ax}

    def _saved_probability(self, name: str, image_id: str, positive: str) -> float | None:
        """The probability notebook 04 saved for this image (its precision, e.g. bf16 autocast), if it has one."""
        if name not in self._predictions:
            self._predictions[name] = pd.read_csv(self.run.find(Path("predictions") / f"{name}.csv"))
        table = self._predictions[name]
        rows = table[(table["image_id"].astype(str) == image_id) & (table["split"] == "test")]
        return float(rows[f"prob_{positive}"].iloc[0]) if len(rows) else None


def cam_viewer(run: Run, manifest: pd.DataFrame, cache: Any, mean: float, std: float,
               image_ids: Sequence[str] | None = None, methods: Sequence[str] = tuple(explain.CAM_METHODS)):
    """The widget: dropdowns for scenario, backbone, image and CAM method over one overlay (display it)."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    viewer = CamViewer(run, manifest, cache, mean, std, image_ids=image_ids, methods=methods)
    controls = {
        "scenario": widgets.Dropdown(options=viewer.scenarios, description="scenario"),
        "backbone": widgets.Dropdown(options=viewer.backbones, description="backbone"),
        "image_id": widgets.Dropdown(options=viewer.image_ids, description="image"),
        "method": widgets.Dropdown(options=viewer.methods, description="CAM"),
    }
    output = widgets.Output()

    def redraw(_: Any = None) -> None:
        with output:
            output.clear_output(wait=True)
            fig, ax = plt.subplots(figsize=(4.5, 4.8))
            try:
                viewer.update(ax=ax, **{k: w.value for k, w in controls.items()})
            except KeyError as err:  # a (scenario, backbone) pair the grid did not train
                ax.set_axis_off()
                ax.set_title(str(err), fontsize=8)
            plt.show()
            plt.close(fig)

    for control in controls.values():
        control.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox(list(controls.values())[:2]), widgets.HBox(list(controls.values())[2:]), output])


def copy_paper_figures(run: Run, patterns: Sequence[str] = PAPER_FIGURES,
                       destination: str | Path | None = None) -> list[Path]:
    """Copy the run's figures matching ``patterns`` into ``destination`` (default the repository's ``figures/``),
    replacing the files there that match the same patterns (the earlier run's set), and write ``SOURCE.md`` naming
    the run; returns the copies. Raises FileNotFoundError if nothing in the run matches (before touching
    ``destination``). Files of other patterns (e.g. notebook 01's figures) are left as they are."""
    source = run.path / "figures"
    files = sorted(p for p in source.glob("*") if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns))
    if not files:
        raise FileNotFoundError(f"no figure in {source} matches {list(patterns)}: run the notebooks that draw them")
    target = Path(destination) if destination is not None else REPO_ROOT / "figures"
    target.mkdir(parents=True, exist_ok=True)
    staging = target / f".{run.path.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for path in files:  # copy first: a failed copy leaves the earlier set whole
        shutil.copy2(path, staging / path.name)
    for old in target.iterdir():
        if old.is_file() and any(fnmatch.fnmatch(old.name, pat) for pat in patterns):
            old.unlink()
    for path in files:
        (staging / path.name).rename(target / path.name)
    staging.rmdir()
    (target / "SOURCE.md").write_text(
        f"The figures matching {', '.join(f'`{pat}`' for pat in patterns)} here come from run `{run.path.name}` "
        f"(its run.json holds the profile, parameters and git commit).\n")
    return [target / p.name for p in files]
