"""A short seeded run of the differential wire fuzzer (tests/wire_fuzz.py); `make fuzz` runs the long one.

The run is a subprocess under a memory limit: a frame the checker wrongly accepts can make thriftpy2
allocate gigabytes or loop 2**31 times, which should fail this test, not take the test run down.
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = 10_000   # against the checker that walked by wire types alone, seeds 1-5 each found a frame well within this
MEMORY_LIMIT = 2 << 30
HANG_S = 300     # not a measure of speed (the run takes about a second): only that it ends


def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def test_whatever_the_checker_accepts_thriftpy2_parses_within_the_frame(tmp_path):
    current = tmp_path / "current"
    try:
        run = subprocess.run([sys.executable, "-m", "tests.wire_fuzz", "--cases", str(CASES), "--seed", "1",
                              "--current", str(current)], cwd=ROOT, capture_output=True, text=True,
                             timeout=HANG_S, preexec_fn=limit_memory)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the fuzzer hung on {current.read_text()}") from None
    last = current.read_text() if current.exists() else "(none)"
    assert run.returncode == 0, f"{run.stdout}{run.stderr}\nthe last frame parsed: {last}"
    assert "accepted=" in run.stdout, run.stdout
