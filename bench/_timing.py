"""Shared by the benchmark scripts: median wall times, and pairs of calls timed alternately."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping


def not_measured(reason) -> str:
  """How a report says that a side did not run, and why."""
  return f"not measured: {reason}"


def torch_side(fn, *args):
  """fn(*args), or why it cannot run here when PyTorch is not installed."""
  try:
    return fn(*args)
  except ImportError as e:
    return not_measured(e)


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


def alternate(calls: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
  """Seconds of each call, `warmup` untimed rounds first, then `repeats` rounds in which every call runs once
  in turn: both sides see the same machine load (another job on a shared machine slows both, not one)."""
  for _ in range(warmup):
    for fn in calls.values():
      fn()
  times: dict[str, list[float]] = {name: [] for name in calls}
  for _ in range(repeats):
    for name, fn in calls.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  return times


def summary(times: list[float]) -> dict:
  """Median and spread (min, max) of timed calls, in seconds."""
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times),
          "times_s": list(times)}
