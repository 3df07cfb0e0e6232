"""Clean-up of the semantic (phase-1) mask, SPEC §3, on PIR model-space arrays, in one of two modes.

Both modes run the same three switchable steps in the same order: (1) delete small connected
components of the bone, canal and disc labels (network speckle), (2) drop what lies away from the
spine (false positives in the skull base or the pelvis), (3) fill holes in the vertebral body,
cord, canal and discs. Each step only ever sets voxels to 0 or fills background voxels.

'spine_jax' (the default): thresholds in the config; step 2 keeps the bounding box of the largest
26-connected piece plus ceil(margin / spacing) voxels per axis; holes are background regions not
6-connected to the array border (scipy), the cord filled before the canal around it.

'spineps': SPINEPS 2.1.3's own clean-up, `phase_semantic.predict_semantic_mask` (phase_semantic.py:87-125)
with the defaults of its CLI and `process_dataset`, on the model grid: its constants (in mm, converted at
the mask's spacing as TPTBox reports it), whole 26-connected components chained to the largest by their
bounding boxes, and holes as `fill_voids` finds them, seeding quirk included (`fill_voids_fill`). Its
defects are reproduced, not fixed; the 'spine_jax' mode is the corrected behaviour.
"""
from __future__ import annotations

import math

import ml_collections
import numpy as np
from scipy import ndimage

from spine_jax.data import spatial
from spine_jax.data.spine_labels import CANAL, CORD, CORPUS, DISC, VERTEBRA_PARTS

SPINE_JAX_MODE, SPINEPS_MODE = 'spine_jax', 'spineps'
MODES = (SPINE_JAX_MODE, SPINEPS_MODE)
# The labels both modes clean of small pieces (SPINEPS: phase_semantic.py:93-105).
SMALL_COMPONENT_LABELS = (*VERTEBRA_PARTS, CANAL, DISC)
FILL_HOLE_LABELS = (CORPUS, CORD, CANAL, DISC)
SAGITTAL_AXIS = 2  # R in PIR: one sagittal slice per index
INFERIOR_AXIS = 1  # I in PIR: SPINEPS chains components with extra tolerance along it

# SPINEPS 2.1.3 constants, derived from its T2w model grid (utils/resolution.py:19-22), which is ours.
SPINEPS_SMALL_COMPONENT_MM3 = 30 * float(np.prod(spatial.REFERENCE_SPACING))  # phase_semantic.py:15
SPINEPS_BBOX_MARGIN_MM = 4 * min(spatial.REFERENCE_SPACING)  # 3 mm, phase_semantic.py:23
SPINEPS_FILL_HOLE_LABELS = (CORPUS, CANAL, DISC, CORD)  # seg_pipeline.py:55-60: the cord last
SPINEPS_SMALL_COMPONENT_CONNECTIVITY = 6  # clean_cc_artifacts: connectivity=1
SPINEPS_COMPONENT_CONNECTIVITY = 26  # semantic_bounding_box_clean: connectivity=3


def default_postprocess_config(mode: str = SPINE_JAX_MODE) -> ml_collections.ConfigDict:
  """Every threshold of the semantic post-processing (SPEC §3), each step switchable."""
  cfg = ml_collections.ConfigDict()
  # 'spineps': SPINEPS' own steps and constants; of the fields below only the three switches apply.
  cfg.mode = check_mode(mode)
  cfg.remove_small_components = True
  cfg.small_component_labels = SMALL_COMPONENT_LABELS
  cfg.min_component_voxels = 30  # components with fewer voxels are deleted
  cfg.small_component_connectivity = 6  # 6, 18 or 26
  cfg.crop_to_largest_component = True
  cfg.bbox_margin_mm = 3.0  # added on every side of the largest component's bounding box
  cfg.largest_component_connectivity = 26
  cfg.fill_holes = True
  # A hole enclosed by several labels goes to the first listed, so the cord (60) comes before the
  # canal (61) around it: a gap in the cord stays cord (SPINEPS lists the cord last).
  cfg.fill_hole_labels = FILL_HOLE_LABELS
  cfg.fill_holes_per_sagittal_slice = False  # False: 3D holes (enclosed in every direction)
  return cfg


def check_mode(mode: str) -> str:
  if mode not in MODES:
    raise ValueError(f'postprocess.mode must be one of {MODES}, got {mode!r}')
  return mode


def connectivity_structure(connectivity: int) -> np.ndarray:
  """3D neighbourhood of 6 (faces), 18 (+ edges) or 26 (+ corners) voxels."""
  ranks = {6: 1, 18: 2, 26: 3}
  if connectivity not in ranks:
    raise ValueError(f'connectivity must be 6, 18 or 26, got {connectivity}')
  return ndimage.generate_binary_structure(3, ranks[connectivity])


def remove_small_components(seg: np.ndarray, labels=SMALL_COMPONENT_LABELS, min_voxels: int = 30,
                            connectivity: int = 6) -> np.ndarray:
  """Set to 0 every connected component of each of `labels` with fewer than `min_voxels` voxels."""
  out = np.array(seg, copy=True)
  structure = connectivity_structure(connectivity)
  for label in labels:
    components, count = ndimage.label(out == label, structure)
    if count == 0:
      continue
    small = np.bincount(components.ravel()) < min_voxels
    small[0] = False
    out[small[components]] = 0
  return out


def margin_voxels(spacing, margin_mm: float) -> np.ndarray:
  """Voxels per axis covering at least `margin_mm` (ceil, tolerant of float error: 3 / 0.75 is 4)."""
  spacing = np.asarray(spacing, np.float64)
  return np.array([max(0, math.ceil(margin_mm / s - 1e-6)) for s in spacing], np.int64)


def largest_component_bbox(seg: np.ndarray, spacing, margin_mm: float = 3.0,
                           connectivity: int = 26) -> tuple | None:
  """Slices of the bounding box of the largest connected piece of seg > 0, grown by the margin; None if empty."""
  components, count = ndimage.label(np.asarray(seg) > 0, connectivity_structure(connectivity))
  if count == 0:
    return None
  largest = int(np.argmax(np.bincount(components.ravel())[1:])) + 1
  box = ndimage.find_objects(components, max_label=largest)[largest - 1]
  grow = margin_voxels(spacing, margin_mm)
  return tuple(slice(max(0, b.start - g), min(n, b.stop + g)) for b, g, n in zip(box, grow, np.shape(seg)))


def keep_largest_component_bbox(seg: np.ndarray, spacing, margin_mm: float = 3.0,
                                connectivity: int = 26) -> np.ndarray:
  """Zero everything outside the largest piece's bounding box plus `margin_mm` (mm, per-axis spacing)."""
  box = largest_component_bbox(seg, spacing, margin_mm, connectivity)
  out = np.zeros_like(seg)
  if box is not None:
    out[box] = np.asarray(seg)[box]
  return out


def _fill_binary_holes(mask: np.ndarray, slice_axis: int | None, fill_3d) -> np.ndarray:
  if slice_axis is None:
    return fill_3d(mask)
  moved = np.moveaxis(mask, slice_axis, 0)
  filled = np.stack([ndimage.binary_fill_holes(s) for s in moved])
  return np.moveaxis(filled, 0, slice_axis)


def fill_holes(seg: np.ndarray, labels=FILL_HOLE_LABELS, slice_axis: int | None = None,
               fill_3d=ndimage.binary_fill_holes) -> np.ndarray:
  """Per label in order, background voxels enclosed by it become that label; other labels are never overwritten.

  A hole is a background region not 6-connected to the array border (scipy's default), in 3D,
  or within each slice across `slice_axis` when given (2D, 4-connected). The cord inside the
  canal is not background, so it stays the cord. Each label's work is confined to its bounding
  box grown by one voxel, which gives the same holes: all that lies outside is background. (That
  box is also where TPTBox's `np_fill_holes` runs `fill_voids`, whose answer depends on it: pass
  `fill_3d=fill_voids_fill` for SPINEPS' holes.)
  """
  out = np.array(seg, copy=True)
  for label in labels:
    mask = out == label
    box = ndimage.find_objects(mask.astype(np.int8))
    if not box:
      continue
    box = tuple(slice(max(0, b.start - 1), min(n, b.stop + 1)) for b, n in zip(box[0], out.shape))
    region = out[box]
    filled = _fill_binary_holes(mask[box], slice_axis, fill_3d)
    region[filled & (region == 0)] = label
  return out


# --- SPINEPS 2.1.3 -------------------------------------------------------------------------------


def fill_voids_seeds(background: np.ndarray) -> np.ndarray:
  """Where fill_voids 2.x starts flooding a 3D array (fill_voids.hpp `initialize_stack`).

  It walks each of the six faces in Fortran order (axis 0 fastest) and seeds the first background
  voxel of each run, but a run carries over from the end of one row to the start of the next, so a
  face region that begins a row right after a background row end gets no seed of its own. Unless
  the flood reaches it another way it is then taken for a hole (a defect: it touches the border).
  """
  seeds = np.zeros_like(background)
  for axis in range(3):
    for index in sorted({0, background.shape[axis] - 1}):
      face = np.take(background, index, axis=axis)
      scan = face.ravel(order='F')
      starts = scan.copy()
      starts[1:] &= ~scan[:-1]
      where = [slice(None)] * 3
      where[axis] = index
      seeds[tuple(where)] |= starts.reshape(face.shape, order='F')
  return seeds


def fill_voids_fill(mask: np.ndarray) -> np.ndarray:
  """`fill_voids.fill` of a 3D binary mask: background not 6-connected to one of its seeds becomes foreground."""
  mask = np.asarray(mask, bool)
  if mask.size == 0:
    return mask.copy()
  background = ~mask
  regions, count = ndimage.label(background, connectivity_structure(6))
  reached = np.zeros(count + 1, bool)
  reached[regions[fill_voids_seeds(background)]] = True
  reached[0] = True  # the foreground
  return mask | ~reached[regions]


def spineps_zoom(spacing) -> tuple[float, ...]:
  """The spacing as SPINEPS' thresholds see it: TPTBox's `NII.zoom`."""
  return tuple(float(z) for z in spatial.tptbox_zoom(spacing))  # pylint: disable=protected-access


def spineps_min_component_voxels(spacing) -> int:
  """`resolution.mm3_to_voxels` of 30 model-grid voxels: Python's round (half to even), at least 1."""
  return max(round(SPINEPS_SMALL_COMPONENT_MM3 / float(np.prod(spineps_zoom(spacing)))), 1)


def spineps_box_margins(spacing) -> tuple[int, int]:
  """(box margin, extra inferior tolerance), voxels on every axis: 3 mm over the finest spacing, which
  `NII.compute_crop` truncates (phase_semantic.py:180) and `mm_to_voxels` rounds (:181)."""
  voxels = SPINEPS_BBOX_MARGIN_MM / min(spineps_zoom(spacing))
  return int(voxels), max(round(voxels), 0)


def spineps_remove_small_components(seg: np.ndarray, spacing) -> np.ndarray:
  """`clean_cc_artifacts(only_delete=True)` as phase_semantic.py:87-111 calls it; a mask without
  background is left alone (proc_functions.py:104)."""
  if np.all(np.asarray(seg) != 0):
    return np.array(seg, copy=True)
  return remove_small_components(seg, SMALL_COMPONENT_LABELS, spineps_min_component_voxels(spacing),
                                 SPINEPS_SMALL_COMPONENT_CONNECTIVITY)


def component_boxes(components: np.ndarray, count: int, margin: int) -> tuple[np.ndarray, np.ndarray]:
  """(starts, stops), (count, 3) each: every component's bounding box grown by `margin`, clipped."""
  boxes = ndimage.find_objects(components, max_label=count)
  starts = np.array([[s.start for s in box] for box in boxes], np.int64).reshape(count, 3)
  stops = np.array([[s.stop for s in box] for box in boxes], np.int64).reshape(count, 3)
  return np.maximum(starts - margin, 0), np.minimum(stops + margin, components.shape)


def chained_components(starts: np.ndarray, stops: np.ndarray, seed: int, tolerance: int) -> np.ndarray:
  """Which boxes join the seed's (bool per box): SPINEPS' loop at phase_semantic.py:195-212 until nothing
  changes. A box joins when it meets a joined one on every axis, ends included (`overlap_slice`), the joined
  one first widened by `tolerance` along I (its start clipped at 0)."""
  low, high = starts.copy(), stops.copy()
  low[:, INFERIOR_AXIS] = np.maximum(low[:, INFERIOR_AXIS] - tolerance, 0)
  high[:, INFERIOR_AXIS] += tolerance
  joined = np.zeros(len(starts), bool)
  joined[seed] = True
  frontier = np.array([seed])
  while frontier.size:
    meets = (starts[None] <= high[frontier, None]) & (stops[None] >= low[frontier, None])
    new = meets.all(-1).any(0) & ~joined
    joined |= new
    frontier = np.flatnonzero(new)
  return joined


def spineps_bounding_box_clean(seg: np.ndarray, spacing) -> np.ndarray:
  """`semantic_bounding_box_clean` (phase_semantic.py:162-234): keeps the 26-connected components of the
  whole mask whose grown boxes chain to the largest one's, whole, and nothing else (its union-box crop
  only ever contains them). The largest is the first in C scan order among equals, as TPTBox's stable
  sort of cc3d's numbering (a C-ordered copy, numbered as scipy numbers) picks it. An empty mask stays
  empty (SPINEPS raises ValueError in `compute_crop`)."""
  seg = np.asarray(seg)
  components, count = ndimage.label(seg > 0, connectivity_structure(SPINEPS_COMPONENT_CONNECTIVITY))
  if count == 0:
    return np.array(seg, copy=True)
  margin, tolerance = spineps_box_margins(spacing)
  starts, stops = component_boxes(components, count, margin)
  seed = int(np.argmax(np.bincount(components.ravel())[1:]))
  keep = np.concatenate([[False], chained_components(starts, stops, seed, tolerance)])
  return np.where(keep[components], seg, 0).astype(seg.dtype)


def postprocess_spineps(seg: np.ndarray, spacing, *, remove_small: bool = True, chain_boxes: bool = True,
                        fill: bool = True) -> np.ndarray:
  """SPINEPS 2.1.3's `predict_semantic_mask` post-processing (phase_semantic.py:78-125) on a PIR mask on the
  model grid, `proc_remove_inferior_beyond_canal` off (its default everywhere, and no CLI flag turns it on)."""
  out = np.array(seg, copy=True)
  if not out.any():
    return out  # phase_semantic.py:78: an empty prediction is returned as it is
  if remove_small:
    out = spineps_remove_small_components(out, spacing)
  if chain_boxes:
    out = spineps_bounding_box_clean(out, spacing)
  if fill:
    out = fill_holes(out, SPINEPS_FILL_HOLE_LABELS, fill_3d=fill_voids_fill)
  return out


# --- Either mode ---------------------------------------------------------------------------------


def _postprocess_spine_jax(seg: np.ndarray, spacing, cfg: ml_collections.ConfigDict) -> np.ndarray:
  out = seg
  if cfg.remove_small_components:
    out = remove_small_components(out, tuple(cfg.small_component_labels), int(cfg.min_component_voxels),
                                  int(cfg.small_component_connectivity))
  if cfg.crop_to_largest_component:
    out = keep_largest_component_bbox(out, spacing, float(cfg.bbox_margin_mm),
                                      int(cfg.largest_component_connectivity))
  if cfg.fill_holes:
    slice_axis = SAGITTAL_AXIS if cfg.fill_holes_per_sagittal_slice else None
    out = fill_holes(out, tuple(cfg.fill_hole_labels), slice_axis)
  return out if out is not seg else np.array(out, copy=True)


def postprocess_semantic(seg: np.ndarray, spacing, cfg: ml_collections.ConfigDict | None = None) -> np.ndarray:
  """SPEC §3 phase-1 post-processing of a PIR semantic mask with voxel `spacing` (mm) per axis, in the
  config's mode (configs without a `mode` field are 'spine_jax')."""
  cfg = cfg if cfg is not None else default_postprocess_config()
  out = np.asarray(seg)
  if out.ndim != 3:
    raise ValueError(f'expected a 3D mask, got shape {out.shape}')
  if check_mode(cfg.get('mode', SPINE_JAX_MODE)) == SPINEPS_MODE:
    return postprocess_spineps(out, spacing, remove_small=bool(cfg.remove_small_components),
                               chain_boxes=bool(cfg.crop_to_largest_component), fill=bool(cfg.fill_holes))
  return _postprocess_spine_jax(out, spacing, cfg)
