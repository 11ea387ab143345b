"""osteolib: the support library of the osteoporosis X-ray study.

Imports flow one way: data (io, manifest, splits, cache, synthetic) -> models -> training
-> explain/stats -> report -> runner.
"""
import os as _os

# The project never downloads weights at run time: make any accidental hub access fail fast.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
