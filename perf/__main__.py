"""`python -m fornax.perf ...`: the benchmarks without the server's CLI (CLI process)."""

from __future__ import annotations

import sys

from fornax.perf.cli import main

if __name__ == "__main__":
    sys.exit(main())
