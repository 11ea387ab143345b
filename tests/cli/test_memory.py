"""The runner's peak-memory record: the high-water mark of processes started under a root, not their last size."""
import os
import subprocess
import sys
import time

import pytest

from osteolib.cli.memory import PeakMemory

# allocate ~300 MiB, touch it, free it, then stay alive small: the peak must be seen although the last size is small
ALLOCATE_THEN_FREE = """
import time
block = bytearray(300 * 2**20)
for i in range(0, len(block), 4096):
    block[i] = 1
time.sleep(0.3)
del block
time.sleep(1.5)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="VmHWM is read from /proc (Linux)")
def test_peak_memory_keeps_a_childs_high_water_mark_after_it_freed_the_memory():
    already = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        with PeakMemory(os.getpid(), interval=0.2) as peak:
            child = subprocess.run([sys.executable, "-c", ALLOCATE_THEN_FREE], check=True)
        assert child.returncode == 0
        assert peak.mb is not None and 290 <= peak.mb < 600
        assert already.pid not in peak.peaks  # running before the block began: not this execution's
    finally:
        already.kill()
        already.wait()


def test_peak_memory_is_none_when_nothing_ran_under_the_root():
    with PeakMemory(os.getpid(), interval=0.05):
        time.sleep(0.2)
    assert PeakMemory(os.getpid()).mb is None


def test_run_cells_adds_what_an_execution_returns_to_its_record():
    from osteolib.cli.jobs import Slot, run_cells
    from osteolib.cli.profiles import Execution

    executions = [Execution(notebook="04_finetune", name=f"cell{k}", parameters={}, origins={}) for k in range(3)]
    records = run_cells(executions, [Slot((0,)), Slot((1,))],
                        lambda e, s: {"peak_rss_mb": float(len(e.name) * 100 + int(e.name[-1]))})
    assert [r["peak_rss_mb"] for r in records] == [500.0, 501.0, 502.0]
