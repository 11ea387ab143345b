"""The speed-up each comparison should reach (issue 22), by kind of CPU.

A CPU with native bf16 arithmetic (AVX512-BF16 or AMX flags) lets osteolib train in bf16 where the plain loop stays
in fp32, so its training goals are higher than on an AVX2-only CPU, where both compute in fp32 and the gain comes
from the cache and the data path alone. Rows without a goal here (the masked DenseNet, predictions with overlays,
the torch.compile options' own cost) are measured and shown, not judged.
"""
from __future__ import annotations

from osteolib.utils import cpu_has_bf16_flags

BF16_CAPABLE, AVX2_ONLY = "bf16-capable", "AVX2-only"

GOALS: dict[str, dict[str, float]] = {
    "mae": {BF16_CAPABLE: 1.6, AVX2_ONLY: 1.2},  # MAE pretraining vs the plain fp32 MAE loop
    "finetune": {BF16_CAPABLE: 2.0, AVX2_ONLY: 1.3},  # fine-tuning vs a plain timm loop over PNGs
    "cams": {BF16_CAPABLE: 2.5, AVX2_ONLY: 2.5},  # batched CAMs vs pytorch-grad-cam one image at a time
    "predict_csv": {BF16_CAPABLE: 0.8, AVX2_ONLY: 0.8},  # `osteo predict` (CSV only) vs the bare forward
    "cache": {BF16_CAPABLE: 3.0, AVX2_ONLY: 3.0},  # ImageCache build vs a plain PIL decode-and-resize loop
}


def cpu_tier() -> str:
    """Which column of :data:`GOALS` applies on this machine (picked by the CPU's flags, as the issue says)."""
    return BF16_CAPABLE if cpu_has_bf16_flags() else AVX2_ONLY


def goal(key: str | None, tier: str) -> float | None:
    return None if key is None else GOALS[key][tier]
