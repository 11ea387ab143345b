#!/usr/bin/env bash
# Install osteolib and everything it needs into ./.venv (Python 3.10+ and pip are all it asks of the machine),
# then register the venv's interpreter as the Jupyter kernel "osteolib" that papermill runs the notebooks with.
# Safe to rerun: an existing .venv is reused and only what is missing is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
VENV_PY="$(cd .venv/bin && pwd)/python"
"$VENV_PY" -m pip install --quiet --upgrade pip
# The project's torch requirement is a range (pyproject.toml): on this lab's machines pip takes the torch 2.14.1 /
# torchvision 0.29.1 pair from local disk; elsewhere it takes the newest release in range (a CUDA build on Linux).
"$VENV_PY" -m pip install --quiet -e '.[test]'
# Register the kernel with the venv's absolute interpreter path: a stray `python3` kernelspec elsewhere would
# otherwise run the notebooks with another environment.
"$VENV_PY" -m ipykernel install --sys-prefix --name osteolib --display-name "osteolib (.venv)" >/dev/null
# The report's PDF is printed by a headless Chromium, and its test turns the PDF into page images with pdftoppm:
# Debian's packages, installed here when they are missing and this runs as root with apt-get (CI does); elsewhere
# the run still writes report.html and says how to get the PDF.
if ! command -v chromium >/dev/null 2>&1 || ! command -v pdftoppm >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        (apt-get install -y -qq chromium poppler-utils >/dev/null 2>&1 \
            || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium poppler-utils >/dev/null 2>&1)) \
            || echo "note: could not install chromium and poppler-utils; reports will have no PDF" >&2
    else
        echo "note: install chromium and poppler-utils (e.g. sudo apt-get install chromium poppler-utils) for the" \
             "report's PDF; without them a run writes report.html only" >&2
    fi
fi
echo "osteolib installed in $(pwd)/.venv (kernel 'osteolib' -> $VENV_PY)"
