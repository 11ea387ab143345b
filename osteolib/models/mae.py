"""Masked autoencoder (MAE, He et al. 2022) for single-channel X-rays, built from timm's ViT parts.

The encoder is a ViT whose parameters carry timm ``VisionTransformer`` names (``cls_token``,
``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.*``, ``norm.*``) so that it loads 1:1 into the
fine-tuning ViT from ``create_backbone("vit_small")``; everything that exists only for
pretraining is named ``decoder_*`` or ``mask_token`` (as registered below; see ``osteolib.models.checkpoint``).
Here ``pos_embed`` is a fixed sin-cos buffer; timm's ViT holds a learnable ``pos_embed`` of the
same shape, so loading copies the table in as its starting value and fine-tuning may adapt it
(a different patch grid is refused unless ``load_pretrained(..., resize_pos_embed=True)``).

Training step: split the image into patches, hide ``mask_ratio`` of them, let the encoder see
only the visible ones (plus the class token), let a light decoder reconstruct every patch from the
encoded visible tokens and a shared mask token, and score only the hidden patches. The default
ratio is 0.9: X-rays are more redundant than natural images (0.75 in the paper), so more must be
hidden for the task to stay hard.

``mask_weights`` bias *which* patches are hidden (the "center crop" scenario concentrates masking
on the diagnostic region). The patch mask helpers, patchify/unpatchify and the loss are shared
with the masked CNN (``masked_cnn.py``) through :mod:`osteolib.models.patches`, so both pretraining
models behave alike for the training loop and the figures.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.layers import LayerNorm, PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from osteolib.models.patches import (
    PatchMask,
    masked_patch_loss,
    normalise_patches,
    num_visible,
    patchify,
    reconstruct_in_eval_mode,
    sample_patch_mask,
    sincos_pos_embed_2d,
    unpatchify,
)
from osteolib.models.registry import register_model
from osteolib.utils import size_pair

# normalise_patches stays importable from here (osteolib.models.mae.normalise_patches / .patchify are used by
# the pretraining stage and its tests); the patch helpers themselves live in osteolib.models.patches.
__all__ = ["VIT_SMALL", "MaskedAutoencoderViT", "mae_vit_small", "normalise_patches", "patchify"]


# ViT-small's shape: a MAE with these values corresponds to create_backbone("vit_small").
VIT_SMALL = dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0)


@register_model("mae", encoder_prefix="", pretraining_keys=("decoder_", "mask_token"))
class MaskedAutoencoderViT(nn.Module):
    """MAE with a timm-named ViT encoder and a light transformer decoder, for any image/patch size.

    ``forward(imgs, mask_ratio=None, mask_weights=None, generator=None) -> (loss, pred, mask)``:
    ``pred`` (B, L, p*p*C) are the predicted patches (standardised per patch when
    ``norm_pix_loss``), ``mask`` (B, L) is 1 where a patch was hidden. Position embeddings are
    fixed 2-D sin-cos tables (buffers, not learned), so they are the same whatever the data.
    """

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
        """Figure panels (see ``patches.reconstruction_panels``) plus ``loss``, computed in eval mode."""
        return reconstruct_in_eval_mode(self, imgs, mask_ratio, mask_weights, generator)


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
