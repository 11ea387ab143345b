"""The sizes of a suite: the full defaults (sized so that every row family together finishes in under 15 minutes on
the 2-core development CPU) and the ``--quick`` ones (tiny, for tests: the figures then mean nothing).

Full: each training measurement runs 2 warm-up steps (the first oneDNN kernels, a compilation), then steady steps
until 12 s have passed (at least 3, at most 200); 256 training images at 128 px; 32 images per CAM measurement;
1,000 files for the cache build; 64 files per prediction command. Estimated on the 2-core CPU from per-step costs
(not yet timed whole): about 13 minutes, of which the two torch.compile rows' compilations are 2-3. ``--images`` and ``--size`` override the image counts and the working size of every family.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

FAMILIES: dict[str, str] = {  # name -> what it compares (the order the suite runs them in)
    "cache": "ImageCache build (decode + resize) vs a plain PIL loop",
    "cams": "batched Grad-CAM / HiResCAM / LayerCAM vs pytorch-grad-cam one image at a time",
    "mae": "MAE ViT-S/16 pretraining (mask 0.9, 0.75) through fit vs a plain fp32 MAE loop",
    "masked_cnn": "masked DenseNet121 pretraining through fit vs a plain fp32 SimMIM loop",
    "finetune": "fine-tuning DenseNet121 and ViT-S from the cache vs a plain timm loop over PNGs",
    "precision": "fit with precision 'auto' vs each explicit choice",
    "predict": "`osteo predict` from files (CSV only; with overlays) vs the bare model forward",
}

SIZE_MULTIPLE = 32  # DenseNet121's output stride; also a multiple of the 16-px patch grid of the masked models


@dataclass(frozen=True)
class Settings:
    families: tuple[str, ...]
    quick: bool = False
    threads: int = 1
    out: Path = Path(__file__).parent / "results"
    images: int | None = None
    size: int | None = None
    seconds: float | None = None
    compile: bool | None = None
    predict_run: str | None = None
    profile: bool = False
    argv: tuple[str, ...] = field(default_factory=tuple)

    @property
    def image_size(self) -> int:
        return self.size or (32 if self.quick else 128)

    @property
    def steady_seconds(self) -> float:
        return self.seconds if self.seconds is not None else (0.0 if self.quick else 12.0)

    @property
    def use_compile(self) -> bool:
        """torch.compile rows: on in the full suite, off in --quick (a compile costs a minute whatever the size)."""
        return self.compile if self.compile is not None else not self.quick

    @property
    def warmup_steps(self) -> int:
        return 1 if self.quick else 2

    @property
    def min_steps(self) -> int:
        return 1 if self.quick else 3

    max_steps = 200

    def images_for(self, full_default: int) -> int:
        return self.images or (16 if self.quick else full_default)

    def batch_for(self, full_default: int) -> int:
        """The batch size of a training row: the study's, or 4 in --quick; never more than the images at hand."""
        return max(2, min(4 if self.quick else full_default, self.images_for(256)))

    @property
    def source_size(self) -> int:
        """Pixel size of synthetic chest PNGs written when the real NIH folder is absent (NIH's own is 1024)."""
        return 256 if self.quick else 1024
