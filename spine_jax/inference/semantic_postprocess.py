"""Clean-up of the semantic (phase-1) mask, SPEC §3, on PIR model-space arrays.

In SPEC order: (1) delete small connected components of the bone, canal and disc labels (network
speckle), (2) keep only what lies in the bounding box of the largest connected piece of the whole
mask plus a margin (false positives far from the spine, e.g. in the skull base or the pelvis),
(3) fill holes in the vertebral body, cord, canal and discs. Each step only ever sets voxels to 0
or fills background voxels, so a clean mask passes through unchanged.

Connectivity choices follow the public SPINEPS code: small components are 6-connected (its
`clean_cc_artifacts` uses connectivity 1), so a speck touching a structure only at an edge or a
corner is still removed; the largest piece of the whole mask is 26-connected (its bounding-box
clean uses connectivity 3), so thin diagonal bridges keep the spine one piece. Holes are filled in
3D (as SPINEPS' `fill_holes_`), optionally per sagittal slice (axis 2 in PIR) instead.
"""
from __future__ import annotations

import math

import ml_collections
import numpy as np
from scipy import ndimage

SMALL_COMPONENT_LABELS = (41, 42, 43, 44, 45, 46, 47, 48, 49, 61, 100)
FILL_HOLE_LABELS = (49, 60, 61, 100)
SAGITTAL_AXIS = 2  # R in PIR: one sagittal slice per index


def default_postprocess_config() -> ml_collections.ConfigDict:
  """Every threshold of the semantic post-processing (SPEC §3), each step switchable."""
  cfg = ml_collections.ConfigDict()
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


def _fill_binary_holes(mask: np.ndarray, slice_axis: int | None) -> np.ndarray:
  if slice_axis is None:
    return ndimage.binary_fill_holes(mask)
  moved = np.moveaxis(mask, slice_axis, 0)
  filled = np.stack([ndimage.binary_fill_holes(s) for s in moved])
  return np.moveaxis(filled, 0, slice_axis)


def fill_holes(seg: np.ndarray, labels=FILL_HOLE_LABELS, slice_axis: int | None = None) -> np.ndarray:
  """Per label in order, background voxels enclosed by it become that label; other labels are never overwritten.

  A hole is a background region not 6-connected to the array border (scipy's default), in 3D,
  or within each slice across `slice_axis` when given (2D, 4-connected). The cord inside the
  canal is not background, so it stays the cord. Each label's work is confined to its bounding
  box grown by one voxel, which gives the same holes: all that lies outside is background.
  """
  out = np.array(seg, copy=True)
  for label in labels:
    mask = out == label
    box = ndimage.find_objects(mask.astype(np.int8))
    if not box:
      continue
    box = tuple(slice(max(0, b.start - 1), min(n, b.stop + 1)) for b, n in zip(box[0], out.shape))
    region = out[box]
    filled = _fill_binary_holes(mask[box], slice_axis)
    region[filled & (region == 0)] = label
  return out


def postprocess_semantic(seg: np.ndarray, spacing, cfg: ml_collections.ConfigDict | None = None) -> np.ndarray:
  """SPEC §3 phase-1 post-processing of a PIR semantic mask with voxel `spacing` (mm) per axis."""
  cfg = cfg if cfg is not None else default_postprocess_config()
  out = np.asarray(seg)
  if out.ndim != 3:
    raise ValueError(f'expected a 3D mask, got shape {out.shape}')
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
