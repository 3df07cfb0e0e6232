"""Phase 2, stage 3: the overlapping cutout views are paired by Dice into couples and merged by
voting into one instance map (SPINEPS' `create_prediction_couples` and `merge_coupled_predictions`).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from spine_jax.inference import semantic_postprocess
from spine_jax.inference.phase2.common import FACES, note
from spine_jax.inference.phase2.cutouts import CutoutMask


def _box_overlap(a: tuple, b: tuple) -> tuple | None:
  out = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b))
  return None if any(s.start >= s.stop for s in out) else out


def _local(box: tuple, window: tuple) -> tuple:
  return tuple(slice(w.start - b.start, w.stop - b.start) for b, w in zip(box, window))


def cutout_dice(a: CutoutMask, b: CutoutMask) -> float:
  """Dice of two cutout masks, computed only where their boxes overlap."""
  total = a.size + b.size
  if total == 0:
    return math.nan
  window = _box_overlap(a.box, b.box)
  if window is None:
    return 0.0
  return 2.0 * int(np.count_nonzero(a.mask[_local(a.box, window)] & b.mask[_local(b.box, window)])) / total


def _flatten(predictions) -> dict:
  """[(above, centre, below) per centre] or {(index, position): mask} -> {(index, position): mask}."""
  if isinstance(predictions, dict):
    return {k: v for k, v in predictions.items() if v is not None and v.size}
  return {(i, k): m for i, masks in enumerate(predictions) for k, m in enumerate(masks) if m is not None and m.size}


def find_couple(key, masks: dict, count: int, *, min_dice: float = 0.3,
                neighbour_range: int = 2) -> tuple[tuple, float]:
  """(members sorted by (centre index, position), agreement) of one prediction and its best partners.

  Partners are predictions of other cutouts within `neighbour_range` centre indices whose Dice
  with it exceeds `min_dice`; the two best are kept, or only the best when those two do not
  overlap each other by `min_dice` (they cannot be one vertebra). Agreement is the partners'
  mean Dice with the prediction (0 without partners).
  """
  index, _ = key
  anchor = masks[key]
  lo, hi = max(0, index - neighbour_range), min(count - 1, index + neighbour_range)
  scores = []
  for other in sorted(k for k in masks if lo <= k[0] <= hi and k[0] != index):
    scores.append((cutout_dice(anchor, masks[other]), other))
  scores.sort(key=lambda item: -item[0])
  partners = [(d, k) for d, k in scores[:2] if d > min_dice]
  if len(partners) == 2 and cutout_dice(masks[partners[0][1]], masks[partners[1][1]]) < min_dice:
    partners = partners[:1]
  agreement = float(np.mean([d for d, _ in partners])) if partners else 0.0
  return tuple(sorted([key] + [k for _, k in partners])), agreement


def rank_couples(masks: dict, count: int, *, min_dice: float = 0.3,
                 neighbour_range: int = 2) -> list[tuple[tuple, float]]:
  """Every prediction's couple (duplicates averaged), best first by (members + 1) x agreement."""
  found: dict[tuple, list] = {}
  for key in sorted(masks):
    members, agreement = find_couple(key, masks, count, min_dice=min_dice, neighbour_range=neighbour_range)
    found.setdefault(members, []).append(agreement)
  ranked = [(members, float(np.mean(values))) for members, values in found.items()]
  ranked.sort(key=lambda item: -(len(item[0]) + 1) * item[1])  # stable: ties keep their discovery order
  return ranked


def _remove_small_pieces(instances: np.ndarray, min_voxels: int) -> np.ndarray:
  """Delete 6-connected pieces of each instance under `min_voxels` (SPINEPS' clean_cc_artifacts, only_delete)."""
  boxes = ndimage.find_objects(instances)
  for label, box in enumerate(boxes, start=1):
    if box is None:
      continue
    region = instances[box]
    pieces, count = ndimage.label(region == label, FACES)
    small = np.bincount(pieces.ravel()) < min_voxels
    small[0] = False
    if small.any():
      region[small[pieces]] = 0
  return instances


def _renumber(instances: np.ndarray) -> np.ndarray:
  ids = np.unique(instances)
  lut = np.zeros(int(ids.max()) + 1, np.int32)
  lut[ids] = np.arange(len(ids))
  return lut[instances]


def consolidate(predictions, shape, *, couple_dice: float = 0.3, neighbour_range: int = 2,
                vote_agreement: float = 0.45, max_taken: float = 0.6, min_instance_voxels: int = 250,
                fill_holes: bool = True) -> tuple[np.ndarray, list[str]]:
  """Overlapping cutout predictions -> (instance map int32 numbered 1..n, messages).

  `predictions` as `predict_cutouts` returns them (index = centre order, bottom to top). Couples
  (`rank_couples`) are merged best first: a voxel joins when at least 2 members mark it if the
  couple has 3 members and agreement >= `vote_agreement`, else when 1 does; a couple whose
  selected voxels are more than `max_taken` already labelled is skipped; only unlabelled voxels
  are filled, each couple a new instance. Then 6-connected pieces of an instance under
  `min_instance_voxels` are deleted (a whole small instance is one such piece), holes are filled
  per instance (never over another instance) and the instances renumbered 1..n in merge order.
  `min_instance_voxels` is a count on this grid (`segment_instances` scales it).
  """
  shape = tuple(int(n) for n in shape)
  messages: list[str] = []
  masks = _flatten(predictions)
  count = 1 + max((k[0] for k in masks), default=-1)
  instances = np.zeros(shape, np.int32)
  if not masks:
    note(messages, 'the instance network found no vertebra in any cutout')
    return instances, messages
  next_id = 1
  for members, agreement in rank_couples(masks, count, min_dice=couple_dice, neighbour_range=neighbour_range):
    votes_needed = 2 if len(members) >= 3 and agreement >= vote_agreement else 1
    window = tuple(slice(min(masks[m].box[a].start for m in members), max(masks[m].box[a].stop for m in members))
                   for a in range(3))
    votes = np.zeros(tuple(s.stop - s.start for s in window), np.uint8)
    for m in members:
      votes[_local(window, masks[m].box)] += masks[m].mask
    selected = votes >= votes_needed
    total = int(np.count_nonzero(selected))
    if total == 0:
      continue
    target = instances[window]
    free = selected & (target == 0)
    if (total - int(np.count_nonzero(free))) / total > max_taken:
      continue
    target[free] = next_id
    next_id += 1
  if min_instance_voxels > 1:
    instances = _remove_small_pieces(instances, int(min_instance_voxels))
  if fill_holes:
    instances = semantic_postprocess.fill_holes(instances, [int(v) for v in np.unique(instances) if v])
  instances = _renumber(instances)
  made = int(instances.max())
  if made == 0:
    note(messages, f'no instance of at least {min_instance_voxels} voxels came out of the cutouts')
  elif made < count:
    note(messages, f'{made} vertebra instances from {count} vertebral bodies: some cutouts did not agree')
  return instances, messages
