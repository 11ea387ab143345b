"""The report's export: one self-contained HTML file (code hidden, images embedded, nothing from the network) and a
PDF; a report is never replaced (issue 17)."""
from __future__ import annotations

import base64
import io
import re

import nbformat
import pytest

from osteolib.report import checklist, export


def executed_notebook(path):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (80, 60), (200, 30, 30)).save(buffer, format="PNG")
    code = nbformat.v4.new_code_cell("secret_code_line = 42\nshow(figure)")
    code.outputs = [nbformat.v4.new_output("display_data", data={"image/png": base64.b64encode(buffer.getvalue()).decode(),
                                                                "text/plain": "<Figure>"})]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("## 1 · Data and flow\n\nSome words."),
                                               code])
    nbformat.write(notebook, str(path))
    return path


def test_the_html_hides_code_embeds_images_and_fetches_nothing(tmp_path):
    html = export.notebook_html(executed_notebook(tmp_path / "07.ipynb"), title="Report · run")
    assert "secret_code_line" not in html
    assert "Data and flow" in html and "<title>Report · run</title>" in html
    assert re.search(r'<img[^>]+src="data:image/png;base64,', html)
    assert not re.findall(r'(?:src|href)="https?://', html)  # no require.js, MathJax or fonts from a CDN


def test_a_report_is_never_replaced(tmp_path):
    notebook = executed_notebook(tmp_path / "07.ipynb")
    assert export.free_stem(tmp_path) == "report"
    first = export.export_report(notebook, tmp_path, stem="report", pdf=False)
    assert first.pdf is None and first.pdf_note == "PDF not asked for"
    with pytest.raises(FileExistsError):
        export.export_report(notebook, tmp_path, stem="report", pdf=False)
    assert export.free_stem(tmp_path) == "report-2"
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "07_report-2.ipynb").write_text("{}")  # a failed second report keeps its name taken
    assert export.free_stem(tmp_path) == "report-3"


def test_the_pdf_is_printed_by_the_browser_or_the_reason_is_given(tmp_path, monkeypatch):
    notebook = executed_notebook(tmp_path / "07.ipynb")
    monkeypatch.setenv(export.BROWSER_ENV, str(tmp_path / "no-such-chromium"))
    with pytest.raises(FileNotFoundError, match="OSTEOLIB_CHROMIUM"):
        export.export_report(notebook, tmp_path, stem="a")
    monkeypatch.delenv(export.BROWSER_ENV)
    monkeypatch.setattr(export, "find_browser", lambda: None)
    files = export.export_report(notebook, tmp_path, stem="b")
    assert files.html.is_file() and files.pdf is None and "apt-get install chromium" in files.pdf_note


def test_pdf_from_a_real_browser(tmp_path):
    browser = export.find_browser()
    if browser is None:
        pytest.skip("no Chromium on this machine (scripts/install.sh installs it as root)")
    files = export.export_report(executed_notebook(tmp_path / "07.ipynb"), tmp_path, stem="report")
    assert files.pdf.read_bytes().startswith(b"%PDF") and files.pdf.stat().st_size > 2000


def test_the_checklist_says_what_the_run_answers_and_what_is_the_authors():
    table = checklist.checklist_table({"figures/00_flow.png": True})
    answered = table[table["status"] == "answered by this run"]
    assert answered["item"].str.contains("flow of participants").all() and len(answered) == 1
    assert (table["status"] == "for the authors").sum() == len(checklist.AUTHORS)
    assert (table["status"] == "not in this run").sum() == len(checklist.ITEMS) - 1


def test_a_browser_that_fails_to_print_leaves_the_html_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "find_browser", lambda: "/bin/false")
    files = export.export_report(executed_notebook(tmp_path / "07.ipynb"), tmp_path, stem="report")
    assert files.html.is_file() and files.pdf is None
    assert files.pdf_note.startswith("printing with /bin/false failed") and "exit 1" in files.pdf_note


def test_the_paired_tests_fit_a_page_and_keep_their_p_values():
    import pandas as pd

    from osteolib.report.sections import paired_tests_table

    tests = pd.DataFrame([{"backbone": "densenet121", "seed": 0, "scenario": "chest_mae", "reference": "random",
                           "test": "delong_auc", "n": 107, "value": 0.7723, "value_reference": 0.7744,
                           "effect": -0.0021, "effect_ci_low": -0.0433, "effect_ci_high": 0.0391,
                           "p_value": 0.000412, "p_holm": 0.0198, "significant": True}])
    table = paired_tests_table(tests)
    assert list(table.columns) == ["model", "seed", "measure", "value vs reference", "difference [95 % CI]", "p",
                                   "p (Holm)"]  # seven columns: a 14-column table was cut at the A4 page's edge
    row = table.iloc[0]
    assert row["measure"] == "AUC (DeLong)" and row["value vs reference"] == "0.772 vs 0.774 (random)"
    assert row["difference [95 % CI]"] == "-0.002 [-0.043, 0.039]"
    assert (row["p"], row["p (Holm)"]) == ("< 0.001", "0.020")


def test_the_report_counts_the_notebooks_of_a_gathered_parent(tmp_path):
    # `osteo collect` writes a run with executions but no plan; a later `--only 04b 07 --parent` run must still
    # report 04's models (it said "Notebook 04 is not part of this run's profile")
    import json

    from osteolib.report.sections import ReportInputs
    from osteolib.runs import Run

    gathered, child = tmp_path / "gathered", tmp_path / "child"
    gathered.mkdir(), child.mkdir()
    (gathered / "run.json").write_text(json.dumps({"profile": "real", "executions": [
        {"name": "04_finetune-seed=0", "notebook": "04_finetune", "status": "ok"}]}))
    (child / "run.json").write_text(json.dumps({"profile": "real", "parent": str(gathered), "plan": [
        {"name": "04b_clinical_fusion", "notebook": "04b_clinical_fusion"}, {"name": "07_report", "notebook": "07_report"}]}))
    inputs = ReportInputs(Run(child))
    assert inputs.ran("04") and inputs.ran("04b") and not inputs.ran("05")
