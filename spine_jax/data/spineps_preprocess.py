"""SPINEPS 2.1.3's intensity preprocessing before its semantic network, step for step, as a selectable mode.

`config.data.preprocess.normalisation`: 'spine_jax' (default; `spatial.normalise_mri` on the model
grid: shift and cap at 1500, z-score over the whole volume) or 'spineps', which is, in order:

On the input grid (seg_run.py:575 `preprocess_input`, phase_pre.py:64-133):
1. phase_pre.py:99  `normalize_to_range_(0, 1500)`: minimum shifted to 0, scaled only if the maximum
   exceeds 1500, cast back to the dtype (TPTBox nii_wrapper.py:1373; integers truncated);
2. phase_pre.py:100 `compute_crop(dist=0)`: the bounding box of the voxels > 0;
3. phase_pre.py:117 `n4_bias` on that crop when `bias_field` is 'n4' (data/bias_field.py; SPINEPS'
   default is on, this module's field defaults to 'none');
4. phase_pre.py:122 `normalize_to_range_` again, on the crop only;
5. phase_pre.py:126 the crop written back (outside it the image is 0 already);
6. phase_pre.py:130 `pad_to(shape + 8)`: 4 voxels (INPUT_PAD_VOXELS) on every side, filled with the
   image minimum, 0 (TPTBox's `get_c_val`).
On the model grid (`spatial.to_model_space(..., input_pad=4, keep_dtype=True)`):
7. seg_model.py:218-221 reorient to PIR and rescale (TPTBox keeps the dtype: scipy rounds integers);
8. TPTBox inference_api.py:333 `astype(np.float16)` (it changes values: 734.37 becomes 734.5);
9. nnU-Net's `run_case_npy` (TPTBox default_preprocessor.py:81,98): `crop_to_nonzero` (the bounding box
   of the non-zero voxels; filling holes does not move it), then `ZScoreNormalization` with
   use_mask_for_norm False: float32 mean and std over that box, (x - mean) / max(std, 1e-8) in float32,
   written back into the float16 array. Resampling there is a no-op (SPINEPS already resampled).
The network sees that box only; nnU-Net puts its prediction back into the uncropped grid with
background around it (export_prediction.py:226-233), which `Volume.network_box` tells inference.

`bias_field` 'n4' with the default normalisation runs steps 1-5 and then spine_jax's own normalisation.
"""
from __future__ import annotations

import numpy as np

from spine_jax.data import bias_field
from spine_jax.data import spatial

SPINE_JAX, SPINEPS = 'spine_jax', 'spineps'
NORMALISATIONS = (SPINE_JAX, SPINEPS)
DEFAULT_NORMALISATION = SPINE_JAX  # what a preprocess config without a `normalisation` field means
INPUT_PAD_VOXELS = 4  # seg_run.py segment_image(proc_pad_size=4)
ZSCORE_EPS = 1e-8  # nnU-Net's ZScoreNormalization for float32 targets


def normalisation_of(prep_cfg) -> str:
  """The normalisation a preprocess config asks for: its `normalisation` field, DEFAULT_NORMALISATION when absent."""
  value = prep_cfg.get('normalisation', DEFAULT_NORMALISATION)
  if value not in NORMALISATIONS:
    raise ValueError(f'config.data.preprocess.normalisation: unknown value {value!r} '
                     f'(one of {", ".join(NORMALISATIONS)})')
  return value


def input_pad_of(prep_cfg) -> int:
  """Voxels SPINEPS pads around the input grid in the config's mode (0 unless 'spineps')."""
  return INPUT_PAD_VOXELS if normalisation_of(prep_cfg) == SPINEPS else 0


def runs_on_input_grid(prep_cfg) -> bool:
  """Whether steps 1-5 run: in SPINEPS' normalisation, or for N4 (which SPINEPS runs inside them)."""
  return normalisation_of(prep_cfg) == SPINEPS or bias_field.bias_field_of(prep_cfg) != bias_field.NONE


def normalize_to_range(image: np.ndarray, max_value=spatial.SPINEPS_MAX_INTENSITY) -> np.ndarray:
  """TPTBox's `normalize_to_range_(0, max_value)` with its numpy arithmetic as it is: the shift stays in
  the image's dtype (an unsigned minimum wraps around and still subtracts), the scale goes through
  float and back by a plain cast."""
  image = np.asarray(image)
  with np.errstate(over='ignore'):
    shifted = image + (-image.min() + 0)
  peak = shifted.max()
  if peak > max_value:
    shifted = (shifted * (max_value / peak)).astype(shifted.dtype)
  return shifted


def foreground_box(image: np.ndarray, name='input volume') -> tuple[slice, ...]:
  """The bounding box of the voxels > 0 (TPTBox's `compute_crop(dist=0)`; nnU-Net's non-zero crop)."""
  where = np.nonzero(np.any(image > 0, axis=2)) + (np.nonzero(np.any(image > 0, axis=(0, 1)))[0],)
  if not where[0].size:
    raise spatial.VolumeError(f'{name}: the image is empty (no voxel above its minimum), as '
                              'SPINEPS reports it')
  return tuple(slice(int(w.min()), int(w.max()) + 1) for w in where)


def crop_affine(affine: np.ndarray, box) -> np.ndarray:
  """nibabel's `slicer` affine, as TPTBox's `apply_crop` computes it (its integer matrix, `affine.dot`)."""
  transform = np.eye(4, dtype=int)
  transform[:3, 3] = [s.start for s in box]
  return np.asarray(affine, np.float64).dot(transform)


def prepare_input(image: np.ndarray, affine: np.ndarray, *, bias: str = bias_field.NONE, name='input volume',
                  max_voxels: int | None = spatial.DEFAULT_MAX_VOXELS,
                  n4_backend: str = bias_field.DEFAULT_N4_BACKEND) -> np.ndarray:
  """Steps 1-5 (module docstring) on the input grid; the dtype follows TPTBox's (an integer scan stays one)."""
  image = np.asarray(image)
  spatial.check_volume(image, name=name, max_voxels=max_voxels)
  out = normalize_to_range(image)
  box = foreground_box(out, name)
  crop = out[box]
  if bias == bias_field.N4:
    try:
      crop = bias_field.spineps_n4(crop, crop_affine(affine, box), backend=n4_backend)
    except ValueError as error:
      raise spatial.VolumeError(f'{name}: {error}') from None
  out[box] = normalize_to_range(crop)
  return out


def network_input(model_image: np.ndarray, name='input volume') -> tuple[np.ndarray, tuple[slice, ...]]:
  """Steps 8-9 on the model grid: (the model grid as float32, z-scored inside the non-zero box and 0
  outside, the box). The statistics are float32 sums in the order nnU-Net's array holds the voxels in
  memory (its axes are reversed views of the model grid's C order, so this grid's C order), so they round
  the same; every value is a float16 value, as the network received it."""
  half = np.asarray(model_image).astype(np.float16)
  box = foreground_box(half != 0, name)
  data = np.ascontiguousarray(half[box]).astype(np.float32)
  mean, std = data.mean(), data.std()
  data -= mean
  data /= max(std, ZSCORE_EPS)
  out = np.zeros(half.shape, np.float32)
  out[box] = data.astype(np.float16)
  return out, box


def stored_dtype(image: np.ndarray, header) -> np.ndarray:
  """A loaded image (float32, `nifti.load_nifti`) back in its file's integer dtype when the file stores
  integers unscaled: TPTBox keeps that dtype, and steps 1, 3, 4 and 7 cast to it."""
  dtype = header.get_data_dtype()
  slope, inter = header.get_slope_inter()
  if np.issubdtype(dtype, np.integer) and slope in (None, 1.0) and inter in (None, 0.0):
    return np.asarray(image).astype(dtype)
  return image
