"""Phase 2, stage 2: a fixed-size block of the relabelled semantic mask around each centre goes
through the instance network, which marks the vertebra above, the one at the centre and the one
below; the cutout geometry and the network's input encoding (`data/instance_cutouts.py`'s classes).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
from scipy import ndimage

from spine_jax.inference.phase2.common import (ABOVE, BELOW, BODY, CENTRE, INPUT_CHANNELS, OUTPUT_CHANNELS,
                                               VERTEBRA_LABELS, check_mask)


def cutout_boxes(centre, size, shape) -> tuple[tuple, tuple]:
  """(volume slices, cutout slices): where a `size` block centred on `centre` overlaps the volume.

  The block spans [centre - size // 2, centre - size // 2 + size) per axis, so the centre voxel
  sits at index size // 2 of the cutout; the parts outside the volume are padding.
  """
  volume_box, cut_box = [], []
  for c, s, n in zip(np.asarray(centre, np.int64), size, shape):
    start = int(c) - int(s) // 2
    lo, hi = min(max(start, 0), n), max(min(start + int(s), n), 0)
    hi = max(hi, lo)
    volume_box.append(slice(lo, hi))
    cut_box.append(slice(lo - start, hi - start))
  return tuple(volume_box), tuple(cut_box)


def cutout(volume: np.ndarray, centre, size, fill=0) -> np.ndarray:
  """The `size` block of `volume` (trailing axes kept) centred on `centre`, `fill` beyond the edges."""
  volume = np.asarray(volume)
  size = tuple(int(s) for s in size)
  volume_box, cut_box = cutout_boxes(centre, size, volume.shape[:3])
  out = np.full(size + volume.shape[3:], fill, volume.dtype)
  out[cut_box] = volume[volume_box]
  return out


def paste(cut: np.ndarray, centre, shape, out: np.ndarray | None = None) -> np.ndarray:
  """Inverse of `cutout`: the block's in-volume part written into `out` (zeros of `shape` if None)."""
  cut = np.asarray(cut)
  shape = tuple(int(n) for n in shape)[:3]
  if out is None:
    out = np.zeros(shape + cut.shape[3:], cut.dtype)
  volume_box, cut_box = cutout_boxes(centre, cut.shape[:3], shape)
  out[volume_box] = cut[cut_box]
  return out


def relabel_for_instance(semantic: np.ndarray) -> np.ndarray:
  """SPINEPS ids -> the instance network's classes: 41..48 -> 1..8, 49 -> 9, everything else 0 (uint8)."""
  semantic = np.asarray(semantic)
  if semantic.size and semantic.min() < 0:
    raise ValueError(f'semantic mask has negative labels ({int(semantic.min())})')
  lut = np.zeros(max(int(semantic.max(initial=0)) + 1, BODY + 1), np.uint8)
  lut[list(VERTEBRA_LABELS)] = np.arange(1, len(VERTEBRA_LABELS) + 1)
  return lut[semantic]


def one_hot_instance_input(classes: np.ndarray) -> np.ndarray:
  """Classes 0..9 (from `relabel_for_instance`) -> float32 one-hot with 10 trailing channels."""
  return np.eye(INPUT_CHANNELS, dtype=np.float32)[np.asarray(classes)]


def instance_network_input(semantic: np.ndarray) -> np.ndarray:
  """A semantic (cutout) in SPINEPS ids -> the network's (..., 10) float32 input."""
  return one_hot_instance_input(relabel_for_instance(semantic))


@dataclasses.dataclass(frozen=True)
class CutoutMask:
  """One vertebra predicted by one cutout, kept over its own bounding box in volume coordinates."""
  box: tuple  # slices into the volume
  mask: np.ndarray  # bool, the box's shape

  @property
  def size(self) -> int:
    return int(np.count_nonzero(self.mask))

  def dense(self, shape) -> np.ndarray:
    out = np.zeros(tuple(shape), bool)
    out[self.box] = self.mask
    return out


def _trimmed(mask: np.ndarray, offset) -> CutoutMask | None:
  box = ndimage.find_objects(mask.astype(np.int8))
  if not box:
    return None
  box = box[0]
  return CutoutMask(tuple(slice(o + b.start, o + b.stop) for o, b in zip(offset, box)), mask[box].copy())


def _output_classes(output, count: int, size: tuple) -> np.ndarray:
  """The network's answer for a batch -> (count, *size) classes 0..3."""
  output = np.asarray(output)
  if output.ndim == 5 and output.shape[1:] == size + (OUTPUT_CHANNELS,):
    return output[:count].argmax(-1)
  if output.ndim == 4 and output.shape[1:] == size and np.issubdtype(output.dtype, np.integer):
    return output[:count]
  sides = ', '.join(map(str, size))
  raise ValueError(f'predict_fn returned shape {output.shape} ({output.dtype}); expected (N, {sides}, '
                   f'{OUTPUT_CHANNELS}) scores or (N, {sides}) integer classes')


def predict_cutouts(predict_fn: Callable, semantic: np.ndarray, centres, size=(248, 304, 64), batch_size: int = 4,
                    *, pad_batches: bool = True) -> list[tuple]:
  """Per centre, the (above, centre, below) vertebrae the instance network finds in its cutout.

  `predict_fn(batch)` gets float32 (N, P, I, R, 10), the one-hot relabelled semantic cutouts
  (beyond the volume: background; with `pad_batches` N is always `batch_size`, the last batch
  filled with all-zero cutouts, so a jitted function compiles once), and returns numpy or JAX
  (N, P, I, R, 4) scores (logits, probabilities or one-hot: argmax over background, above,
  centre, below) or (N, P, I, R) integer classes 0..3 (cheaper to bring back from a device).
  The next batch is dispatched before the previous answer is read, so device work overlaps the
  host's; two input buffers alternate, so a batch's array is refilled once its answer has been
  read (copy it to keep it). Each mask is a `CutoutMask` in volume coordinates, None where
  nothing was predicted.
  """
  semantic = check_mask(semantic, 'semantic mask')
  size = tuple(int(s) for s in size)
  if len(size) != 3 or min(size) < 1:
    raise ValueError(f'cutout size must be three positive sides, got {size}')
  if batch_size < 1:
    raise ValueError(f'batch_size must be at least 1, got {batch_size}')
  centres = np.asarray(centres, np.int64).reshape(-1, 3)
  classes = relabel_for_instance(semantic)
  channels = np.arange(INPUT_CHANNELS, dtype=np.uint8)
  buffers: list = [None, None]
  results: list[tuple] = []

  def dispatch(index, chunk):
    if buffers[index % 2] is None:
      buffers[index % 2] = np.zeros((batch_size,) + size + (INPUT_CHANNELS,), np.float32)
    batch = buffers[index % 2]
    for k, centre in enumerate(chunk):  # one-hot written in place: no temporary of the cutout's size x 10
      np.equal(cutout(classes, centre, size)[..., None], channels, out=batch[k], casting='unsafe')
    batch[len(chunk):] = 0
    return predict_fn(batch if pad_batches else batch[:len(chunk)])

  def collect(chunk, output):
    for centre, cut in zip(chunk, _output_classes(output, len(chunk), size)):
      volume_box, cut_box = cutout_boxes(centre, size, semantic.shape)
      offset = [b.start for b in volume_box]
      results.append(tuple(_trimmed(cut[cut_box] == k, offset) for k in (ABOVE, CENTRE, BELOW)))

  chunks = [centres[i:i + batch_size] for i in range(0, len(centres), batch_size)]
  pending = None
  for index, chunk in enumerate(chunks + [None]):
    current = (chunk, dispatch(index, chunk)) if chunk is not None else None
    if pending is not None:
      collect(*pending)
    pending = current
  return results
