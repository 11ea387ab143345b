"""A multi-scale DenseNet121 classifier (after Sedai et al. 2018) whose scales can be explained separately.

Features are tapped after dense blocks 2, 3 and 4 (by default); each goes through global average
pooling and its own linear classifier, and the per-scale logits are combined per class with learned
*layer-relevance weights* ``h`` (B scales x C classes)::

    logit_c = sum_b h_bc * logit_bc,        h_bc >= 0,  sum_b h_bc = 1 for every class c.

The convex combination is kept by a softmax over the scales of an unconstrained parameter
(``relevance.logits``, initialised to zero = equal weights) rather than by Sedai et al.'s penalty
``lambda * sum_c (1 - sum_b h_bc)`` with clipping: the softmax holds the constraint exactly at every
step, needs no extra loss term (so the one fit path of the project trains it unchanged) and no
penalty weight to tune.

Where the features are tapped: DenseNet's block outputs are raw concatenations of its layers'
convolutions; every consumer of a block output first applies BatchNorm + ReLU (the next transition's
``norm`` for blocks 1-3, ``norm5`` for block 4). The taps are exactly those BN+ReLU outputs, at the
block's own resolution (before the transition's 1x1 convolution and 2x2 pooling). So every scale's
feature map is non-negative and normalised like the one the plain DenseNet pools (``norm5``), the
taps reuse the backbone's own normalisation (no new parameters between encoder and heads), and each
scale is "GAP + linear", for which the class activation map ``M_bc = sum_k w_bck A_bk`` is exact:
its spatial mean plus the bias *is* the scale's logit (see ``osteolib.explain.multiscale_cam``).
At an input of S pixels the taps of blocks 2, 3, 4 are S/8, S/16 and S/32 wide with 512, 1024 and
1024 channels.

The encoder is ``create_backbone("densenet121", num_classes=0)`` stored as ``.backbone``, so its
parameters carry the plain DenseNet's names under the prefix ``backbone.``; a pretraining checkpoint
loads into it with ``model.load_pretrained_encoder(path)`` (= ``load_pretrained(model.backbone, path)``).
"""
from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from osteolib.models.backbones import create_backbone
from osteolib.models.checkpoint import LoadReport, load_pretrained
from osteolib.models.registry import register_model

DENSE_BLOCKS = ("denseblock1", "denseblock2", "denseblock3", "denseblock4")
DEFAULT_BLOCKS = ("denseblock2", "denseblock3", "denseblock4")


class ScaleOutputs(NamedTuple):
    """Per-scale results of :meth:`MultiScaleDenseNet.forward_scales`, ordered as ``model.blocks``.

    ``features[b]`` is (N, K_b, h_b, w_b), the tapped BN+ReLU map of scale b; ``logits[b]`` is
    (N, C), that scale's classifier applied to the spatial mean of ``features[b]``.
    """

    features: list[torch.Tensor]
    logits: list[torch.Tensor]


class LayerRelevance(nn.Module):
    """The (B scales, C classes) layer-relevance weights h, as a softmax over the scales of free parameters.

    A module of its own (rather than a bare parameter of the model) so that it has a name and a place
    at the output end of the network, e.g. for cascading weight randomisation from the top.
    """

    def __init__(self, num_scales: int, num_classes: int) -> None:
        super().__init__()
        # Zero logits -> equal weights 1/B: no scale is favoured before training has seen any data.
        self.logits = nn.Parameter(torch.zeros(num_scales, num_classes))

    def forward(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=0)


# Not a pretraining model: "pretraining_keys" are its heads, new at fine-tuning like a backbone's classifier.
@register_model("multiscale", encoder_prefix="backbone.", pretraining_keys=("scale_heads.", "relevance."))
class MultiScaleDenseNet(nn.Module):
    """DenseNet121 with one GAP + linear classifier per tapped dense block and learned convex scale weights.

    ``forward(x) -> (N, num_classes)`` combined logits; :meth:`forward_scales` gives the per-scale
    feature maps and logits; :meth:`relevance_weights` the (B, C) weights ``h``. ``num_classes=1``
    is a binary model with a single logit, as for the plain backbones.
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 1,
        img_size: int | tuple[int, int] = 128,
        blocks: Sequence[str] = DEFAULT_BLOCKS,
        drop_rate: float = 0.0,
        **backbone_kwargs: Any,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"MultiScaleDenseNet: num_classes must be an int >= 1 (1 = one binary logit), got {num_classes!r}")
        blocks = tuple(blocks)
        unknown = [b for b in blocks if b not in DENSE_BLOCKS]
        if unknown or not blocks:
            raise ValueError(f"MultiScaleDenseNet: blocks must be a non-empty subset of {DENSE_BLOCKS}, got {blocks!r}")
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"MultiScaleDenseNet: blocks {blocks!r} name a block twice")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"MultiScaleDenseNet: drop_rate must be in [0, 1), got {drop_rate}")
        # Shallow to deep, whatever order the caller gave: scale b of every output is the b-th tap in the network.
        self.blocks: tuple[str, ...] = tuple(sorted(blocks, key=DENSE_BLOCKS.index))
        self.num_classes = num_classes
        self.config: dict[str, Any] = dict(
            num_classes=num_classes, in_chans=in_chans, img_size=img_size, blocks=self.blocks, drop_rate=drop_rate,
            **backbone_kwargs,
        )
        self.backbone = create_backbone("densenet121", num_classes=0, in_chans=in_chans, img_size=img_size, **backbone_kwargs)
        features = self.backbone.features
        self._tap_modules = {block: self._tap_module(features, block) for block in self.blocks}
        self.scale_heads = nn.ModuleList(
            nn.Linear(self._tap_modules[block].num_features, num_classes) for block in self.blocks
        )
        self.head_drop = nn.Dropout(drop_rate)
        self.relevance = LayerRelevance(len(self.blocks), num_classes)

    @staticmethod
    def _tap_module(features: nn.Module, block: str) -> nn.Module:
        """The BatchNorm(+ReLU) module that first consumes ``block``'s output: next transition's norm, or norm5."""
        index = DENSE_BLOCKS.index(block) + 1
        return features.norm5 if index == 4 else getattr(features, f"transition{index}").norm

    def tap_modules(self) -> list[nn.Module]:
        """The modules whose outputs are the per-scale feature maps (targets for layer-hooking explainers)."""
        return [self._tap_modules[block] for block in self.blocks]

    def backbone_kwargs(self) -> dict[str, Any]:
        """Arguments for ``create_backbone("densenet121", ...)`` that give an encoder with ``.backbone``'s weights."""
        return {k: v for k, v in self.config.items() if k not in ("num_classes", "blocks", "drop_rate")}

    def relevance_weights(self) -> torch.Tensor:
        """The layer-relevance weights h, (B scales, C classes), non-negative and summing to 1 over the scales."""
        return self.relevance()

    def forward_scales(self, x: torch.Tensor) -> ScaleOutputs:
        """Run the encoder up to the deepest tapped block; return every tap's feature map and logits."""
        if x.dim() != 4:
            raise ValueError(f"MultiScaleDenseNet expects images (N, C, H, W), got shape {tuple(x.shape)}")
        taps: dict[str, torch.Tensor] = {}
        deepest = self.blocks[-1]
        for name, module in self.backbone.features.named_children():
            if name.startswith("transition") and f"denseblock{name[len('transition'):]}" in taps:
                # The transition's own norm produced the tap already; the rest (1x1 conv, pool) continues from it.
                for child in list(module.children())[1:]:
                    x = child(x)
                continue
            x = module(x)
            if name in self.blocks:
                x = self._tap_modules[name](x)
                taps[name] = x
                if name == deepest:
                    break  # later blocks feed no tap: not computing them saves time and memory
        features = [taps[block] for block in self.blocks]
        logits = [
            head(self.head_drop(feature.mean(dim=(2, 3)))) for head, feature in zip(self.scale_heads, features)
        ]
        return ScaleOutputs(features, logits)

    def combine(self, scale_logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-class convex combination of per-scale logits: sum_b h_bc * logit_bc -> (N, C)."""
        stacked = torch.stack(list(scale_logits), dim=0)  # (B, N, C)
        return (self.relevance_weights().unsqueeze(1) * stacked).sum(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(self.forward_scales(x).logits)

    def load_pretrained_encoder(
        self, checkpoint: str | os.PathLike | Mapping[str, Any], kind: str = "auto", **options: Any
    ) -> LoadReport:
        """Load a DenseNet121 pretraining checkpoint (masked CNN, rotation, plain backbone) into ``.backbone``, checked.

        The scale heads and relevance weights keep their initialisation (they are new at fine-tuning).
        """
        return load_pretrained(self.backbone, checkpoint, kind, **options)


def multiscale_densenet121(num_classes: int, in_chans: int = 1, img_size: int | tuple[int, int] = 128,
                           **kwargs: Any) -> MultiScaleDenseNet:
    """Constructor under the backbone-factory signature, for the name ``"densenet121_multiscale"``."""
    return MultiScaleDenseNet(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **kwargs)
