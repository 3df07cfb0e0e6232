"""N4 bias-field correction as SPINEPS 2.1.3 runs it, in numpy (default) or on SimpleITK, not ANTsPy.

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

Step 4 runs in one of two backends: 'numpy' (data/n4_filter.py, ITK's filter rewritten as separable
tensor contractions; no extra needed, 15-20x faster) or 'sitk' (SimpleITK's own filter, the `n4` extra).

What makes the numbers ANTs' own and not merely close (tests/data/test_bias_field.py):
* which voxels the shrink keeps: on an even-sized padded axis the first kept voxel sits exactly halfway
  between two, and ITK rounds a physical point computed from ANTs' image geometry (LPS origin and
  direction of the NIfTI affine, the padding as a negative start index), so round-off decides (the other
  voxel changes the test MRI's result by 7%); that arithmetic is redone on the same geometry by ITK itself
  ('sitk') or by data/itk_geometry.py's bit-exact replay of it ('numpy'), and the shrunk image gets the
  origin N4 fits on there;
* the B-spline fits sum float32 contributions in per-work-unit chunks: ANTsPy's ITK uses the Pool
  threader (4 work units per thread), SimpleITK's default Platform threader splits differently, and
  over 200 iterations that do not converge the difference grows to ~1e-3. The Pool threader is used for
  'sitk'; 'numpy' sums in float64 and keeps ITK's float32 where it is sequential and cheap to keep (the
  histogram, the field's evaluation), without which its field drifts 10x further from SimpleITK's.
Both libraries take ITK's thread count from the machine the same way. Measured (relative L2 of the
corrected image): 'sitk' against ANTsPy bit for bit on the TPTBox test MRI in five orientations, 1e-5 to
3e-5 on a phantom, where ANTsPy differs from itself by 2e-5 to 6e-5 between 1, 2 and 3 threads; 'numpy'
against 'sitk' 4e-7 to 7e-7 on the test MRI (after the cast to its uint16, 2 to 8 voxels differ by 1) and
5e-6 to 1.9e-4 on phantoms, where SimpleITK differs from itself by 9e-6 to 1.5e-4 between 1, 2 and 3 threads,
and 2e-5 to 3e-5 against ANTsPy on a phantom ('sitk': 1e-5 to 3e-5).
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple

import numpy as np

from spine_jax.data import itk_geometry
from spine_jax.data import n4_filter

NONE, N4 = 'none', 'n4'
BIAS_FIELDS = (NONE, N4)
DEFAULT_BIAS_FIELD = NONE  # what a preprocess config without a `bias_field` field means
N4_MASK_THRESHOLD = 60  # intensity on SPINEPS' 0-1500 scale (n4_bias's `threshold`)
N4_SPLINE_DISTANCE_MM = 100.0  # n4_bias's `spline_param`
N4_SHRINK_FACTOR = 4
N4_ITERATIONS = (50, 50, 50, 50)  # per fitting level
N4_CONVERGENCE = 1e-7
SPLINE_ORDER = n4_filter.SPLINE_ORDER
# ANTsPy's nibabel conversion removes shear above this (a cosine between axes) before building its image.
ANTS_DESHEAR_THRESHOLD = 1e-6
_ANTS_THREADER = 'POOL'
_SLAB_VOXELS = 1 << 22  # the numpy backend evaluates the full-resolution field in slabs of about this size
NUMPY, SITK = 'numpy', 'sitk'
N4_BACKENDS = (NUMPY, SITK)
DEFAULT_N4_BACKEND = NUMPY


class MissingExtraError(ImportError):
  """SimpleITK is not installed (the 'sitk' backend needs it)."""


def bias_field_of(prep_cfg) -> str:
  """The correction a preprocess config asks for: its `bias_field` field, DEFAULT_BIAS_FIELD when absent."""
  value = prep_cfg.get('bias_field', DEFAULT_BIAS_FIELD)
  if value not in BIAS_FIELDS:
    raise ValueError(f'config.data.preprocess.bias_field: unknown value {value!r} (one of {", ".join(BIAS_FIELDS)})')
  return value


def n4_backend_of(prep_cfg) -> str:
  """The N4 implementation a preprocess config asks for: its `n4_backend` field, DEFAULT_N4_BACKEND when absent."""
  value = prep_cfg.get('n4_backend', DEFAULT_N4_BACKEND)
  if value not in N4_BACKENDS:
    raise ValueError(f'config.data.preprocess.n4_backend: unknown value {value!r} (one of {", ".join(N4_BACKENDS)})')
  return value


def _sitk():
  try:
    import SimpleITK
  except ImportError:
    raise MissingExtraError("N4 backend 'sitk' needs SimpleITK: pip install 'spine_jax[n4]' "
                            "(the default backend 'numpy' needs nothing)") from None
  return SimpleITK


def _check_backend(backend: str) -> str:
  if backend not in N4_BACKENDS:
    raise ValueError(f'N4: unknown backend {backend!r} (one of {", ".join(N4_BACKENDS)})')
  return backend


def box_mask(image: np.ndarray, threshold: float = N4_MASK_THRESHOLD) -> np.ndarray:
  """n4_bias's mask: 1 in the bounding box of the voxels >= threshold, 0 elsewhere (uint8)."""
  above = np.asarray(image) >= threshold
  if not above.any():
    raise ValueError(f'N4: no voxel reaches {threshold}, so there is no mask (SPINEPS fails here too)')
  mask = np.zeros(above.shape, np.uint8)
  mask[n4_filter.nonzero_box(above)] = 1
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


class _SitkGrid:
  """itk_geometry.ItkGrid's transforms done by ITK itself, on a SimpleITK image of the same geometry."""

  def __init__(self, spacing, origin, direction):
    sitk = _sitk()
    self.image = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    self.image.SetSpacing([float(s) for s in spacing])
    self.image.SetOrigin([float(o) for o in origin])
    self.image.SetDirection(np.asarray(direction, np.float64).ravel().tolist())

  def continuous_index_to_point(self, index):
    return self.image.TransformContinuousIndexToPhysicalPoint([float(i) for i in index])

  def index_to_point(self, index):
    return self.image.TransformIndexToPhysicalPoint([int(i) for i in index])

  def point_to_index(self, point):
    return self.image.TransformPhysicalPointToIndex([float(p) for p in point])


def shrink_grid(padded_shape, lower, geometry, factor: int = N4_SHRINK_FACTOR,
                backend: str = DEFAULT_N4_BACKEND) -> tuple[list, list, list]:
  """(first kept voxel, kept count) per padded axis, and the shrunk grid's origin as N4 takes it: ITK's
  ShrinkImageFilter on ANTs' padded image (start index -lower), its physical-point round trip on the same
  origin, spacing and direction, done by ITK itself ('sitk') or by data/itk_geometry.py's replay of ITK's
  double arithmetic ('numpy'); N4 fits on origin + spacing * start index."""
  origin, spacing, direction = geometry
  grid = functools.partial(_SitkGrid if _check_backend(backend) == SITK else itk_geometry.ItkGrid,
                           direction=direction)
  out_spacing = [s * float(factor) for s in spacing]
  start = [-p for p in lower]
  count = [max(1, n // factor) for n in padded_shape]
  out_start = [-((-s) // factor) for s in start]  # ceil(start / factor)
  centre_in = grid(spacing, origin).continuous_index_to_point(
      [s + (n - 1) / 2.0 for s, n in zip(start, padded_shape)])
  centre_out = grid(out_spacing, origin).continuous_index_to_point(
      [s + (n - 1) / 2.0 for s, n in zip(out_start, count)])
  out_origin = [o + (a - b) for o, a, b in zip(origin, centre_in, centre_out)]
  first_point = grid(out_spacing, out_origin).index_to_point(out_start)
  first = grid(spacing, origin).point_to_index(first_point)
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


class N4Setup(NamedTuple):
  """What N4 runs on (steps 2-3): the padded image and mask, the shrink's kept voxels of them (slices), the
  shrunk grid's spacing and origin as N4 fits on them, the lattice's control points, the lower padding."""
  padded: np.ndarray
  padded_mask: np.ndarray
  kept: tuple
  spacing: list
  origin: list
  points: list
  lower: list


def n4_setup(image: np.ndarray, affine: np.ndarray, mask: np.ndarray, *, distance_mm: float = N4_SPLINE_DISTANCE_MM,
             factor: int = N4_SHRINK_FACTOR, backend: str = DEFAULT_N4_BACKEND) -> N4Setup:
  """Steps 2-3 of the module docstring on `image` (float32) and `mask` (uint8) with ANTs' geometry of `affine`."""
  image = np.asarray(image, np.float32)
  mask = np.asarray(mask, np.uint8)
  if image.ndim != 3 or image.shape != mask.shape:
    raise ValueError(f'N4: image {image.shape} and mask {mask.shape} must be 3-d arrays of one shape')
  geometry = ants_geometry(affine)
  lower, upper, points = spline_padding(image.shape, geometry[1], distance_mm)
  pads = list(zip(lower, upper))
  first, count, origin = shrink_grid([n + lo + up for n, (lo, up) in zip(image.shape, pads)], lower, geometry,
                                     factor, backend)
  kept = tuple(slice(f, f + factor * (k - 1) + 1, factor) for f, k in zip(first, count))
  return N4Setup(np.pad(image, pads), np.pad(mask, pads), kept, [s * float(factor) for s in geometry[1]], origin,
                 points, lower)


def _sitk_corrected(setup: N4Setup, iterations, convergence) -> np.ndarray:
  """SimpleITK's N4 on the shrunk image, its log field on the padded grid, the padded image divided by its exp."""
  sitk = _sitk()
  n4 = sitk.N4BiasFieldCorrectionImageFilter()
  n4.SetMaximumNumberOfIterations([int(i) for i in iterations])
  n4.SetConvergenceThreshold(float(convergence))
  n4.SetNumberOfControlPoints(setup.points)
  n4.SetSplineOrder(SPLINE_ORDER)
  small = setup.spacing, setup.origin
  with _threader(sitk, _ANTS_THREADER):
    n4.Execute(_sitk_image(sitk, setup.padded[setup.kept], *small),
               _sitk_image(sitk, setup.padded_mask[setup.kept], *small))
    log_field = n4.GetLogBiasFieldAsImage(sitk.Image(list(setup.padded.shape), sitk.sitkFloat32))
    corrected = sitk.Divide(_sitk_image(sitk, setup.padded, [1.0] * 3), sitk.Exp(log_field))
  return np.transpose(sitk.GetArrayFromImage(corrected))


def _numpy_corrected(setup: N4Setup, iterations, convergence) -> np.ndarray:
  """The same with data/n4_filter.py; the field is evaluated only in the mask's box (outside it the input
  stays), slab by slab along axis 0 to bound memory, with ITK's exp (in double) and float32 division."""
  lattice = n4_filter.n4_lattice(setup.padded[setup.kept], setup.padded_mask[setup.kept], setup.spacing,
                                 setup.origin, setup.points, iterations, convergence)
  box = n4_filter.nonzero_box(setup.padded_mask)
  out = setup.padded.copy()
  step = max(1, _SLAB_VOXELS // max(1, out[box][0].size))
  for start in range(box[0].start, box[0].stop, step):
    slab = (slice(start, min(start + step, box[0].stop)),) + box[1:]
    gain = np.exp(n4_filter.log_field(lattice, out.shape, slab).astype(np.float64)).astype(np.float32)
    out[slab] /= gain
  return out


def n4_correct(image: np.ndarray, affine: np.ndarray, mask: np.ndarray, *,
               distance_mm: float = N4_SPLINE_DISTANCE_MM, factor: int = N4_SHRINK_FACTOR,
               iterations=N4_ITERATIONS, convergence: float = N4_CONVERGENCE,
               backend: str = DEFAULT_N4_BACKEND) -> np.ndarray:
  """ANTs' N4BiasFieldCorrection (steps 2-5 of the module docstring) of `image` inside `mask` (float32), by
  data/n4_filter.py ('numpy') or SimpleITK's filter ('sitk', the `n4` extra)."""
  setup = n4_setup(image, affine, mask, distance_mm=distance_mm, factor=factor, backend=backend)
  run = _sitk_corrected if backend == SITK else _numpy_corrected
  out = np.where(setup.padded_mask == 0, setup.padded, run(setup, iterations, convergence))
  return out[tuple(slice(p, p + n) for p, n in zip(setup.lower, np.shape(image)))]


def spineps_n4(image: np.ndarray, affine: np.ndarray, *, backend: str = DEFAULT_N4_BACKEND) -> np.ndarray:
  """SPINEPS' `n4_bias` on an image on SPINEPS' 0-1500 scale: N4 inside the threshold box, back in the
  image's dtype (TPTBox's `set_dtype_`: a plain cast, so integers are truncated)."""
  image = np.asarray(image)
  return n4_correct(image, affine, box_mask(image), backend=backend).astype(image.dtype)
