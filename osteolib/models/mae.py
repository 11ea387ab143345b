"""Masked autoencoder (MAE, He et al. 2022) for single-channel X-rays, built from timm's ViT parts.

The encoder is a ViT whose parameters carry timm ``VisionTransformer`` names (``cls_token``,
``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.*``, ``norm.*``) so that it loads 1:1 into the
fine-tuning ViT from ``create_backbone("vit_small")``; everything that exists only for
pretraining is named ``decoder_*`` or ``mask_token`` (see ``backbones.PRETRAINING_LAYOUTS``).
Here ``pos_embed`` is a fixed sin-cos buffer; timm's ViT holds a learnable ``pos_embed`` of the
same shape, so loading copies the table in as its starting value and fine-tuning may adapt it
(a different patch grid is refused unless ``load_pretrained(..., resize_pos_embed=True)``).

Training step: split the image into patches, hide ``mask_ratio`` of them, let the encoder see
only the visible ones (plus the class token), let a light decoder reconstruct every patch from the
encoded visible tokens and a shared mask token, and score only the hidden patches. The default
ratio is 0.9: X-rays are more redundant than natural images (0.75 in the paper), so more must be
hidden for the task to stay hard.

``mask_weights`` bias *which* patches are hidden (the "center crop" scenario concentrates masking
on the diagnostic region). The patch mask helpers, patchify/unpatchify and the loss here are shared
with the masked CNN (``masked_cnn.py``), so both pretraining models behave alike for the training
loop and the figures.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from timm.layers import LayerNorm, PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from osteolib.utils import eval_mode, size_pair

# ViT-small's shape: a MAE with these values corresponds to create_backbone("vit_small").
VIT_SMALL = dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0)


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


class MaskedAutoencoderViT(nn.Module):
    """MAE with a timm-named ViT encoder and a light transformer decoder, for any image/patch size.

    ``forward(imgs, mask_ratio=None, mask_weights=None, generator=None) -> (loss, pred, mask)``:
    ``pred`` (B, L, p*p*C) are the predicted patches (standardised per patch when
    ``norm_pix_loss``), ``mask`` (B, L) is 1 where a patch was hidden. Position embeddings are
    fixed 2-D sin-cos tables (buffers, not learned), so they are the same whatever the data.
    """

    checkpoint_kind = "mae"
    backbone_name = "vit_small"

    def __init__(
        self,
        img_size: int | tuple[int, int] = 128,
        patch_size: int = 16,
        in_chans: int = 1,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        decoder_embed_dim: int = 256,
        decoder_depth: int = 4,
        decoder_num_heads: int = 8,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        mask_ratio: float = 0.9,
    ) -> None:
        super().__init__()
        height, width = size_pair(img_size, "img_size")
        if height % patch_size or width % patch_size:
            raise ValueError(f"MaskedAutoencoderViT: img_size {img_size} is not a multiple of patch_size {patch_size}")
        widths = ((embed_dim, num_heads, "embed_dim"), (decoder_embed_dim, decoder_num_heads, "decoder_embed_dim"))
        for dim, heads, what in widths:
            if dim % 4 or dim % heads:
                raise ValueError(
                    f"MaskedAutoencoderViT: {what}={dim} must be a multiple of 4 and of its head count {heads}"
                )
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"MaskedAutoencoderViT: mask_ratio must be in (0, 1), got {mask_ratio}")
        self.config: dict[str, Any] = dict(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
            decoder_num_heads=decoder_num_heads, mlp_ratio=mlp_ratio, norm_pix_loss=norm_pix_loss,
            mask_ratio=mask_ratio,
        )
        self.img_size = (height, width)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        self.mask_ratio = mask_ratio

        # Encoder: the same modules and names as timm's VisionTransformer (qkv_bias=True is its default).
        self.patch_embed = PatchEmbed(
            img_size=(height, width), patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim
        )
        self.grid_size = self.patch_embed.grid_size
        self.num_patches = self.patch_embed.num_patches
        num_visible(self.num_patches, mask_ratio)  # refuses a grid too small to hide anything
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", torch.from_numpy(sincos_pos_embed_2d(embed_dim, self.grid_size))[None])
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = LayerNorm(embed_dim)

        # Decoder: pretraining only, discarded at fine-tuning.
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer(
            "decoder_pos_embed", torch.from_numpy(sincos_pos_embed_2d(decoder_embed_dim, self.grid_size))[None]
        )
        self.decoder_blocks = nn.Sequential(
            *[Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True) for _ in range(decoder_depth)]
        )
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * in_chans)
        self._init_weights()

    def _init_weights(self) -> None:
        # As in the MAE reference: the patch projection is initialised like a linear layer (xavier on
        # its flattened kernel), tokens with a small normal, linear layers xavier, LayerNorm identity.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        proj = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(proj.data.view(proj.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def backbone_kwargs(self) -> dict[str, Any]:
        """Arguments for ``create_backbone("vit_small", ...)`` that give a ViT this encoder loads into."""
        kwargs: dict[str, Any] = dict(
            img_size=self.config["img_size"], patch_size=self.patch_size, in_chans=self.in_chans
        )
        kwargs.update({k: self.config[k] for k, v in VIT_SMALL.items() if self.config[k] != v})
        return kwargs

    def _check_input(self, imgs: torch.Tensor) -> None:
        expected = (self.in_chans, *self.img_size)
        if imgs.dim() != 4 or tuple(imgs.shape[1:]) != expected:
            raise ValueError(
                f"MaskedAutoencoderViT expects images (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(imgs.shape)}"
            )

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.patch_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        return unpatchify(patches, self.patch_size, self.grid_size, self.in_chans)

    def forward_encoder(
        self,
        imgs: torch.Tensor,
        mask_ratio: float | None = None,
        mask_weights: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, PatchMask]:
        """Encode the visible patches only: returns tokens (B, 1 + K, D) and the :class:`PatchMask`.

        ``mask_ratio=0`` encodes every patch (in shuffled order; ``ids_restore`` undoes it).
        """
        self._check_input(imgs)
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        patch_mask = sample_patch_mask(
            x.shape[0], x.shape[1], ratio, mask_weights=mask_weights, generator=generator, device=x.device
        )
        x = torch.gather(x, 1, patch_mask.ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1).to(x.dtype)
        x = self.blocks(torch.cat([cls, x], dim=1))
        return self.norm(x), patch_mask

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Predict every patch (B, L, p*p*C) from the encoded visible tokens and mask tokens."""
        x = self.decoder_embed(latent)
        batch, visible_plus_cls, dim = x.shape
        hidden = ids_restore.shape[1] + 1 - visible_plus_cls
        mask_tokens = self.mask_token.to(x.dtype).expand(batch, hidden, -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, dim))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed.to(x.dtype)
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x)[:, 1:]

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float | None = None,
        mask_weights: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pretraining step: ``(loss, pred, mask)``; the loss covers hidden patches only."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1) for a pretraining step, got {ratio}")
        latent, patch_mask = self.forward_encoder(imgs, ratio, mask_weights, generator)
        pred = self.forward_decoder(latent, patch_mask.ids_restore)
        loss = masked_patch_loss(pred, self.patchify(imgs), patch_mask.mask, self.norm_pix_loss, "l2")
        return loss, pred, patch_mask.mask

    def reconstruct(
        self,
        imgs: torch.Tensor,
        mask_ratio: float | None = None,
        mask_weights: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Figure panels (see :func:`reconstruction_panels`) plus ``loss``, computed in eval mode."""
        return reconstruct_in_eval_mode(self, imgs, mask_ratio, mask_weights, generator)


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


def mae_vit_small(img_size: int | tuple[int, int] = 128, patch_size: int = 16, **kw: Any) -> MaskedAutoencoderViT:
    """MAE with a ViT-small encoder (384-dim, 12 blocks, 6 heads) and a light decoder.

    The decoder is 256-dim with 4 blocks of 8 heads (the paper uses 512-dim x 8 blocks for ViT-B/L):
    with a few thousand X-rays a large decoder mostly adds cost, the paper reports that decoder
    depth matters little for fine-tuning, and a weaker decoder pushes more of the reconstruction
    work into the encoder, which is the part that is kept. Any argument can be overridden.
    """
    options: dict[str, Any] = dict(VIT_SMALL, decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8)
    options.update(kw)
    return MaskedAutoencoderViT(img_size=img_size, patch_size=patch_size, **options)
