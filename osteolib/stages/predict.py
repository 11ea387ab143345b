"""Apply a fine-tuned model of a run to new X-rays: probabilities, decisions and Grad-CAM overlays.

:func:`predict_images` reproduces notebook 04's prediction path exactly, so the same image gives the same
probabilities as the run's ``predictions/<name>.csv``: the files are decoded and letterboxed into an
:class:`~osteolib.data.ImageCache` at the run's image size, normalised with the run's ``data/audit.json`` mean/std,
and passed through :func:`osteolib.stages.finetune.predict_probs` in the precision (autocast dtype, channels-last
memory format) and batch size the run predicted with. Binary models decide at the threshold chosen on the run's
validation split; models with more classes take the argmax. A file that cannot be read gets a row with its reason;
the others still go through.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from osteolib import models
from osteolib.data import ImageCache, XrayDataset, crop_policy, read_audit, scan_files
from osteolib.engine import choose_precision, precision as engine_precision
from osteolib.explain import compute_cams, multiscale_cam, overlay
from osteolib.runs import Run, open_run
from osteolib.stages import finetune

__all__ = ["predict_images", "choose_model", "expand_inputs", "overlay_map_name", "PREDICTIONS_FILE"]

PREDICTIONS_FILE = "predictions.csv"


def choose_model(run: Run, model_name: str | None = None) -> str:
    """The fine-tuned model to apply: ``model_name`` when the run has it, else the run's only one."""
    names = finetune.finetuned_runs(run)
    if not names:
        raise FileNotFoundError(f"{run.path} holds no fine-tuned model (no logs/*-summary.json): run notebook "
                                f"04_finetune into it first, or pass another run")
    if model_name is None:
        if len(names) > 1:
            raise ValueError(f"{run.path} holds {len(names)} fine-tuned models; choose one with --model NAME: "
                             + ", ".join(names))
        return names[0]
    if model_name not in names:
        raise ValueError(f"model {model_name!r} is not in {run.path}; its fine-tuned models: {', '.join(names)}")
    return model_name


def expand_inputs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given, folders as every non-hidden file below them (sorted); a missing path is an error."""
    files: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*")
                            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder; give X-ray files (PNG, JPEG, DICOM) or folders")
    if not files:
        raise ValueError(f"no files found in {[str(p) for p in paths]}")
    return files


def _fresh_out_dir(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder: predictions are never written over earlier "
                              f"ones; give a new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _prepare_model(run: Run, name: str, device: torch.device) -> tuple[nn.Module, Any, list[str], dict, Any]:
    """The selected model, placed as notebook 04 predicted with it (device, precision, memory format)."""
    model, config, classes = finetune.load_finetuned(run, name)
    summary = json.loads(run.find(Path("logs") / f"{name}-summary.json").read_text())
    try:  # the precision the run predicted in; "auto" where this device cannot (fp16 of a GPU run on a CPU)
        precision = choose_precision(device, summary.get("precision") or config.precision)
    except ValueError:
        precision = choose_precision(device, config.precision)
    model.to(device)
    if engine_precision.use_channels_last(model, config.train_config().channels_last, precision):
        model.to(memory_format=torch.channels_last)
    return model, config, classes, summary, precision


def _decide(probs: np.ndarray, classes: list[str], threshold: float | None) -> list[str]:
    if len(classes) == 2 and threshold is not None:
        return [classes[1] if p >= threshold else classes[0] for p in probs[:, 1]]  # evaluation's p >= t rule
    return [classes[i] for i in probs.argmax(axis=1)]


def overlay_map_name(model: nn.Module) -> str:
    """Which map the overlays of ``model`` show (the ``overlay_map`` column)."""
    return "multiscale_cam" if isinstance(model, models.MultiScaleDenseNet) else "gradcam"


def _cams(model: nn.Module, images: torch.Tensor, targets: list[int]) -> np.ndarray:
    """Maps of the decided class: the multi-scale DenseNet's relevance-weighted multi-scale CAM (grad-cam on its
    taps would weigh every scale equally), else Grad-CAM at the layer notebook 05 explains, with the token-to-grid
    reshape for ViTs (both chosen by :func:`osteolib.explain.compute_cams`)."""
    if overlay_map_name(model) == "multiscale_cam":
        return multiscale_cam(model, images, class_idx=targets)[0]
    return compute_cams(model, images, "gradcam", targets=targets)


def _save_overlay(pixels: np.ndarray, cam: np.ndarray, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    overlay(pixels, cam, ax=ax, title=title)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="predict", disable=not enabled)


def predict_images(run: Run | str | os.PathLike, model_name: str | None, paths: Sequence[str | os.PathLike],
                   out_dir: str | os.PathLike, overlays: bool = True, batch_size: int | None = None,
                   device: str | torch.device | None = None, progress: bool = True) -> pd.DataFrame:
    """Predict ``paths`` (files or folders) with fine-tuned model ``model_name`` of ``run``; returns the table
    written to ``out_dir/predictions.csv`` and draws ``out_dir/overlays/<n>_<file>.png`` unless ``overlays=False``.

    Columns: ``file``, ``status`` ("ok" | "unreadable"), ``error``, ``prob_<class>`` per class, ``predicted``,
    ``threshold``, ``model``, ``run``, ``overlay`` (the PNG's path) and ``overlay_map`` ("gradcam", or
    "multiscale_cam" for the multi-scale DenseNet; empty where none was drawn). DICOM files are read as notebook
    00 reads them (:func:`osteolib.data.read_xray`: the header's window, else the data's min-max range).
    ``batch_size`` defaults to the one notebook 04 predicted with (2 x the run's batch size), which keeps the
    numbers identical to its predictions file.
    """
    run = run if isinstance(run, Run) else open_run(run)
    name = choose_model(run, model_name)
    files = expand_inputs(paths)
    out = _fresh_out_dir(out_dir)
    device = torch.device(device) if device is not None else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, config, classes, summary, precision = _prepare_model(run, name, device)
    threshold = (summary.get("threshold") or {}).get("value") if len(classes) == 2 else None
    normalisation = read_audit(run.find("data/audit.json"))["normalisation"]
    scan = scan_files([str(f) for f in files])
    table = pd.DataFrame({"file": [str(f) for f in files], "status": np.where(scan["ok"], "ok", "unreadable"),
                          "error": scan["reason"].tolist()})
    for c in classes:
        table[f"prob_{c}"] = np.nan
    table["predicted"], table["threshold"], table["model"], table["run"] = "", threshold, name, str(run.path)
    table["overlay"], table["overlay_map"] = "", ""
    for row in table.index[~scan["ok"]]:
        print(f"predict: cannot read {table.at[row, 'file']}: {table.at[row, 'error']}", flush=True)
    good = list(table.index[scan["ok"]])
    if good:
        with tempfile.TemporaryDirectory(prefix="osteo-predict-") as root:
            manifest = pd.DataFrame({"image_id": [f"{i:06d}" for i in good], "path": table.loc[good, "file"]})
            cache = ImageCache.build(manifest, config.image_size, root=root, progress=False)
            _predict_rows(table, good, cache, model, config, classes, threshold, precision,
                          (normalisation["mean"], normalisation["std"]), batch_size or 2 * config.batch_size,
                          out / "overlays" if overlays else None, progress)
    table.to_csv(out / PREDICTIONS_FILE, index=False)
    return table


def _predict_rows(table: pd.DataFrame, rows: list[int], cache: ImageCache, model: nn.Module, config: Any,
                  classes: list[str], threshold: float | None, precision: Any, mean_std: tuple[float, float],
                  batch_size: int, overlay_dir: Path | None, progress: bool) -> None:
    """Fill ``table``'s rows batch by batch (the batches notebook 04's predict_probs forms), drawing overlays."""
    mean, std = mean_std
    columns = [f"prob_{c}" for c in classes]
    if overlay_dir is not None:
        overlay_dir.mkdir()
    with _progress(len(rows), progress) as bar:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            ids = [f"{i:06d}" for i in chunk]
            with torch.no_grad():  # no autograd graph: the same numbers, up to ~25 % faster on CPU (measured)
                probs = finetune.predict_probs(model, cache, ids, config.image_size, mean, std,
                                               batch_size=batch_size, precision=precision)
            decided = _decide(probs, classes, threshold)
            table.loc[chunk, columns] = probs
            table.loc[chunk, "predicted"] = decided
            if overlay_dir is not None:
                _draw_overlays(table, chunk, ids, cache, model, config.image_size, mean, std,
                               [classes.index(d) for d in decided], overlay_dir)
            bar.update(len(chunk))


def _draw_overlays(table: pd.DataFrame, rows: list[int], ids: list[str], cache: ImageCache, model: nn.Module,
                   image_size: int, mean: float, std: float, targets: list[int], overlay_dir: Path) -> None:
    dataset = XrayDataset(cache, ids, transform=crop_policy("none", image_size), mean=mean, std=std)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    maps = _cams(model, images, targets)
    map_name = overlay_map_name(model)
    for k, row in enumerate(rows):
        file = Path(table.at[row, "file"])
        path = overlay_dir / f"{row:05d}_{file.stem}.png"
        pixels = images[k, 0].numpy() * std + mean  # back to [0, 1] for display
        decided = table.at[row, "predicted"]
        title = f"{file.name}: {decided} (p={table.at[row, 'prob_' + decided]:.3f}, {map_name})"
        _save_overlay(pixels, maps[k], title, path)
        table.at[row, "overlay"], table.at[row, "overlay_map"] = str(path), map_name
