"""Saliency maps through the ``grad-cam`` package.

:func:`compute_cams`: Grad-CAM, Grad-CAM++, HiResCAM, LayerCAM, EigenCAM, batched, at the right layer of every
backbone of the study (:func:`target_layers`), for single-logit binary and multi-class models. For the
multi-scale DenseNet, :func:`multiscale_cam` combines exact per-scale class activation maps with the model's
learned layer-relevance weights (no public implementation exists; it is tested by hand).

Maps are ``(H, W)`` float arrays in [0, 1] on the input's pixel grid (bright = relevant); regions are
``(H, W)`` bool arrays on the same grid, as ``ImageCache.regions`` provides them.

Binary models have one logit. Following grad-cam's ``BinaryClassifierOutputTarget``, class 1 means
"evidence for the positive class" (the logit) and class 0 "evidence for the negative class" (minus
the logit); every function here uses that convention, and the default target is the predicted class
(see :mod:`osteolib.explain.targets`).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM
from torch import nn

from osteolib.explain.targets import as_image_batch, num_outputs_of, output_target, resolve_targets
from osteolib.models import MultiScaleDenseNet, model_arch
from osteolib.utils import eval_mode

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
    images = as_image_batch(images)
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
            num_outputs = num_outputs_of(model, images[:1].to(device))
            classes = resolve_targets(model, images, targets, num_outputs, batch_size)
        with torch.enable_grad(), CAM_METHODS[method](model=model, target_layers=layers,
                                                      reshape_transform=reshape_transform) as cam:
            for start in range(0, len(images), batch_size):
                chunk = images[start:start + batch_size].to(device).detach().clone()
                # The input asks for gradients so that activations do even when every weight is frozen;
                # otherwise grad-cam's hooks see no gradient at all.
                chunk.requires_grad_(True)
                chunk_targets = None if class_agnostic else [
                    output_target(c, num_outputs, "logit") for c in classes[start:start + batch_size]
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
    images = as_image_batch(images)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    # Explicit classes are checked before any forward pass; None is resolved per batch from its logits.
    classes = None if class_idx is None else resolve_targets(model, images, class_idx, model.num_classes, batch_size)
    device = next(model.parameters()).device
    combined_parts: list[np.ndarray] = []
    per_scale_parts: list[list[np.ndarray]] = []
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size].to(device)
            outputs = model.forward_scales(chunk)
            chunk_classes = classes[start:start + batch_size] if classes is not None else resolve_targets(
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
