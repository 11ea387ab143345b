"""A lab's own X-rays through the whole sequence from a profile, as a user would run them: a folder of class
sub-folders (PNG, pre-augmented JPEG copies under other patients' names, a few DICOM files, an expert box table),
then the same images described by a label table. No code changes, only profiles.

The copies are caught: with ``near_duplicates: stop`` the audit ends the run listing them; with ``group`` they join
one patient group and the run goes on through 00 -> 06. ``osteo predict`` on the run's test images then gives
exactly notebook 04's probabilities."""
from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from osteolib.cli.osteo import RunFailed, main, run_profile
from osteolib.data import read_manifest
from osteolib.data.synthetic.lab_folder import write_lab_folder

pytestmark = pytest.mark.slow

PATIENT = r"^(?P<patient>P\d+)_"
TRAINING = "epochs: 1, batch_size: 16, warmup_epochs: 0"


def target_spec(lab, layout: str) -> str:
    if layout == "folders":
        return (f"{{kind: folder, root: '{lab.root}', patient_from: '{PATIENT}', "
                f"regions: {{boxes: '{lab.boxes}'}}}}")
    return (f"{{kind: csv, table: '{lab.table}', image_dir: '{lab.root}', path_column: file, label_column: diagnosis, "
            f"patient_column: patient, view_column: view, regions: {{boxes: '{lab.boxes}'}}}}")


# a second synthetic hospital as the external test set of the label-table run (its report shows it beside the
# internal test)
EXTERNAL = "{dataset: synthetic_shoulder, options: {n_patients: 24, size: 64, difficulty: 0.3, seed: 2, site: ext}}"


def profile(tmp: Path, name: str, lab, layout: str, policy: str, later_steps: str = "",
            external_test: str | None = None) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: {name}
        parameters: {{data_root: null, image_size: 32}}
        steps:
          - notebook: 00_data_audit
            parameters:
              dataset: {target_spec(lab, layout)}
              classes: [normal, osteoporosis]
              near_duplicates: {policy}
              split_seed: 1
        """) + (f"      external_test: {external_test}\n" if external_test else "")
        + textwrap.indent(textwrap.dedent(later_steps), "  "))
    return path


WHOLE_SEQUENCE = f"""\
  - notebook: 01_chest_mae
    # the pretraining pool: the lab's own images, unlabelled
    parameters: {{chest_datasets: [{{kind: folder, root: LAB, labels: none}}], {TRAINING}, template_check_images: 4}}
    variants:
      - {{backbone: densenet121, patch_size: 8}}
  - notebook: 02_shoulder_mae
    parameters: {{{TRAINING}, template_check_images: 4}}
    variants:
      - {{backbone: densenet121, patch_size: 8, crop_mode: center, mask_region_bias: 2.0}}
  - notebook: 03_rotation_proxy
    parameters: {{{TRAINING}}}
    variants:
      - {{backbone: densenet121}}
  - notebook: 04_finetune
    parameters: {{{TRAINING}, base_lr: 0.02, layer_decay: null, randaug_magnitude: null, backbone: densenet121}}
    grid:
      scenario: [random, chest_mae+rotation]
    after: results_tables
"""

# 05-07 run once, in the label-table run (which reads the folder run's pretraining): each notebook costs ~15 s of
# kernel start and imports, and the two layouts give the same manifest
EXPLAIN_TEXT_REPORT = f"""\
  - notebook: 05_gradcam_statistics
    parameters: {{max_cam_images: 6, cam_methods: [gradcam, eigencam], n_boot: 200, randomisation_steps: 2,
                 max_faithfulness_images: 2, confounder_check: false}}
  - notebook: 06_image_text
    parameters: {{scenario: chest_mae, backbone: densenet121, align_epochs: 1, epochs: 1, batch_size: 16,
                 text_column: report}}
  - notebook: 07_report
    after: report
"""


# the label-table run searches each initialisation's recipe on validation, then trains the chosen one on half and
# all of the training patients (issue 21's profile step, at toy scale), and fuses the chosen model with the table's
# age and sex (issue 18)
SEARCH_AND_CURVE = f"""\
  - notebook: 04a_recipe_search
    parameters: {{{TRAINING}, backbone: densenet121, layer_decay: null, randaug_magnitude: null}}
    variants:
      - {{recipe: low, base_lr: 0.002}}
      - {{recipe: high, base_lr: 0.02}}
    grid:
      scenario: [random, chest_mae+rotation]
    after: recipe_search
  - notebook: 04_finetune
    parameters: {{{TRAINING}, recipe: searched, backbone: densenet121}}
    grid:
      scenario: [random, chest_mae+rotation]
      label_fraction: [0.5, 1.0]
    after: results_tables
  - notebook: 04b_clinical_fusion
    parameters: {{covariates: [age, sex]}}
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    # 256 px files: the copy detector compares fine structure, which a 64 px rendering no longer has
    return write_lab_folder(tmp_path_factory.mktemp("lab") / "xrays", n_patients=40, size=256, copy_fraction=0.2,
                            n_dicom=3, seed=5)


@pytest.fixture(scope="module")
def grouped_run(lab, tmp_path_factory) -> Path:
    """The whole sequence on the lab folder (minutes); OSTEO_TEST_OWN_RUN reuses a run made earlier."""
    if os.environ.get("OSTEO_TEST_OWN_RUN"):
        return Path(os.environ["OSTEO_TEST_OWN_RUN"])
    tmp = tmp_path_factory.mktemp("own_run")
    path = profile(tmp, "own_folders", lab, "folders", "group", WHOLE_SEQUENCE.replace("LAB", str(lab.root)))
    return run_profile(str(path), runs_dir=tmp / "runs", log_output=False, jobs=2).path


def planted_pairs(lab) -> set[frozenset]:
    return {frozenset((Path(c).stem, Path(o).stem)) for c, o in zip(lab.copies["copy"], lab.copies["original"])}


def test_copies_across_splits_stop_the_audit_with_the_files_listed(lab, tmp_path):
    path = profile(tmp_path, "own_stop", lab, "folders", "stop")
    with pytest.raises(RunFailed) as failure:
        run_profile(str(path), runs_dir=tmp_path / "runs", log_output=False)
    message = str(failure.value)
    assert "copies of one radiograph sit in different splits" in message, message[-3000:]
    assert "near_duplicates: group" in message
    assert any(Path(c).name in message for c in lab.copies["copy"]), message[-3000:]


def test_the_folder_goes_through_00_to_04_with_its_copies_grouped(lab, grouped_run):
    run = grouped_run
    manifest = read_manifest(run / "data" / "manifest.csv")
    assert len(manifest) == lab.n_images  # nothing dropped: PNG, JPEG copies and DICOM all read
    assert sum(str(p).endswith(".dcm") for p in manifest["path"]) == 3
    audit = json.loads((run / "data" / "audit.json").read_text())
    assert audit["classes"] == ["normal", "osteoporosis"] and audit["copy_policy"] == "group"
    copies = pd.read_csv(run / "data" / "copies.csv", dtype=str)
    # image ids are paths below the root without suffix (normal/batch2/P024_AP): compare file stems
    found = {frozenset(Path(i).name for i in pair) for pair in zip(copies["image_id_a"], copies["image_id_b"])}
    assert planted_pairs(lab) <= found, sorted(map(sorted, planted_pairs(lab) - found))
    # every planted copy is reported; a reported pair that was not planted is one patient's two views, not a
    # look-alike of another patient
    stray = [p for p in found - planted_pairs(lab) if len({i.split("_")[0] for i in p}) > 1]  # P024_AP -> P024
    assert not stray, stray
    assert audit["copy_pairs_across_splits"] == 0 and audit["patients_joined_by_copies"] >= len(lab.copies)
    split_of = dict(zip(manifest["image_id"], manifest["split"]))
    assert all(split_of[a] == split_of[b] for a, b in zip(copies["image_id_a"], copies["image_id_b"]))
    # the expert boxes are in the manifest; both fine-tuned models were evaluated (05-07: the label-table run)
    assert manifest["boxes"].map(bool).sum() > 0
    assert sorted(p.stem for p in (run / "predictions").glob("*.csv")) == [
        "chest_mae+rotation-densenet121-seed0-frac1.0", "random-densenet121-seed0-frac1.0"]
    executed = sorted(p.name[:2] for p in (run / "notebooks").glob("*.ipynb"))
    assert executed == ["00", "01", "02", "03", "04", "04"]


def test_predict_on_the_runs_test_images_gives_04s_probabilities(grouped_run, tmp_path):
    run = grouped_run
    model_file = sorted((run / "predictions").glob("*.csv"))[0]
    predictions = pd.read_csv(model_file, dtype={"image_id": str})
    test = predictions[predictions["split"] == "test"].reset_index(drop=True)
    manifest = read_manifest(run / "data" / "manifest.csv").set_index("image_id")
    paths = [str(p) for p in manifest.loc[test["image_id"], "path"]]
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"DICM but not really")
    out = tmp_path / "predicted"
    assert main(["predict", "--run", str(run), "--model", model_file.stem, *paths, str(broken),
                 "--out", str(out), "--quiet"]) == 0
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    ok = table[table["status"] == "ok"].reset_index(drop=True)
    assert ok["file"].tolist() == paths
    for column in [c for c in test.columns if c.startswith("prob_")]:
        # equal up to float32 rounding (see tests/stages/test_predict.py)
        np.testing.assert_allclose(ok[column].to_numpy(float), test[column].to_numpy(float), rtol=0, atol=1e-6,
                                   err_msg=column)
    assert table.loc[table["file"] == str(broken), "status"].item() != "ok"


@pytest.fixture(scope="module")
def table_run(grouped_run, tmp_path_factory) -> Path:
    """The csv layout of the same lab (same seed): the same images, patients and copies, read from labels.csv;
    the audit, the recipe search and the curve, 04b, 05, 06 reading the table's own reports, and the report, with
    an external test set. OSTEO_TEST_TABLE_RUN
    reuses a run made earlier."""
    if os.environ.get("OSTEO_TEST_TABLE_RUN"):
        return Path(os.environ["OSTEO_TEST_TABLE_RUN"])
    tmp = tmp_path_factory.mktemp("own_table")
    table_lab = write_lab_folder(tmp / "xrays", n_patients=40, size=256, copy_fraction=0.2, n_dicom=3, seed=5,
                                 layout="csv")
    # 01-03 come from the folder run (--parent): the same images and patients, so the same pretraining
    path = profile(tmp, "own_table", table_lab, "csv", "group", SEARCH_AND_CURVE + EXPLAIN_TEXT_REPORT,
                   external_test=EXTERNAL)
    return run_profile(str(path), parent=grouped_run, runs_dir=tmp / "runs", log_output=False, jobs=2).path


def test_the_same_images_from_a_label_table(grouped_run, table_run):
    run = table_run
    from_table = read_manifest(run / "data" / "manifest.csv")
    from_folders = read_manifest(grouped_run / "data" / "manifest.csv")
    assert {"age", "sex", "site", "report"} <= set(from_table.columns)  # the table's extra columns are kept
    key = ["label", "split"]
    by_name = lambda m: m.assign(name=[Path(p).stem for p in m["path"]]).set_index("name").sort_index()[key]
    pd.testing.assert_frame_equal(by_name(from_table), by_name(from_folders))
    assert len(list((run / "predictions").glob("*.csv"))) == 4  # 2 initialisations x 2 label fractions
    # the recipe search: 4 candidates, one chosen per initialisation, validation rows only, and the curve's runs
    # trained what it chose
    search = pd.read_csv(run / "tables" / "recipe_search.csv")
    assert len(search) == 4 and search.groupby("scenario")["chosen"].sum().tolist() == [1, 1]
    assert all(set(pd.read_csv(p)["split"]) == {"val"} for p in (run / "recipe_search").glob("*-val.csv"))
    chosen = search[search["chosen"]].set_index("scenario")["recipe"]
    for summary in (run / "logs").glob("*-summary.json"):
        config = json.loads(summary.read_text())["config"]
        assert config["recipe"] == chosen[config["scenario"]], summary.name
    effects = pd.read_csv(run / "tables" / "label_efficiency_effects.csv")
    assert sorted(effects["label_fraction"]) == [0.5, 1.0] and effects["p_holm"].between(0, 1).all()
    assert (run / "figures" / "label_efficiency.png").is_file()
    fusion = pd.read_csv(run / "tables" / "04b_fusion_auc.csv")
    assert fusion["model"].tolist() == ["clinical", "image", "image+clinical"] and fusion["auc"].between(0, 1).all()
    assert set(pd.read_csv(run / "tables" / "04b_odds_ratios.csv")["term"]) >= {"age", "sex_M"}
    texts = pd.read_csv(run / "tables" / "06_pairs.csv")
    assert texts["text"].str.endswith(("density, intact cortex.", "thin cortex.")).all()  # the reports, not rules
    # the lab's box table reached 05's agreement with experts; grouped copies: patient-level tests; 06 and 07 ran
    assert len(pd.read_csv(run / "tables" / "05_agreement_per_image.csv")) > 0
    assert (run / "tables" / "05_significance_patient_level.csv").is_file()
    assert len(pd.read_csv(run / "tables" / "06_test_predictions.csv")) == (from_table["split"] == "test").sum()
    executed = sorted(p.name[:3].rstrip("_") for p in (run / "notebooks").glob("*.ipynb"))
    assert executed == ["00", "04", "04", "04", "04", "04a", "04a", "04a", "04a", "04b", "05", "06", "07"]
    assert (run / "report.html").is_file()


# ------------------------------------------------------------------------------------------------------------------
# The run's report, read as a person reads it (issue 17): opened in a real headless browser, printed to pages


def browser_or_skip() -> str:
    from osteolib.report.export import find_browser

    browser = find_browser()
    if browser is None or shutil.which("pdftoppm") is None:
        if os.geteuid() == 0:  # scripts/install.sh installs both as root: their absence is a broken install
            pytest.fail("no chromium or pdftoppm although scripts/install.sh runs as root; rerun it")
        pytest.skip("the report's browser test needs chromium and pdftoppm (apt-get install chromium poppler-utils)")
    return browser


def open_in_browser(html: Path, screenshot: Path, browser: str) -> dict:
    """Load the page in headless Chromium; what went wrong, and each image's loaded size."""
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=browser, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = chromium.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
        page.goto(html.as_uri(), wait_until="load")
        images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        headings = page.evaluate("Array.from(document.querySelectorAll('h2')).map(h => h.innerText)")
        text = page.evaluate("document.body.innerText")
        page.screenshot(path=str(screenshot), full_page=True)
        chromium.close()
    return {"problems": problems, "images": images, "headings": headings, "text": text}


def test_the_report_opens_in_a_browser_with_every_figure_and_prints_to_pages(table_run, tmp_path):
    from osteolib.report import sections
    from osteolib.runs import Run

    browser = browser_or_skip()
    run = table_run
    html, pdf = run / "report.html", run / "report.pdf"
    assert html.is_file() and pdf.is_file(), sorted(p.name for p in run.iterdir())
    shots = Path(os.environ.get("OSTEO_REPORT_SHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    seen = open_in_browser(html, shots / "report-page.png", browser)
    assert seen["problems"] == [], seen["problems"]
    # every figure the sections point at is in the page, and loaded
    inputs = sections.ReportInputs(Run(run))
    figures = [b for f in (sections.overview, sections.data_and_flow, sections.discrimination,
                           sections.fair_comparison, sections.clinical_data, sections.calibration,
                           sections.subgroups, sections.external_validation, sections.explanations,
                           sections.reproducibility, sections.checklist) for b in f(inputs) if isinstance(b, Path)]
    assert len(seen["images"]) == len(figures), (seen["images"], figures)
    stems = {f.stem for f in figures}
    assert {"00_flow", "roc_test", "roc_external", "05_gradcam_overlays", "05_confident_errors",
            "label_efficiency", "04b_fusion_roc"} <= stems, stems
    assert any(s.endswith("_reliability") for s in stems), stems
    assert all(complete and width > 50 and height > 50 for complete, width, height in seen["images"])
    assert [h.split(" · ")[0].strip() for h in seen["headings"]] == [str(k) for k in range(1, 11)], seen["headings"]
    # numbers come from the run's tables: Table 1, the external set, the subgroups by sex / age band / site
    table1 = pd.read_csv(run / "tables" / "table1.csv")
    assert all(value in seen["text"] for value in table1.iloc[:, -1].astype(str)), table1
    external = pd.read_csv(run / "tables" / "results_external_summary.csv")
    assert f"{external['auc_mean'].iloc[0]:.3f}" in seen["text"]
    subgroups = pd.read_csv(run / "tables" / "subgroups.csv")
    assert {"sex", "age_band", "site"} <= set(subgroups["variable"])
    assert "Failure analysis" in seen["text"] and "for the authors" in seen["text"]
    # the PDF has its pages, none of them blank
    import subprocess

    from PIL import Image

    subprocess.run(["pdftoppm", "-r", "40", "-png", str(pdf), str(shots / "report-pdf")], check=True)
    pages = sorted(shots.glob("report-pdf*.png"))
    assert len(pages) >= 5, pages
    assert all(np.asarray(Image.open(p).convert("L")).std() > 5 for p in pages)


def test_osteo_report_rebuilds_beside_the_first_and_names_a_missing_table(table_run, tmp_path, capsys):
    browser_or_skip()
    # a copy of the run's results (not its checkpoints) to rebuild from
    copy = tmp_path / table_run.name
    copy.mkdir()
    for name in ("run.json", "data", "tables", "figures", "notebooks"):
        source = table_run / name
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, copy / name)
    first = (table_run / "report.html").read_bytes()
    shutil.copy2(table_run / "report.html", copy / "report.html")
    assert main(["report", str(copy), "--no-pdf"]) == 0
    assert (copy / "report-2.html").is_file() and (copy / "report.html").read_bytes() == first  # never replaced
    info = json.loads((copy / "run.json").read_text())
    assert [r["html"] for r in info["reports"]][-1] == "report-2.html"
    # a table only this run wrote (its parent, the folder run, has its own 00 tables, which the report would read)
    (copy / "tables" / "04b_fusion_auc.csv").unlink()
    capsys.readouterr()
    assert main(["report", str(copy), "--no-pdf"]) == 1
    error = capsys.readouterr().err
    assert "tables/04b_fusion_auc.csv" in error and "04b_clinical_fusion" in error, error
    assert not (copy / "report-3.html").exists()
