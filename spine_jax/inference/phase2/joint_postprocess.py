"""The 'spineps' post-processing mode of phase 2: SPINEPS 2.1.3's joint clean-up of the semantic and
instance masks on the input grid (`phase_post.phase_postprocess_combined`, phase_post.py:54-188, as
seg_run.py:678-693 calls it: no labelling model, labeling_offset 1 for MRI), reproduced voxel for voxel with
numpy/scipy (cc3d numbers components as scipy does; its `contacts` counts face pairs). Steps, in its order:

1. instances masked by the semantic mask (phase_post.py:118); both cropped to the semantic mask's box plus
   int(1.5 mm / finest spacing) voxels (:119, :41), uncropped at the end (:181-182);
2. `assign_vertebra_inconsistency` (:135, :637-703): each 26-connected articular process goes to the
   instance (unlabelled counting as one) covering over twice the runner-up;
3. `mask_cleaning_other` -> `assign_missing_cc` (:137, :191-369): instances grow 2 steps 6-connected into
   uncovered vertebra voxels, label by label in increasing id (the smaller id wins; the first label also
   grows from its voxels off the vertebra labels, dropped only after it grew, :306-313); each remaining
   18-connected piece takes the commonest id among its 18-neighbours (:352) or is deleted from both masks
   (:365, :236-237);
4. `detect_and_solve_merged_vertebra` (:147, :706-766), if a disc is present: discs (endplates counted as
   disc) and vertebrae (body and arch) sorted along axis 1 of the input orientation, not PIR's I; the first
   two vertebrae merge if the first is under half the second's size and they share more than 20 reference
   voxel faces (:762);
5. in PIR: `fix_wrong_posterior_instance_label` (:150, proc_functions.py:228-304); `label_instance_top_to_bottom`
   (:153, :610-634): ids from labeling_offset + 1 by centre along I, 26 not skipped; sacrum voxels 26 (:169);
   `add_ivd_ep_vert_label` (:172, :451-575): each 26-connected disc/endplate piece takes 100/200 + the first
   owner (ids up to 26 and 28) whose body centre is nearest above the piece's, body-less instances and the
   sacrum counting at height 0; `_split_endplates` (:372-448) splits endplates into 52/53 by growing the
   vertebrae into them, and that split replaces 62 in the semantic mask (:174-177).
Left out, as spine_jax's semantic ids cannot hold them: 50 (mapped to 49 before, seg_run.py:667), metal 80
and dens 51 (:170-171), and masks already split into 52/53 (the CT branch of add_ivd_ep_vert_label). SPINEPS'
defects are kept (measured in tests/inference/test_joint_postprocess_vs_spineps.py); the 'spine_jax' mode,
`labelling.label_spine`, has none of them. Where SPINEPS raises (an empty mask; discs but no vertebra) this
leaves the masks and says so.
"""
from __future__ import annotations

import nibabel as nib
import numpy as np
from scipy import ndimage

from spine_jax.data import levels as levels_lib
from spine_jax.data import labeling_patches
from spine_jax.data import spatial
from spine_jax.data.spine_labels import ARCUS, ENDPLATE_INFERIOR, ENDPLATE_SUPERIOR, SPINOUS, VERTEBRA_PARTS
from spine_jax.inference.phase2.common import (BODY, CUBE, DISC, DISC_OFFSET, EDGES, ENDPLATE, ENDPLATE_OFFSET,
                                               FACES, INFERIOR_AXIS, SACRUM, SACRUM_ID, centres_of_mass,
                                               check_mask, grow_box, note)
from spine_jax.inference.phase2.labelling import first_vertebra_id, reassign_articular_processes

# SPINEPS 2.1.3's constants (phase_post.py:37-51, proc_functions.py:21), from its T2w grid, which is ours.
MISSING_GROW_STEPS = 2  # 6-connected steps the instances grow into uncovered vertebra voxels
MERGED_SIZE_RATIO = 0.5  # the top instance merges only if smaller than this fraction of the next ...
MERGED_MIN_CONTACT_MM2 = 20 * float(np.prod(spatial.REFERENCE_SPACING)) ** (2.0 / 3.0)  # ... and touches it more
POSTERIOR_LABELS = (ARCUS, SPINOUS)
POSTERIOR_MAX_PIECES = 3  # the largest pieces of an instance that are looked at
POSTERIOR_MAX_ID = 25  # L6: instances above are not looked at
OWNER_IDS_LIMIT = SACRUM_ID  # disc/endplate owners: ids up to the sacrum's, and T13's
T13_ID = levels_lib.level_to_label('T13', 'spineps')
SPLIT_ID_LIMIT = 40  # instances below this grow into the endplates
MAX_ENDPLATE_DILATION = 15  # growth rounds 1 .. 14


def zooms(affine) -> tuple[float, ...]:
  """Voxel sizes (mm) as TPTBox reports them: the affine's column norms to 7 decimals."""
  return tuple(np.round(np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0), 7))


def _box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
  return grow_box(ndimage.find_objects(mask.astype(np.int8))[0], margin, mask.shape)


def _present(labels: np.ndarray) -> list[int]:
  return [int(v) for v in np.unique(labels) if v != 0]


def _lookup(labels: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
  """Labels through `mapping` at once (the others unchanged), as TPTBox's np_map_labels."""
  lut = np.arange(max(int(labels.max()), *mapping) + 1, dtype=np.int64)
  for old, new in mapping.items():
    lut[old] = new
  return lut[labels]


def assign_uncovered(instances: np.ndarray, vertebra: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(instances on `vertebra` only, deleted voxels): SPINEPS' `assign_missing_cc` (phase_post.py:295-375)."""
  out = np.array(instances, np.int32, copy=True)
  deleted = np.zeros(vertebra.shape, bool)
  if not (vertebra & (out == 0)).any():
    return np.where(vertebra, out, 0), deleted
  labels = _present(out)
  boxes = ndimage.find_objects(out)
  for step in range(MISSING_GROW_STEPS):  # np_dilate_msk(n_pixel=2, connectivity=1, mask=vertebra, use_crop=False)
    for label in labels:
      box = grow_box(boxes[label - 1], MISSING_GROW_STEPS + 1, out.shape)
      region = out[box]
      grown = ndimage.binary_dilation(region == label, FACES) & (region == 0) & vertebra[box]
      region[grown] = label
      if step == 0 and label == labels[0]:  # the mask is applied after each label, the first time after this one
        out[~vertebra] = 0
  pieces, _ = ndimage.label(vertebra & (out == 0), EDGES)
  for index, box in enumerate(ndimage.find_objects(pieces), start=1):
    if box is None:
      continue
    box = grow_box(box, 2, out.shape)
    piece = pieces[box] == index
    neighbours = out[box][ndimage.binary_dilation(piece, EDGES)]
    neighbours = neighbours[neighbours != 0]
    if neighbours.size:
      out[box][piece] = np.bincount(neighbours).argmax()
    else:
      deleted[box] |= piece
  return out, deleted


def face_contacts(a: np.ndarray, b: np.ndarray) -> int:
  """Face-adjacent voxel pairs between masks a and b (cc3d.contacts' surface area at unit spacing)."""
  total = 0
  for axis in range(a.ndim):
    lo = tuple(slice(0, -1) if d == axis else slice(None) for d in range(a.ndim))
    hi = tuple(slice(1, None) if d == axis else slice(None) for d in range(a.ndim))
    total += int(np.count_nonzero((a[lo] & b[hi]) | (b[lo] & a[hi])))
  return total


def merge_split_top(instances: np.ndarray, semantic: np.ndarray, zoom) -> tuple[np.ndarray, tuple[int, int] | None]:
  """(instances, (merged, into) or None): SPINEPS' `detect_and_solve_merged_vertebra` (phase_post.py:705-766).

  Discs (endplates counted as disc) and vertebrae (by their body and arch) are sorted along axis 1 as
  given; if the first two are vertebrae, the first is under half the second's size and they share more
  than 20 reference voxel faces of contact, the first becomes the second.
  """
  disc = np.isin(semantic, (DISC, ENDPLATE))
  if not (semantic == DISC).any():
    return instances, None
  pieces, count = ndimage.label(disc, CUBE)
  sizes, centres = centres_of_mass(pieces, count)
  stats = {DISC_OFFSET + k: (centres[k, 1], True, sizes[k]) for k in range(1, count + 1)}
  body_arch = np.where(np.isin(semantic, (BODY, ARCUS)), instances, 0)
  volumes, _ = centres_of_mass(instances)
  arch_sizes, arch_centres = centres_of_mass(body_arch, len(volumes) - 1)
  for v in np.flatnonzero(arch_sizes):
    stats[int(v)] = (arch_centres[v, 1], False, volumes[v])
  ordered = sorted(stats.items(), key=lambda item: item[1][0])
  if len(ordered) < 2:
    return instances, None
  (first, (_, first_disc, first_size)), (second, (_, second_disc, second_size)) = ordered[:2]
  if first_disc or second_disc or not first_size < MERGED_SIZE_RATIO * second_size:
    return instances, None
  mean_face_mm2 = float(np.prod(zoom)) ** (2.0 / 3.0)
  if face_contacts(instances == first, instances == second) <= max(round(MERGED_MIN_CONTACT_MM2 / mean_face_mm2), 1):
    return instances, None
  return np.where(instances == first, second, instances), (first, second)


def fix_posterior_pieces(instances: np.ndarray, semantic: np.ndarray) -> np.ndarray:
  """SPINEPS' `fix_wrong_posterior_instance_label` (proc_functions.py:227-300) on PIR arrays: of each vertebra's
  three largest 26-connected pieces, the smaller two move to the one other instance inside their box grown
  by 1 voxel if they hold arcus/spinous only (decided on the input instances, written to a copy)."""
  out = instances.copy()
  for vert in (v for v in _present(instances) if 1 <= v <= POSTERIOR_MAX_ID):
    box = _box(instances == vert, 1)
    inst_box, sem_box = instances[box], semantic[box]
    pieces, count = ndimage.label(inst_box == vert, CUBE)
    if count < 2:
      continue
    by_size = np.argsort(-np.bincount(pieces.ravel())[1:], kind='stable') + 1
    for index in by_size[1:POSTERIOR_MAX_PIECES]:
      piece = pieces == index
      near = _box(piece, 1)
      inside = piece[near]
      labels = _present(sem_box[near][inside])
      if not (len(labels) <= 2 and all(v in POSTERIOR_LABELS for v in labels)):
        continue
      others = _present(inst_box[near][~inside])
      if len(others) == 1 and others[0] != vert:
        out[box][piece] = others[0]
  return out


def number_top_to_bottom(instances: np.ndarray, offset: int) -> np.ndarray:
  """SPINEPS' `label_instance_top_to_bottom` (phase_post.py:612-637): ids 1 + offset, 2 + offset, ... by the
  centre along I (ties: smaller id first), 26 not skipped."""
  present = _present(instances)
  if not present:
    return instances
  _, centres = centres_of_mass(instances)
  order = sorted(present, key=lambda v: centres[v, INFERIOR_AXIS])
  return _lookup(instances, {v: rank + 1 + offset for rank, v in enumerate(order)})


def _nearest_lower(heights: list[float], row: float) -> float:
  lower = [h for h in heights if h < row]
  return max(lower) if lower else min(heights)


def label_discs_and_endplates(instances: np.ndarray, semantic: np.ndarray, messages: list) -> np.ndarray:
  """SPINEPS' `add_ivd_ep_vert_label` (phase_post.py:456-566) on PIR arrays, before the endplate split.

  Owners are the ids up to 26 and 28 (T13), each at its body's centre along I, or 0 without a body; a
  piece's owner is the first (smallest id) at the greatest height above its centre (or the least height
  if none); a disc above every owner goes to the smallest owner id - 1.
  """
  out = instances.copy()
  owners = [v for v in _present(out) if v <= OWNER_IDS_LIMIT or v == T13_ID]
  sizes, centres = centres_of_mass(np.where(semantic == BODY, out, 0), max(owners, default=0))
  heights = {v: (centres[v, INFERIOR_AXIS] if sizes[v] > 0 else 0) for v in owners}
  for label, offset in ((DISC, DISC_OFFSET), (ENDPLATE, ENDPLATE_OFFSET)):
    pieces, count = ndimage.label(semantic == label, CUBE)
    if not count:
      continue
    if not heights:  # SPINEPS raises ValueError (min of an empty list)
      note(messages, f'{count} {"disc" if label == DISC else "endplate"} piece(s) but no vertebra: left 0')
      continue
    _, piece_centres = centres_of_mass(pieces, count)
    lut = np.zeros(count + 1, np.int64)
    for index in range(1, count + 1):
      row = piece_centres[index, INFERIOR_AXIS]
      if label == DISC and row < min(heights.values()):
        owner = min(heights) - 1
      else:
        height = _nearest_lower(list(heights.values()), row)
        owner = next(v for v in heights if heights[v] == height)
      lut[index] = offset + owner if owner else 0
    out[pieces > 0] = lut[pieces[pieces > 0]]
  return out


def split_endplates(instances: np.ndarray, endplate: np.ndarray) -> np.ndarray:
  """SPINEPS' `_split_endplates` (phase_post.py:378-452) on PIR arrays: the split labels (52, 53, 62 or 0) per voxel.

  Each round grows every instance below 40 (in increasing id) by one 26-connected step; unclaimed endplate
  voxels reached take their endplate id, 200 + the grower -> inferior (53), 200 + the previous grower ->
  superior (52), any other id added as is (a sum that is no label); rounds stop at 14, when nothing more
  was claimed, or all was; endplate voxels never claimed keep 62 if nothing was added to them, else 0.
  """
  out = np.zeros(endplate.shape, np.int64)
  sites = np.flatnonzero(endplate)  # only endplate voxels ever change: the rounds run on them alone
  if not sites.size:
    return out
  values = np.asarray(instances).reshape(-1)[sites].astype(np.int64)
  growers = [v for v in _present(instances) if v < SPLIT_ID_LIMIT]
  reach = {v: _rounds_to_reach(instances, v, sites) for v in growers}
  state = np.zeros(sites.size, np.int64)
  claimed = lambda a: (a == ENDPLATE_INFERIOR) | (a == ENDPLATE_SUPERIOR)  # noqa: E731
  previous, old = 1, -1
  for step in range(1, MAX_ENDPLATE_DILATION):
    new = int(np.count_nonzero(claimed(state)))
    if (new == old and old != 0) or new == sites.size:
      break
    old = new
    for v in growers:
      plates = np.where((reach[v] <= step) & ~claimed(state), values, 0)
      named = np.where(plates == ENDPLATE_OFFSET + v, ENDPLATE_INFERIOR, plates)
      named = np.where(plates == ENDPLATE_OFFSET + previous, ENDPLATE_SUPERIOR, named)  # a dict: this key last
      state += named
      previous = v
  state[~claimed(state)] += ENDPLATE
  out.reshape(-1)[sites] = np.where(claimed(state) | (state == ENDPLATE), state, 0)
  return out


def _rounds_to_reach(instances: np.ndarray, v: int, sites: np.ndarray) -> np.ndarray:
  """Per flat index in `sites`, the number of 26-connected dilations of instance v that first cover it (its
  chessboard distance), within v's box grown by MAX_ENDPLATE_DILATION as SPINEPS' rounds see it; beyond: a
  number above every round."""
  window = _box(instances == v, MAX_ENDPLATE_DILATION)
  distance = ndimage.distance_transform_cdt(instances[window] != v, metric='chessboard')
  coords = np.unravel_index(sites, instances.shape)
  inside = np.ones(sites.size, bool)
  local = []
  for c, w in zip(coords, window):
    inside &= (c >= w.start) & (c < w.stop)
    local.append(np.clip(c - w.start, 0, w.stop - w.start - 1))
  return np.where(inside, distance[tuple(local)], MAX_ENDPLATE_DILATION)


def postprocess_combined(semantic: np.ndarray, instances: np.ndarray, affine, *,
                         first_vertebra=2) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Input-grid semantic mask and instances (any orientation, `affine`) -> (semantic (uint8), instances (int16),
  messages) as SPINEPS' `phase_postprocess_combined` returns them (module docstring); vertebrae numbered from
  `first_vertebra` (SPINEPS' labeling_offset + 1: 2 for its MRI models)."""
  semantic = check_mask(semantic, 'semantic mask')
  instances = check_mask(instances, 'instance mask')
  if instances.shape != semantic.shape:
    raise ValueError(f'instance mask shape {instances.shape} differs from semantic mask shape {semantic.shape}')
  messages: list[str] = []
  sem_out = np.array(semantic, np.uint8, copy=True)
  inst_out = np.zeros(semantic.shape, np.int16)
  if not semantic.any():  # SPINEPS raises ValueError (compute_crop of an empty mask)
    note(messages, 'empty semantic mask: no instances')
    return sem_out, inst_out, messages
  zoom = zooms(affine)
  crop = labeling_patches.spine_crop(semantic, affine)  # the box the labelling phase sees too
  sem = semantic[crop].astype(np.int32)
  inst = np.where(sem != 0, instances[crop], 0).astype(np.int32)
  inst = reassign_articular_processes(inst, sem)
  vertebra = np.isin(sem, VERTEBRA_PARTS)
  inst, deleted = assign_uncovered(inst, vertebra)
  if deleted.any():
    note(messages, f'{int(deleted.sum())} vertebra voxel(s) of the semantic mask touch no instance: deleted')
    sem[deleted] = 0
  inst, merged = merge_split_top(inst, sem, zoom)
  if merged:
    note(messages, f'instance {merged[0]} is a small piece on top of instance {merged[1]}: merged')
  start = nib.orientations.io_orientation(np.asarray(affine, np.float64))
  to_pir = nib.orientations.ornt_transform(start, nib.orientations.axcodes2ornt(spatial.PIR))
  sem_pir = nib.orientations.apply_orientation(sem, to_pir)
  inst_pir = fix_posterior_pieces(nib.orientations.apply_orientation(inst, to_pir), sem_pir)
  inst_pir = number_top_to_bottom(inst_pir, first_vertebra_id(first_vertebra) - 1)
  inst_pir[sem_pir == SACRUM] = SACRUM_ID
  inst_pir = label_discs_and_endplates(inst_pir, sem_pir, messages)
  endplate = sem_pir == ENDPLATE
  sem_pir = np.where(endplate, split_endplates(inst_pir, endplate), sem_pir)
  back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(spatial.PIR), start)
  sem_out[crop] = nib.orientations.apply_orientation(sem_pir, back)
  inst_out[crop] = nib.orientations.apply_orientation(inst_pir, back)
  return sem_out, inst_out, messages
