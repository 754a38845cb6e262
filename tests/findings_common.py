"""What the findings tests (tests/test_findings_*.py) share besides conftest's `experiment` fixture: the seeds and
the paired comparison. One file per paper, so that pytest-xdist (`make test`, --dist loadfile) runs them side by side."""
from __future__ import annotations

import statistics

SEEDS = range(10)


def _compare(a: list[float], b: list[float]) -> tuple[float, int, str]:
    """Mean paired difference a - b in points, wins of a, and the per-seed line for messages."""
    diffs = [100 * (x - y) for x, y in zip(a, b)]
    return statistics.mean(diffs), sum(d > 0 for d in diffs), " ".join(f"{d:+.1f}" for d in diffs)


