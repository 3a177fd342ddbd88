"""`fornax bench realtime`'s CPU utilisation: the CPU time of a process and its descendants."""

from __future__ import annotations

import os
import subprocess
import sys

from fornax.perf.bench_realtime import cpu_cores, process_tree_cpu_s


def test_process_tree_cpu_counts_a_busy_child() -> None:
    """A child that spins for ~0.6 s then sleeps: the tree's CPU time grows by about that much
    (a parent's own time alone would not)."""
    code = ("import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\n"
            "print('spun', flush=True)\ntime.sleep(30)\n")
    before = process_tree_cpu_s(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "spun"
        after = process_tree_cpu_s(os.getpid())
        own = process_tree_cpu_s(child.pid)
    finally:
        child.kill()
        child.wait()
    assert before is not None and after is not None and own is not None
    assert own >= 0.5 and after - before >= 0.5
    assert process_tree_cpu_s(child.pid) is None  # gone: nothing to count
    assert cpu_cores() >= 1
