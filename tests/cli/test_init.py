"""`osteo init` and the runner's check of data-set specs before any kernel starts."""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from osteolib.cli.init import guess_patient_pattern
from osteolib.cli.osteo import main
from osteolib.cli.profiles import ProfileError, check_profile, load_profile


def class_folder(root: Path, names: dict[str, list[str]]) -> Path:
    rng = np.random.default_rng(0)
    for label, files in names.items():
        for name in files:
            path = root / label / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(path)
    return root


@pytest.fixture
def lab(tmp_path) -> Path:
    return class_folder(tmp_path / "lab xrays", {"normal": ["P01_a.png", "P01_b.png", "P02_a.png"],
                                                 "osteoporosis": ["P03_a.png", "sub/P04_a.png"]})


def test_init_writes_a_commented_profile_and_never_overwrites(lab, tmp_path, capsys):
    out = tmp_path / "profiles" / "mine.yaml"
    assert main(["init", str(lab), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "normal" in printed and "3" in printed and "4 patients" in printed
    text = out.read_text()
    assert text.startswith("# Your own X-rays") and "real: 128" in text  # the template's comments stay
    raw = yaml.safe_load(text)
    assert raw["name"] == "mine"
    step = raw["steps"][0]["parameters"]
    assert step["dataset"] == {"kind": "folder", "root": str(lab.resolve()),
                               "patient_from": "^(?P<patient>[A-Za-z]*\\d+)[_\\-]"}
    check_profile(load_profile(out))  # the written profile passes the runner's checks
    before = out.read_text()
    assert main(["init", str(lab), "--out", str(out)]) == 1
    assert "exists; it is not overwritten" in capsys.readouterr().out and out.read_text() == before


def test_init_warns_without_patient_ids(tmp_path, capsys):
    folder = class_folder(tmp_path / "anon", {"a": ["x.png", "y.png"], "b": ["z.png"]})
    assert main(["init", str(folder), "--out", str(tmp_path / "p.yaml")]) == 0
    assert "no patient ids found" in capsys.readouterr().out
    assert "\n        # patient_from:" in (tmp_path / "p.yaml").read_text()  # left commented


def test_init_refuses_a_folder_without_class_folders(tmp_path, capsys):
    (tmp_path / "flat").mkdir()
    assert main(["init", str(tmp_path / "flat"), "--out", str(tmp_path / "p.yaml")]) == 1
    assert "no sub-folder holding images" in capsys.readouterr().out and not (tmp_path / "p.yaml").exists()


def test_guess_patient_pattern():
    assert guess_patient_pattern(["P1_a.png", "P1_b.png", "P2_a.png"])[1] == 2
    assert guess_patient_pattern(["a.png", "b.png"]) == (None, 2)


def write_profile(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def test_shipped_own_data_profile_is_refused_until_its_root_is_set():
    with pytest.raises(ProfileError, match=r"profile own_data, step 00_data_audit, dataset.root: 'CHANGE_ME/my_xrays' "
                                           r"is the placeholder"):
        check_profile(load_profile("own_data"))
    check_profile(load_profile("own_data"), data=False)  # everything else in it matches the notebooks


def test_runner_checks_specs_of_the_target_and_the_pool_before_running(lab, tmp_path):
    bad = write_profile(tmp_path, f"""
        name: mine
        steps:
          - notebook: 00_data_audit
            parameters:
              dataset: {{kind: folder, root: '{lab}', patient_from: '^(?P<patient>Q\\d+)_'}}
          - notebook: 01_chest_mae
            parameters:
              chest_datasets: [synthetic_chest, {{kind: folder, root: '{tmp_path}/nowhere', labels: none}}]
        """)
    with pytest.raises(ProfileError) as info:
        check_profile(load_profile(bad))
    text = str(info.value)
    assert "profile mine, step 00_data_audit, dataset.patient_from: " in text and "matches none of the 5" in text
    assert "profile mine, step 01_chest_mae, chest_datasets[1].root: folder not found" in text
    # the runner stops before a run folder is made
    assert main(["run", "--profile", str(bad), "--runs-dir", str(tmp_path / "runs"), "--quiet"]) == 1
    assert not (tmp_path / "runs").exists()


def test_runner_checks_classes_against_a_spec(lab, tmp_path):
    profile = write_profile(tmp_path, f"""
        name: mine
        steps:
          - notebook: 00_data_audit
            parameters:
              dataset: {{kind: folder, root: '{lab}'}}
              classes: [osteoporosis, normal, osteopenia]
        """)
    with pytest.raises(ProfileError, match=r"step 00_data_audit, classes: .*not in the data \['osteopenia'\]"):
        check_profile(load_profile(profile))
    profile.write_text(profile.read_text().replace(", osteopenia]", "]\n      positive_class: osteoporosis"))
    check_profile(load_profile(profile))
