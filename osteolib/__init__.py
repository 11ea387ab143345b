"""osteolib: the support library of the osteoporosis X-ray study.

One folder per layer; imports only point down (tests/test_layers.py checks it, docs/architecture.md explains it):

    leaves (study, runs, paths, utils, plotting) -> data -> models -> engine -> evaluation -> explain -> stages
    -> report -> cli
"""
import os as _os

# The project never downloads weights at run time: make any accidental hub access fail fast.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
