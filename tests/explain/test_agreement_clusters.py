"""agreement_ci with ``cluster``: intervals over patients where a patient has several images, unchanged otherwise."""
from __future__ import annotations

import numpy as np
import pandas as pd

from osteolib import explain


def _table(patients, values):
    return pd.DataFrame({"image_id": [f"i{k}" for k in range(len(values))], "patient_id": patients,
                         "scenario": "random", "backbone": "densenet121", "method": "gradcam", "note": "",
                         "hit": values, "energy_in_region": values, "iou": values})


def test_one_image_per_patient_gives_the_image_interval():
    values = np.random.default_rng(0).uniform(size=40)
    table = _table([f"p{k}" for k in range(40)], values)
    plain = explain.agreement_ci(table, measures=["iou"], n_boot=500)
    clustered = explain.agreement_ci(table, measures=["iou"], n_boot=500, cluster="patient_id")
    pd.testing.assert_frame_equal(plain, clustered)


def test_correlated_images_widen_the_interval():
    rng = np.random.default_rng(1)
    per_patient = rng.uniform(size=10)
    values = np.repeat(per_patient, 6) + rng.normal(0, 0.01, 60)
    table = _table(np.repeat([f"p{k}" for k in range(10)], 6), values)
    plain = explain.agreement_ci(table, measures=["iou"], n_boot=500).iloc[0]
    clustered = explain.agreement_ci(table, measures=["iou"], n_boot=500, cluster="patient_id").iloc[0]
    assert clustered["mean"] == plain["mean"]
    assert clustered["ci_high"] - clustered["ci_low"] > 1.8 * (plain["ci_high"] - plain["ci_low"])
