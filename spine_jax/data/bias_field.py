"""N4 bias-field correction as SPINEPS 2.1.3 runs it, on SimpleITK instead of ANTsPy.

SPINEPS (`utils/proc_functions.py::n4_bias`, called by `phase_pre.py::preprocess_input` on the input
grid) corrects the foreground crop with TPTBox's `NII.n4_bias_field_correction`, which calls ANTsPy's
`n4_bias_field_correction`, which runs ANTs' `N4BiasFieldCorrection` program. The steps here are that
program's, with its parameters as SPINEPS passes them:

1. the mask is the bounding box of the voxels >= N4_MASK_THRESHOLD (a box, not the voxels themselves);
2. `-b [100]`, a spline distance: every axis is zero-padded to a whole number of 100 mm spans, and the
   B-spline lattice has spans + 3 control points per axis (ANTs computes this in float32);
3. `-s 4`: the padded image and mask are shrunk by 4 (ITK's ShrinkImageFilter: every 4th voxel);
4. `-c [50x50x50x50, 1e-7]`: four fitting levels of at most 50 iterations (ITK's N4 filter, the
   same code in both libraries; histogram sharpening at its defaults 0.15, 0.01, 200);
5. the log field is evaluated on the padded full-resolution grid, the image divided by its exp,
   voxels outside the mask keep their input value, the padding is cut off; no rescaling (`-r 0`);
6. TPTBox casts the float32 result back to the input's dtype (integers truncated).

What makes the numbers ANTs' own and not merely close (tests/data/test_bias_field.py: bit for bit on the
TPTBox test MRI in five orientations, relative L2 1e-5 to 3e-5 on a phantom, where ANTsPy differs from
itself by 2e-5 to 6e-5 between 1, 2 and 3 threads):
* which voxels the shrink keeps: on an even-sized padded axis the first kept voxel sits exactly halfway
  between two, and ITK rounds a physical point computed from ANTs' image geometry (LPS origin and
  direction of the NIfTI affine, the padding as a negative start index), so round-off decides; that
  arithmetic is redone here with ITK's own transforms (SimpleITK images) on the same geometry (the other
  voxel changes the test MRI's result by 7%), and the shrunk image gets the origin N4 fits on there;
* the B-spline fits sum float32 contributions in per-work-unit chunks: ANTsPy's ITK uses the Pool
  threader (4 work units per thread), SimpleITK's default Platform threader splits differently, and
  over 200 iterations that do not converge the difference grows to ~1e-3. The Pool threader is used here.
Both libraries take ITK's thread count from the machine the same way.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np

NONE, N4 = 'none', 'n4'
BIAS_FIELDS = (NONE, N4)
DEFAULT_BIAS_FIELD = NONE  # what a preprocess config without a `bias_field` field means
N4_MASK_THRESHOLD = 60  # intensity on SPINEPS' 0-1500 scale (n4_bias's `threshold`)
N4_SPLINE_DISTANCE_MM = 100.0  # n4_bias's `spline_param`
N4_SHRINK_FACTOR = 4
N4_ITERATIONS = (50, 50, 50, 50)  # per fitting level
N4_CONVERGENCE = 1e-7
SPLINE_ORDER = 3
# ANTsPy's nibabel conversion removes shear above this (a cosine between axes) before building its image.
ANTS_DESHEAR_THRESHOLD = 1e-6
_ANTS_THREADER = 'POOL'


class MissingExtraError(ImportError):
  """SimpleITK is not installed."""


def bias_field_of(prep_cfg) -> str:
  """The correction a preprocess config asks for: its `bias_field` field, DEFAULT_BIAS_FIELD when absent."""
  value = prep_cfg.get('bias_field', DEFAULT_BIAS_FIELD)
  if value not in BIAS_FIELDS:
    raise ValueError(f'config.data.preprocess.bias_field: unknown value {value!r} (one of {", ".join(BIAS_FIELDS)})')
  return value


def _sitk():
  try:
    import SimpleITK
  except ImportError:
    raise MissingExtraError("bias_field 'n4' needs SimpleITK: pip install 'spine_jax[n4]'") from None
  return SimpleITK


def box_mask(image: np.ndarray, threshold: float = N4_MASK_THRESHOLD) -> np.ndarray:
  """n4_bias's mask: 1 in the bounding box of the voxels >= threshold, 0 elsewhere (uint8)."""
  where = np.nonzero(np.asarray(image) >= threshold)
  if not where[0].size:
    raise ValueError(f'N4: no voxel reaches {threshold}, so there is no mask (SPINEPS fails here too)')
  mask = np.zeros(np.shape(image), np.uint8)
  mask[tuple(slice(int(w.min()), int(w.max()) + 1) for w in where)] = 1
  return mask


def _ants_affine(affine: np.ndarray) -> np.ndarray:
  """The affine ANTsPy builds its image from (`from_nibabel_nifti`): desheared by QR above the threshold."""
  affine = np.asarray(affine, np.float64)
  columns = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
  shear = max(abs(float(columns[:, i] @ columns[:, j])) for i, j in ((0, 1), (0, 2), (1, 2)))
  if shear <= ANTS_DESHEAR_THRESHOLD:
    return affine.copy()
  q, r = np.linalg.qr(affine[:3, :3])
  signs = np.where(np.abs(np.diag(r)) < 1e-12, 1.0, np.sign(np.diag(r)))
  scales = np.diag(np.diag(signs) @ r).copy()
  scales[np.abs(scales) < 1e-12] = 1.0
  out = affine.copy()
  out[:3, :3] = (q @ np.diag(signs)) @ np.diag(scales)
  return out


def ants_geometry(affine: np.ndarray) -> tuple[list, list, np.ndarray]:
  """(origin, spacing, direction) of the ITK image ANTsPy makes from a NIfTI (RAS) affine: LPS, unit columns."""
  lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ _ants_affine(affine)
  spacing = [float(np.linalg.norm(lps[:3, i])) for i in range(3)]
  direction = np.column_stack([lps[:3, i] / spacing[i] for i in range(3)])
  return lps[:3, 3].tolist(), spacing, direction


def spline_padding(shape, spacing, distance_mm: float = N4_SPLINE_DISTANCE_MM) -> tuple[list, list, list]:
  """(lower pad, upper pad, control points) per axis: ANTs' spline-distance set-up, in its float32."""
  f32 = np.float32
  lower, upper, points = [], [], []
  for n, s in zip(shape, spacing):
    domain = f32(n - 1) * f32(s)
    spans = int(math.ceil(f32(domain / f32(distance_mm))))
    extra = int(f32(f32(f32(spans) * f32(distance_mm)) - domain) / f32(s) + f32(0.5))
    lower.append(extra // 2)
    upper.append(extra - extra // 2)
    points.append(spans + SPLINE_ORDER)
  return lower, upper, points


def shrink_grid(padded_shape, lower, geometry, factor: int = N4_SHRINK_FACTOR) -> tuple[list, list, list]:
  """(first kept voxel, kept count) per padded axis, and the shrunk grid's origin as N4 takes it: ITK's
  ShrinkImageFilter on ANTs' padded image (start index -lower), its physical-point round trip done by ITK
  itself on the same origin, spacing and direction; N4 fits on origin + spacing * start index."""
  sitk = _sitk()
  origin, spacing, direction = geometry

  def grid(step, at):
    image = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    image.SetSpacing(step)
    image.SetOrigin(at)
    image.SetDirection(direction.ravel().tolist())
    return image

  out_spacing = [s * float(factor) for s in spacing]
  start = [-p for p in lower]
  count = [max(1, n // factor) for n in padded_shape]
  out_start = [-((-s) // factor) for s in start]  # ceil(start / factor)
  centre_in = grid(spacing, origin).TransformContinuousIndexToPhysicalPoint(
      [s + (n - 1) / 2.0 for s, n in zip(start, padded_shape)])
  centre_out = grid(out_spacing, origin).TransformContinuousIndexToPhysicalPoint(
      [s + (n - 1) / 2.0 for s, n in zip(out_start, count)])
  out_origin = [o + (a - b) for o, a, b in zip(origin, centre_in, centre_out)]
  first_point = grid(out_spacing, out_origin).TransformIndexToPhysicalPoint(out_start)
  first = grid(spacing, origin).TransformPhysicalPointToIndex(first_point)
  offsets = [max(0, i - s * factor) for i, s in zip(first, out_start)]
  fit_origin = [o + s * i for o, s, i in zip(out_origin, out_spacing, out_start)]
  return [s * factor + o + p for s, o, p in zip(out_start, offsets, lower)], count, fit_origin


@contextlib.contextmanager
def _threader(sitk, name: str):
  before = sitk.ProcessObject.GetGlobalDefaultThreader()
  sitk.ProcessObject.SetGlobalDefaultThreader(name)
  try:
    yield
  finally:
    sitk.ProcessObject.SetGlobalDefaultThreader(before)


def _sitk_image(sitk, array: np.ndarray, spacing, origin=(0.0, 0.0, 0.0)):
  """Array axis i as ITK axis i (SimpleITK reads numpy arrays with their axes reversed)."""
  image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array)))
  image.SetSpacing([float(s) for s in spacing])
  image.SetOrigin([float(o) for o in origin])
  return image


def n4_correct(image: np.ndarray, affine: np.ndarray, mask: np.ndarray, *,
               distance_mm: float = N4_SPLINE_DISTANCE_MM, factor: int = N4_SHRINK_FACTOR,
               iterations=N4_ITERATIONS, convergence: float = N4_CONVERGENCE) -> np.ndarray:
  """ANTs' N4BiasFieldCorrection (steps 2-5 of the module docstring) of `image` inside `mask` (float32)."""
  sitk = _sitk()
  image = np.asarray(image, np.float32)
  geometry = ants_geometry(affine)
  lower, upper, points = spline_padding(image.shape, geometry[1], distance_mm)
  pads = list(zip(lower, upper))
  padded, padded_mask = np.pad(image, pads), np.pad(np.asarray(mask, np.uint8), pads)
  first, count, fit_origin = shrink_grid(padded.shape, lower, geometry, factor)
  kept = tuple(slice(f, f + factor * (k - 1) + 1, factor) for f, k in zip(first, count))
  small = [s * float(factor) for s in geometry[1]], fit_origin
  n4 = sitk.N4BiasFieldCorrectionImageFilter()
  n4.SetMaximumNumberOfIterations([int(i) for i in iterations])
  n4.SetConvergenceThreshold(float(convergence))
  n4.SetNumberOfControlPoints(points)
  n4.SetSplineOrder(SPLINE_ORDER)
  with _threader(sitk, _ANTS_THREADER):
    n4.Execute(_sitk_image(sitk, padded[kept], *small), _sitk_image(sitk, padded_mask[kept], *small))
    log_field = n4.GetLogBiasFieldAsImage(sitk.Image(list(padded.shape), sitk.sitkFloat32))
    corrected = sitk.Divide(_sitk_image(sitk, padded, [1.0] * 3), sitk.Exp(log_field))
  out = np.transpose(sitk.GetArrayFromImage(corrected))
  out = np.where(padded_mask == 0, padded, out)
  return out[tuple(slice(p, p + n) for p, n in zip(lower, image.shape))]


def spineps_n4(image: np.ndarray, affine: np.ndarray) -> np.ndarray:
  """SPINEPS' `n4_bias` on an image on SPINEPS' 0-1500 scale: N4 inside the threshold box, back in the
  image's dtype (TPTBox's `set_dtype_`: a plain cast, so integers are truncated)."""
  image = np.asarray(image)
  return n4_correct(image, affine, box_mask(image)).astype(image.dtype)
