"""Profiles, run folders and the papermill runner."""
from __future__ import annotations

import json
import textwrap

import pytest

from osteolib import runs
from osteolib.config import ProfileError, Step, check_profile, load_profile, notebook_parameters
from osteolib.runner import RunFailed, main, run_profile, select


def write_profile(tmp_path, body: str):
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def test_every_shipped_profile_matches_its_notebooks():
    for name in ("smoke", "real"):
        profile = load_profile(name)
        check_profile(profile)  # raises on a parameter a notebook does not declare
        assert profile.executions(), name


def test_every_notebook_has_a_tagged_parameters_cell_with_run_dir_and_no_outputs():
    import nbformat

    from osteolib.config import NOTEBOOKS_DIR

    notebooks = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
    assert notebooks
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert "parameters" in code[0].metadata.get("tags", []), f"{path.name}: first code cell is not tagged"
        assert "run_dir" in notebook_parameters(path), path.name
        assert not any(c.get("outputs") for c in code), f"{path.name} is committed with outputs"


def test_grid_and_variants_expand_to_named_executions():
    step = Step("04_finetune", {"epochs": 1}, [{"crop": "a"}], {"backbone": ["d", "v"], "seed": [0, 1]})
    executions = step.executions({"image_size": 64, "epochs": 9})
    assert [e.name for e in executions] == [
        "04_finetune-crop=a-backbone=d-seed=0", "04_finetune-crop=a-backbone=d-seed=1",
        "04_finetune-crop=a-backbone=v-seed=0", "04_finetune-crop=a-backbone=v-seed=1"]
    # step parameters override shared ones, grid cells override both
    assert executions[0].parameters == {"image_size": 64, "epochs": 1, "crop": "a", "backbone": "d", "seed": 0}


def test_profile_errors_name_the_problem(tmp_path):
    with pytest.raises(ProfileError, match="unknown profile 'nope'"):
        load_profile("nope")
    bad_key = write_profile(tmp_path, """
        name: t
        steps:
          - notebook: 00_data_audit
            parameters: {no_such_parameter: 1}
        """)
    with pytest.raises(ProfileError, match="'no_such_parameter' is not declared"):
        check_profile(load_profile(bad_key))
    missing_nb = write_profile(tmp_path, """
        steps:
          - notebook: 99_missing
        """)
    with pytest.raises(ProfileError, match="99_missing.ipynb does not exist"):
        check_profile(load_profile(missing_nb))
    bad_grid = write_profile(tmp_path, """
        steps:
          - notebook: 00_data_audit
            grid: {split_seed: 3}
        """)
    with pytest.raises(ProfileError, match="must be a non-empty list"):
        load_profile(bad_grid)


def test_select_only_and_from():
    profile = load_profile("smoke")
    assert [e.notebook for e in select(profile, only=["00"])] == ["00_data_audit"]
    with pytest.raises(ProfileError, match="matches no notebook"):
        select(profile, start="77")


def test_new_runs_never_share_a_folder_and_find_follows_parents(tmp_path):
    first = runs.new_run("t", root=tmp_path)
    second = runs.new_run("t", root=tmp_path, parent=first.path)
    assert first.path != second.path
    (first.data / "manifest.csv").write_text("x")
    assert second.find("data/manifest.csv") == first.data / "manifest.csv"
    with pytest.raises(FileNotFoundError, match="written by an earlier notebook"):
        second.find("data/nothing.csv")
    info = json.loads((second.path / "run.json").read_text())
    assert info["parent"] == str(first.path) and info["environment"]["packages"]["torch"]


@pytest.mark.slow
def test_failing_notebook_stops_the_run_naming_the_cell_and_keeps_outputs(tmp_path):
    profile = write_profile(tmp_path, """
        name: failing
        steps:
          - notebook: 00_data_audit
            parameters: {dataset: no_such_dataset}
        """)
    with pytest.raises(RunFailed, match=r"00_data_audit failed in cell \d+ .*unknown data set 'no_such_dataset'"):
        run_profile(profile, runs_dir=tmp_path / "runs", log_output=False)
    (run_dir,) = (tmp_path / "runs").iterdir()
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "failed" and info["executions"][0]["status"] == "failed"
    assert (run_dir / "notebooks" / "00_data_audit.ipynb").is_file()  # the executed copy, with the traceback
    # the command-line entry point reports the same as an error exit
    assert main(["run", "--profile", str(profile), "--runs-dir", str(tmp_path / "runs"), "--quiet"]) == 1
    assert len(list((tmp_path / "runs").iterdir())) == 2  # a second, separate run folder


@pytest.mark.slow
def test_smoke_audit_runs_end_to_end(tmp_path):
    run = run_profile("smoke", only=["00"], parent=None, runs_dir=tmp_path / "runs", log_output=False,
                      overrides={"image_size": 48})
    def strict(constant):
        raise AssertionError(f"audit.json holds {constant}, which is not JSON")

    summary = json.loads((run.path / "data" / "audit.json").read_text(), parse_constant=strict)
    assert summary["n_images"] > 100 and set(summary["images_per_split"]) == {"train", "val", "test"}
    assert 0.0 < summary["normalisation"]["mean"] < 1.0
    assert (run.path / "figures" / "00_sample_grid.png").is_file()
    assert (run.path / "data" / "split.csv").is_file()
    assert json.loads((run.path / "run.json").read_text())["status"] == "complete"


@pytest.mark.slow
@pytest.mark.real_data
def test_real_profile_audits_the_nih_subset(tmp_path, real_data_root):
    run = run_profile("real", only=["00"], runs_dir=tmp_path / "runs", log_output=False,
                      overrides={"data_root": str(real_data_root)})
    summary = json.loads((run.path / "data" / "audit.json").read_text())
    assert summary["n_images"] == 1000 and summary["n_patients"] == 682
    assert summary["with_expert_region"] == 44  # the 49 radiologist boxes fall on 44 images
    assert (run.path / "figures" / "00_sample_grid.png").is_file()
