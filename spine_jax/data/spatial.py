"""MRI geometry and intensities shared by training and inference: the model's space and back.

The SPINEPS models see PIR volumes (axis 0 to the patient's posterior, 1 inferior, 2 right; axis 2
is the sagittal slice axis) at 0.75 x 0.75 x 1.65 mm. `to_model_space` takes any scan there and
returns a `ModelSpace` that `from_model_space` uses to put a result back on the scan's own grid,
voxel for voxel, so the written mask shares the input's shape and affine exactly.

Resampling convention (both directions, so the round trip is consistent): centre-aligned grids.
An axis of n_in voxels of s_in mm becomes n_out = round(n_in * s_in / s_out) voxels (at least 1)
covering the same field of view: output voxel j samples input coordinate
(j + 0.5) * n_in / n_out - 0.5 (the convention of nnU-Net's resize and of `align_corners=False`).
The model grid's true spacing is therefore n_in * s_in / n_out (`ModelSpace.model_spacing`),
within half a voxel over the whole field of view of the requested one. Masks use nearest neighbour
(exact integer index arithmetic, no float ties), so a mask whose spacing is an integer multiple of
the model's, or equal to it, comes back unchanged. Samples beyond the edge repeat the edge voxel.

`grid='spineps'` selects SPINEPS' convention instead (TPTBox 1.1.0's `NII.rescale` and
`NII.resample_from_to`, which SPINEPS 2.1.3 uses), so a converted SPINEPS network sees its own
grid: n_out = rint(n_in * s_in / s_out) voxels of exactly s_out mm, voxel 0 kept at its world
position and the axes' directions kept (the field of view loses or gains up to half an output
voxel at the far end; the 'centre' grid's voxel 0 lies about 0.5 * (s_out - s_in) mm further along
each axis, -0.825 mm for 3.3 mm slices at 1.65 mm). Arrays move by
the voxel-to-voxel matrix inv(A_from) @ A_to with spline order 3 (images) or 0 (masks) and
mode 'nearest', as TPTBox calls scipy (align_corners=False, the default of both NII methods);
masks return to the input grid by that matrix straight from the model grid. When every axis
is already within 0.001 mm of the target, TPTBox leaves the grid alone, and so does this.

SPINEPS pads its input grid by 4 voxels of zeros before all this (`input_pad`, with
`data/spineps_preprocess.py`) and keeps the image's own dtype through the rescale (`keep_dtype`);
a model space remembers the padding, so arrays still come back onto the unpadded input grid.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from spine_jax.data import nifti

PIR = ('P', 'I', 'R')
REFERENCE_SPACING = (0.75, 0.75, 1.65)  # mm along P, I, R: the SPINEPS T2w models.
SPINEPS_MAX_INTENSITY = 1500.0
# 2**27 voxels: 0.5 GiB as float32, already ~8 GiB of 15-class probabilities. Far above any
# clinical MRI (a 1024 x 1024 x 60 scan is 2**26); a bigger array is almost surely a wrong header.
DEFAULT_MAX_VOXELS = 2**27
CENTRE_GRID, SPINEPS_GRID = 'centre', 'spineps'
GRIDS = (CENTRE_GRID, SPINEPS_GRID)
DEFAULT_GRID = CENTRE_GRID  # what a preprocess config without a `grid` field means
# TPTBox's `rescale` keeps a volume as it is when every axis is this close (np.isclose) to the target.
SPINEPS_KEEP_ATOL_MM = 0.001


class VolumeError(nifti.NiftiError):
  """A volume cannot go to model space: not 3D, NaN/Inf values, or an unusable geometry."""


class VolumeTooLargeError(VolumeError):
  """A volume (as given or once resampled) exceeds the voxel limit."""


@dataclasses.dataclass(frozen=True)
class ModelSpace:
  """What takes a model-space array back exactly onto the input grid."""
  reorientation: nifti.Reorientation  # input orientation, shape and affine
  axcodes: tuple  # model orientation, e.g. ('P', 'I', 'R')
  reoriented_shape: tuple  # input shape after reorienting (before resampling)
  reoriented_affine: np.ndarray  # affine of that grid
  source_spacing: tuple  # mm along the reoriented axes
  target_spacing: tuple  # mm requested
  target_shape: tuple  # model-space shape
  grid: str = DEFAULT_GRID  # resampling convention, one of GRIDS
  input_pad: int = 0  # zero voxels added on every side of the input grid first (reoriented_* include them)

  @property
  def input_shape(self) -> tuple:
    return self.reorientation.shape

  @property
  def input_affine(self) -> np.ndarray:
    return self.reorientation.affine

  @property
  def resampled(self) -> bool:
    """Whether the model grid differs from the reoriented one (SPINEPS' grid keeps a near-target scan as it is)."""
    if self.grid == SPINEPS_GRID:
      return not spineps_keeps_grid(self.source_spacing, self.target_spacing)
    return self.target_shape != self.reoriented_shape

  @property
  def model_spacing(self) -> np.ndarray:
    """The model grid's true spacing (mm): 'centre' keeps the field of view, so it differs slightly from target."""
    if self.grid == SPINEPS_GRID:
      return np.asarray(self.target_spacing if self.resampled else self.source_spacing, np.float64)
    return np.asarray(self.source_spacing) * np.asarray(self.reoriented_shape) / np.asarray(self.target_shape)

  @property
  def model_affine(self) -> np.ndarray:
    """Voxel-to-world affine of the model-space grid (for writing model-space arrays as NIfTI)."""
    if self.grid == SPINEPS_GRID:
      affine = np.asarray(self.reoriented_affine, np.float64)
      return spineps_model_affine(affine, self.target_spacing) if self.resampled else affine.copy()
    scale = np.asarray(self.reoriented_shape, np.float64) / np.asarray(self.target_shape, np.float64)
    to_reoriented = np.diag([*scale, 1.0])
    to_reoriented[:3, 3] = 0.5 * scale - 0.5
    return np.asarray(self.reoriented_affine, np.float64) @ to_reoriented


def _label(name) -> str:
  return str(name) if name is not None else 'input volume'


def check_volume(array: np.ndarray, *, name=None, max_voxels: int | None = DEFAULT_MAX_VOXELS) -> None:
  """Raise VolumeError unless `array` is a finite 3D volume of at most `max_voxels` voxels."""
  array = np.asarray(array)
  if array.ndim != 3:
    raise VolumeError(f'{_label(name)}: expected a 3D volume, got shape {array.shape}')
  if min(array.shape) < 1:
    raise VolumeError(f'{_label(name)}: empty volume of shape {array.shape}')
  check_voxel_count(array.shape, name=name, max_voxels=max_voxels)
  if np.issubdtype(array.dtype, np.inexact) and not np.all(np.isfinite(array)):
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    raise VolumeError(f'{_label(name)}: {bad} NaN or infinite voxel value(s)')


def check_voxel_count(shape, *, name=None, max_voxels: int | None = DEFAULT_MAX_VOXELS,
                      what: str = 'volume') -> None:
  """Raise VolumeTooLargeError naming the size and the limit when prod(shape) > max_voxels."""
  count = int(np.prod(shape, dtype=np.int64))
  if max_voxels is not None and count > max_voxels:
    raise VolumeTooLargeError(
        f'{_label(name)}: {what} of shape {tuple(int(s) for s in shape)} has {count:,} voxels, more than '
        f'the limit of {int(max_voxels):,} (raise max_voxels if this scan really is that large)')


def check_spacing(spacing, *, name=None) -> np.ndarray:
  """(3,) float64 spacing, or ValueError unless it has three finite positive values."""
  spacing = np.asarray(spacing, np.float64)
  if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
    raise ValueError(f'{_label(name)}: spacing must be three positive numbers (mm), got {spacing.tolist()}')
  return spacing


def resampled_shape(shape, spacing, target_spacing) -> tuple:
  """round(n * spacing / target_spacing) per axis, at least 1: the field of view is kept."""
  ratio = np.asarray(shape, np.float64) * check_spacing(spacing) / check_spacing(target_spacing)
  return tuple(max(1, int(n)) for n in np.round(ratio))


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
  """Input index of each output voxel's centre, floor((j + 0.5) * n_in / n_out), in integers."""
  return np.minimum((2 * np.arange(n_out, dtype=np.int64) + 1) * n_in // (2 * n_out), n_in - 1)


def check_grid(grid, *, name=None) -> str:
  """`grid` if it is one of GRIDS, else ValueError listing them."""
  if grid not in GRIDS:
    raise ValueError(f'{_label(name)}: unknown resampling grid {grid!r} (one of {", ".join(GRIDS)})')
  return grid


def grid_of(prep_cfg) -> str:
  """The grid a preprocess config asks for: its `grid` field, DEFAULT_GRID when absent (configs older than it)."""
  return check_grid(prep_cfg.get('grid', DEFAULT_GRID), name='config.data.preprocess.grid')


def tptbox_zoom(spacing) -> np.ndarray:
  """Spacing as TPTBox's `NII.zoom` reports it (rounded to 7 decimals), which its shape rule and skip test use."""
  return np.round(np.asarray(spacing, np.float64), 7)


def spineps_keeps_grid(source_spacing, target_spacing) -> bool:
  """TPTBox's `rescale` skip: every axis within SPINEPS_KEEP_ATOL_MM (np.isclose) of the target keeps the grid."""
  return bool(np.all(np.isclose(np.asarray(target_spacing, np.float64), tptbox_zoom(source_spacing),
                                atol=SPINEPS_KEEP_ATOL_MM)))


def spineps_model_affine(affine: np.ndarray, spacing) -> np.ndarray:
  """TPTBox's `rescale` affine: each column scaled to `spacing` mm (directions kept), voxel 0's world position kept."""
  affine = np.asarray(affine, np.float64)
  out = affine.copy()
  out[:3, :3] = affine[:3, :3] * tuple(float(s) for s in spacing) / nifti.spacing_from_affine(affine)
  return out


def tptbox_grid_affine(affine: np.ndarray) -> np.ndarray:
  """The affine TPTBox resamples onto when the target is an NII (`resample_from_to` takes its `to_gird()`):
  zoom (`tptbox_zoom` of the column norms) and origin rounded to 7 decimals, rotation = columns / zoom, the
  product recomposed and rounded to 7 decimals again. A float32 origin of a NIfTI file moves by up to 5e-8 mm,
  which decides the nearest voxel wherever a model voxel lies exactly halfway between two input voxels (a
  1.5 mm grid over a 0.75 mm one: 22% of a mask's voxels on a phantom)."""
  affine = np.asarray(affine, np.float64)
  zoom = tptbox_zoom(nifti.spacing_from_affine(affine))
  out = np.eye(4)
  out[:3, :3] = (affine[:3, :3] / zoom) @ np.diag(zoom)
  out[:3, 3] = np.round(affine[:3, 3], 7)
  return np.round(out, 7)


def resample_affine(array: np.ndarray, from_affine: np.ndarray, to_affine: np.ndarray, out_shape, *,
                    order: int, dtype=None) -> np.ndarray:
  """TPTBox's `_resample_from_to` (align_corners=False, mode 'nearest'): output voxel v samples input
  voxel inv(from_affine) @ to_affine @ v, the same matrix computed the same way, so the numbers match.

  order 0 keeps the dtype (masks), order >= 1 gives float32, or `dtype` from the array as it is (TPTBox
  writes into the image's own dtype: scipy rounds integers half away from zero); trailing axes follow along.
  """
  array = np.asarray(array)
  voxel_map = np.linalg.inv(np.asarray(from_affine, np.float64)).dot(np.asarray(to_affine, np.float64))
  matrix, offset = voxel_map[:3, :3], voxel_map[:3, 3]
  out_shape = tuple(int(n) for n in out_shape)
  flat = array.reshape(array.shape[:3] + (-1,))
  if order >= 1 and dtype is None:
    flat = flat.astype(np.float32, copy=False)
  out = np.empty(out_shape + (flat.shape[-1],), flat.dtype if dtype is None else dtype)
  for c in range(flat.shape[-1]):
    ndimage.affine_transform(flat[..., c], matrix, offset, output_shape=out_shape, output=out[..., c],
                             order=order, mode='nearest')
  return out.reshape(out_shape + array.shape[3:])


def _unresampled(array: np.ndarray, order: int, dtype=None) -> np.ndarray:
  """What resampling onto the same grid gives: a copy (order 0 keeps the dtype) or float32 (or `dtype`)."""
  return array.copy() if order == 0 else array.astype(np.float32 if dtype is None else dtype)


def _to_grid(reoriented: np.ndarray, model_space: ModelSpace, *, order: int, dtype=None) -> np.ndarray:
  """A reoriented array onto the model grid, in the model space's convention."""
  if model_space.grid == SPINEPS_GRID:
    if not model_space.resampled:
      return _unresampled(reoriented, order, dtype)
    return resample_affine(reoriented, model_space.reoriented_affine, model_space.model_affine,
                           model_space.target_shape, order=order, dtype=dtype)
  return resample(reoriented, model_space.target_shape, order=order, dtype=dtype)


def resample(array: np.ndarray, out_shape, *, order: int, dtype=None) -> np.ndarray:
  """Centre-aligned resampling of the first three axes to `out_shape` (trailing axes follow).

  order 0: nearest neighbour by index arithmetic, dtype kept (masks). order >= 1: scipy spline
  interpolation (1 linear, 3 cubic) to float32 (or `dtype`, as `resample_affine`), one channel at a time.
  """
  array = np.asarray(array)
  in_shape = array.shape[:3]
  out_shape = tuple(int(n) for n in out_shape)
  if out_shape == in_shape:
    return _unresampled(array, order, dtype)
  if order == 0:
    return array[np.ix_(*(_nearest_indices(a, b) for a, b in zip(in_shape, out_shape)))]
  scale = np.asarray(in_shape, np.float64) / np.asarray(out_shape, np.float64)
  offset = 0.5 * scale - 0.5
  flat = array.reshape(in_shape + (-1,))
  out = np.empty(out_shape + (flat.shape[-1],), np.float32 if dtype is None else dtype)
  for c in range(flat.shape[-1]):
    ndimage.affine_transform(flat[..., c].astype(np.float32) if dtype is None else flat[..., c], scale, offset,
                             output_shape=out_shape, output=out[..., c], order=order, mode='nearest')
  return out.reshape(out_shape + array.shape[3:])


def _target_shape(shape, source_spacing, target_spacing, grid: str) -> tuple:
  """Model-space shape: round(n * s_in / s_out) per axis ('spineps': TPTBox's rounded zoom, or kept as it is)."""
  if grid == SPINEPS_GRID:
    if spineps_keeps_grid(source_spacing, target_spacing):
      return tuple(int(n) for n in shape)
    source_spacing = tptbox_zoom(source_spacing)
  return resampled_shape(shape, source_spacing, target_spacing)


def pad_grid(array: np.ndarray, affine: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray]:
  """`pad` zero voxels on every side of the first three axes, and the grid's affine: TPTBox's `apply_pad`
  (its float translation matrix, `affine @ transform`), so voxel 0 moves `pad` voxels back."""
  array = np.asarray(array)
  transform = np.eye(4)
  transform[:3, 3] = -pad
  pads = [(pad, pad)] * 3 + [(0, 0)] * (array.ndim - 3)
  return np.pad(array, pads), np.asarray(affine, np.float64) @ transform


def _unpad(array: np.ndarray, pad: int) -> np.ndarray:
  return array[pad:-pad, pad:-pad, pad:-pad] if pad else array


def to_model_space(image: np.ndarray, affine: np.ndarray, *, axcodes=PIR, spacing=REFERENCE_SPACING,
                   order: int = 3, is_mask: bool = False, max_voxels: int | None = DEFAULT_MAX_VOXELS,
                   grid: str = DEFAULT_GRID, input_pad: int = 0, keep_dtype: bool = False,
                   name=None) -> tuple[np.ndarray, ModelSpace]:
  """Reorient to `axcodes` and resample to `spacing` mm on `grid` (see module docstring): (model-space
  array, ModelSpace).

  Images are interpolated with spline `order` (3 cubic, 1 linear) to float32 (their own dtype with
  `keep_dtype`, as TPTBox); masks (`is_mask=True`) with nearest neighbour, keeping their dtype.
  `input_pad` zero voxels go around the input grid first (`pad_grid`). Faults raise VolumeError (a
  NiftiError) naming `name`: not 3D, NaN/Inf, a bad affine, more than `max_voxels` voxels
  before or after resampling.
  """
  image = np.asarray(image)
  check_volume(image, name=name, max_voxels=max_voxels)
  affine = np.asarray(affine, np.float64)
  nifti.check_affine(_label(name), affine)
  target_spacing = check_spacing(spacing, name=name)
  grid = check_grid(grid, name=name)
  padded, padded_affine = pad_grid(image, affine, input_pad) if input_pad else (image, affine)
  reoriented, new_affine, reorientation = nifti.reorient(padded, padded_affine, axcodes)
  reorientation = dataclasses.replace(reorientation, shape=tuple(image.shape[:3]), affine=affine.copy())
  source_spacing = nifti.spacing_from_affine(new_affine)
  target_shape = _target_shape(reoriented.shape, source_spacing, target_spacing, grid)
  check_voxel_count(target_shape, name=name, max_voxels=max_voxels,
                    what=f'volume resampled to {target_spacing.tolist()} mm')
  model_space = ModelSpace(
      reorientation=reorientation, axcodes=tuple(axcodes), reoriented_shape=tuple(reoriented.shape),
      reoriented_affine=new_affine, source_spacing=tuple(source_spacing.tolist()),
      target_spacing=tuple(target_spacing.tolist()), target_shape=target_shape, grid=grid, input_pad=int(input_pad))
  dtype = image.dtype if keep_dtype and not is_mask else None
  return _to_grid(reoriented, model_space, order=0 if is_mask else order, dtype=dtype), model_space


def mask_to_model_space(mask: np.ndarray, affine: np.ndarray, **kwargs) -> tuple[np.ndarray, ModelSpace]:
  """`to_model_space` for label masks: nearest neighbour, labels and dtype kept."""
  return to_model_space(mask, affine, is_mask=True, **kwargs)


def apply_model_space(array: np.ndarray, model_space: ModelSpace, *, is_mask: bool = False,
                      order: int = 3) -> np.ndarray:
  """Another array on the same input grid (e.g. the mask of an image) into an existing model space."""
  array = np.asarray(array)
  if array.shape[:3] != model_space.input_shape:
    raise ValueError(f'array of shape {array.shape} is not on the input grid of shape {model_space.input_shape}')
  reoriented, _, _ = nifti.reorient(array, model_space.input_affine, model_space.axcodes)
  if model_space.input_pad:  # padding every side alike commutes with the axis flips and permutations
    reoriented = pad_grid(reoriented, model_space.input_affine, model_space.input_pad)[0]
  return _to_grid(reoriented, model_space, order=0 if is_mask else order)


def from_model_space(array: np.ndarray, model_space: ModelSpace, *, is_mask: bool = True,
                     order: int = 1) -> np.ndarray:
  """A model-space array (masks, or probabilities with trailing class axes) back on the input grid.

  Masks use nearest neighbour; other arrays spline `order` (default linear: probabilities stay
  in [0, 1] and keep summing to 1, which cubic would not). The result has the input's exact
  shape (plus trailing axes), so it is saved with the input's affine. On SPINEPS' grid it goes
  straight from the model grid to the (unpadded) input grid, as TPTBox's `resample_from_to` does.
  """
  array = np.asarray(array)
  order = 0 if is_mask else order
  if array.shape[:3] != model_space.target_shape:
    raise ValueError(f'array of shape {array.shape} is not on the model grid of shape {model_space.target_shape}')
  if model_space.grid == SPINEPS_GRID:
    if model_space.resampled:
      return resample_affine(array, model_space.model_affine, tptbox_grid_affine(model_space.input_affine),
                             model_space.input_shape, order=order)
    resampled = _unresampled(array, order)
  else:
    resampled = resample(array, model_space.reoriented_shape, order=order)
  return nifti.undo_reorientation(_unpad(resampled, model_space.input_pad), model_space.reorientation)


def shift_and_cap_intensity(image: np.ndarray, max_value: float = SPINEPS_MAX_INTENSITY) -> np.ndarray:
  """SPINEPS' MRI intensity step: minimum shifted to 0, then scaled linearly so the maximum is <= `max_value`.

  MRI intensities have no physical unit; this puts every scanner's output in the range the
  networks were trained on without changing contrast.
  """
  image = np.asarray(image, np.float32)
  shifted = image - image.min()
  peak = float(shifted.max())
  if peak > max_value:
    shifted *= np.float32(max_value / peak)
  return shifted


def zscore(image: np.ndarray, eps: float = 1e-8) -> np.ndarray:
  """nnU-Net's MRI normalisation, (x - mean) / max(std, eps) over the whole volume, as float32."""
  image = np.asarray(image)
  mean = float(np.mean(image, dtype=np.float64))
  std = float(np.std(image, dtype=np.float64))
  return ((image.astype(np.float64) - mean) / max(std, eps)).astype(np.float32)


def normalise_mri(image: np.ndarray, *, max_value: float = SPINEPS_MAX_INTENSITY,
                  standardise: bool = True) -> np.ndarray:
  """The full MRI intensity pipeline: `shift_and_cap_intensity`, then `zscore` unless `standardise=False`."""
  shifted = shift_and_cap_intensity(image, max_value)
  return zscore(shifted) if standardise else shifted
