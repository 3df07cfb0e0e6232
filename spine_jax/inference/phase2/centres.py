"""Phase 2, stage 1: one centre per vertebral body (label 49), bottom to top, with fused bodies split
and body fragments at one height merged (SPEC section 3).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from spine_jax.inference.phase2.common import (BODY, CUBE, DISC, EDGES, ENDPLATE, INFERIOR_AXIS, REFERENCE_SPACING,
                                               centres_of_mass, check_mask, grow_box, note, scaled_distance,
                                               scaled_voxel_count)


def split_fused_body(mask: np.ndarray, max_erosions: int = 10, spur_fraction: float = 0.2) -> np.ndarray | None:
  """A body mask that is really two bodies -> labels 1 and 2 over it, or None if it never separates.

  Erodes (26-connected) until the mask falls apart; pieces under `spur_fraction` of the largest
  are corners and spurs that erosion cut off first, so they are dropped and erosion goes on.
  Once two real pieces remain, every voxel of the original mask goes to the nearer of the two
  largest (Euclidean distance): the cut follows the narrowest part of the bridge between them,
  where SPINEPS fits a plane.
  """
  mask = np.asarray(mask, bool)
  box = ndimage.find_objects(mask.astype(np.int8))
  if not box:
    return None
  box = grow_box(box[0], 1, mask.shape)
  local = mask[box]
  eroded = local
  for _ in range(int(max_erosions)):
    eroded = ndimage.binary_erosion(eroded, CUBE)
    pieces, count = ndimage.label(eroded, CUBE)
    if count == 0:
      return None
    sizes = np.bincount(pieces.ravel())[1:]
    real = np.flatnonzero(sizes >= spur_fraction * sizes.max()) + 1
    if len(real) >= 2:
      two = real[np.argsort(sizes[real - 1])[::-1][:2]]
      seeds = np.zeros(local.shape, np.uint8)
      seeds[pieces == two[0]] = 1
      seeds[pieces == two[1]] = 2
      nearest = ndimage.distance_transform_edt(seeds == 0, return_distances=False, return_indices=True)
      out = np.zeros(mask.shape, np.uint8)
      out[box] = np.where(local, seeds[tuple(nearest)], 0)
      return out
    eroded = np.isin(pieces, real)
  return None


def _body_components(semantic, spacing, erosion: int, min_voxels: int) -> tuple[np.ndarray, int]:
  """Labels of the eroded body's 26-connected components that are at least `min_voxels` large."""
  body = semantic == BODY
  if erosion > 0:
    body = ndimage.binary_erosion(body, EDGES, iterations=int(erosion))
  components, count = ndimage.label(body, CUBE)
  if count == 0:
    return components, 0
  keep = np.bincount(components.ravel()) >= scaled_voxel_count(min_voxels, spacing)
  keep[0] = False
  lut = np.zeros(count + 1, np.int32)
  lut[keep] = np.arange(1, int(keep.sum()) + 1)
  return lut[components], int(keep.sum())


def _edge_slivers(semantic, components, count, erosion: int, min_voxels: int) -> tuple[np.ndarray, int]:
  """Adds the body pieces that touch the field's top or bottom and vanished in the erosion as components.

  A vertebra cut by the field of view can leave a body only a voxel or two thick, which the erosion
  (there to part bodies touching across thin discs) removes; it is still a vertebra to find, and
  training centres cutouts on such slivers too. The pieces are what the body loses in an opening
  (erosion, then the kept components grown back), so a sliver stays apart from the whole body next
  to it; pieces that touch a kept body are its rim and stay out."""
  body = semantic == BODY
  kept = components > 0
  if erosion > 0 and count:
    kept = ndimage.binary_dilation(kept, EDGES, iterations=int(erosion)) & body
  pieces, n = ndimage.label(body & ~kept, CUBE)
  if n == 0:
    return components, count
  sizes = np.bincount(pieces.ravel(), minlength=n + 1)
  keep = np.zeros(n + 1, bool)
  keep[pieces[:, 0]] = keep[pieces[:, -1]] = True  # the field's top and bottom rows, where it cuts the spine
  keep &= sizes >= min_voxels
  # A piece against a kept body is that body's rim, not a vertebra of its own.
  keep[np.unique(pieces[ndimage.binary_dilation(kept, CUBE)])] = False
  keep[0] = False
  if not keep.any():
    return components, count
  lut = np.zeros(n + 1, np.int32)
  lut[keep] = np.arange(count + 1, count + 1 + int(keep.sum()))
  components = np.where(components > 0, components, lut[pieces])
  return components, count + int(keep.sum())


def _merge_duplicates(components: np.ndarray, count: int, distance: float, messages: list) -> tuple[np.ndarray, int]:
  """Body pieces whose centres lie closer than `distance` voxels along I are one body (chained)."""
  if count < 2:
    return components, count
  _, centres = centres_of_mass(components, count)
  heights = centres[1:, INFERIOR_AXIS]
  order = np.argsort(heights, kind='stable')
  lut = np.arange(count + 1)
  group = order[0] + 1
  for prev, cur in zip(order[:-1], order[1:]):
    if heights[cur] - heights[prev] < distance:
      lut[cur + 1] = group
      note(messages, f'vertebral body pieces at rows {heights[prev]:.0f} and {heights[cur]:.0f} are closer than '
                      f'{distance:.1f} voxels: taken as one body')
    else:
      group = cur + 1
  if np.array_equal(lut, np.arange(count + 1)):
    return components, count
  _, compact = np.unique(lut, return_inverse=True)
  return compact.astype(np.int32)[components], int(compact.max())


def _disc_heights(semantic) -> np.ndarray:
  """Axis-1 centres of the 26-connected pieces of disc and endplate (one piece per disc space)."""
  discs, count = ndimage.label((semantic == DISC) | (semantic == ENDPLATE), CUBE)
  if count == 0:
    return np.zeros(0)
  return centres_of_mass(discs, count)[1][1:, INFERIOR_AXIS]


def _alternation_errors(body_heights: np.ndarray, disc_heights: np.ndarray, distance: float):
  """Positions where two bodies or two discs follow each other along I, and the sorted sequence.

  Returns (errors, sequence): sequence is [(height, is_disc, body index or -1)] top to bottom,
  each error the index of the first of two same-kind neighbours. Two discs closer than
  `distance` are one disc in two pieces, not an error.
  """
  sequence = sorted([(float(h), False, i) for i, h in enumerate(body_heights)]
                    + [(float(h), True, -1) for h in disc_heights])
  errors = [k for k in range(len(sequence) - 1)
            if sequence[k][1] == sequence[k + 1][1]
            and not (sequence[k][1] and sequence[k + 1][0] - sequence[k][0] < distance)]
  return errors, sequence


def _fused_candidate(sequence, error: int, sizes: np.ndarray, window: int, ratio: float) -> tuple[int, float] | None:
  """(body index, size / mean of the others) of the largest body near an alternation error, if oversized."""
  lo, hi = max(0, error - window), min(len(sequence), error + 2 + window)
  bodies = [item[2] for item in sequence[lo:hi] if not item[1]]
  if len(bodies) < 4:  # the suspect and at least three others to compare with, as SPINEPS
    return None
  volumes = sizes[bodies]
  big = int(np.argmax(volumes))
  others = np.delete(volumes, big).mean()
  factor = float(volumes[big] / others) if others > 0 else math.inf
  return (bodies[big], factor) if factor > ratio else None


def _split_merged_bodies(components, count, semantic, distance, ratio, window, max_erosions, messages):
  """Find bodies/discs out of alternation and split the oversized body next to each, until none is left."""
  disc_heights = _disc_heights(semantic)
  if disc_heights.size == 0:
    return components, count
  failed, reported = set(), set()
  splits_left = count  # each split adds a body; more than doubling them is no longer repair
  while splits_left > 0:
    sizes, centres = centres_of_mass(components, count)
    errors, sequence = _alternation_errors(centres[1:, INFERIOR_AXIS], disc_heights, distance)
    split_one = False
    for error in errors:
      found = _fused_candidate(sequence, error, sizes[1:], window, ratio)
      if found is None:
        row = round(sequence[error][0])
        if row not in reported:
          reported.add(row)
          note(messages, f'vertebral bodies and discs do not alternate near row {sequence[error][0]:.0f}: '
                          'a body or disc is missing or fused')
        continue
      index, factor = found
      label = index + 1
      if label in failed:
        continue
      parts = split_fused_body(components == label, max_erosions)
      row = centres[label, INFERIOR_AXIS]
      if parts is None:
        failed.add(label)
        note(messages, f'fused vertebral bodies near row {row:.0f} ({factor:.1f}x the size of their neighbours) '
                        'could not be separated: they get one cutout')
        continue
      count += 1
      components[parts == 2] = count
      note(messages, f'fused vertebral bodies near row {row:.0f} ({factor:.1f}x the size of their neighbours): '
                      'split in two')
      split_one = True
      splits_left -= 1
      break
    if not split_one:
      break
  return components, count


def _inside(component: np.ndarray, centre: np.ndarray) -> np.ndarray:
  """The rounded centre if it lies in the component, else the component's voxel nearest to it."""
  point = np.clip(np.rint(centre).astype(np.int64), 0, np.asarray(component.shape) - 1)
  if component[tuple(point)]:
    return point
  voxels = np.argwhere(component)
  return voxels[np.argmin(((voxels - centre) ** 2).sum(axis=1))]


def vertebral_body_centres(semantic: np.ndarray, spacing=REFERENCE_SPACING, *, erosion: int = 2,
                           min_voxels: int = 100, detect_merged: bool = True, duplicate_distance: float = 10,
                           merged_ratio: float = 1.5, merged_window: int = 5,
                           max_split_erosions: int = 10, edge_bodies: bool = True) -> tuple[np.ndarray, list[str]]:
  """(centres (n, 3) int voxel indices ordered bottom to top, messages) of the vertebral bodies.

  Bodies are the 26-connected components of label 49 after an `erosion`-voxel erosion (which
  parts bodies touching across a thin disc), those under `min_voxels` dropped. Pieces closer than
  `duplicate_distance` voxels along I are merged (one body broken in two). With `detect_merged`,
  bodies and disc spaces (disc plus endplate pieces) must alternate along I; where two of a kind
  follow each other, the largest body within `merged_window` positions that is more than
  `merged_ratio` times the mean of at least three others is split (`split_fused_body`). Each
  centre is the component's centre of mass, moved to the nearest voxel of the component when it
  falls outside. With `edge_bodies`, body slivers at the field's edge that the erosion removed and
  that are at least `min_voxels` large are bodies too (`_edge_slivers`). Sizes and distances are at
  the reference spacing and scaled to `spacing`.
  """
  semantic = check_mask(semantic, 'semantic mask')
  messages: list[str] = []
  empty = np.zeros((0, 3), np.int64)
  if not np.any(semantic == BODY):
    note(messages, 'no vertebral body (label 49) in the semantic mask: no vertebra instances can be made')
    return empty, messages
  components, count = _body_components(semantic, spacing, erosion, min_voxels)
  if edge_bodies:
    components, count = _edge_slivers(semantic, components, count, erosion, scaled_voxel_count(min_voxels, spacing))
  if count == 0:
    note(messages, f'no vertebral body survives a {erosion}-voxel erosion with at least '
                    f'{scaled_voxel_count(min_voxels, spacing)} voxels: no vertebra instances can be made')
    return empty, messages
  distance = scaled_distance(duplicate_distance, spacing)
  components, count = _merge_duplicates(components, count, distance, messages)
  if detect_merged:
    components, count = _split_merged_bodies(components, count, semantic, distance, merged_ratio,
                                             int(merged_window), int(max_split_erosions), messages)
  _, centres = centres_of_mass(components, count)
  boxes = ndimage.find_objects(components)
  points = []
  for label in range(1, count + 1):
    box = boxes[label - 1]
    offset = np.array([b.start for b in box])
    points.append(offset + _inside(components[box] == label, centres[label] - offset))
  points = np.array(points, np.int64)
  points = points[np.argsort(-centres[1:, INFERIOR_AXIS], kind='stable')]
  if len(points) == 1:
    note(messages, 'a single vertebral body: its cutout alone decides the instances (no neighbours to agree with)')
  return points, messages
