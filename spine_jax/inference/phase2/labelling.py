"""Phase 2, stage 4: the joint post-processing of instances and semantics. Vertebra voxels follow
the semantic mask exactly, vertebrae are numbered top to bottom, the sacrum is 26, the disc below
vertebra X is 100 + X and its endplate 200 + X.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from spine_jax.data import levels as levels_lib
from spine_jax.inference.phase2.common import (ARTICULAR_LABELS, BODY, CUBE, DISC, DISC_OFFSET, EDGES, ENDPLATE,
                                               ENDPLATE_OFFSET, ENDPLATE_OWNERS, FACES, INFERIOR_AXIS, LAST_LUMBAR_ID,
                                               SACRUM, SACRUM_ID, VERTEBRA_LABELS, centres_of_mass, check_mask,
                                               grow_box, note)


def reassign_articular_processes(instances: np.ndarray, semantic: np.ndarray, dominance: float = 0.5) -> np.ndarray:
  """Each 26-connected articular process (45..48) goes wholly to the instance covering most of it.

  As SPINEPS' `assign_vertebra_inconsistency`: only when that instance (unlabelled counts as a
  candidate) covers more than twice the runner-up; a process already in one instance is left.
  """
  out = np.array(instances, copy=True)
  for label in ARTICULAR_LABELS:
    pieces, count = ndimage.label(semantic == label, CUBE)
    for index, box in enumerate(ndimage.find_objects(pieces), start=1):
      if box is None:
        continue
      piece = pieces[box] == index
      owners, votes = np.unique(out[box][piece], return_counts=True)
      if len(owners) < 2:
        continue
      order = np.argsort(votes)[::-1]
      if votes[order[0]] * dominance > votes[order[1]]:
        out[box][piece] = owners[order[0]]
  return out


def assign_uncovered(instances: np.ndarray, vertebra: np.ndarray, grow: int = 2) -> tuple[np.ndarray, int]:
  """Vertebra voxels no instance covers join the instance around them, or are deleted: (instances, deleted).

  As SPINEPS' `assign_missing_cc`: instances first grow `grow` 6-connected steps inside the
  vertebra mask (the larger id wins a contested voxel); each remaining uncovered 18-connected
  piece then takes the instance most common among its 18-neighbours, or, with none, is
  deleted (left 0: a speck of bone far from every vertebra).
  """
  out = np.where(vertebra, instances, 0)
  for _ in range(int(grow)):
    hole = vertebra & (out == 0)
    if not hole.any():
      return out, 0
    grown = ndimage.grey_dilation(out, footprint=FACES)
    out[hole] = grown[hole]
  pieces, count = ndimage.label(vertebra & (out == 0), EDGES)
  deleted = 0
  for index, box in enumerate(ndimage.find_objects(pieces), start=1):
    if box is None:
      continue
    box = grow_box(box, 1, out.shape)
    piece = pieces[box] == index
    ring = ndimage.binary_dilation(piece, EDGES) & ~piece
    neighbours = out[box][ring]
    neighbours = neighbours[neighbours > 0]
    if neighbours.size:
      out[box][piece] = np.bincount(neighbours).argmax()
    else:
      deleted += int(piece.sum())
  return out, deleted


def first_vertebra_id(first) -> int:
  """A numbering start (SPINEPS id 1..25 or a level name C1..L6) as an id."""
  if isinstance(first, str):
    first = levels_lib.level_to_label(first, 'spineps')
  first = int(first)
  if not 1 <= first <= LAST_LUMBAR_ID:
    raise ValueError(f'first_vertebra must be a level C1..L6 or its SPINEPS id 1..{LAST_LUMBAR_ID}, got {first}')
  return first


def vertebra_ids(first, count: int) -> list[int]:
  """`count` consecutive SPINEPS ids from `first`, skipping the sacrum's 26."""
  ids, value = [], first_vertebra_id(first)
  while len(ids) < count:
    if value != SACRUM_ID:
      ids.append(value)
    value += 1
  if ids and ids[-1] >= DISC_OFFSET:
    raise ValueError(f'{count} vertebrae from id {first} reach {ids[-1]}, which collides with disc ids (100 + X)')
  return ids


def number_top_to_bottom(instances: np.ndarray, first=1) -> tuple[np.ndarray, dict[int, int]]:
  """Instances renumbered by their centre of mass along I, the highest `first` (int16), and the id map."""
  present = [int(v) for v in np.unique(instances) if v]
  if not present:
    return np.zeros(instances.shape, np.int16), {}
  _, centres = centres_of_mass(instances)
  order = sorted(present, key=lambda v: centres[v, INFERIOR_AXIS])
  mapping = dict(zip(order, vertebra_ids(first, len(order))))
  lut = np.zeros(int(max(present)) + 1, np.int16)
  for old, new in mapping.items():
    lut[old] = new
  return lut[instances], mapping


def _vertebra_heights(numbered: np.ndarray, semantic: np.ndarray) -> dict[int, float]:
  """Axis-1 centre of each vertebra's body (label 49), or of the whole instance without one (C1).

  The sacrum is left out: nothing it could number lies below it, and alone it would number the
  discs of a spine whose vertebrae were all lost.
  """
  ids = [int(v) for v in np.unique(numbered) if 0 < v < DISC_OFFSET and v != SACRUM_ID]
  if not ids:
    return {}
  body_sizes, body_centres = centres_of_mass(np.where(semantic == BODY, numbered, 0), max(ids))
  _, all_centres = centres_of_mass(numbered, max(ids))
  return {v: float(body_centres[v, INFERIOR_AXIS] if body_sizes[v] > 0 else all_centres[v, INFERIOR_AXIS])
          for v in ids}


def _nearest_above(heights: dict[int, float], row: float) -> int | None:
  above = [(h, v) for v, h in heights.items() if h < row]
  return max(above)[1] if above else None


def _label_discs(out, semantic, heights, messages) -> None:
  """Each 26-connected disc piece -> 100 + the vertebra nearest above its centre (top: the one before)."""
  pieces, count = ndimage.label(semantic == DISC, CUBE)
  if count == 0:
    return
  if not heights:
    note(messages, f'{count} disc(s) but no vertebra to number them after: discs left 0')
    return
  top = min(heights, key=heights.get)
  _, centres = centres_of_mass(pieces, count)
  lut = np.zeros(count + 1, np.int16)
  for index in range(1, count + 1):
    owner = _nearest_above(heights, centres[index, INFERIOR_AXIS])
    if owner is None:  # above the topmost vertebra: the disc below the vertebra before it, as SPINEPS
      owner = top - 1 if top - 1 != SACRUM_ID else top - 2
      if owner < 1:
        note(messages, 'a disc above the first vertebra (C1) has no vertebra to be numbered after: left 0')
        continue
    lut[index] = DISC_OFFSET + owner
  out[pieces > 0] = lut[pieces[pieces > 0]]


def _label_endplates(out, semantic, heights, owner_rule: str, messages) -> None:
  """Endplates -> 200 + X: X the vertebra nearest above each piece's centre ('above') or nearest voxel ('vertebra')."""
  endplate = semantic == ENDPLATE
  if not endplate.any():
    return
  if not heights:
    note(messages, 'endplates but no vertebra to number them after: endplates left 0')
    return
  if owner_rule == 'vertebra':
    box = grow_box(ndimage.find_objects(endplate.astype(np.int8))[0], 4, out.shape)
    bone = np.where((out[box] > 0) & (out[box] < DISC_OFFSET), out[box], 0)
    if bone.any():
      nearest = ndimage.distance_transform_edt(bone == 0, return_distances=False, return_indices=True)
      owners = bone[tuple(nearest)]
      region = out[box]
      region[endplate[box]] = ENDPLATE_OFFSET + owners[endplate[box]]
      return
  pieces, count = ndimage.label(endplate, CUBE)
  _, centres = centres_of_mass(pieces, count)
  top = min(heights, key=heights.get)
  lut = np.zeros(count + 1, np.int16)
  for index in range(1, count + 1):
    owner = _nearest_above(heights, centres[index, INFERIOR_AXIS])
    lut[index] = ENDPLATE_OFFSET + (owner if owner is not None else top)
  out[pieces > 0] = lut[pieces[pieces > 0]]


def label_spine(instances: np.ndarray, semantic: np.ndarray, *, first_vertebra=1, endplate_owner: str = 'above',
                reassign_articular: bool = True, assign_missing: bool = True) -> tuple[np.ndarray, list[str]]:
  """Consolidated instances + semantic mask -> (instance mask with SPINEPS ids (int16), messages).

  In order (SPINEPS' `phase_postprocess_combined`): instances are cut to the semantic vertebra
  labels 41..49; articular processes go to the instance that dominates them
  (`reassign_articular_processes`); uncovered vertebra voxels join a neighbouring instance or
  are dropped (`assign_uncovered`), so every vertebra voxel of the semantic mask ends up in
  exactly one vertebra (or nowhere); vertebrae are numbered top to bottom from `first_vertebra`
  (an id 1..25 or a level name; 26 is skipped); semantic sacrum voxels become 26; each disc
  piece becomes 100 + X and each endplate 200 + X.

  Numbering: there is no labelling network here, so ids are positions. The default 1 makes a
  field whose topmost vertebra is C1 come out right: the phantoms draw C1 (arch, no body), and
  C2's cutout brings it back as "the vertebra above". (SPINEPS' T2w models do not segment C1,
  so SPINEPS starts at 2 and lets its labelling model fix the levels.) For a field starting
  lower, pass its top level, e.g. first_vertebra='T10'.

  X is the nearest vertebra above (smaller I) by its body's centre, as SPEC and SPINEPS: for a
  disc that is the vertebra it lies under. For endplates, `endplate_owner='above'` (SPEC,
  SPINEPS) gives both endplates around disc 100 + X the id 200 + X, so a vertebra's upper
  endplate carries the number of the vertebra above it; 'vertebra' gives each endplate voxel the
  nearest vertebra voxel's number, the endplates of X being 200 + X (the phantoms' convention).
  """
  instances = check_mask(instances, 'instance mask')
  semantic = check_mask(semantic, 'semantic mask')
  if instances.shape != semantic.shape:
    raise ValueError(f'instance mask shape {instances.shape} differs from semantic mask shape {semantic.shape}')
  if endplate_owner not in ENDPLATE_OWNERS:
    raise ValueError(f'endplate_owner must be one of {ENDPLATE_OWNERS}, got {endplate_owner!r}')
  messages: list[str] = []
  vertebra = np.isin(semantic, VERTEBRA_LABELS)
  work = np.where(vertebra, instances, 0).astype(np.int32)
  if reassign_articular:
    work = reassign_articular_processes(work, semantic)
  if assign_missing and work.any():
    work, deleted = assign_uncovered(work, vertebra)
    if deleted:
      note(messages, f'{deleted} vertebra voxel(s) of the semantic mask touch no vertebra instance: left 0')
  numbered, mapping = number_top_to_bottom(work, first_vertebra)
  if mapping and max(mapping.values()) > LAST_LUMBAR_ID:
    note(messages, f'{len(mapping)} vertebrae numbered from {first_vertebra_id(first_vertebra)} run past L6 (25): '
                    'the ids after 25 are positions, not levels (is first_vertebra too low?)')
  if vertebra.any() and not mapping:
    note(messages, 'the semantic mask has vertebra voxels but no vertebra instance')
  out = numbered.copy()
  out[semantic == SACRUM] = SACRUM_ID
  heights = _vertebra_heights(out, semantic)
  _label_discs(out, semantic, heights, messages)
  _label_endplates(out, semantic, heights, endplate_owner, messages)
  return out, messages


# ---------------------------------------------------------------------------------------------
