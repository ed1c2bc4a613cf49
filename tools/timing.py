"""Wall-clock timing for the bench tools: one warm-up call (compilation, caches), then `repeats`
timed calls; the median by default, the best for a peak."""
from __future__ import annotations

import statistics
import time


def seconds(fn, repeats: int, reduce=statistics.median) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return reduce(times)
