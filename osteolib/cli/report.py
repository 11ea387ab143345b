"""``osteo report [RUN]``: (re)build the report of an existing run folder -- notebook 07 executed against it and
exported to ``report.html`` (code hidden, figures embedded) and ``report.pdf`` in the run folder.

A profile's run ends with the same report (its step ``07_report`` with ``after: report``); this command is for a
run made before the report existed, a run whose report step failed, or a fresh look after a partial rerun. An
earlier report is never replaced: the next one is ``report-2.html`` (and ``notebooks/07_report-2.ipynb``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

from osteolib import runs

__all__ = ["add_arguments", "run", "export_run_report", "build_report"]

NOTEBOOK = "07_report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", nargs="?", help="the run folder (default: the latest under runs/)")
    parser.add_argument("--no-pdf", action="store_true", help="write the HTML only")


def export_run_report(run: runs.Run, notebook: Path, stem: str, pdf: bool = True):
    """Export an executed report notebook into the run folder and note the files in ``run.json``."""
    from osteolib.report.export import export_report

    files = export_report(notebook, run.path, stem=stem, title=f"Report · {run.path.name}", pdf=pdf)
    reports = list(run.info().get("reports", []))
    reports.append({"html": files.html.name, "pdf": files.pdf.name if files.pdf else None,
                    "pdf_note": files.pdf_note or None, "notebook": str(notebook.relative_to(run.path)),
                    "created": _dt.datetime.now().isoformat(timespec="seconds"),
                    "git_commit": runs.git_commit()})
    run.update_info(reports=reports)
    return files


def build_report(run: runs.Run, pdf: bool = True, log_output: bool = False):
    """Execute notebook 07 against ``run`` into ``notebooks/07_<stem>.ipynb``, then export it."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    from osteolib.cli.kernel import KERNEL_NAME, check_kernel
    from osteolib.cli.profiles import NOTEBOOKS_DIR
    from osteolib.report.export import free_stem

    check_kernel()
    stem = free_stem(run.path, "report")
    notebook = run.dir("notebooks") / f"{NOTEBOOK}{stem[len('report'):]}.ipynb"
    try:
        papermill.execute_notebook(str(NOTEBOOKS_DIR / f"{NOTEBOOK}.ipynb"), str(notebook),
                                   parameters={"run_dir": str(run.path)}, kernel_name=KERNEL_NAME,
                                   log_output=log_output, progress_bar=False, cwd=str(NOTEBOOKS_DIR))
    except PapermillExecutionError as err:
        raise RuntimeError(f"the report of {run.path} failed in cell {err.cell_index}: {err.ename}: {err.evalue}\n"
                           f"  the executed copy is kept at {notebook}") from None
    return export_run_report(run, notebook, stem, pdf=pdf)


def run(args: argparse.Namespace) -> int:
    folder = runs.open_run(args.run)
    if not (folder.path / "run.json").is_file():
        print(f"osteo: error: {folder.path} has no run.json; `osteo report` reads run folders made by `osteo run`",
              file=sys.stderr)
        return 1
    files = build_report(folder, pdf=not args.no_pdf)
    print(files.summary())
    return 0
