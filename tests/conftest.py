"""Shared fixtures: where the real X-ray folder is (tests that need it skip with a reason without it)."""
from __future__ import annotations

from pathlib import Path

import pytest

from osteolib.paths import real_data_root as _find_real_data_root


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """The folder holding nih-cxr14-subset/, kermany-pediatric-cxr/, hannover-covid-cxr/ (or a skip)."""
    root = _find_real_data_root()
    if root is None:
        pytest.skip("real X-ray folder not found: set OSTEOLIB_DATA_ROOT or place it at ../shared/data")
    return root
