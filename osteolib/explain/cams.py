"""Explanations of the classifiers and how well they agree with expert regions.

Four parts, each usable alone:

1. **Saliency maps** through the ``grad-cam`` package (:func:`compute_cams`): Grad-CAM, Grad-CAM++,
   HiResCAM, LayerCAM, EigenCAM, batched, at the right layer of every backbone of the study
   (:func:`target_layers`), for single-logit binary and multi-class models. For the multi-scale
   DenseNet, :func:`multiscale_cam` combines exact per-scale class activation maps with the model's
   learned layer-relevance weights (no public implementation exists; it is tested by hand).
2. **Agreement with expert regions** (pure numpy, one map and one boolean region at a time):
   :func:`pointing_game`, :func:`energy_in_region`, :func:`iou_dice` at Otsu / quantile thresholds
   (:func:`map_threshold`), :func:`region_auc`; :func:`agreement_table` scores a batch into one row
   per image (images without a region get a row too, marked and counted) and
   :func:`agreement_summary` aggregates it.
3. **Sanity check** (Adebayo et al. 2018): :func:`randomise_parameters` returns a copy of a model
   with its weights re-initialised from the top (cascading) or all at once; :func:`map_similarity`
   compares the maps before and after.
4. **Faithfulness**: :func:`faithfulness` runs grad-cam's ROAD metrics (remove and impute the most /
   least relevant pixels) or its CAM-multiplication confidence change.

Maps are ``(H, W)`` float arrays in [0, 1] on the input's pixel grid (bright = relevant); regions are
``(H, W)`` bool arrays on the same grid, as ``ImageCache.regions`` provides them.

Binary models have one logit. Following grad-cam's ``BinaryClassifierOutputTarget``, class 1 means
"evidence for the positive class" (the logit) and class 0 "evidence for the negative class" (minus
the logit); every function here uses that convention, and the default target is the predicted class.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM
from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
from pytorch_grad_cam.metrics.road import (
    ROADCombined,
    ROADLeastRelevantFirstAverage,
    ROADMostRelevantFirstAverage,
)
from pytorch_grad_cam.utils.model_targets import (
    BinaryClassifierOutputTarget,
    ClassifierOutputSoftmaxTarget,
    ClassifierOutputTarget,
)
from scipy.ndimage import distance_transform_edt
from scipy.stats import spearmanr
from skimage.filters import threshold_otsu
from skimage.metrics import structural_similarity
from sklearn.metrics import roc_auc_score
from torch import nn

from osteolib.models import model_arch
from osteolib.utils import eval_mode
from osteolib.models import MultiScaleDenseNet

CAM_METHODS: dict[str, type] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "layercam": LayerCAM,
    "eigencam": EigenCAM,
}

# The layer each architecture is explained at, as an attribute path (negative numbers index from the end).
# - densenet121: ``features.norm5`` (BatchNorm + ReLU of dense block 4), not ``features.denseblock4``: it is
#   the map the classifier pools, so for this GAP + linear head Grad-CAM reduces exactly to the class
#   activation map (the gradient is w_c / HW everywhere), its values are non-negative, and the block's raw
#   concatenated output would put the BatchNorm scale and the ReLU mask into the gradients.
# - vit_small: ``blocks[-1].norm1``. With timm's default "token" pooling only the class token of the last
#   block's *output* reaches the head, so gradients at the patch tokens of ``blocks[-1]`` are exactly zero
#   and Grad-CAM maps there are blank. The input of the last block's attention (its ``norm1``) is mixed
#   into the class token by that attention, so its patch tokens carry gradient; with "avg" pooling it
#   works as well. Tokens are reshaped to the patch grid by :func:`vit_reshape_transform`.
# - resnet50: ``layer4`` (its output is pooled directly). efficientnetv2_s: ``bn2`` (BatchNorm + SiLU after
#   ``conv_head``, pooled directly: the analogue of norm5). mobilenetv3: ``blocks[-1]``, because timm's
#   MobileNetV3 pools *before* its ``conv_head``, which therefore has no spatial extent.
# - densenet121_multiscale: every tapped scale (grad-cam averages the per-layer maps with equal weight;
#   :func:`multiscale_cam` is the version weighted by the learned layer relevance).
TARGET_LAYER_PATHS: dict[str, str] = {
    "densenet121": "features.norm5",
    "vit_small": "blocks.-1.norm1",
    "resnet50": "layer4",
    "efficientnetv2_s": "bn2",
    "mobilenetv3": "blocks.-1",
}
MULTISCALE_ARCH = "densenet121_multiscale"

DEFAULT_THRESHOLDS: tuple[str | float, ...] = ("otsu", 0.5, 0.8, 0.9)
DEFAULT_ROAD_PERCENTILES: tuple[int, ...] = (20, 40, 60, 80)
FAITHFULNESS_METHODS = ("road", "road_morf", "road_lerf", "cam_mult")


# --------------------------------------------------------------------------------------------------
# Saliency maps
# --------------------------------------------------------------------------------------------------

def model_arch_name(model: nn.Module, arch: str | None = None) -> str:
    """The architecture name used to pick target layers: ``arch`` if given, else read from the model."""
    if arch is not None:
        if arch not in TARGET_LAYER_PATHS and arch != MULTISCALE_ARCH:
            known = sorted([*TARGET_LAYER_PATHS, MULTISCALE_ARCH])
            raise ValueError(f"arch {arch!r} has no known target layer; known: {known} (or pass layers=[...])")
        return arch
    if isinstance(model, MultiScaleDenseNet):
        return MULTISCALE_ARCH
    try:
        return model_arch(model)
    except ValueError as err:
        raise ValueError(
            f"cannot tell which layer of {type(model).__name__} to explain: pass arch= (one of "
            f"{sorted([*TARGET_LAYER_PATHS, MULTISCALE_ARCH])}) or layers=[module, ...] ({err})"
        ) from err


def target_layers(model: nn.Module, arch: str | None = None) -> list[nn.Module]:
    """The module(s) whose output the CAM methods weigh, for a model of the study (see TARGET_LAYER_PATHS)."""
    arch = model_arch_name(model, arch)
    if arch == MULTISCALE_ARCH:
        if not isinstance(model, MultiScaleDenseNet):
            raise ValueError(f"arch {MULTISCALE_ARCH!r} needs a MultiScaleDenseNet, got {type(model).__name__}")
        return model.tap_modules()
    module: Any = model
    for part in TARGET_LAYER_PATHS[arch].split("."):
        try:
            module = module[int(part)] if part.lstrip("-").isdigit() else getattr(module, part)
        except (AttributeError, IndexError, TypeError) as err:
            raise ValueError(
                f"{type(model).__name__} has no layer {TARGET_LAYER_PATHS[arch]!r} expected for arch {arch!r}: "
                "is it really that architecture? Pass arch= or layers= explicitly"
            ) from err
    return [module]


def vit_reshape_transform(tensor: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """ViT tokens (N, prefix + gh*gw, D) -> (N, D, gh, gw), dropping the class / register tokens."""
    height, width = grid
    if tensor.dim() != 3 or tensor.shape[1] != num_prefix_tokens + height * width:
        raise ValueError(
            f"vit_reshape_transform: expected tokens (N, {num_prefix_tokens} + {height}*{width}, D), "
            f"got {tuple(tensor.shape)}; is the grid / number of prefix tokens right?"
        )
    patches = tensor[:, num_prefix_tokens:, :]
    return patches.reshape(tensor.shape[0], height, width, tensor.shape[2]).permute(0, 3, 1, 2)


def reshape_transform_for(model: nn.Module, arch: str | None = None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The token-to-map transform grad-cam needs for ViTs (None for CNNs)."""
    arch = model_arch_name(model, arch)
    if arch != "vit_small":
        return None
    grid = tuple(model.patch_embed.grid_size)
    return partial(vit_reshape_transform, grid=grid, num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 1)))


def compute_cams(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    method: str = "gradcam",
    targets: int | Sequence[int] | None = None,
    arch: str | None = None,
    batch_size: int = 16,
    *,
    layers: Sequence[nn.Module] | None = None,
    reshape_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """Saliency maps ``(N, H, W)`` in [0, 1] for images ``(N, C, H, W)`` with a grad-cam method.

    ``targets``: None (each image's predicted class), one class for all, or one per image; for a
    single-logit model 1 = positive, 0 = negative evidence (see the module docstring). EigenCAM is
    class-agnostic and ignores them. ``layers`` / ``reshape_transform`` override the per-architecture
    choice (for models outside the study's registry). The model is put in eval mode while the maps
    are computed and given back in the mode it came in.
    """
    if method not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {sorted(CAM_METHODS)}")
    images = _as_image_batch(images)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if layers is None:
        layers = target_layers(model, arch)
        if reshape_transform is None:
            reshape_transform = reshape_transform_for(model, arch)
    layers = list(layers)
    device = next(model.parameters()).device
    class_agnostic = method == "eigencam"
    maps: list[np.ndarray] = []
    with eval_mode(model):
        if not class_agnostic:
            num_outputs = _num_outputs(model, images[:1].to(device))
            classes = _resolve_targets(model, images, targets, num_outputs, batch_size)
        with torch.enable_grad(), CAM_METHODS[method](model=model, target_layers=layers,
                                                      reshape_transform=reshape_transform) as cam:
            for start in range(0, len(images), batch_size):
                chunk = images[start:start + batch_size].to(device).detach().clone()
                # The input asks for gradients so that activations do even when every weight is frozen;
                # otherwise grad-cam's hooks see no gradient at all.
                chunk.requires_grad_(True)
                chunk_targets = None if class_agnostic else [
                    _target(c, num_outputs, "logit") for c in classes[start:start + batch_size]
                ]
                maps.append(np.asarray(cam(input_tensor=chunk, targets=chunk_targets), dtype=np.float32))
    # grad-cam's context manager prints and *swallows* an IndexError raised inside it (e.g. no gradient
    # reached the target layer), which would leave maps missing: count them instead of trusting it.
    if sum(len(m) for m in maps) != len(images):
        raise RuntimeError(
            f"{method} returned maps for {sum(len(m) for m in maps)} of {len(images)} images: grad-cam failed "
            "inside its context manager (see the message it printed); is the target layer used by the forward pass?"
        )
    out = np.concatenate(maps, axis=0)
    if not np.isfinite(out).all():
        bad = np.where(~np.isfinite(out).reshape(len(out), -1).all(axis=1))[0]
        raise FloatingPointError(f"{method} produced non-finite maps for images {bad.tolist()}: does the model output NaN?")
    return np.clip(out, 0.0, 1.0)


def multiscale_cam(
    model: MultiScaleDenseNet,
    images: torch.Tensor | np.ndarray,
    class_idx: int | Sequence[int] | None = None,
    normalise: bool = True,
    batch_size: int = 16,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Multi-scale class activation map ``S_c = sum_b h_bc R(M_bc)`` and the per-scale maps.

    ``M_bc = sum_k w_bck A_bk`` is the classic CAM of scale b (its features A_b, its own classifier
    weights w_bc); since every scale is GAP + linear it is exact: its spatial mean plus the bias is
    the scale's logit. ``R`` is bilinear resizing to the input (half-pixel centres, like grad-cam's
    resize). ``h_bc`` are the learned relevance weights. For a single-logit model class 0 uses -M.

    Normalisation happens *after* combining and never per scale before it: min-max per scale would
    erase the magnitudes that h is meant to weigh, and with raw maps the combined map decomposes the
    combined logit (mean of S_c = logit_c - sum_b h_bc bias_bc). With ``normalise=True`` (default)
    the combined map and, separately, each per-scale map get ReLU (positive evidence only, as
    Grad-CAM) then min-max to [0, 1], matching :func:`compute_cams`; ``normalise=False`` returns the
    raw signed maps, the per-scale ones *not* multiplied by h. Returns ``(combined (N, H, W), [per
    scale (N, H, W), ...])`` ordered as ``model.blocks``.
    """
    if not isinstance(model, MultiScaleDenseNet):
        raise TypeError(f"multiscale_cam needs a MultiScaleDenseNet, got {type(model).__name__}")
    images = _as_image_batch(images)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    # Explicit classes are checked before any forward pass; None is resolved per batch from its logits.
    classes = None if class_idx is None else _resolve_targets(model, images, class_idx, model.num_classes, batch_size)
    device = next(model.parameters()).device
    combined_parts: list[np.ndarray] = []
    per_scale_parts: list[list[np.ndarray]] = []
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size].to(device)
            outputs = model.forward_scales(chunk)
            chunk_classes = classes[start:start + batch_size] if classes is not None else _resolve_targets(
                model, chunk, None, model.num_classes, batch_size, logits=model.combine(outputs.logits))
            combined, per_scale = combine_scale_cams(
                outputs.features,
                [head.weight for head in model.scale_heads],
                model.relevance_weights(),
                chunk_classes,
                out_size=tuple(images.shape[-2:]),
                single_logit=model.num_classes == 1,
            )
            if normalise:
                combined, per_scale = _relu_min_max(combined), [_relu_min_max(m) for m in per_scale]
            combined_parts.append(combined.float().cpu().numpy())
            per_scale_parts.append([m.float().cpu().numpy() for m in per_scale])
    per_scale_maps = [np.concatenate([part[b] for part in per_scale_parts]) for b in range(len(model.blocks))]
    return np.concatenate(combined_parts), per_scale_maps


def combine_scale_cams(
    features: Sequence[torch.Tensor],
    class_weights: Sequence[torch.Tensor],
    relevance: torch.Tensor,
    classes: Sequence[int] | torch.Tensor,
    out_size: tuple[int, int],
    single_logit: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The arithmetic of :func:`multiscale_cam` on given tensors (no normalisation).

    ``features[b]`` (N, K_b, h_b, w_b), ``class_weights[b]`` (C, K_b), ``relevance`` (B, C),
    ``classes`` one per image. Returns the raw combined map (N, H, W) and the resized raw per-scale
    maps R(M_bc) (N, H, W) each.
    """
    if len(features) != len(class_weights) or len(features) != relevance.shape[0]:
        raise ValueError(
            f"combine_scale_cams: {len(features)} feature maps, {len(class_weights)} weight matrices and "
            f"{relevance.shape[0]} relevance rows must match"
        )
    n = features[0].shape[0]
    classes_t = torch.as_tensor(classes, dtype=torch.long, device=features[0].device).reshape(-1)
    if len(classes_t) != n:
        raise ValueError(f"combine_scale_cams: {len(classes_t)} classes for {n} images")
    if single_logit:  # one logit: class 1 = its evidence, class 0 = evidence against it (minus the map)
        signs = torch.where(classes_t == 1, 1.0, -1.0).to(features[0].dtype)
        rows = torch.zeros_like(classes_t)
    else:
        signs = torch.ones(n, dtype=features[0].dtype, device=features[0].device)
        rows = classes_t
    combined = torch.zeros(n, *out_size, dtype=features[0].dtype, device=features[0].device)
    per_scale: list[torch.Tensor] = []
    for b, (feature, weights) in enumerate(zip(features, class_weights)):
        if feature.shape[1] != weights.shape[1]:
            raise ValueError(f"scale {b}: features have {feature.shape[1]} channels, weights {weights.shape[1]}")
        cam = torch.einsum("nkhw,nk->nhw", feature, weights[rows]) * signs[:, None, None]
        resized = F.interpolate(cam[:, None], size=out_size, mode="bilinear", align_corners=False)[:, 0]
        per_scale.append(resized)
        combined = combined + relevance[b, rows][:, None, None] * resized
    return combined, per_scale


def _relu_min_max(maps: torch.Tensor) -> torch.Tensor:
    """grad-cam's normalisation: ReLU, subtract the per-map minimum, divide by (maximum + 1e-7)."""
    maps = maps.clamp(min=0)
    maps = maps - maps.amin(dim=(-2, -1), keepdim=True)
    return maps / (maps.amax(dim=(-2, -1), keepdim=True) + 1e-7)


def _as_image_batch(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a tensor or numpy array (N, C, H, W), got {type(images).__name__}")
    if images.dim() != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty batch (N, C, H, W), got shape {tuple(images.shape)}")
    return images.float()


def _num_outputs(model: nn.Module, example: torch.Tensor) -> int:
    num = getattr(model, "num_classes", None)
    if not isinstance(num, int):
        with torch.no_grad():
            num = int(model(example).shape[-1])
    if num < 1:
        raise ValueError(f"{type(model).__name__} has no classifier (num_classes={num}); explain a fine-tuned model")
    return num


def _resolve_targets(
    model: nn.Module,
    images: torch.Tensor,
    targets: int | Sequence[int] | None,
    num_outputs: int,
    batch_size: int,
    logits: torch.Tensor | None = None,
) -> list[int]:
    """One class index per image, checked; None -> the predicted class (logit > 0 for one logit)."""
    n = len(images)
    if targets is None:
        if logits is None:
            device = next(model.parameters()).device
            with torch.no_grad():
                logits = torch.cat([model(images[s:s + batch_size].to(device)) for s in range(0, n, batch_size)])
        if num_outputs == 1:
            return [int(v > 0) for v in logits.reshape(n).tolist()]
        return [int(v) for v in logits.argmax(dim=1).tolist()]
    if isinstance(targets, (int, np.integer)):
        classes = [int(targets)] * n
    else:
        classes = [int(t) for t in (targets.tolist() if hasattr(targets, "tolist") else targets)]
        if len(classes) != n:
            raise ValueError(f"targets has {len(classes)} entries for {n} images; give one per image or one int")
    allowed = 2 if num_outputs == 1 else num_outputs
    bad = [(i, c) for i, c in enumerate(classes) if not 0 <= c < allowed]
    if bad:
        what = "0 (negative) or 1 (positive) for a single-logit model" if num_outputs == 1 else f"0..{num_outputs - 1}"
        raise ValueError(f"targets out of range at (image, class) {bad[:5]}: classes must be {what}")
    return classes


class _BinaryProbabilityTarget:
    """Probability of class 1 (sigmoid of the logit) or class 0 (1 - that) of a single-logit model."""

    def __init__(self, category: int) -> None:
        self.category = category

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(model_output.reshape(-1)[0])
        return p if self.category == 1 else 1 - p


def _target(category: int, num_outputs: int, score: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A grad-cam target object: what is explained (logit) or scored (probability) for one image."""
    if num_outputs == 1:
        return BinaryClassifierOutputTarget(category) if score == "logit" else _BinaryProbabilityTarget(category)
    return ClassifierOutputTarget(category) if score == "logit" else ClassifierOutputSoftmaxTarget(category)


# --------------------------------------------------------------------------------------------------
# Agreement with expert regions
# --------------------------------------------------------------------------------------------------

def _check_pair(cam: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cam = np.asarray(cam, dtype=np.float64)
    region = np.asarray(region)
    if cam.ndim != 2:
        raise ValueError(f"cam must be a 2-D map (H, W), got shape {cam.shape}")
    if region.shape != cam.shape:
        raise ValueError(f"region shape {region.shape} differs from cam shape {cam.shape}: resample one onto the other's grid")
    if not np.isfinite(cam).all():
        raise ValueError("cam has non-finite values")
    region = region.astype(bool)
    if not region.any():
        raise ValueError("region is empty: an image without an expert region has no agreement score")
    return cam, region


def pointing_game(cam: np.ndarray, region: np.ndarray, tolerance_px: float = 0) -> float:
    """1.0 if the map's maximum lies in the region (grown by ``tolerance_px``), else 0.0.

    Ties are scored as the share of maximal pixels inside, i.e. the expected hit when the tie is
    broken at random: a flat map scores the region's area share (chance), neither a free hit nor a miss.
    """
    cam, region = _check_pair(cam, region)
    if tolerance_px < 0:
        raise ValueError(f"tolerance_px must be >= 0, got {tolerance_px}")
    if tolerance_px > 0:
        region = distance_transform_edt(~region) <= tolerance_px
    peaks = cam == cam.max()
    return float(region[peaks].mean())


def energy_in_region(cam: np.ndarray, region: np.ndarray) -> float:
    """Share of the map's total (non-negative) mass inside the region; NaN for an all-zero map."""
    cam, region = _check_pair(cam, region)
    if cam.min() < 0:
        raise ValueError("energy_in_region needs a non-negative map (e.g. after ReLU / min-max, as compute_cams gives)")
    total = cam.sum()
    return float(cam[region].sum() / total) if total > 0 else math.nan


def map_threshold(cam: np.ndarray, rule: str | float) -> float:
    """The value above which a map counts as "on": ``"otsu"`` or a quantile q in (0, 1) of its values.

    A constant map gets its own value as threshold, so nothing is above it (an empty mask).
    """
    cam = np.asarray(cam, dtype=np.float64)
    if isinstance(rule, str):
        if rule != "otsu":
            raise ValueError(f"threshold rule must be 'otsu' or a quantile in (0, 1), got {rule!r}")
        if cam.max() == cam.min():
            return float(cam.max())
        return float(threshold_otsu(cam))
    if not 0 < float(rule) < 1:
        raise ValueError(f"quantile threshold must lie in (0, 1), got {rule!r}")
    return float(np.quantile(cam, float(rule)))


def iou_dice(cam: np.ndarray, region: np.ndarray, threshold: float | str = "otsu") -> tuple[float, float]:
    """IoU and Dice of ``cam > threshold`` with the region; ``threshold`` is a map value or ``"otsu"``."""
    cam, region = _check_pair(cam, region)
    if isinstance(threshold, str):
        if threshold != "otsu":
            raise ValueError(f"threshold must be a map value or 'otsu', got {threshold!r}")
        threshold = map_threshold(cam, "otsu")
    on = cam > float(threshold)
    overlap = np.logical_and(on, region).sum()
    union = np.logical_or(on, region).sum()
    return float(overlap / union), float(2 * overlap / (on.sum() + region.sum()))


def region_auc(cam: np.ndarray, region: np.ndarray) -> float:
    """ROC AUC of the map's values separating region from non-region pixels (threshold-free).

    1 = every region pixel outranks every other pixel, 0.5 = no separation (e.g. a flat map),
    0 = inverted; NaN when the region covers the whole image (nothing to separate it from).
    """
    cam, region = _check_pair(cam, region)
    if region.all():
        return math.nan
    return float(roc_auc_score(region.ravel(), cam.ravel()))


def _threshold_name(rule: str | float) -> str:
    return "otsu" if rule == "otsu" else f"q{float(rule) * 100:g}"


def _measure_names(thresholds: Sequence[str | float]) -> list[str]:
    names = ["region_fraction", "pointing_game", "energy_in_region", "region_auc"]
    for rule in thresholds:
        names += [f"iou_{_threshold_name(rule)}", f"dice_{_threshold_name(rule)}", f"threshold_{_threshold_name(rule)}"]
    return names


def agreement_measures(cam: np.ndarray, region: np.ndarray, thresholds: Sequence[str | float] = DEFAULT_THRESHOLDS,
                       tolerance_px: float = 0) -> dict[str, float]:
    """Every agreement measure of one map with one (non-empty) region, as a flat dict."""
    cam, region = _check_pair(cam, region)
    row: dict[str, float] = {
        "region_fraction": float(region.mean()),
        "pointing_game": pointing_game(cam, region, tolerance_px),
        "energy_in_region": energy_in_region(cam, region),
        "region_auc": region_auc(cam, region),
    }
    for rule in thresholds:
        name = _threshold_name(rule)
        value = map_threshold(cam, rule)
        row[f"iou_{name}"], row[f"dice_{name}"] = iou_dice(cam, region, value)
        row[f"threshold_{name}"] = value
    return row


def agreement_table(
    cams: np.ndarray,
    regions: np.ndarray,
    has_region: Sequence[bool] | np.ndarray,
    image_ids: Sequence[str],
    *,
    thresholds: Sequence[str | float] = DEFAULT_THRESHOLDS,
    tolerance_px: float = 0,
    **identifiers: Any,
) -> pd.DataFrame:
    """One row per image with every agreement measure; images without a usable region are kept.

    ``cams`` (N, H, W) and ``regions`` (N, H, W) (e.g. ``ImageCache.regions`` rows, any values where
    ``has_region`` is False). ``identifiers`` become columns: a scalar is repeated (``method="gradcam"``,
    ``backbone=...``, ``seed=0``), a sequence of length N is per image. Rows without a region get
    ``has_region=False``, NaN measures and a ``note``; a flagged region that is empty on this grid is
    also kept, with NaN measures and a note saying so. Measures are described at each function.
    """
    cams = np.asarray(cams)
    regions = np.asarray(regions)
    has_region = np.asarray(has_region, dtype=bool).reshape(-1)
    ids = [str(i) for i in image_ids]
    n = len(ids)
    if cams.ndim != 3 or cams.shape != regions.shape or len(cams) != n or len(has_region) != n:
        raise ValueError(
            f"agreement_table: cams {cams.shape}, regions {regions.shape}, has_region ({len(has_region)},) and "
            f"{n} image_ids must all describe the same N images (cams and regions as (N, H, W) on one grid)"
        )
    for rule in thresholds:
        map_threshold(np.zeros(1), rule)  # a bad rule fails here, before any image is scored
    if len(set(ids)) != n:
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"agreement_table: image_ids repeat: {dupes[:10]}")
    columns: dict[str, list[Any]] = {}
    for key, value in identifiers.items():
        if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray, pd.Series)):
            columns[key] = [value] * n
        elif len(value) == n:
            columns[key] = list(value)
        else:
            raise ValueError(f"agreement_table: identifier {key!r} has {len(value)} values for {n} images")
    measure_names = _measure_names(thresholds)
    rows = []
    for i, image_id in enumerate(ids):
        row: dict[str, Any] = {"image_id": image_id, "has_region": bool(has_region[i]), "note": ""}
        if not has_region[i]:
            row["note"] = "no expert region"
        elif not np.asarray(regions[i]).any():
            row["note"] = "expert region is empty on this grid"
        if row["note"]:
            row.update({name: math.nan for name in measure_names})
        else:
            try:
                row.update(agreement_measures(cams[i], regions[i], thresholds, tolerance_px))
            except ValueError as err:
                raise ValueError(f"image {image_id!r} (row {i}): {err}") from err
        rows.append(row)
    table = pd.DataFrame(rows)
    for key, values in columns.items():
        table.insert(len(table.columns), key, values)
    return table


# Summarised per group; region_fraction is the chance level of the pointing game and of the energy share.
AGREEMENT_MEASURES = ("region_fraction", "pointing_game", "energy_in_region", "region_auc")


def agreement_summary(table: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """Counts and mean / standard deviation of every measure, per group of ``by`` columns.

    ``n_images`` = ``n_scored`` + ``n_without_region`` + ``n_empty_region``: every image of the table
    is accounted for. The mean pointing game is the hit rate.
    """
    by = list(by)
    missing = [c for c in ["image_id", "has_region", "note", *by] if c not in table.columns]
    if missing:
        raise ValueError(f"agreement_summary: the table lacks columns {missing}; pass agreement_table's output")
    measures = [c for c in table.columns if c in AGREEMENT_MEASURES or c.startswith(("iou_", "dice_"))]
    groups = table.groupby(by, sort=True, dropna=False) if by else [((), table)]
    rows = []
    for key, group in groups:
        scored = group[group["note"] == ""]
        row: dict[str, Any] = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        row.update(
            n_images=len(group),
            n_with_region=int(group["has_region"].sum()),
            n_without_region=int((~group["has_region"].astype(bool)).sum()),
            n_empty_region=int((group["has_region"].astype(bool) & (group["note"] != "")).sum()),
            n_scored=len(scored),
        )
        for m in measures:
            values = scored[m].astype(float)
            row[f"{m}_mean"] = float(values.mean()) if values.notna().any() else math.nan
            row[f"{m}_std"] = float(values.std(ddof=1)) if values.notna().sum() > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# Model-parameter randomisation (Adebayo et al. 2018)
# --------------------------------------------------------------------------------------------------

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class _Unit:
    name: str
    module: nn.Module
    own_only: bool  # only the module's direct parameters (those of an expanded module, e.g. a ViT's pos_embed)


def _expands(module: nn.Module) -> bool:
    """Containers and wrappers of containers (a DenseNet holding ``features``) are opened into their parts."""
    return isinstance(module, _CONTAINERS) or any(isinstance(c, _CONTAINERS) for c in module.children())


def _units(module: nn.Module, prefix: str = "") -> Iterator[_Unit]:
    own = [name for name, _ in module.named_parameters(recurse=False)]
    if own:  # direct parameters of an opened module act on its input side (cls_token, pos_embed)
        yield _Unit(f"{prefix}({','.join(own)})", module, True)
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if _expands(child):
            yield from _units(child, path + ".")
        elif any(True for _ in child.parameters()):
            yield _Unit(path, child, False)


def cascade_units(model: nn.Module) -> list[str]:
    """The randomisation units of a model from the top (output) to the bottom (input).

    Units follow the order modules are registered in, which for timm models is the forward order:
    containers (Sequential, ModuleList, ModuleDict, and modules holding one) are opened, every other
    module with parameters is one unit (a DenseNet dense layer, a ViT block, a classifier).
    """
    return [u.name for u in reversed(list(_units(model)))]


def randomise_parameters(
    model: nn.Module,
    mode: str = "cascading",
    layers: int | str | None = None,
    seed: int = 0,
) -> nn.Module:
    """A copy of ``model`` with weights re-initialised, for the model-parameter randomisation test.

    ``mode="cascading"`` re-initialises the top units of :func:`cascade_units`: ``layers=k`` the top
    k (default 1, the classifier), ``layers="name"`` everything from the top down to and including
    the unit ``name`` (or every unit under that prefix, e.g. ``"features.denseblock4"``).
    ``mode="full"`` re-initialises everything (``layers`` must be None). Each module's own
    ``reset_parameters`` is used where it has one (PyTorch's default initialisation; BatchNorm also
    resets its running statistics); parameters without one (a ViT's ``pos_embed``, ``cls_token``) are
    drawn from a normal distribution with the parameter's own standard deviation (0.02 if it has none).
    The original model is untouched; the copy's ``randomised_units`` lists what was re-initialised.
    """
    units = list(reversed(list(_units(model))))
    if not units:
        raise ValueError(f"{type(model).__name__} has no parameters to randomise")
    names = [u.name for u in units]
    if mode == "full":
        if layers is not None:
            raise ValueError("randomise_parameters(mode='full') re-initialises every layer; leave layers=None")
        count = len(units)
    elif mode == "cascading":
        if layers is None:
            layers = 1
        if isinstance(layers, str):
            hits = [i for i, n in enumerate(names) if n == layers or n.startswith(layers + ".")]
            if not hits:
                raise ValueError(
                    f"randomise_parameters: no unit {layers!r} in {type(model).__name__}; units from the top: "
                    f"{names[:12]}{' ...' if len(names) > 12 else ''} (see cascade_units(model))"
                )
            count = max(hits) + 1
        elif isinstance(layers, int) and 1 <= layers <= len(units):
            count = layers
        else:
            raise ValueError(f"randomise_parameters: layers must be a unit name or an int in 1..{len(units)}, got {layers!r}")
    else:
        raise ValueError(f"randomise_parameters: mode must be 'cascading' or 'full', got {mode!r}")

    randomised = copy.deepcopy(model)
    copied_units = list(reversed(list(_units(randomised))))[:count]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for unit in copied_units:
            _reinitialise(unit)
    randomised.randomised_units = [u.name for u in copied_units]
    return randomised


def _reinitialise(unit: _Unit) -> None:
    modules = [unit.module] if unit.own_only else list(unit.module.modules())
    covered: set[int] = set()
    for module in modules:
        reset = getattr(module, "reset_parameters", None)
        if callable(reset) and not unit.own_only:
            reset()
            covered.update(id(p) for p in module.parameters(recurse=False))
    params = unit.module.parameters(recurse=not unit.own_only)
    for p in params:
        if id(p) not in covered:
            std = float(p.detach().float().std()) if p.numel() > 1 else 0.0
            p.normal_(0.0, std if math.isfinite(std) and std > 0 else 0.02)


def map_similarity(cams_a: np.ndarray, cams_b: np.ndarray) -> pd.DataFrame:
    """Per-image similarity of two sets of maps (N, H, W), as in Adebayo et al.: Spearman rank correlation and SSIM.

    A flat map has no ranking: its Spearman value is NaN (kept, not dropped).
    """
    a, b = np.asarray(cams_a, dtype=np.float64), np.asarray(cams_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"map_similarity needs two stacks of the same shape (N, H, W), got {a.shape} and {b.shape}")
    side = min(a.shape[1:])
    if side < 3:
        raise ValueError(f"map_similarity: maps of {a.shape[1:]} pixels are too small for SSIM (needs >= 3)")
    win = min(7, side if side % 2 else side - 1)  # SSIM's window must be odd and fit in the map
    rows = []
    for x, y in zip(a, b):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns on constant input and returns NaN, which we keep
            rho = spearmanr(x.ravel(), y.ravel()).statistic
        data_range = max(x.max(), y.max()) - min(x.min(), y.min())
        ssim = structural_similarity(x, y, data_range=data_range if data_range > 0 else 1.0, win_size=win)
        rows.append({"spearman": float(rho), "ssim": float(ssim)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# Faithfulness
# --------------------------------------------------------------------------------------------------

def faithfulness(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    cams: np.ndarray,
    targets: int | Sequence[int] | None = None,
    method: str = "road",
    *,
    percentiles: Sequence[int] = DEFAULT_ROAD_PERCENTILES,
    score: str = "probability",
    seed: int = 0,
    batch_size: int = 16,
) -> np.ndarray:
    """Per-image faithfulness of maps to the model, with grad-cam's perturbation metrics: ``(N,)``.

    Scores are changes of the target's ``score`` ("probability": softmax / sigmoid of the target
    class, default, comparable across models; or "logit") when pixels are removed and filled in by
    ROAD's noisy linear imputation (which avoids the out-of-distribution artefacts of blacking out):

    - ``"road"``: (LeRF - MoRF) / 2 averaged over ``percentiles`` (grad-cam's ROADCombined). Higher is
      more faithful: removing what the map calls most relevant hurts the prediction more than removing
      the least relevant. Around 0 = no better than a random map; negative = anti-faithful.
    - ``"road_morf"``: change when the most relevant pixels are removed (deletion); lower (more
      negative) is more faithful. ``"road_lerf"``: change when the least relevant are removed; closer
      to 0 / higher is more faithful.
    - ``"cam_mult"``: change when the image is multiplied by the map (grad-cam's
      CamMultImageConfidenceChange); higher = the map keeps the evidence.

    ROAD at percentile p removes the top (100 - p) % (MoRF) or bottom (100 - p) % (LeRF) of the map.
    The imputation noise is drawn from a generator seeded with ``seed`` (the global RNG is restored).
    """
    if method not in FAITHFULNESS_METHODS:
        raise ValueError(f"faithfulness method must be one of {FAITHFULNESS_METHODS}, got {method!r}")
    if score not in ("probability", "logit"):
        raise ValueError(f"score must be 'probability' or 'logit', got {score!r}")
    if not percentiles or any(not 0 < p < 100 for p in percentiles):
        raise ValueError(f"percentiles must be a non-empty list of values in (0, 100), got {list(percentiles)}")
    images = _as_image_batch(images)
    cams = np.asarray(cams, dtype=np.float32)
    if cams.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"cams must be (N, H, W) = {(images.shape[0], *images.shape[-2:])} to match the images, got {cams.shape}")
    if not np.isfinite(cams).all():
        raise ValueError("cams contain non-finite values")
    metric = {
        "road": lambda: ROADCombined(percentiles=list(percentiles)),
        "road_morf": lambda: ROADMostRelevantFirstAverage(percentiles=list(percentiles)),
        "road_lerf": lambda: ROADLeastRelevantFirstAverage(percentiles=list(percentiles)),
        "cam_mult": CamMultImageConfidenceChange,
    }[method]()
    device = next(model.parameters()).device
    scores: list[np.ndarray] = []
    with eval_mode(model):
        num_outputs = _num_outputs(model, images[:1].to(device))
        classes = _resolve_targets(model, images, targets, num_outputs, batch_size)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            for start in range(0, len(images), batch_size):
                chunk = images[start:start + batch_size].to(device)
                chunk_targets = [_target(c, num_outputs, score) for c in classes[start:start + batch_size]]
                result = np.asarray(metric(chunk, cams[start:start + batch_size], chunk_targets, model), dtype=np.float64)
                scores.append(result.reshape(len(chunk), -1)[:, 0])
    return np.concatenate(scores)


# --------------------------------------------------------------------------------------------------
# Figure helper
# --------------------------------------------------------------------------------------------------

def overlay(
    image: np.ndarray,
    cam: np.ndarray | None = None,
    region: np.ndarray | None = None,
    boxes: Sequence[Mapping[str, Any]] | None = None,
    ax: Any = None,
    *,
    cmap: str = "jet",
    alpha: float = 0.4,
    title: str | None = None,
):
    """Draw a grey X-ray with a saliency map on top, the expert region's outline and boxes; returns the Axes.

    ``image`` (H, W) (or (1, H, W)); ``cam`` is resized bilinearly to the image for display if its
    grid differs; ``region`` (H, W) bool is outlined; ``boxes`` are dicts {"x","y","w","h","label"}
    in the image's pixel coordinates.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 2:
        raise ValueError(f"overlay needs a single-channel image (H, W), got shape {image.shape}")
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(image, cmap="gray", interpolation="nearest")
    if cam is not None:
        cam = np.asarray(cam, dtype=np.float32)
        if cam.shape != image.shape:
            from skimage.transform import resize

            cam = resize(cam, image.shape, order=1, preserve_range=True, anti_aliasing=False)
        ax.imshow(cam, cmap=cmap, alpha=alpha, vmin=0.0, vmax=max(1.0, float(cam.max())), interpolation="bilinear")
    if region is not None:
        region = np.asarray(region).astype(bool)
        if region.shape != image.shape:
            raise ValueError(f"overlay: region {region.shape} and image {image.shape} differ in shape")
        if region.any() and not region.all():
            ax.contour(region.astype(float), levels=[0.5], colors="lime", linewidths=1.2)
    for box in boxes or []:
        ax.add_patch(Rectangle((box["x"], box["y"]), box["w"], box["h"], fill=False, edgecolor="cyan", linewidth=1.2))
        if box.get("label"):
            ax.text(box["x"], box["y"] - 1, str(box["label"]), color="cyan", fontsize=7, va="bottom")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return ax


# --------------------------------------------------------------------------------------------------
# The checks of notebook 05, built on the parts above
# --------------------------------------------------------------------------------------------------

RANDOMISATION_MEASURES = ("pointing_game", "energy_in_region", "region_auc")
CI_MEASURES = ("pointing_game", "energy_in_region", "iou_otsu")


@dataclass
class RandomisationResult:
    """The cascading randomisation test of one model.

    ``table``: one row per step (step 0 = the trained model) with how many units were re-initialised, the
    deepest one, the mean agreement with the regions and the median similarity to the trained model's maps.
    ``maps``: the maps of every step, ``(steps, N, H, W)``. ``similarity``: the per-image rows of
    :func:`map_similarity` with a ``step`` column.
    """

    table: pd.DataFrame
    maps: np.ndarray
    similarity: pd.DataFrame
    method: str

    def verdict(self, max_spearman: float = 0.5) -> str:
        return randomisation_verdict(self.table, max_spearman=max_spearman)


def cascade_steps(model: nn.Module, n_steps: int = 5) -> list[int]:
    """Numbers of top units to re-initialise along the cascade: about evenly spaced on a log scale from 1
    (the classifier) to every unit, so that the top of the network, where most change is expected first,
    is sampled densely."""
    if not isinstance(n_steps, int) or n_steps < 2:
        raise ValueError(f"n_steps must be an int >= 2 (the classifier and the whole network), got {n_steps!r}")
    total = len(cascade_units(model))
    return sorted({int(round(v)) for v in np.geomspace(1, total, n_steps)})


def randomisation_check(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    regions: np.ndarray,
    method: str = "gradcam",
    targets: int | Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    seed: int = 0,
    layers: Callable[[nn.Module], Sequence[nn.Module]] | None = None,
) -> RandomisationResult:
    """Model-parameter randomisation test (Adebayo et al. 2018), cascading from the top.

    For each step the top ``k`` units (:func:`cascade_units`) are re-initialised
    (:func:`randomise_parameters`), the maps recomputed for the same ``targets`` (default: each image's
    class predicted by the *trained* model, kept fixed along the cascade) and compared with the trained
    model's maps (:func:`map_similarity`) and with the ``regions`` (N, H, W bool, every one non-empty).
    ``layers``: for models outside the study's registry, a function giving a model's target layers (it is
    called on each randomised copy, whose modules are not the original's).
    """
    images = _as_image_batch(images)
    regions = np.asarray(regions).astype(bool)
    if regions.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"regions must be (N, H, W) = {(images.shape[0], *images.shape[-2:])}, got {regions.shape}")
    empty = np.where(~regions.reshape(len(regions), -1).any(axis=1))[0]
    if len(empty):
        raise ValueError(f"regions of images {empty.tolist()[:10]} are empty: pass only images with an expert region")
    total = len(cascade_units(model))
    steps = list(steps) if steps is not None else cascade_steps(model)
    bad = [k for k in steps if not isinstance(k, (int, np.integer)) or not 1 <= k <= total]
    if bad:
        raise ValueError(f"steps must be unit counts in 1..{total} (see cascade_units(model)), got {bad}")
    if targets is None:
        num_outputs = _num_outputs(model, images[:1].to(next(model.parameters()).device))
        with eval_mode(model):
            targets = _resolve_targets(model, images, None, num_outputs, 16)
    ids = [str(i) for i in range(len(images))]
    def maps_of(net: nn.Module) -> np.ndarray:
        return compute_cams(net, images, method, targets=targets, layers=None if layers is None else layers(net))

    trained = maps_of(model)
    all_maps, rows, similarities = [trained], [], []
    for step, count in enumerate([0, *steps]):
        if count == 0:
            maps, deepest = trained, "(trained model)"
        else:
            randomised = randomise_parameters(model, "cascading", layers=int(count), seed=seed)
            maps, deepest = maps_of(randomised), randomised.randomised_units[-1]
            all_maps.append(maps)
        agreement = agreement_table(maps, regions, [True] * len(ids), ids)
        similarity = map_similarity(trained, maps).assign(step=step)
        similarities.append(similarity)
        row: dict[str, Any] = {"step": step, "units_randomised": int(count), "down_to": deepest}
        row.update({f"{m}_mean": float(agreement[m].mean()) for m in RANDOMISATION_MEASURES})
        row["spearman_median"] = float(similarity["spearman"].median())
        row["flat_maps"] = int(sum(float(m.max() - m.min()) == 0.0 for m in maps))
        row["ssim_median"] = float(similarity["ssim"].median())
        rows.append(row)
    return RandomisationResult(table=pd.DataFrame(rows), maps=np.stack(all_maps), method=method,
                               similarity=pd.concat(similarities, ignore_index=True))


def randomisation_verdict(table: pd.DataFrame, max_spearman: float = 0.5, min_trained_auc: float = 0.55) -> str:
    """Whether the randomisation test passed, in one sentence built from its table.

    Passed = the maps changed (the lowest median Spearman correlation with the trained model's maps over the
    randomised steps is below ``max_spearman``; a step whose maps are all flat has no ranking, counts as
    changed and is reported) *and* the agreement with the regions did not survive (the region AUC of the
    fully cascaded model is not above the trained model's). Maps that survive randomisation reflect the
    image or the architecture, not what the model learned. When the trained model's region AUC is itself
    below ``min_trained_auc`` (chance is 0.5) there is no agreement to lose, and the check is reported as
    uninformative rather than passed.
    """
    needed = ["units_randomised", "spearman_median", "ssim_median", "region_auc_mean", "flat_maps"]
    missing = [c for c in needed if c not in table.columns]
    if missing or len(table) < 2 or table["units_randomised"].iloc[0] != 0:
        raise ValueError(f"randomisation_verdict needs randomisation_check's table (step 0 = the trained model and at "
                         f"least one randomised step); missing columns {missing}")
    first, last, randomised = table.iloc[0], table.iloc[-1], table.iloc[1:]
    ranked = randomised["spearman_median"].dropna()
    all_flat = randomised[randomised["spearman_median"].isna()]
    lowest = float(ranked.min()) if len(ranked) else math.nan
    changed = bool((len(ranked) and lowest < max_spearman) or len(all_flat))
    dropped = bool(not last["region_auc_mean"] > first["region_auc_mean"])
    informative = bool(first["region_auc_mean"] >= min_trained_auc)
    outcome = "passed" if changed and dropped else "did not pass"
    flat = (f"; from {int(all_flat['units_randomised'].iloc[0])} units on the maps are flat (no ranking left)"
            if len(all_flat) else "")
    if len(ranked):
        fall = (f"the maps' median Spearman correlation with the trained model's falls to {lowest:.2f} "
                f"({'below' if changed else 'not below'} {max_spearman}){flat}")
    else:  # every randomised step gave flat maps: there is no correlation to report
        fall = f"the maps lose all structure{flat}"
    what_happened = (
        f"as the top units are re-initialised {fall}, and with all "
        f"{int(last['units_randomised'])} units re-initialised their region AUC is {last['region_auc_mean']:.3f} "
        f"against {first['region_auc_mean']:.3f} for the trained model "
        f"({'not higher' if dropped else 'higher: agreement survives randomisation'})."
    )
    if not informative:
        return (f"The randomisation check is uninformative here: the trained model's maps do not agree with the "
                f"regions to begin with (region AUC {first['region_auc_mean']:.3f}, below {min_trained_auc}; chance "
                f"is 0.5), so there is no agreement to destroy. What happened: {what_happened}")
    return f"The randomisation check {outcome}: {what_happened}"


def randomisation_figure(result: RandomisationResult, n_images: int = 3, images: torch.Tensor | np.ndarray | None = None,
                         regions: np.ndarray | None = None):
    """Maps along the cascade: one row per image, one column per step (left: the trained model)."""
    import matplotlib.pyplot as plt

    n_images = min(n_images, result.maps.shape[1])
    steps = result.table
    fig, axes = plt.subplots(n_images, len(steps), figsize=(1.7 * len(steps), 1.8 * n_images), squeeze=False)
    for r in range(n_images):
        for c in range(len(steps)):
            background = (np.asarray(images[r, 0]) if images is not None else np.zeros(result.maps.shape[-2:]))
            region = regions[r] if regions is not None else None
            name = "trained" if c == 0 else f"top {int(steps['units_randomised'].iloc[c])}"
            overlay(background, result.maps[c, r], region=region, ax=axes[r, c], title=name if r == 0 else None)
    fig.tight_layout()
    return fig


def faithfulness_table(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    methods: Sequence[str],
    targets: int | Sequence[int] | None = None,
    *,
    metric: str = "road",
    percentiles: Sequence[int] = DEFAULT_ROAD_PERCENTILES,
    random_baseline: bool = True,
    seed: int = 0,
    layers: Sequence[nn.Module] | None = None,
    **identifiers: Any,
) -> pd.DataFrame:
    """Per-image faithfulness (:func:`faithfulness`) of every CAM method's maps for one model.

    With ``random_baseline`` a row set for uniformly random maps (``method="random map"``) is added: the
    level a method has to beat to be called faithful. ``identifiers`` become columns (scenario, backbone ...);
    ``layers`` overrides the target layers (models outside the study's registry).
    """
    unknown = [m for m in methods if m not in CAM_METHODS]
    if unknown:
        raise ValueError(f"unknown CAM method(s) {unknown}; choose from {sorted(CAM_METHODS)}")
    images = _as_image_batch(images)
    maps = {m: compute_cams(model, images, m, targets=targets, layers=layers) for m in methods}
    if random_baseline:
        maps["random map"] = np.random.default_rng(seed).random((len(images), *images.shape[-2:])).astype(np.float32)
    rows = []
    for name, cams in maps.items():
        scores = faithfulness(model, images, cams, targets=targets, method=metric, percentiles=percentiles, seed=seed)
        rows += [{**identifiers, "method": name, "image": i, metric: float(s)} for i, s in enumerate(scores)]
    return pd.DataFrame(rows)


def faithfulness_figure(table: pd.DataFrame, metric: str = "road", by: str = "backbone"):
    """Bars of the mean faithfulness per CAM method (one group of bars per ``by`` value), error bars = SEM."""
    import matplotlib.pyplot as plt

    if metric not in table.columns or "method" not in table.columns or by not in table.columns:
        raise ValueError(f"faithfulness_figure needs columns 'method', {by!r} and {metric!r} (faithfulness_table output)")
    stats_ = table.groupby([by, "method"], sort=False)[metric].agg(["mean", "sem"]).reset_index()
    methods = list(dict.fromkeys(table["method"]))
    groups = list(dict.fromkeys(table[by]))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(1.2 + 1.6 * len(groups) * max(1, len(methods) / 3), 3.2))
    for j, method in enumerate(methods):
        rows = stats_[stats_["method"] == method].set_index(by).reindex(groups)
        ax.bar(np.arange(len(groups)) + (j - (len(methods) - 1) / 2) * width, rows["mean"], width,
               yerr=rows["sem"].fillna(0.0), capsize=2, label=method, color="0.6" if method == "random map" else None)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel(f"{metric} (higher = more faithful)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def agreement_ci(
    table: pd.DataFrame,
    by: Sequence[str] = ("scenario", "backbone", "method"),
    measures: Sequence[str] = CI_MEASURES,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> pd.DataFrame:
    """Mean of each agreement measure per group with a percentile-bootstrap CI over images (long format).

    Rows: the ``by`` columns, ``measure``, ``n`` (scored images), ``mean``, ``ci_low``, ``ci_high``. The
    pointing-game mean is the hit rate. Groups with fewer than two scored images get a NaN interval.
    """
    from osteolib.evaluation import stats

    by = list(by)
    missing = [c for c in [*by, *measures, "note"] if c not in table.columns]
    if missing:
        raise ValueError(f"agreement_ci: the table lacks columns {missing}; pass agreement_table's output "
                         f"(measures available: {[c for c in table.columns if c in AGREEMENT_MEASURES or c.startswith('iou_')]})")
    rows = []
    for key, group in table[table["note"] == ""].groupby(by, sort=True):
        for measure in measures:
            values = group[measure].astype(float).dropna().to_numpy()
            row = {**dict(zip(by, key if isinstance(key, tuple) else (key,))), "measure": measure, "n": len(values)}
            if len(values) >= 2:
                ci = stats.bootstrap_ci(np.mean, values, n_boot=n_boot, seed=seed, alpha=alpha)
                row.update(mean=ci.estimate, ci_low=ci.ci_low, ci_high=ci.ci_high)
            else:
                row.update(mean=float(values.mean()) if len(values) else math.nan, ci_low=math.nan, ci_high=math.nan)
            rows.append(row)
    return pd.DataFrame(rows)


def agreement_ci_wide(ci_table: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """:func:`agreement_ci`'s rows as one row per group, one "mean [low, high]" column per measure (for papers)."""
    by = [c for c in ci_table.columns if c not in ("measure", "n", "mean", "ci_low", "ci_high")]
    text = ci_table.assign(value=[f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]" for m, lo, hi in
                                  zip(ci_table["mean"], ci_table["ci_low"], ci_table["ci_high"])])
    wide = text.pivot_table(index=by, columns="measure", values="value", aggfunc="first", sort=False).reset_index()
    counts = ci_table.groupby(by, sort=False)["n"].max().rename("n").reset_index()
    return counts.merge(wide, on=by)


def compare_agreement(
    table: pd.DataFrame,
    measures: Sequence[str] = CI_MEASURES,
    by: Sequence[str] = ("backbone", "method"),
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Per-image agreement compared between scenarios (image = grouping factor), Holm-corrected over all tests.

    For each ``by`` group and measure :func:`osteolib.evaluation.stats.agreement_model` fits ``measure ~ scenario`` with a
    random intercept per image (or OLS with the image as a factor, as it decides); every scenario term
    (against ``random`` where present) is one test of the family. Models that cannot be fitted (e.g. a
    measure constant in the group) are kept as rows with a ``note`` and left out of the family.
    """
    from osteolib.evaluation import stats

    by = list(by)
    missing = [c for c in [*by, *measures, "scenario", "image_id"] if c not in table.columns]
    if missing:
        raise ValueError(f"compare_agreement: the table lacks columns {missing}")
    if table["scenario"].nunique() < 2:
        raise ValueError("compare_agreement needs at least two scenarios in the table")
    rows = []
    scored = table[table["note"] == ""] if "note" in table.columns else table
    for key, group in scored.groupby(by, sort=True):
        ident = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        for measure in measures:
            try:
                fit = stats.agreement_model(group.drop(columns=["method"]) if "method" in by else group,
                                            measure, fixed="scenario", group="image_id", alpha=alpha)
            except (ValueError, RuntimeError) as err:
                rows.append({**ident, "measure": measure, "term": "", "note": str(err)})
                continue
            for _, coef in fit.coefficients.iterrows():
                if coef["term"] == "Intercept":
                    continue
                rows.append({**ident, "measure": measure, "term": coef["term"], "estimate": coef["estimate"],
                             "ci_low": coef["ci_low"], "ci_high": coef["ci_high"], "p_value": coef["p_value"],
                             "model": fit.method, "n_obs": fit.n_obs, "n_images": fit.n_groups, "note": ""})
    out = pd.DataFrame(rows)
    tested = out["note"] == "" if len(out) else pd.Series(dtype=bool)
    out["p_holm"], out["significant"] = math.nan, False
    if tested.any():
        holm = stats.holm(out.loc[tested, "p_value"].to_numpy(), alpha=alpha)
        out.loc[tested, "p_holm"] = holm.p_adjusted
        out.loc[tested, "significant"] = holm.reject
    out["family_size"] = int(tested.sum())
    return out
