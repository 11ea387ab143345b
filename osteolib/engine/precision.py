"""Precision of a training run: autocast dtype and GradScaler per device, and when channels-last pays off.

:func:`choose_precision`: CUDA -> AMP (bf16 where supported, else fp16 with a GradScaler); CPU -> bf16 autocast
only on CPUs with native bf16 instructions, else fp32. Channels-last memory format goes with autocast on CNNs
(:func:`use_channels_last`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from osteolib.utils import cpu_has_bf16_flags

__all__ = ["PrecisionChoice", "cpu_supports_bf16", "choose_precision", "is_cnn", "use_channels_last"]


@dataclass(frozen=True)
class PrecisionChoice:
    """How a run computes: ``name`` "bf16" | "fp16" | "fp32", the autocast dtype (None for fp32),
    whether a GradScaler is needed (fp16 only), the device type autocast runs on, and why."""

    name: str
    autocast_dtype: torch.dtype | None
    grad_scaler: bool
    device_type: str
    reason: str


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 arithmetic (AVX512-BF16 or AMX), so bf16 autocast is fast.

    oneDNN's own check is asked first; /proc/cpuinfo flags are the fallback on builds without it.
    Without native support bf16 is emulated and slower than fp32.
    """
    try:
        if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return True
    except (AttributeError, RuntimeError):
        pass
    return cpu_has_bf16_flags()


def choose_precision(device: torch.device | str, requested: str = "auto") -> PrecisionChoice:
    """The precision for training on ``device``: CUDA -> AMP (bf16 if supported, else fp16 + GradScaler);
    CPU -> bf16 autocast when the CPU has native bf16, else fp32. ``requested`` overrides "auto"
    (an impossible request, e.g. fp16 on the CPU, is an error)."""
    device = torch.device(device)
    if requested not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be 'auto', 'bf16', 'fp16' or 'fp32', got {requested!r}")
    if requested == "fp32":
        return PrecisionChoice("fp32", None, False, device.type, "fp32 requested")
    if device.type == "cuda":
        return _cuda_precision(requested)
    if device.type == "cpu":
        return _cpu_precision(requested)
    if requested == "auto":
        return PrecisionChoice("fp32", None, False, device.type, f"no mixed precision on {device.type}")
    raise ValueError(f"precision={requested!r} is not supported on {device.type}; use 'fp32' or 'auto'")


def _cuda_precision(requested: str) -> PrecisionChoice:
    bf16_ok = torch.cuda.is_bf16_supported()
    if requested == "bf16" and not bf16_ok:
        raise ValueError("precision='bf16' requested but this GPU does not support bfloat16; use 'fp16' or 'auto'")
    if requested == "bf16" or (requested == "auto" and bf16_ok):
        return PrecisionChoice("bf16", torch.bfloat16, False, "cuda", "CUDA AMP with bfloat16")
    return PrecisionChoice("fp16", torch.float16, True, "cuda",
                           "CUDA AMP with float16 and a GradScaler" + ("" if requested == "fp16" else
                                                                       " (GPU lacks bfloat16)"))


def _cpu_precision(requested: str) -> PrecisionChoice:
    if requested == "fp16":
        raise ValueError("precision='fp16' is for CUDA; on the CPU use 'bf16', 'fp32' or 'auto'")
    native = cpu_supports_bf16()
    if requested == "bf16":
        return PrecisionChoice("bf16", torch.bfloat16, False, "cpu",
                               "bf16 requested" + ("" if native else " (emulated: this CPU has no native bf16)"))
    if native:
        return PrecisionChoice("bf16", torch.bfloat16, False, "cpu", "CPU has native bf16 (AVX512-BF16/AMX)")
    return PrecisionChoice("fp32", None, False, "cpu", "CPU has no native bf16")


def is_cnn(model: nn.Module) -> bool:
    """A real CNN (two or more convolutions): a ViT has a single conv, its patch embedding."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) >= 2


def use_channels_last(model: nn.Module, setting: str | bool, precision: PrecisionChoice) -> bool:
    """Whether ``model`` trains in channels-last memory format (``TrainConfig.channels_last``)."""
    if setting is True or setting is False:
        return bool(setting) and any(isinstance(m, nn.Conv2d) for m in model.modules())
    # Measured: channels-last speeds up bf16 CNN training on CPU and AMP on GPU, but slows plain
    # fp32 on the CPU, so "auto" ties it to autocast.
    return is_cnn(model) and precision.autocast_dtype is not None
