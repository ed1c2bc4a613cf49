"""Wall-clock timing for the bench tools: one warm-up call (compilation, caches), then `repeats`
timed calls; the median by default, the best for a peak. `interleaved` times two sides in turns."""
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


def interleaved(fns: dict, repeats: int, reduce=statistics.median) -> dict:
    """Seconds of each (already warmed-up) function, timed in turns (a, b, a, b, ...) so that
    both sides of a comparison see the same moments of a shared machine."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: reduce(ts) for name, ts in times.items()}
