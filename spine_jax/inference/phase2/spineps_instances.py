"""Phase 2 up to the raw instance mask as SPINEPS 2.1.3 makes it (`inference.phase2_mode = 'spineps'`):
`phase_instance.predict_instance_mask` (phase_instance.py:116-269) on a PIR mask already on the model grid,
with numpy and scipy only.

In order: crop to the mask's bounding box plus 3.75 mm (line 189); thresholds from the model's voxel counts
(lines 196-199); body centres (`spineps_centres.corpus_centres`, line 747); each centre moved 5 rows down
until it lies on a vertebra label, truncated to a voxel (lines 781-789); cutouts of [c - size // 2,
c + size // 2) zero-padded beyond the crop (`nii_calc_crop_around_centerpoint`, lines 660-704); the network's
one-hot input of classes 41..48 -> 1..8, 49 -> 9, else 0 (the inference config's mapping; labels >= channels
-> 0, seg_model.py:617-625), through `cutouts.predict_cutouts`; couples (`find_prediction_couple`, lines
955-1019) ranked by (members + 1) x agreement (lines 912-952); the merge (lines 1022-1093); 6-connected
pieces under the instance threshold deleted (line 1096, clean_cc_artifacts); holes filled label by label
as fill_voids does (line 243); instances renumbered 1..n by merge order (line 252); uncropped (line 260).

One SPINEPS defect is not reproduced unless asked (`abort_on_empty_couple`): a couple whose vote selects no
voxel makes SPINEPS drop every instance (merge_coupled_predictions returns ErrCode.EMPTY, so
predict_instance_mask returns None); here that couple is skipped. With the stored predictions non-empty the
case cannot arise (a 3-member couple's anchor overlaps its best partner, Dice > 0.3), so the two agree.
Not covered: SPINEPS' labels 50 (dense corpus) and 51 (dens), which its mapping also sends to class 9 and
which switch get_corpus_coms to another branch, are no spine_jax semantic ids (spine_labels.SEMANTIC_IDS);
pad_size (0 in SPINEPS' pipeline) and resampling (phase 2 here already runs on the model's grid).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from spine_jax.inference.phase2.common import (BODY, INFERIOR_AXIS, REFERENCE_SPACING, VERTEBRA_LABELS, check_mask,
                                               note)
from spine_jax.inference.phase2.consolidation import _flatten, _local, _remove_small_pieces, _renumber, find_couple
from spine_jax.inference.phase2.cutouts import cutout_boxes, predict_cutouts
from spine_jax.inference.phase2.spineps_centres import corpus_centres
from spine_jax.inference import semantic_postprocess

CROP_MARGIN_MM = 5 * min(REFERENCE_SPACING)  # 3.75 mm, INSTANCE_CROP_MARGIN_MM
MIN_CLEANING_MM3 = 40 * float(np.prod(REFERENCE_SPACING))  # MIN_CLEANING_VOLUME_MM3: 40 model-grid voxels
COM_STEP_ROWS = 5  # a centre off the vertebrae moves this many voxels along I at a time
COUPLE_DICE = 0.3  # PREDICTION_COUPLE_DICE_THRESHOLD
COUPLE_RANGE = 2  # partners come from cutouts within this many centre indices
MAX_ESTABLISHED_OVERLAP = 0.6


@dataclasses.dataclass
class SpinepsInstances:
  """What SPINEPS' instance phase made, in the volume's voxel coordinates."""
  instances: np.ndarray  # int32, 1..n in merge order (0 where SPINEPS returns no mask)
  coms: np.ndarray  # (n, 3) float64 body centres of mass, bottom to top
  centres: np.ndarray  # (n, 3) int64 cutout centres (after the step onto a vertebra)
  boxes: np.ndarray  # (n, 3, 2) int64 start, stop of each cutout's part inside the crop
  crop: tuple  # slices: the cropped region
  messages: list
  completed: bool  # False where SPINEPS returns None (no body, no body centre, no prediction, an abort)


def voxel_threshold(model_voxels: float, spacing) -> int:
  """SPINEPS' size threshold on this grid (phase_instance.py:197-199): the inference config's count at the
  model's resolution (its `resolution_range`, which phase 2 runs on: `spacing`), times that voxel volume
  (Segmentation_Inference_Config), over the grid's, truncated, at least 40 reference voxels' volume
  (mm3_to_voxels: Python's round)."""
  zms = tuple(float(z) for z in spacing)
  per_config = model_voxels * np.prod(zms)
  minimum = max(round(MIN_CLEANING_MM3 / float(np.prod(zms))), 1)
  return max(int(per_config / (zms[0] * zms[1] * zms[2])), minimum)


def crop_box(semantic: np.ndarray, zoom) -> tuple:
  """`compute_crop(dist=3.75 mm / finest zoom)`: the bounding box of the labelled voxels grown by the
  truncated distance, clipped to the volume (np_bbox_binary)."""
  margin = int(CROP_MARGIN_MM / min(float(z) for z in zoom))
  where = [np.flatnonzero(np.any(semantic, axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
  return tuple(slice(max(int(w[0]) - margin, 0), min(int(w[-1]) + margin + 1, n))
               for w, n in zip(where, semantic.shape))


def step_onto_vertebra(com, vertebra: np.ndarray) -> np.ndarray:
  """A centre of mass moved 5 rows down (I) until it lies on a vertebra label, back where it was if it
  leaves the volume first; truncated to a voxel (phase_instance.py:781-789, 689)."""
  com = tuple(com)
  start = com
  while not vertebra[int(com[0]), int(com[1]), int(com[2])]:
    com = (com[0], com[1] + COM_STEP_ROWS, com[2])
    if com[1] >= vertebra.shape[INFERIOR_AXIS]:
      com = start
      break
  return np.array([int(c) for c in com], np.int64)


def rank_couples(masks: dict, count: int) -> list[tuple[tuple, float]]:
  """`create_prediction_couples`: each prediction's couple (`consolidation.find_couple`, the same rule),
  repeated couples averaged with Python's sum, best first by (members + 1) x agreement, ties in order."""
  found: dict[tuple, list] = {}
  for key in sorted(masks):
    members, agreement = find_couple(key, masks, count, min_dice=COUPLE_DICE, neighbour_range=COUPLE_RANGE)
    found.setdefault(members, []).append(agreement)
  means = {members: sum(values) / len(values) for members, values in found.items()}
  return sorted(means.items(), key=lambda item: (len(item[0]) + 1) * item[1], reverse=True)


def votes_needed(members: int, agreement: float) -> int:
  """2 votes per voxel for a 3-member couple of agreement >= 0.3 + 0.15 (in floating point 0.44999...), else 1."""
  return 1 if members <= 2 or agreement < 0.3 + 0.15 * (4 - members) else 2


def merge_couples(masks: dict, count: int, shape, *, abort_on_empty_couple: bool = False):
  """(instances int32, aborted): `merge_coupled_predictions` without its clean-up. Couples in rank order
  each become a new instance on their voted voxels not yet taken, unless more than 60 % are taken."""
  instances = np.zeros(tuple(shape), np.int32)
  next_id = 1
  for members, agreement in rank_couples(masks, count):
    window = tuple(slice(min(masks[m].box[a].start for m in members), max(masks[m].box[a].stop for m in members))
                   for a in range(3))
    votes = np.zeros(tuple(s.stop - s.start for s in window), np.uint8)
    for m in members:
      votes[_local(window, masks[m].box)] += masks[m].mask
    selected = votes >= votes_needed(len(members), agreement)
    total = int(np.count_nonzero(selected))
    if total == 0:
      if abort_on_empty_couple:
        return np.zeros(tuple(shape), np.int32), True
      continue
    target = instances[window]
    free = selected & (target == 0)
    if (total - int(np.count_nonzero(free))) / total > MAX_ESTABLISHED_OVERLAP:
      continue
    target[free] = next_id
    next_id += 1
  return instances, False


def _finish(instances: np.ndarray, min_voxels: int, clean_small: bool, fill_holes: bool) -> np.ndarray:
  """Lines 1095-1104, 243-253: small pieces deleted (not when nothing is background), holes filled by label
  in ascending order as fill_voids finds them, labels renumbered 1..n."""
  if clean_small and (instances == 0).any():
    instances = _remove_small_pieces(instances, int(min_voxels))
  if fill_holes:
    labels = [int(v) for v in np.unique(instances) if v]
    instances = semantic_postprocess.fill_holes(instances, labels, fill_3d=semantic_postprocess.fill_voids_fill)
  return _renumber(instances)


def instance_mask(semantic: np.ndarray, predict_fn: Callable, spacing, *, cutout_size, batch_size: int = 4,
                  min_body_voxels: float = 100, min_instance_voxels: float = 250, detect_merged: bool = True,
                  clean_small: bool = True, fill_holes: bool = True,
                  abort_on_empty_couple: bool = False) -> SpinepsInstances:
  """SPINEPS' raw instance mask of a PIR semantic mask on the instance model's grid (`spacing`, mm).

  `predict_fn` as `cutouts.predict_cutouts` calls it; `min_body_voxels` and `min_instance_voxels` are the
  inference config's corpus_size_cleaning and vert_size_threshold (voxels at the model's resolution); the
  switches are predict_instance_mask's proc_detect_and_solve_merged_corpi, proc_inst_clean_small_cc_artifacts
  and proc_inst_fill_3d_holes. Cutout sides must be even (SPINEPS cuts 2 x (side // 2) voxels).
  """
  semantic = check_mask(semantic, 'semantic mask')
  size = tuple(int(s) for s in cutout_size)
  if any(s % 2 for s in size):
    raise ValueError(f'cutout size {size}: SPINEPS cuts 2 x (side // 2) voxels, so sides must be even')
  zoom = semantic_postprocess.spineps_zoom(spacing)
  messages: list[str] = []
  empty = SpinepsInstances(np.zeros(semantic.shape, np.int32), np.zeros((0, 3)), np.zeros((0, 3), np.int64),
                           np.zeros((0, 3, 2), np.int64), (slice(0, 0),) * 3, messages, False)
  if not semantic.any():
    note(messages, 'empty semantic mask: no instances (SPINEPS: its crop raises)')
    return empty
  crop = crop_box(semantic, zoom)
  empty.crop = crop
  offset = np.array([s.start for s in crop], np.int64)
  cropped = semantic[crop]
  if not (cropped == BODY).any():
    note(messages, 'no vertebral body (label 49) in the semantic mask: no instances (SPINEPS: ErrCode.EMPTY)')
    return empty
  coms, more = corpus_centres(cropped, spacing, min_voxels=voxel_threshold(min_body_voxels, spacing),
                              detect_merged=detect_merged, zoom=zoom)
  messages += more
  if not len(coms):
    return empty
  vertebra = np.isin(cropped, VERTEBRA_LABELS)
  centres = np.array([step_onto_vertebra(com, vertebra) for com in coms], np.int64)
  boxes = np.array([[(b.start, b.stop) for b in cutout_boxes(c, size, cropped.shape)[0]] for c in centres], np.int64)
  located = dict(coms=coms + offset, centres=centres + offset, boxes=boxes + offset[:, None], crop=crop)
  masks = _flatten(predict_cutouts(predict_fn, cropped, centres, size, int(batch_size)))
  if not masks:
    note(messages, 'the instance network found no vertebra in any cutout (SPINEPS: ErrCode.EMPTY)')
    return dataclasses.replace(empty, **located)
  merged, aborted = merge_couples(masks, len(centres), cropped.shape, abort_on_empty_couple=abort_on_empty_couple)
  if aborted:
    note(messages, 'a couple of cutout predictions selected no voxel: SPINEPS drops every instance (ErrCode.EMPTY)')
    return dataclasses.replace(empty, **located)
  merged = _finish(merged, voxel_threshold(min_instance_voxels, spacing), clean_small, fill_holes)
  if merged.max() < len(centres):
    note(messages, f'{int(merged.max())} vertebra instances from {len(centres)} vertebral body centres')
  instances = np.zeros(semantic.shape, np.int32)
  instances[crop] = merged
  return SpinepsInstances(instances, messages=messages, completed=True, **located)
