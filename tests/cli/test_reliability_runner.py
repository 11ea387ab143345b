"""Nothing wrong gets through the runner quietly (issue 19): parameters checked before any kernel starts, naming the
profile line or `--set` they came from; `--set` wins over step values (or is refused for a value a step varies);
`--from`'s default parent is the latest complete run of the same profile; a killed run reads `interrupted`; and
`osteo run --resume` continues a killed run to the same tables and predictions as an uninterrupted one.

The fast tests replace the kernel with a stand-in (`execute`); the fault-injection test at the end runs the real
notebooks (00 and a two-cell 04 grid at 32 px, one epoch) and SIGKILLs `osteo run` in the middle of the grid.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import osteolib.cli.osteo as runner
from osteolib import runs
from osteolib.cli.osteo import main, run_profile
from osteolib.cli.profiles import ProfileError, check_profile, load_profile

TINY = """\
name: tiny_resume
description: 00 and a two-cell 04 grid at 32 px, one epoch
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
    grid:
      seed: [0, 1]
    after: results_tables
"""
CELLS = ["04_finetune-seed=0", "04_finetune-seed=1"]


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


@pytest.fixture
def no_kernel(monkeypatch):
    """The runner may not reach a kernel: a check that passes must fail the test here."""
    monkeypatch.setattr(runner, "check_kernel", lambda: pytest.fail("a kernel would have started"))


def first_error_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[0]


# ------------------------------------------------------------------------------------------ A: checked before work


@pytest.mark.parametrize("value, expected", [
    ("abc", "osteo: error: profile tiny_resume, step 00_data_audit: image_size=abc from --set image_size=abc: "
            "must be an int (the notebook's default is 64)"),
    ("-5", "osteo: error: profile tiny_resume, step 00_data_audit: image_size=-5 from --set image_size=-5: "
           "must be an int >= 16 pixels"),
])
def test_a_bad_set_value_fails_before_any_kernel_naming_the_set(tiny, tmp_path, capsys, no_kernel, value, expected):
    assert main(["run", "--profile", str(tiny), "--set", f"image_size={value}", "--runs-dir",
                 str(tmp_path / "runs"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0] == expected
    # 04 reports it through its own configuration dataclass, for both cells at once
    assert "step 04_finetune (2 executions): " in err and "FinetuneConfig" in err
    assert not (tmp_path / "runs").exists()  # no run folder either


def test_backbone_and_scenario_are_checked_against_the_registry_and_the_study(tiny, tmp_path, capsys, no_kernel):
    tiny.write_text(TINY.replace("backbone: densenet121", "backbone: densenet12"))
    assert main(["run", "--profile", str(tiny), "--runs-dir", str(tmp_path / "runs")]) == 1
    line = first_error_line(capsys)
    assert line.startswith("osteo: error: profile tiny_resume, step 04_finetune (2 executions): invalid "
                           "FinetuneConfig: backbone='densenet12' is unknown; choose one of ['densenet121', ")
    assert line.endswith(f"[backbone from {tiny} line 11 (step 04_finetune, parameters: backbone)]")
    tiny.write_text(TINY)
    assert main(["run", "--profile", str(tiny), "--set", "scenario=chest_mea", "--runs-dir",
                 str(tmp_path / "runs")]) == 1
    line = first_error_line(capsys)
    assert "scenario='chest_mea' is unknown; choose one of ['random', 'chest_mae', " in line
    assert line.endswith("[scenario from --set scenario=chest_mea]")


def test_missing_data_root_and_parent_are_errors_not_fallbacks(tiny, tmp_path, capsys, no_kernel):
    missing = tmp_path / "no_such_folder"
    assert main(["run", "--profile", str(tiny), "--data-root", str(missing), "--runs-dir",
                 str(tmp_path / "runs")]) == 1
    assert first_error_line(capsys) == (
        f"osteo: error: profile tiny_resume, step 00_data_audit: data_root={missing} from "
        f"--data-root {missing}: no such folder ({missing}); give the folder of the real data sets")
    assert main(["run", "--profile", str(tiny), "--from", "04", "--parent", str(missing), "--runs-dir",
                 str(tmp_path / "runs")]) == 1
    assert first_error_line(capsys) == (
        f"osteo: error: --parent {missing}: no such run folder ({missing}); give the run folder whose outputs the "
        f"skipped stages come from (runs/<timestamp>-<profile>)")
    assert not (tmp_path / "runs").exists()


def test_a_profile_whose_parameters_are_a_list_names_the_file(tmp_path):
    path = tmp_path / "listed.yaml"
    path.write_text(TINY.replace("parameters: {data_root: null, image_size: 32, seed: 0}",
                                 "parameters:\n  - image_size: 32\n  - seed: 0"))
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert str(info.value).splitlines()[0] == (
        f"{path} line 3: `parameters` must be a mapping of NAME: VALUE (e.g. `image_size: 64` on its own line), not a "
        f"list: [{{image_size: 32}}, {{seed: 0}}]")


def test_a_range_the_stage_dataclass_leaves_open_is_still_checked():
    # PretrainConfig takes any int image_size; notebooks 01-03 would fail deep inside the model
    profile = load_profile("smoke").set({"image_size": -5}, {"image_size": "--set image_size=-5"})
    with pytest.raises(ProfileError) as info:
        check_profile(profile, executions=[e for e in profile.executions() if e.notebook == "01_chest_mae"])
    assert str(info.value) == ("profile smoke, step 01_chest_mae (2 executions): image_size=-5 from --set "
                               "image_size=-5: must be an int >= 16 pixels")


def test_every_shipped_profile_passes_the_value_checks():
    for name in ("smoke", "real", "paper", "label_efficiency"):
        check_profile(load_profile(name))


# ------------------------------------------------------------------------------------------ B: --set wins or refuses


def fake_execute(ran):
    """A stand-in kernel: records what the notebook would get and writes what a 04 cell leaves."""

    def execute(execution, run, log_output=True):
        ran.append((execution.name, runner.parameters_for(execution)))
        (run.dir("notebooks") / f"{execution.name}.ipynb").write_text("{}")
        if execution.notebook == "04_finetune":
            (run.predictions / f"{execution.name}.csv").write_text(execution.name)
    return execute


def test_set_wins_over_step_values_and_run_json_records_what_ran(tiny, tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(runner, "check_kernel", lambda: None)
    monkeypatch.setattr(runner, "execute", fake_execute(ran))
    monkeypatch.setitem(runner.AFTER_STEP, "results_tables", lambda run: None)
    assert main(["run", "--jobs", "1", "--profile", str(tiny), "--set", "split_seed=5", "epochs=2", "--runs-dir",
                 str(tmp_path / "runs"), "--quiet"]) == 0
    given = dict(ran)
    assert given["00_data_audit"]["split_seed"] == 5  # the step said 0
    assert [given[c]["epochs"] for c in CELLS] == [2, 2]  # the step said 1
    (folder,) = (tmp_path / "runs").iterdir()
    info = json.loads((folder / "run.json").read_text())
    records = {r["name"]: r for r in info["executions"]}
    assert records["00_data_audit"]["parameters"]["split_seed"] == 5
    assert records["00_data_audit"]["command_line"] == {"split_seed": 5}
    assert all(records[c]["parameters"]["epochs"] == 2 and records[c]["command_line"] == {"epochs": 2} for c in CELLS)
    assert "split_seed" not in records[CELLS[0]]["parameters"]  # only what the notebook declares
    assert info["overrides"] == {"split_seed": 5, "epochs": 2}
    assert {p["name"]: p["origins"]["epochs"] for p in info["plan"] if p["notebook"] == "04_finetune"} == \
        {c: "--set epochs=2" for c in CELLS}


def test_set_of_a_grid_value_is_refused_naming_the_step(tiny, tmp_path, capsys, no_kernel):
    assert main(["run", "--profile", str(tiny), "--set", "seed=3", "--runs-dir", str(tmp_path / "runs")]) == 1
    assert first_error_line(capsys) == (
        f"osteo: error: profile tiny_resume, step 04_finetune: --set seed=3 is refused: this step runs one execution "
        f"per seed in its grid [0, 1], at {tiny} line 14 (step 04_finetune, grid: seed); --set replaces shared and "
        f"step parameters, never a value an execution is named after. Edit the step's grid in the profile, or leave "
        f"the step out (--only / --from)")
    # a step that is not selected does not matter
    monkeypatch = pytest.MonkeyPatch()
    ran = []
    monkeypatch.setattr(runner, "check_kernel", lambda: None)
    monkeypatch.setattr(runner, "execute", fake_execute(ran))
    try:
        run_profile(str(tiny), only=["00"], overrides={"seed": 3}, runs_dir=tmp_path / "runs", log_output=False)
    finally:
        monkeypatch.undo()
    assert [name for name, _ in ran] == ["00_data_audit"]


# ----------------------------------------------------------------------------- C: default parent, interrupted runs


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_from_takes_the_latest_complete_run_of_the_same_profile(tmp_path):
    root = tmp_path / "runs"
    made_so_far = []

    def made(profile, status, **info):
        run = runs.new_run(profile, root=root, status=status, **info)
        made_so_far.append(run)
        run.update_info(created=f"2026-01-01T00:00:{len(made_so_far):02d}")  # one second apart, in this order
        return run.path

    good = made("tiny_resume", "complete")
    made("tiny_resume", "failed")
    made("tiny_resume", "running", pid=dead_pid(), host=runs.socket.gethostname())  # killed: reads interrupted
    made("tiny_resume", "running", **runs.owner())  # still running (this process)
    made("tiny_resume", "complete", cell=1)  # one grid cell
    made("tiny_resume_other", "complete")  # another profile whose name starts the same
    assert runner.latest_run("tiny_resume", root) == good
    with pytest.raises(ProfileError, match=r"no complete run of profile 'nothing' under .*runs: run the whole"):
        runner.latest_run("nothing", root)
    runs.Run(good).update_info(status="failed")
    with pytest.raises(ProfileError) as info:
        runner.latest_run("tiny_resume", root)
    assert str(info.value).startswith(
        f"--from/--only need the outputs of earlier stages, but there is no complete run of profile 'tiny_resume' "
        f"under {root}; passed over: 2 failed, 1 interrupted, 1 running, 1 single cell: ")


def test_a_running_status_with_a_dead_pid_reads_interrupted(tmp_path):
    run = runs.new_run("t", root=tmp_path, status="running", pid=dead_pid(), host=runs.socket.gethostname())
    assert run.info()["status"] == "running" and run.status == "interrupted"
    run.update_info(**runs.owner())
    assert run.status == "running"  # this process is alive


def test_sigterm_marks_the_run_interrupted_and_resume_continues_it(tiny, tmp_path, monkeypatch, capsys):
    ran = []
    plain = fake_execute(ran)

    def execute(execution, run, log_output=True):
        if execution.name == CELLS[1] and not any(name == CELLS[1] for name, _ in ran):
            # the cell writes part of its outputs, then the runner gets SIGTERM
            (run.dir("checkpoints/finetune/cell1")).joinpath("best.pt").write_text("partial")
            (run.dir("notebooks") / f"{execution.name}.ipynb").write_text("partial")
            ran.append((execution.name, None))
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            pytest.fail("SIGTERM did not interrupt the run")
        plain(execution, run, log_output)

    tables = []
    monkeypatch.setattr(runner, "check_kernel", lambda: None)
    monkeypatch.setattr(runner, "execute", execute)
    monkeypatch.setitem(runner.AFTER_STEP, "results_tables", lambda run: tables.append(run.path))
    assert main(["run", "--jobs", "1", "--profile", str(tiny), "--runs-dir", str(tmp_path / "runs"), "--quiet"]) == 128 + 15
    (folder,) = (tmp_path / "runs").iterdir()
    info = json.loads((folder / "run.json").read_text())
    assert info["status"] == "interrupted" and runs.Run(folder).status == "interrupted"
    assert [(r["name"], r["status"]) for r in info["executions"]] == [
        ("00_data_audit", "ok"), (CELLS[0], "ok"), (CELLS[1], "interrupted")]
    assert f"osteo run --resume {folder}" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the runner's handler is gone again
    kept = (folder / "predictions" / f"{CELLS[0]}.csv").stat().st_mtime_ns

    assert main(["run", "--jobs", "1", "--resume", str(folder), "--quiet"]) == 0
    assert [name for name, _ in ran] == ["00_data_audit", CELLS[0], CELLS[1], CELLS[1]]  # only the unfinished one
    info = json.loads((folder / "run.json").read_text())
    assert info["status"] == "complete" and [r["status"] for r in info["executions"]] == ["ok", "ok", "ok"]
    assert info["resumed"][0]["kept"] == ["00_data_audit", CELLS[0]] and len(tables) == 1
    # the partial outputs moved aside, the completed ones untouched, the redone cell in the usual places
    assert (folder / "unfinished" / "1" / "checkpoints" / "finetune" / "cell1" / "best.pt").read_text() == "partial"
    assert (folder / "unfinished" / "1" / "notebooks" / f"{CELLS[1]}.ipynb").read_text() == "partial"
    assert not (folder / "checkpoints" / "finetune" / "cell1").exists()
    assert (folder / "notebooks" / f"{CELLS[1]}.ipynb").read_text() == "{}"
    assert (folder / "predictions" / f"{CELLS[0]}.csv").stat().st_mtime_ns == kept
    # a complete run, a run still running and a run whose completed outputs changed are refused
    assert main(["run", "--resume", str(folder)]) == 1
    assert first_error_line(capsys) == f"osteo: error: --resume {folder}: the run is complete; nothing to resume"
    runs.Run(folder).update_info(status="running", **runs.owner())
    assert main(["run", "--resume", str(folder)]) == 1
    assert first_error_line(capsys).startswith(f"osteo: error: --resume {folder}: the run is still running (pid "
                                               f"{os.getpid()} on ")
    runs.Run(folder).update_info(status="failed")
    (folder / "predictions" / f"{CELLS[0]}.csv").write_text("changed")
    assert main(["run", "--resume", str(folder)]) == 1
    assert first_error_line(capsys).startswith(
        f"osteo: error: --resume {folder}: output(s) of completed executions were changed or removed after they "
        f"completed, so the run cannot be continued as it was: ['predictions/{CELLS[0]}.csv']")


# ------------------------------------------------------------------------------ D/E: SIGKILL, --resume, same files


def osteo(*args: str) -> list[str]:
    # the sequential path (--jobs 1): its resume point follows every execution, which these tests kill between
    return [sys.executable, "-m", "osteolib.cli.osteo", *args, *(["--jobs", "1"] if args[:1] == ("run",) else [])]


def deterministic_files(run: Path) -> dict[str, bytes]:
    """The files compared byte for byte: the results tables and the prediction tables. (The others differ between
    any two runs: histories, checkpoints, learning-curve plots and summaries hold timings and paths, PDFs a
    creation date, the executed notebooks their timings.)"""
    return {p.relative_to(run).as_posix(): p.read_bytes()
            for folder in ("tables", "predictions") for p in sorted((run / folder).rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_run_killed_in_the_grid_resumes_to_the_uninterrupted_files(tiny, tmp_path, monkeypatch):
    # one thread per kernel: on a busy 2-core machine two OpenMP threads per step run many times slower; both runs
    # use the same setting, so they compute the same numbers
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(name, "1")
    base = run_profile(str(tiny), only=["00"], runs_dir=tmp_path / "base", log_output=False).path
    # the uninterrupted run, in parallel with the one to be killed (one thread each)
    with open(tmp_path / "reference.log", "w") as log:
        reference_job = subprocess.Popen(osteo("run", "--profile", str(tiny), "--from", "04", "--parent", str(base),
                                               "--runs-dir", str(tmp_path / "reference"), "--quiet"),
                                         env=env, stdout=log, stderr=subprocess.STDOUT)

    killed_root = tmp_path / "killed"
    job = subprocess.Popen(osteo("run", "--profile", str(tiny), "--from", "04", "--parent", str(base), "--runs-dir",
                                 str(killed_root), "--quiet"), env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    # SIGKILL in the middle of the grid: the first cell done, the second has trained and written its checkpoints
    # (but not yet its predictions or its executed notebook's end)
    deadline = time.monotonic() + 300
    marker = "checkpoints/finetune/random-densenet121-seed1-frac1.0/checkpoint_last.pt"
    while not list(killed_root.glob(f"*/{marker}")):
        assert job.poll() is None, "osteo run ended before it could be killed"
        assert time.monotonic() < deadline, "the second cell never wrote its checkpoint"
        time.sleep(0.1)
    job.send_signal(signal.SIGKILL)
    job.wait()
    (killed,) = killed_root.iterdir()
    info = json.loads((killed / "run.json").read_text())
    assert info["status"] == "running" and runs.Run(killed).status == "interrupted"  # SIGKILL: nothing written
    assert [(r["name"], r["status"]) for r in info["executions"]] == [(CELLS[0], "ok")]
    assert not (killed / "tables" / "results_runs.csv").exists()

    resumed = subprocess.run(osteo("run", "--resume", str(killed), "--quiet"), env=env, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"osteo: resuming {killed}: 1 of 2 execution(s) kept, 1 to run" in resumed.stdout
    info = json.loads((killed / "run.json").read_text())
    assert info["status"] == "complete" and [r["status"] for r in info["executions"]] == ["ok", "ok"]
    # what the killed cell had written is kept aside, never overwritten, never mixed in
    aside = killed / "unfinished" / "1"
    assert (aside / marker).is_file() and (aside / "notebooks" / f"{CELLS[1]}.ipynb").is_file()

    assert reference_job.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    (reference,) = (tmp_path / "reference").iterdir()
    expected, got = deterministic_files(reference), deterministic_files(killed)
    assert sorted(got) == sorted(expected)
    assert any(name.startswith("tables/results") for name in got) and len(
        [name for name in got if name.startswith("predictions/")]) == 2
    assert [name for name in expected if got[name] != expected[name]] == []
    # the models too: every checkpoint's weights (the files hold timings in their history, so not their bytes)
    import torch

    for name in ("best.pt", "final.pt"):
        for cell in ("seed0", "seed1"):
            path = f"checkpoints/finetune/random-densenet121-{cell}-frac1.0/{name}"
            a = torch.load(reference / path, weights_only=True)["model"]
            b = torch.load(killed / path, weights_only=True)["model"]
            assert all(torch.equal(a[k], b[k]) for k in a), path
