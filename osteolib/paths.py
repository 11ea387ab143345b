"""Where things live: the repository, the real-data root, the regenerable data folders.

The real X-rays are never copied into the repository; they are found through one setting,
the environment variable ``OSTEOLIB_DATA_ROOT``, falling back to ``../shared/data`` beside
the repository (the development and CI layout).
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT_ENV = "OSTEOLIB_DATA_ROOT"


def real_data_root(explicit: str | os.PathLike | None = None) -> Path | None:
    """The folder holding the real X-ray data sets, or None where there is none.

    Order: an explicit path (a profile value), then ``$OSTEOLIB_DATA_ROOT``, then
    ``../shared/data`` beside the repository.
    """
    for candidate in (explicit, os.environ.get(DATA_ROOT_ENV), REPO_ROOT.parent / "shared" / "data"):
        if candidate and Path(candidate).expanduser().is_dir():
            return Path(candidate).expanduser().resolve()
    return None


def require_real_data_root(explicit: str | os.PathLike | None = None) -> Path:
    """Like :func:`real_data_root` but raises a clear error naming what to set."""
    root = real_data_root(explicit)
    if root is None:
        raise FileNotFoundError(
            f"No real X-ray data folder found (looked at data_root={explicit!r}, "
            f"${DATA_ROOT_ENV}={os.environ.get(DATA_ROOT_ENV)!r}, {REPO_ROOT.parent / 'shared' / 'data'}). "
            f"Set {DATA_ROOT_ENV} or the profile's data_root to the folder that holds the data sets."
        )
    return root


def data_dir() -> Path:
    """Regenerable data (synthetic X-rays, caches) lives here; it is git-ignored."""
    return Path(os.environ.get("OSTEOLIB_DATA_DIR", REPO_ROOT / "data"))


def synthetic_dir() -> Path:
    return data_dir() / "synthetic"


def cache_dir() -> Path:
    return data_dir() / "cache"
