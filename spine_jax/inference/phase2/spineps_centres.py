"""Phase 2's body centres as SPINEPS 2.1.3 finds them: `phase_instance.get_corpus_coms` (phase_instance.py:272-447)
with its plane split of fused bodies (`get_separating_components`, `get_plane_split`, `split_by_plane`,
phase_instance.py:450-657), on the cropped PIR model-grid mask, with numpy and scipy only.

TPTBox counts components with cc3d on C-ordered copies (`NII.get_seg_array` copies in C order), which numbers
them by their first voxel in C order; `label_components` numbers scipy's components the same way, since ties
in height and volume are broken by that numbering. Centres of mass are cc3d's: integer coordinate sums over
the voxel count, in float64. SPINEPS' choices are reproduced, defects included (see `separating_components`).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from spine_jax.inference.phase2.common import (BODY, CUBE, DISC, EDGES, ENDPLATE, FACES, INFERIOR_AXIS,
                                               REFERENCE_SPACING, centres_of_mass, grow_box, note)

STRUCTURES = {6: FACES, 18: EDGES, 26: CUBE}
BODY_EROSION = 2  # voxels, 18-connected (get_corpus_coms: erode_msk_(2, connectivity=2))
IVD_LABEL_OFFSET = 100  # seg_pipeline.IVD_LABEL_OFFSET: disc components are keyed 101, 102, ...
SAME_HEIGHT_MM = 10 * REFERENCE_SPACING[INFERIOR_AXIS]  # 7.5 mm, SAME_HEIGHT_MERGE_THRESHOLD_MM
NEIGHBOR_OFFSETS = (-5, -4, -3, -2, -1, 1, 2, 3, 4, 5)  # positions in the height order (not the body itself)
MIN_NEIGHBORS_FOR_VOLUME_CHECK = 2  # more than this many bodies besides the largest
MERGED_CORPUS_VOLUME_RATIO = 1.5
SPLIT_MAX_EROSIONS = 10  # get_separating_components' max_iter


class SplitError(Exception):
  """A fused body that SPINEPS' split gives up on (it logs the exception and keeps the body whole)."""


def label_components(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
  """(labels int32, count): cc3d's components of a binary mask, numbered by their first voxel in C order."""
  labels, count = ndimage.label(np.asarray(mask, bool), STRUCTURES[connectivity])
  if count < 2:
    return labels.astype(np.int32), int(count)
  flat = labels.ravel()
  found = flat[np.flatnonzero(flat)]
  _, first = np.unique(found, return_index=True)  # where each label first appears in C order
  lut = np.zeros(count + 1, np.int32)
  lut[1:][np.argsort(first, kind='stable')] = np.arange(1, count + 1)
  return lut[labels], int(count)


def _centroid(mask: np.ndarray, offset=(0, 0, 0)) -> np.ndarray:
  """cc3d's centre of mass of a mask cut out at `offset`: the sum of the volume's coordinates over the count."""
  coords = np.argwhere(mask) + np.asarray(offset, np.int64)
  return coords.sum(axis=0).astype(np.float64) / len(coords)


def corpus_mask(semantic: np.ndarray, min_voxels: int) -> np.ndarray:
  """The bodies whose centres count (phase_instance.py:307-323): label 49 eroded by 2 voxels (18-connected,
  the outside is background), then 6-connected pieces under `min_voxels` deleted (clean_cc_artifacts,
  only_delete; skipped when nothing is background, as SPINEPS does; 0 switches it off)."""
  body = ndimage.binary_erosion(semantic == BODY, EDGES, iterations=BODY_EROSION)
  if min_voxels > 0 and body.any() and not body.all():
    pieces, count = ndimage.label(body, FACES)
    small = np.bincount(pieces.ravel(), minlength=count + 1) < min_voxels
    small[0] = False
    body &= ~small[pieces]
  return body


def _dilate(mask: np.ndarray) -> np.ndarray:
  return ndimage.binary_dilation(mask, CUBE)


def separating_components(segvert: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(S, T, S dilated, T dilated): `get_separating_components(segvert, connectivity=3)`.

  Erodes (26-connected) until the body falls apart, at most 10 times; S and T are the two pieces (the two
  largest by volume, ties in cc3d's order, when there are more); each is then dilated in turn, S first,
  until the two touch. A body that erodes away without falling apart is never split: SPINEPS' fallback for
  it writes 2 into the boolean mask it got (`vol[vol_old != 0] = 2`), finds no second part and raises.
  """
  vol = np.asarray(segvert, bool)
  for _ in range(SPLIT_MAX_EROSIONS + 1):
    eroded = ndimage.binary_erosion(vol, CUBE)
    pieces, count = label_components(eroded, 26)
    if count > 1:
      break
    if count == 0:
      raise SplitError('eroded away without falling apart (SPINEPS: "cannot split volume into two parts")')
    vol = eroded
  else:
    raise SplitError(f'not apart after {SPLIT_MAX_EROSIONS} erosions')
  if count == 2:
    spart, tpart = pieces == 1, pieces == 2
  else:
    sizes = np.bincount(pieces.ravel())[1:]
    ranked = np.argsort(-sizes, kind='stable') + 1
    spart, tpart = pieces == ranked[0], pieces == ranked[1]
  spart_dil, tpart_dil = _dilate(spart), _dilate(tpart)
  while not (spart_dil & tpart_dil).any():
    spart_dil = _dilate(spart_dil)
    if (spart_dil & tpart_dil).any():
      break
    tpart_dil = _dilate(tpart_dil)
  return spart, tpart, spart_dil, tpart_dil


def plane_split(segvert: np.ndarray, spart, tpart, spart_dil, tpart_dil, box=None) -> np.ndarray:
  """`get_plane_split` + `split_by_plane`: segvert's voxels as 1 (at or above the plane) and 2 (below).

  The plane goes through the centre of mass of where the dilated parts meet, normal to the line between
  the parts' centres of mass; it is rasterised one voxel per column along the axis nearest that normal
  (truncated, clipped to the volume). SPINEPS then fills it in S, A, R from the bottom: a voxel is 1 when
  its (P, R) column holds a plane voxel at or below it, else 2. The parts may be cut out of the volume at
  `box` (slices); the plane is worked out in the volume's coordinates over the box's columns, all rows.
  """
  segvert = np.asarray(segvert, bool)
  box = box if box is not None else tuple(slice(0, n) for n in segvert.shape)
  offset = [b.start for b in box]
  collision_point = _centroid(spart_dil & tpart_dil, offset)
  normal_vector = _centroid(spart, offset) - _centroid(tpart, offset)
  with np.errstate(divide='ignore', invalid='ignore'):
    normalized = normal_vector / np.linalg.norm(normal_vector)
  if not np.all(np.isfinite(normalized)):
    raise SplitError('the two parts share a centre of mass')
  axis = int(np.argmax(np.abs(normalized)))
  dim1, dim2 = (d for d in range(3) if d != axis)
  columns = [range(b.start, b.stop) for b in box]
  columns[INFERIOR_AXIS] = range(segvert.shape[INFERIOR_AXIS])  # whole columns: the fill runs up from the bottom
  shift_total = -collision_point.dot(normal_vector)
  xx, yy = np.meshgrid(columns[dim1], columns[dim2])
  zz = (-normal_vector[dim1] * xx - normal_vector[dim2] * yy - shift_total) * 1.0 / normal_vector[axis]
  z_max = segvert.shape[axis] - 1
  zz[zz < 0] = 0
  zz[zz > z_max] = z_max
  coords = np.zeros([xx.shape[0], xx.shape[1], 3], dtype=int)
  coords[:, :, axis] = zz
  coords[:, :, dim1] = xx
  coords[:, :, dim2] = yy
  starts = np.array([c.start for c in columns])
  local = coords.reshape(-1, 3) - starts
  inside = np.all((local >= 0) & (local < [len(c) for c in columns]), axis=1)
  plane = np.zeros([len(c) for c in columns], bool)
  plane[tuple(local[inside].T)] = True
  rows = np.flip(np.logical_or.accumulate(np.flip(plane, INFERIOR_AXIS), axis=INFERIOR_AXIS), INFERIOR_AXIS)
  window = tuple(slice(c.start, c.stop) for c in columns)
  out = np.zeros(segvert.shape, np.uint8)
  out[window] = np.where(segvert[window], np.where(rows, 1, 2), 0)
  return out


def split_fused_body(segvert: np.ndarray) -> np.ndarray:
  """A fused body -> 0, 1 (upper part), 2 (lower part); raises SplitError where SPINEPS' split fails.

  Works in the body's bounding box grown by half its longest side plus 2 (TPTBox crops too): the parts'
  dilations until they meet reach no further, so nothing changes but the time."""
  segvert = np.asarray(segvert, bool)
  found = ndimage.find_objects(segvert.astype(np.int8))
  if not found:
    raise SplitError('empty body')
  box = grow_box(found[0], max(b.stop - b.start for b in found[0]) // 2 + 2, segvert.shape)
  return plane_split(segvert, *separating_components(segvert[box]), box=box)


def _volumes_and_heights(labels: np.ndarray, count: int) -> dict[int, tuple[float, int]]:
  sizes, centres = centres_of_mass(labels, count)
  return {k: (float(centres[k, INFERIOR_AXIS]), int(sizes[k])) for k in range(1, count + 1) if sizes[k] > 0}


def _fix_merged(corpus_cc: np.ndarray, semantic: np.ndarray, same_height: float, messages: list) -> np.ndarray:
  """phase_instance.py:341-438: walk bodies and disc spaces by height; two of a kind in a row are merged for
  the walk when closer than `same_height` voxels, else the largest body within 5 positions is split by a
  plane when it exceeds 1.5 x the mean of more than 2 others. `stats` keeps its pre-split values, as there."""
  discs = (semantic == DISC) | (semantic == ENDPLATE)
  has_ivd = bool(discs.any())
  ivd_cc, ivd_count = label_components(discs, 26)
  stats = {IVD_LABEL_OFFSET + k: (h, True, v) for k, (h, v) in _volumes_and_heights(ivd_cc, ivd_count).items()}
  for k, (h, v) in _volumes_and_heights(corpus_cc, int(corpus_cc.max())).items():
    stats[k] = (h, False, v)
  by_height = dict(sorted(stats.items(), key=lambda x: x[1][0]))
  keys = list(by_height)
  position = {k: n for n, k in enumerate(keys)}
  for vl in list(keys):
    if vl not in by_height:
      continue
    idx = position[vl]
    height, is_ivd = by_height[vl][0], by_height[vl][1]
    if idx + 1 >= len(keys):
      continue
    nkey = keys[idx + 1]
    if not (nkey in by_height and by_height[nkey][1] == is_ivd and has_ivd):
      continue
    if abs(by_height[nkey][0] - height) < same_height:
      by_height.pop(vl)
      by_height = dict(sorted(by_height.items(), key=lambda x: x[1][0]))
      keys = list(by_height)
      position = {k: n for n, k in enumerate(keys)}
      continue
    neighbours = {keys[idx + i]: by_height[keys[idx + i]] for i in NEIGHBOR_OFFSETS
                  if 0 <= idx + i < len(keys) and keys[idx + i] < IVD_LABEL_OFFSET}
    volumes = [v[2] for v in neighbours.values()]
    others = len(volumes) - 1
    if others <= MIN_NEIGHBORS_FOR_VOLUME_CHECK:
      continue
    biggest = int(np.argmax(volumes))
    ratio = volumes[biggest] / (sum(volumes[i] for i in range(len(volumes)) if i != biggest) / others)
    if ratio <= MERGED_CORPUS_VOLUME_RATIO:
      continue
    target = list(neighbours)[biggest]
    row = by_height[target][0]
    try:
      parts = split_fused_body(corpus_cc == target)
    except SplitError as error:
      note(messages, f'fused vertebral bodies near row {row:.0f} ({ratio:.2f}x their neighbours) not split: {error}')
      continue
    corpus_cc[parts == 2] = corpus_cc.max() + 1
    note(messages, f'fused vertebral bodies near row {row:.0f} ({ratio:.2f}x their neighbours): split by a plane')
  return corpus_cc


def corpus_centres(semantic: np.ndarray, spacing, *, min_voxels: int, detect_merged: bool = True,
                   zoom=None) -> tuple[np.ndarray, list[str]]:
  """(centres of mass (n, 3) float64 bottom to top, messages): `get_corpus_coms` on a PIR mask.

  `min_voxels` is SPINEPS' corpus threshold in voxels of this grid (0: no clean-up); `zoom` the spacing as
  TPTBox reports it (the same-height distance is 7.5 mm over it along I; default `spacing`). Bodies at one
  height are sorted by label and then reversed with the rest, as SPINEPS' stable sort and reverse do.
  """
  zoom = np.asarray(spacing if zoom is None else zoom, np.float64)
  messages: list[str] = []
  body = corpus_mask(semantic, min_voxels)
  if not body.any():
    note(messages, 'no vertebral body survives the erosion and clean-up (SPINEPS: no corpus found, phase 2 stops)')
    return np.zeros((0, 3)), messages
  corpus_cc, count = label_components(body, 26)
  if detect_merged:
    corpus_cc = _fix_merged(corpus_cc, semantic, SAME_HEIGHT_MM / float(zoom[INFERIOR_AXIS]), messages)
    count = int(corpus_cc.max())
  sizes, centres = centres_of_mass(corpus_cc, count)
  coms = [centres[k] for k in range(1, count + 1) if sizes[k] > 0]
  coms.sort(key=lambda a: a[INFERIOR_AXIS])
  coms.reverse()
  return np.array(coms, np.float64).reshape(-1, 3), messages
