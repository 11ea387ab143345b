"""Layer 7, report: results tables and the notebook viewer."""
from __future__ import annotations

from osteolib.report import viewer
from osteolib.report.viewer import (
    PAPER_FIGURES,
    ViewerModel,
    viewer_models,
    CamViewer,
    cam_viewer,
    copy_paper_figures,
)

__all__ = [
    "viewer",
    "PAPER_FIGURES",
    "ViewerModel",
    "viewer_models",
    "CamViewer",
    "cam_viewer",
    "copy_paper_figures",
]
