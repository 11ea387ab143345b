"""Masked patch modelling shared by the two pretraining models (ViT MAE and masked CNN).

Patches (:func:`patchify` / :func:`unpatchify`, row-major like timm's ``PatchEmbed``), the fixed 2-D
sine-cosine position tables of the MAE (:func:`sincos_pos_embed_2d`), random -- optionally weighted --
patch masks (:func:`sample_patch_mask`, :class:`PatchMask`), the loss on hidden patches only
(:func:`masked_patch_loss`) and the reconstruction-figure panels (:func:`reconstruction_panels`,
:func:`reconstruct_in_eval_mode`). Both models use these, so they behave alike for the training loop and
the figures; neither model file imports the other.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from osteolib.utils import eval_mode, size_pair



def sincos_pos_embed_2d(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = True) -> np.ndarray:
    """Fixed 2-D sine-cosine position table, shape ``(cls + gh*gw, embed_dim)``, float32.

    The first half of the channels encodes the patch row, the second half the column; each half
    is ``[sin(pos * w_k), cos(pos * w_k)]`` for frequencies ``w_k = 10000^(-k / (D/4))``. Rows
    follow the patch order of ``PatchEmbed`` (row-major). The class token's row is zero (it has
    no position). Every patch row has squared norm ``D/2`` and the dot product of two rows depends
    only on their offset, which is what makes the table position-*relative* for attention.
    """
    if embed_dim % 4:
        raise ValueError(f"sincos_pos_embed_2d: embed_dim must be a multiple of 4, got {embed_dim}")
    grid_h, grid_w = size_pair(grid_size, "grid_size")
    quarter = embed_dim // 4
    frequencies = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")

    def encode(positions: np.ndarray) -> np.ndarray:
        angles = np.outer(positions.reshape(-1), frequencies)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([encode(rows), encode(cols)], axis=1)
    if cls_token:
        table = np.concatenate([np.zeros((1, embed_dim)), table], axis=0)
    return table.astype(np.float32)


@dataclass(frozen=True)
class PatchMask:
    """Which patches a pretraining step hides.

    ``mask`` (B, L) is 1.0 for hidden patches (to reconstruct) and 0.0 for visible ones;
    ``ids_keep`` (B, K) are the visible patch indices; ``ids_restore`` (B, L) puts a sequence
    ordered [visible..., hidden...] back into patch order.
    """

    mask: torch.Tensor
    ids_keep: torch.Tensor
    ids_restore: torch.Tensor


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches left visible: ``round(L * (1 - mask_ratio))``, at least one, and at least one hidden when
    ``mask_ratio > 0`` (a step with nothing to reconstruct has no loss)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if mask_ratio > 0 and num_patches < 2:
        raise ValueError(f"cannot mask {num_patches} patch(es): use a smaller patch_size or a larger image")
    most = num_patches - 1 if mask_ratio > 0 else num_patches
    return max(1, min(most, int(round(num_patches * (1.0 - mask_ratio)))))


def sample_patch_mask(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    *,
    mask_weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> PatchMask:
    """Draw a random patch mask per sample, optionally biased by ``mask_weights``.

    Without weights every patch is equally likely to be hidden (uniform noise, argsort). With
    non-negative ``mask_weights`` of shape (B, L) or (L,), the hidden set is drawn without
    replacement with probability proportional to the weights (Gumbel-top-k: the patches with the
    largest ``log w + Gumbel noise`` are hidden), so heavily weighted patches (the diagnostic
    region) are hidden first. Zero-weight patches are hidden only once every positive-weight patch
    is. The noise comes from ``generator`` when given, so masks are reproducible.
    """
    keep = num_visible(num_patches, mask_ratio)
    noise_device = generator.device if generator is not None else device
    noise = torch.rand(batch_size, num_patches, generator=generator, device=noise_device)
    if device is not None:
        noise = noise.to(device)
    if mask_weights is not None:
        weights = torch.as_tensor(mask_weights, dtype=torch.float32, device=noise.device)
        if weights.shape not in ((batch_size, num_patches), (num_patches,)):
            raise ValueError(
                f"mask_weights must have shape ({batch_size}, {num_patches}) or ({num_patches},) "
                f"(one weight per patch), got {tuple(weights.shape)}"
            )
        if not torch.isfinite(weights).all() or (weights < 0).any():
            raise ValueError("mask_weights must be finite and non-negative")
        gumbel = -torch.log(-torch.log(noise.clamp(1e-12, 1.0 - 1e-7)))
        # The floor keeps zero weights finite: they sort after every positive weight (a gap of ~28
        # nats in log space) but stay randomly ordered among themselves instead of by index.
        noise = torch.log(weights.clamp_min(1e-12)).expand(batch_size, num_patches) + gumbel
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: low scores stay visible, high scores are hidden
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch_size, num_patches, device=noise.device)
    mask[:, :keep] = 0.0
    mask = torch.gather(mask, 1, ids_restore)
    return PatchMask(mask=mask, ids_keep=ids_shuffle[:, :keep], ids_restore=ids_restore)


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches in row-major order, pixels (row, col, channel) inside."""
    batch, channels, height, width = imgs.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not a multiple of patch_size {patch_size}")
    grid_h, grid_w = height // patch_size, width // patch_size
    x = imgs.reshape(batch, channels, grid_h, patch_size, grid_w, patch_size)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(batch, grid_h * grid_w, patch_size * patch_size * channels)


def unpatchify(
    patches: torch.Tensor, patch_size: int, grid_size: int | tuple[int, int], channels: int = 1
) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, L, p*p*C) -> (B, C, gh*p, gw*p)."""
    grid_h, grid_w = size_pair(grid_size, "grid_size")
    batch, length, dim = patches.shape
    if length != grid_h * grid_w or dim != patch_size * patch_size * channels:
        raise ValueError(
            f"patches of shape {tuple(patches.shape)} do not fit a {grid_h}x{grid_w} grid of "
            f"{patch_size}x{patch_size}x{channels} patches"
        )
    x = patches.reshape(batch, grid_h, grid_w, patch_size, patch_size, channels)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(batch, channels, grid_h * patch_size, grid_w * patch_size)


def normalise_patches(patches: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-patch standardised pixels and the (mean, std) used, for normalised-target losses."""
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + eps).sqrt()
    return (patches - mean) / std, mean, std


def masked_patch_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool, loss: str = "l2"
) -> torch.Tensor:
    """Mean per-patch error over the hidden patches only (visible patches contribute nothing).

    Computed in float32 whatever the autocast precision, so bf16 training keeps an exact loss.
    ``norm_pix_loss`` standardises each target patch first: the model then learns local structure
    (edges, trabecular texture) rather than the patch's brightness, as in the MAE paper.
    """
    pred, target = pred.float(), target.float()
    if norm_pix_loss:
        target = normalise_patches(target)[0]
    if loss == "l2":
        per_patch = (pred - target).pow(2).mean(dim=-1)
    elif loss == "l1":
        per_patch = (pred - target).abs().mean(dim=-1)
    else:
        raise ValueError(f"loss must be 'l1' or 'l2', got {loss!r}")
    return (per_patch * mask).sum() / mask.sum()


def reconstruction_panels(
    imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix_loss: bool, fill: float = 0.0
) -> dict[str, torch.Tensor]:
    """Images for a reconstruction figure, each (B, C, H, W) in the input's pixel space.

    ``original``; ``masked`` (hidden patches set to ``fill``); ``reconstruction`` (every patch as
    predicted); ``pasted`` (visible patches from the original, hidden ones predicted); ``mask``
    (B, 1, H, W), 1 where hidden. With normalised targets the prediction is mapped back with each
    original patch's own mean and std (the model never predicts those; this is for display only), so
    ``pasted``'s coarse brightness comes from the hidden patches themselves; ``prediction`` is the model's
    own output on the hidden patches alone (standardised per patch with normalised targets, visible
    patches 0): what the model has learnt, with nothing taken from the hidden original.
    """
    imgs = imgs.float()
    channels, height, width = imgs.shape[1:]
    grid = (height // patch_size, width // patch_size)
    target = patchify(imgs, patch_size)
    pred = pred.float()
    hidden = mask[..., None].float()
    own = unpatchify(pred * hidden, patch_size, grid, channels)
    if norm_pix_loss:
        _, mean, std = normalise_patches(target)
        pred = pred * std + mean
    mask_img = unpatchify(hidden.expand(-1, -1, patch_size * patch_size), patch_size, grid, 1)
    return {
        "original": imgs,
        "masked": unpatchify(target * (1 - hidden) + fill * hidden, patch_size, grid, channels),
        "reconstruction": unpatchify(pred, patch_size, grid, channels),
        "pasted": unpatchify(target * (1 - hidden) + pred * hidden, patch_size, grid, channels),
        "prediction": own,
        "mask": mask_img,
    }


def reconstruct_in_eval_mode(
    model: nn.Module,
    imgs: torch.Tensor,
    mask_ratio: float | None = None,
    mask_weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Figure panels from one masked forward pass of a pretraining model (MAE or masked CNN).

    Runs in eval mode, so BatchNorm statistics are not updated by a figure, and restores the mode.
    """
    with eval_mode(model), torch.no_grad():
        loss, pred, mask = model(imgs, mask_ratio=mask_ratio, mask_weights=mask_weights, generator=generator)
        panels = reconstruction_panels(imgs, pred, mask, model.patch_size, model.norm_pix_loss)
    panels["loss"] = loss
    return panels
