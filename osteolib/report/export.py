"""An executed report notebook as one self-contained HTML file (code hidden, figures embedded) and a PDF.

The HTML comes from nbconvert with the ``osteoreport`` template (``templates/``): nbconvert's lab template without
the scripts it would fetch from a CDN, so the file opens offline. The PDF is that HTML printed by a headless
Chromium (``--print-to-pdf``); without a browser the HTML is still written and :class:`ReportFiles` says why there
is no PDF. A report never replaces an earlier one: ``report.html`` is taken, the next is ``report-2.html``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BROWSER_ENV", "ReportFiles", "find_browser", "notebook_html", "html_to_pdf", "free_stem",
           "export_report"]

TEMPLATES = Path(__file__).resolve().parent / "templates"
BROWSER_ENV = "OSTEOLIB_CHROMIUM"  # path of a Chromium / Chrome executable, when it is not on PATH
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
# Headless without a sandbox (root in containers) and without the background connections a closed network refuses.
BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-extensions", "--hide-scrollbars")
INSTALL_HINT = ("install a headless Chromium (Debian/Ubuntu: apt-get install chromium; scripts/install.sh does it "
                f"when it runs as root) or point ${BROWSER_ENV} at a Chrome/Chromium executable")


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    pdf: Path | None
    pdf_note: str = ""  # why there is no PDF

    def summary(self) -> str:
        pdf = str(self.pdf) if self.pdf else f"no PDF ({self.pdf_note})"
        return f"report: {self.html}\nreport: {pdf}"


def find_browser() -> str | None:
    """The Chromium to print with: ``$OSTEOLIB_CHROMIUM``, else the first of :data:`BROWSER_NAMES` on PATH."""
    chosen = os.environ.get(BROWSER_ENV)
    if chosen:
        if not (Path(chosen).is_file() and os.access(chosen, os.X_OK)):
            raise FileNotFoundError(f"${BROWSER_ENV}={chosen!r} is not an executable file")
        return chosen
    for name in BROWSER_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def notebook_html(notebook: str | os.PathLike, title: str | None = None) -> str:
    """The executed notebook as HTML with its inputs and prompts hidden and its images embedded."""
    import nbformat
    from nbconvert import HTMLExporter

    node = nbformat.read(str(notebook), as_version=4)
    if title:
        node.metadata["title"] = title
    exporter = HTMLExporter(template_name="osteoreport", extra_template_basedirs=[str(TEMPLATES)],
                            exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True,
                            embed_images=True)
    body, _ = exporter.from_notebook_node(node)
    return body


def html_to_pdf(html: str | os.PathLike, pdf: str | os.PathLike, browser: str | None = None,
                timeout: float = 300) -> Path:
    """Print ``html`` to ``pdf`` with headless Chromium (A4, no header or footer)."""
    browser = browser or find_browser()
    if browser is None:
        raise FileNotFoundError(f"no headless browser to print {html} to PDF: {INSTALL_HINT}")
    pdf = Path(pdf).resolve()
    with tempfile.TemporaryDirectory(prefix="osteo-chromium-") as profile:
        command = [browser, *BROWSER_FLAGS, f"--user-data-dir={profile}", "--no-pdf-header-footer",
                   f"--print-to-pdf={pdf}", Path(html).resolve().as_uri()]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not pdf.is_file() or pdf.stat().st_size == 0:
        raise RuntimeError(f"{browser} could not print {html} to {pdf} (exit {done.returncode}):\n"
                           f"{done.stderr[-2000:]}")
    return pdf


def free_stem(folder: Path, stem: str = "report") -> str:
    """``report``, or ``report-2``, ``report-3`` ... when an earlier report's files are there (its HTML or PDF, or
    its executed notebook ``notebooks/07_<stem>.ipynb``, kept also when that report failed)."""
    folder = Path(folder)
    taken = lambda s: (any((folder / f"{s}{suffix}").exists() for suffix in (".html", ".pdf"))  # noqa: E731
                       or (folder / "notebooks" / f"07_{s}.ipynb").exists())
    if not taken(stem):
        return stem
    k = 2
    while taken(f"{stem}-{k}"):
        k += 1
    return f"{stem}-{k}"


def export_report(notebook: str | os.PathLike, folder: str | os.PathLike, stem: str = "report",
                  title: str | None = None, pdf: bool = True) -> ReportFiles:
    """Write ``<folder>/<stem>.html`` and, when a browser is found, ``<folder>/<stem>.pdf``."""
    folder = Path(folder)
    html_path = folder / f"{stem}.html"
    if html_path.exists():
        raise FileExistsError(f"{html_path} exists: a report is never replaced (use free_stem for the next name)")
    html_path.write_text(notebook_html(notebook, title=title), encoding="utf-8")
    if not pdf:
        return ReportFiles(html_path, None, "PDF not asked for")
    browser = find_browser()
    if browser is None:
        return ReportFiles(html_path, None, f"no headless browser found: {INSTALL_HINT}")
    try:
        return ReportFiles(html_path, html_to_pdf(html_path, folder / f"{stem}.pdf", browser=browser))
    except (RuntimeError, subprocess.TimeoutExpired) as err:  # the HTML stands; a failed print is said, not fatal
        return ReportFiles(html_path, None, f"printing with {browser} failed: {str(err)[:500]}")
