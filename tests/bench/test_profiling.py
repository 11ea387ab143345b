"""--profile's view of one side: the work that ran, also for a side shared between rows (timing.once)."""
from __future__ import annotations

import torch

from bench.profiling import profile_side
from bench.timing import Measurement, once


def test_a_shared_side_is_profiled_doing_its_work_not_returning_its_kept_figure():
    calls = []

    def side() -> Measurement:
        calls.append(1)
        a = torch.randn(256, 256)
        for _ in range(20):
            a = torch.mm(a, a).clamp_(-1, 1)
        return Measurement(1.0)

    shared = once(side)
    shared()
    shared()  # the second row gets the kept figure: no work
    assert len(calls) == 1
    found = profile_side(shared)
    assert len(calls) == 2  # the profiler ran the work itself
    assert found["operators"][0]["name"] in ("aten::mm", "aten::clamp_") and found["operators"][0]["share"] > 0
