"""Axial slices of one vertebra, the classifier's input: the single extraction used everywhere.

Phantoms, users' manifests and inference all call `extract_vertebra_slices`, so a model sees the
same field of view, bone isolation, orientation and normalisation in training and in use.

Output orientation (radiological display convention, as DICOM axial images are shown):
row 0 is the most anterior row (rows run anterior -> posterior) and column 0 is the patient's
RIGHT (columns run right -> left). Input volumes must be RAS (see nifti.to_canonical).
"""
from __future__ import annotations

import ml_collections
import numpy as np
from scipy import ndimage

OUTSIDE_HU = -1000.0  # air beyond the scanned volume
_FAR_MM = 1.0e6  # distance assigned beyond the volume: always outside the margin


class SliceError(ValueError):
  """A vertebra label cannot give slices (absent from the mask, or too small)."""


def default_slice_config() -> ml_collections.ConfigDict:
  """Slice geometry and intensity settings; training and inference must use the same values."""
  cfg = ml_collections.ConfigDict()
  cfg.image_size = 64  # output pixels per side
  cfg.field_of_view_mm = 112.0  # square in-plane field of view (1.75 mm pixels at 64)
  cfg.hu_window = (-200.0, 1500.0)  # clip before normalising
  cfg.hu_mean = 69.9  # normalisation from the authors' code
  cfg.hu_std = 182.3
  # Bone isolation (the paper's HU threshold is unknown; a mask margin keeps the cortex edge).
  cfg.mask_margin_mm = 4.0  # keep pixels within this in-plane distance of the vertebra's mask
  cfg.background_hu = -200.0  # value given to everything else
  cfg.other_labels_to_background = True  # voxels of other mask labels never show, even within the margin
  cfg.min_slice_voxels = 20  # skip slices that only graze the vertebra
  return cfg


def normalise_hu(hu: np.ndarray, cfg) -> np.ndarray:
  """Clip to the HU window, then standardise with the authors' mean and std."""
  low, high = cfg.hu_window
  return ((np.clip(hu, low, high) - cfg.hu_mean) / cfg.hu_std).astype(np.float32)


def background_value(cfg) -> float:
  """The normalised value of every pixel outside the bone margin."""
  return float(normalise_hu(np.float32(cfg.background_hu), cfg))


def _check_inputs(volume_hu, mask, label, spacing_mm):
  volume_hu = np.asarray(volume_hu, np.float32)
  mask = np.asarray(mask)
  if volume_hu.ndim != 3 or mask.shape != volume_hu.shape:
    raise ValueError(f'label {label}: volume {volume_hu.shape} and mask {mask.shape} must be 3D of the same shape')
  spacing = np.asarray(spacing_mm, np.float64)
  if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
    raise ValueError(f'label {label}: spacing_mm must be three positive numbers, got {spacing_mm!r}')
  return volume_hu, mask, spacing


def slice_selection(mask: np.ndarray, label: int, min_slice_voxels: int) -> tuple[np.ndarray, np.ndarray]:
  """(vertebra voxels, z indices of the axial slices to use); SliceError when there are none."""
  vert = mask == label
  counts = vert.sum(axis=(0, 1))
  if not counts.any():
    present = np.unique(mask)
    present = present[present != 0]
    shown = ', '.join(map(str, present[:30])) + (' ...' if present.size > 30 else '')
    raise SliceError(f'label {label} is absent from the mask (labels present: {shown or "none"})')
  z = np.flatnonzero(counts >= max(int(min_slice_voxels), 1))
  if z.size == 0:
    raise SliceError(f'label {label}: its largest axial cross-section has {int(counts.max())} voxels, '
                     f'fewer than min_slice_voxels={min_slice_voxels}')
  return vert, z


def _window(center: float, offsets: np.ndarray, extent: tuple[int, int], size: int) -> tuple[int, int]:
  """Index range [lo, hi) covering the sampled positions and the vertebra's extent, inside the volume."""
  lo = min(int(np.floor(center + offsets.min())) - 1, extent[0])
  hi = max(int(np.ceil(center + offsets.max())) + 2, extent[1] + 1)
  return max(lo, 0), min(hi, size)


def extract_vertebra_slices(volume_hu, mask, label: int, spacing_mm, cfg) -> tuple[np.ndarray, np.ndarray]:
  """Normalised axial slices (n, S, S) float32 through vertebra `label`, and their z indices (n,).

  volume_hu, mask: 3D RAS arrays on one grid (axial slices along the last axis); spacing_mm:
  (sx, sy, sz). Every slice is centred on the in-plane bounding-box centre of the whole vertebra,
  covers cfg.field_of_view_mm, and is resampled linearly; beyond the volume is air (-1000 HU).
  Pixels farther than cfg.mask_margin_mm (in-plane) from the vertebra, and pixels of other labels,
  become cfg.background_hu, so only this vertebra's bone remains.
  """
  volume_hu, mask, spacing = _check_inputs(volume_hu, mask, label, spacing_mm)
  label = int(label)
  vert, z = slice_selection(mask, label, cfg.min_slice_voxels)
  size, fov = int(cfg.image_size), float(cfg.field_of_view_mm)
  ii, jj = np.nonzero(vert.any(axis=2))
  ci, cj = (ii.min() + ii.max()) / 2.0, (jj.min() + jj.max()) / 2.0
  # Pixel centres (mm from the field's centre), then toward -x for columns, -y for rows.
  offsets = (np.arange(size) + 0.5) * (fov / size) - fov / 2.0
  off_i, off_j = -offsets / spacing[0], -offsets / spacing[1]
  i0, i1 = _window(ci, off_i, (ii.min(), ii.max()), mask.shape[0])
  j0, j1 = _window(cj, off_j, (jj.min(), jj.max()), mask.shape[1])
  hu = volume_hu[i0:i1, j0:j1][:, :, z]
  this = vert[i0:i1, j0:j1][:, :, z]
  if getattr(cfg, 'other_labels_to_background', True):  # before interpolation: no blending of their bone
    hu = np.where((mask[i0:i1, j0:j1][:, :, z] != 0) & ~this, np.float32(cfg.background_hu), hu)
  distance = np.stack([ndimage.distance_transform_edt(~this[:, :, k], sampling=spacing[:2])
                       for k in range(z.size)], axis=-1).astype(np.float32)
  # Sample positions (3, S rows, S cols, n): row r -> j, column c -> i, slice k -> k.
  coords = np.empty((3, size, size, z.size), np.float32)
  coords[0] = (ci + off_i - i0)[None, :, None]
  coords[1] = (cj + off_j - j0)[:, None, None]
  coords[2] = np.arange(z.size, dtype=np.float32)[None, None, :]
  image = ndimage.map_coordinates(hu, coords, order=1, mode='constant', cval=OUTSIDE_HU)
  near = ndimage.map_coordinates(distance, coords, order=1, mode='constant', cval=_FAR_MM)
  image = np.where(near <= cfg.mask_margin_mm, image, np.float32(cfg.background_hu))
  return np.ascontiguousarray(normalise_hu(image, cfg).transpose(2, 0, 1)), z.astype(np.int64)
