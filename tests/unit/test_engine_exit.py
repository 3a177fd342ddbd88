"""The engine-core process's end (runtime/structured_output/grammar_pool.py:exit_process): at once,
with its code and its logs flushed, while a helper thread still works (test process)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time

BOUND_S = 10.0  # a correctness bound: the busy thread below would hold the exit for 120 s

PROGRAM = textwrap.dedent("""
    import logging, sys, time
    from concurrent.futures import ThreadPoolExecutor
    from fornax.runtime.structured_output.grammar_pool import exit_process

    logging.basicConfig(stream=sys.stderr, level=logging.INFO)
    pool = ThreadPoolExecutor(max_workers=1)  # as xgrammar's prewarm after start-up
    pool.submit(time.sleep, 120)
    time.sleep(0.2)
    logging.getLogger("engine").info("last words at %r", time.time())
    exit_process(3)
""")


def test_exit_does_not_wait_for_a_busy_helper_thread() -> None:
    done = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True,
                          timeout=130)
    ended = time.time()
    assert done.returncode == 3, done.stderr
    match = re.search(r"last words at ([0-9.]+)", done.stderr)
    assert match, done.stderr  # logged before the exit: flushed
    assert ended - float(match.group(1)) < BOUND_S, "the exit waited for the helper thread"
