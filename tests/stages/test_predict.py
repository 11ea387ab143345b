"""``osteo predict`` on a tiny run made by notebooks 00 and 04: the same test images give exactly the probabilities
notebook 04 wrote, an unreadable file is reported while the others go through, and nothing is overwritten."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from osteolib.cli.osteo import main, run_profile
from osteolib.data import read_manifest

TINY_PROFILE = """\
name: tiny_predict
description: a tiny run for osteo predict's test
parameters: {data_root: null, image_size: 32, seed: 0}
steps:
  - notebook: 00_data_audit
    parameters:
      dataset: synthetic_shoulder
      dataset_options: {n_patients: 40, difficulty: 0.2, confounder: 0.0, size: 48}
      split_seed: 0
  - notebook: 04_finetune
    parameters: {scenario: random, backbone: densenet121, epochs: 1, batch_size: 8, warmup_epochs: 0,
                 base_lr: 0.02, layer_decay: null, randaug_magnitude: null}
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run with one fine-tuned DenseNet (minutes on 2 cores); OSTEO_TEST_PREDICT_RUN reuses one made earlier."""
    if os.environ.get("OSTEO_TEST_PREDICT_RUN"):
        return Path(os.environ["OSTEO_TEST_PREDICT_RUN"])
    root = tmp_path_factory.mktemp("predict")
    (root / "tiny.yaml").write_text(TINY_PROFILE)
    return run_profile(str(root / "tiny.yaml"), runs_dir=root / "runs", log_output=False).path


def _test_split(run: Path) -> tuple[pd.DataFrame, list[str]]:
    predictions = pd.read_csv(next((run / "predictions").glob("*.csv")), dtype={"image_id": str})
    # read_manifest resolves the paths, which the file stores relative to itself
    manifest = read_manifest(run / "data" / "manifest.csv").set_index("image_id")
    test = predictions[predictions["split"] == "test"].reset_index(drop=True)
    return test, [str(p) for p in manifest.loc[test["image_id"], "path"]]


@pytest.mark.slow
def test_predict_reproduces_notebook_04_and_reports_a_broken_file(tiny_run, tmp_path, capsys):
    test, paths = _test_split(tiny_run)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"these bytes are no image")
    out = tmp_path / "out"
    assert main(["predict", "--run", str(tiny_run), *paths, str(broken), "--out", str(out)]) == 0
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    ok = table[table["status"] == "ok"].reset_index(drop=True)
    assert ok["file"].tolist() == paths
    for column in [c for c in test.columns if c.startswith("prob_")]:
        assert np.array_equal(ok[column].to_numpy(float), test[column].to_numpy(float)), column  # exact floats
    bad = table[table["status"] == "unreadable"]
    assert bad["file"].tolist() == [str(broken)] and "not a recognised image format" in bad["error"].iloc[0]
    assert f"cannot read {broken}" in capsys.readouterr().out
    assert all(Path(p).is_file() for p in ok["overlay"])
    positive = [c for c in test.columns if c.startswith("prob_")][1][len("prob_"):]
    threshold = float(ok["threshold"].iloc[0])
    assert ((ok["predicted"] == positive) == (ok[f"prob_{positive}"].astype(float) >= threshold)).all()
    # never written over: the same --out again is refused
    assert main(["predict", "--run", str(tiny_run), paths[0], "--out", str(out), "--no-overlays"]) == 1
    assert "not an empty folder" in capsys.readouterr().err


@pytest.mark.slow
def test_an_unknown_model_name_lists_the_run_s_models(tiny_run, tmp_path, capsys):
    _, paths = _test_split(tiny_run)
    assert main(["predict", "--run", str(tiny_run), "--model", "nope", paths[0], "--out", str(tmp_path / "o")]) == 1
    assert "random-densenet121-seed0-frac1.0" in capsys.readouterr().err
