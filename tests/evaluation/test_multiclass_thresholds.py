"""with_validation_thresholds on a three-class table: no threshold column (the prediction is the most probable
class), so notebook 05 runs on several classes."""
from __future__ import annotations

import numpy as np
import pandas as pd

from osteolib import evaluation


def test_three_classes_have_no_threshold():
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c"]
    frames = []
    for split in ("val", "test"):
        target = np.arange(30) % 3
        probs = rng.dirichlet(np.ones(3), 30)
        frames.append(evaluation.prediction_table([f"{split}{k}" for k in range(30)], [classes[t] for t in target],
                                                  probs, classes, split, scenario="random", backbone="densenet121",
                                                  seed=0, fold=0))
    table = pd.concat(frames, ignore_index=True)
    out = evaluation.with_validation_thresholds(table)
    assert "threshold" not in out.columns
    pd.testing.assert_frame_equal(out, table)
