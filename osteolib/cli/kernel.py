"""The Jupyter kernel every notebook runs with: the venv's interpreter, registered as "osteolib" by
scripts/install.sh (papermill ``-k osteolib``)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

__all__ = ["KERNEL_NAME", "check_kernel"]

KERNEL_NAME = "osteolib"


def check_kernel() -> None:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    except NoSuchKernel:
        raise RuntimeError(
            f"the Jupyter kernel {KERNEL_NAME!r} is not installed; register this environment's interpreter with\n"
            f"  {sys.executable} -m ipykernel install --sys-prefix --name {KERNEL_NAME}\n(scripts/install.sh does it)"
        ) from None
    interpreter = Path(spec.argv[0])
    if interpreter.is_absolute() and interpreter.resolve() != Path(sys.executable).resolve():
        logging.getLogger(__name__).warning("kernel %r runs %s, not this interpreter %s", KERNEL_NAME, interpreter,
                                            sys.executable)
