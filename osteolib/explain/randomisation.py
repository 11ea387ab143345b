"""Model-parameter randomisation, the sanity check of Adebayo et al. 2018.

:func:`randomise_parameters` returns a copy of a model with its weights re-initialised from the top
(cascading, over the units of :func:`cascade_units`) or all at once; :func:`map_similarity` compares the
maps before and after.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity
from torch import nn

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
