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
echo "osteolib installed in $(pwd)/.venv (kernel 'osteolib' -> $VENV_PY)"
