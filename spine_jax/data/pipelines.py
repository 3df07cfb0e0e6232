"""grain pipelines: deterministic shuffling, augmentation, per-process shards of every global batch.

Each process loads only its slice of each global batch, and which elements make up global batch k
depends on the seed alone, not on the number of processes. So a run gives the same batches on 1 or N
processes, and the iterator state ({'next_index': k}) restores on any process count.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import grain
import jax
import numpy as np

from spine_jax.data import augment as augment_lib
from spine_jax.data import labeling_samples


# Batches built ahead of the step, and the threads that build them. grain's defaults (500 and 16) held about
# 13 GB of the nnU-Net plan's 2 x 128 x 192 x 64 batches, with 16 threads beside a step on a 2-core CPU. Every
# pipeline still delivers at least 3.8 times what its step consumes (BUILD_NOTES.md "Benchmarks in one command", e).
PREFETCH_BATCHES = 8
MAX_PREFETCH_THREADS = 16


def read_options() -> grain.ReadOptions:
  """Prefetch of the training iterators: PREFETCH_BATCHES ahead, one thread per CPU (at most 16)."""
  return grain.ReadOptions(num_threads=max(1, min(os.cpu_count() or 1, MAX_PREFETCH_THREADS)),
                           prefetch_buffer_size=PREFETCH_BATCHES)


class ArraySource:
  """Random access to a dict of equally long numpy arrays, one element = one row of each."""

  def __init__(self, arrays: dict[str, np.ndarray], keys: Sequence[str], indices: np.ndarray | None = None):
    missing = [k for k in keys if k not in arrays]
    if missing:
      raise KeyError(f"data set lacks arrays {missing}")
    self._arrays = {k: arrays[k] for k in keys}
    lengths = {len(v) for v in self._arrays.values()}
    if len(lengths) != 1:
      raise ValueError(f"arrays differ in length: { {k: len(v) for k, v in self._arrays.items()} }")
    n = lengths.pop()
    self._indices = np.arange(n) if indices is None else np.asarray(indices)
    if len(self._indices) == 0:
      raise ValueError("the data set is empty")

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    i = self._indices[index]
    return {k: v[i] for k, v in self._arrays.items()}


def oversample_minority(labels: np.ndarray, majority_fraction: float, seed: int, majority: int = 0) -> np.ndarray:
  """Indices in which the minority-class elements repeat until the majority class is `majority_fraction`.

  The authors capped normal slices to counter a 91% normal training set; repeating the rare slices
  instead keeps every normal one. 0 (or a fraction at or above the natural one) keeps the data as is.
  """
  labels = np.asarray(labels)
  idx = np.arange(len(labels))
  major, minor = idx[labels == majority], idx[labels != majority]
  if not majority_fraction or len(minor) == 0 or len(major) / len(labels) <= majority_fraction:
    return idx
  want = int(round(len(major) * (1 - majority_fraction) / majority_fraction))
  reps, rest = divmod(want, len(minor))
  extra = np.random.default_rng(seed).choice(minor, rest, replace=False)
  return np.sort(np.concatenate([major, np.tile(minor, reps), extra]))


class ProcessShardOfBatches(grain.MapDataset):
  """Element j of this process = element (j // local) * global + offset + j % local of the parent."""

  def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int, process_count: int):
    super().__init__(parent)
    if global_batch % process_count:
      raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
    self._global = global_batch
    self._local = global_batch // process_count
    self._offset = process_index * self._local
    self._len = len(parent) // global_batch * self._local

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    batch, within = divmod(index, self._local)
    return self._parent[batch * self._global + self._offset + within]


def train_iterator(source, *, global_batch: int, seed: int, transform: Callable[[Any, np.random.Generator], Any],
                   num_workers: int = 0, process_index: int | None = None,
                   process_count: int | None = None) -> grain.DatasetIterator:
  """An endless, shuffled, augmented, batched iterator over this process's share of `source`."""
  p = jax.process_index() if process_index is None else process_index
  n = jax.process_count() if process_count is None else process_count
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat().random_map(transform, seed=seed + 1)
  ds = ProcessShardOfBatches(ds, global_batch, p, n).batch(global_batch // n, drop_remainder=True)
  it = ds.to_iter_dataset(read_options())
  if num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(it)


def eval_batches(arrays: dict[str, np.ndarray], keys: Sequence[str], batch_size: int):
  """Every element once, in order; the last batch padded by repetition and reported with its true size."""
  n = len(arrays[keys[0]])
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size) % n if n >= batch_size else np.resize(np.arange(start, n), batch_size)
    yield {k: arrays[k][idx] for k in keys}, min(batch_size, n - start)


def model_input(images: np.ndarray, in_channels: int) -> np.ndarray:
  """(..., H, W) grey slices -> (..., H, W, C) float32, the grey value replicated C times."""
  return np.repeat(np.asarray(images, np.float32)[..., None], in_channels, axis=-1)


def classifier_transform(aug_cfg, in_channels: int):
  """Slice record -> augmented model input (H, W, C) float32 with its labels."""
  def fn(record, rng):
    image = model_input(augment_lib.augment_slice(record["image"], rng, aug_cfg), in_channels)
    return {"image": image, "quality": np.int32(record["quality"]), "posterolateral": np.int32(record["posterolateral"])}
  return fn


CLASSIFIER_KEYS = ("image", "quality", "posterolateral")


def bone_quality_train_iterator(arrays, config, process_index=None, process_count=None):
  indices = oversample_minority(arrays["quality"], config.data.get("normal_fraction", 0.0), config.seed)
  source = ArraySource(arrays, CLASSIFIER_KEYS, indices)
  transform = classifier_transform(config.data.augment, config.data.in_channels)
  return train_iterator(source, global_batch=config.batch_size, seed=config.seed, transform=transform,
                        num_workers=config.data.num_workers, process_index=process_index,
                        process_count=process_count)


def labeling_train_iterator(records: list[dict], cfg, heads, *, global_batch: int, seed: int, num_workers: int = 0,
                            process_index=None, process_count=None) -> grain.DatasetIterator:
  """Batches of labelling samples (`labeling_samples.sample_vertebra`: patch (B, *patch_size) float32, targets
  {head: (B,) int32}, fully_visible, level), one element per vertebra of the records (`phantom_records` or
  `volume_record`), this process's share of each global batch."""
  return train_iterator(labeling_samples.LabelingSource(records), global_batch=global_batch, seed=seed,
                        transform=labeling_samples.labeling_transform(cfg, heads), num_workers=num_workers,
                        process_index=process_index, process_count=process_count)
