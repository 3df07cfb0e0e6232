"""Shared by the benchmark scripts: the median wall time of repeated calls."""
import statistics
import time


def median_time(fn, repeats: int, warmup: bool = False) -> float:
  """Median seconds of `repeats` calls of fn (after one untimed call when `warmup`)."""
  if warmup:
    fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)
