"""Layer 7, report: what a finished run shows, read from its files.

* :mod:`osteolib.report.results`: the grid's results from the prediction files -- per-run test metrics, their
  summary over seeds, Table 1 (``tables/table1.csv|md|tex``) and the label-efficiency table and figure
  (:func:`write_results_tables`).
* :mod:`osteolib.report.viewer`: the notebook's interactive Grad-CAM viewer (:func:`cam_viewer`) and the copy of a
  run's paper figures into the repository (:func:`copy_paper_figures`).

Report sits above :mod:`osteolib.stages` (it reads what the stages wrote and loads their models); only the CLI
imports it.
"""
from __future__ import annotations

from osteolib.report import results, viewer
from osteolib.report.results import (
    BACKBONE_LABELS,
    SCENARIO_LABELS,
    collect_results,
    label_efficiency_figure,
    label_efficiency_table,
    write_results_tables,
)
from osteolib.report.viewer import (
    PAPER_FIGURES,
    ViewerModel,
    viewer_models,
    CamViewer,
    cam_viewer,
    copy_paper_figures,
)

__all__ = [
    "results",
    "viewer",
    "BACKBONE_LABELS",
    "SCENARIO_LABELS",
    "collect_results",
    "write_results_tables",
    "label_efficiency_table",
    "label_efficiency_figure",
    "PAPER_FIGURES",
    "ViewerModel",
    "viewer_models",
    "CamViewer",
    "cam_viewer",
    "copy_paper_figures",
]
