"""SPINEPS' N4 (data/bias_field.py) in both backends: the numpy one (data/n4_filter.py, data/itk_geometry.py)
against SimpleITK's filter, both against SPINEPS' own `n4_bias` (ANTsPy) through the SPINEPS oracle
(tests/spineps_worker.py: `n4_bias`), and the steps that need neither.

Measured on this machine (2 cores; ANTsPy 0.6.3 and SimpleITK 2.5.7, both ITK 5.4), relative L2 of the
difference of the corrected images, where N4 itself changes the image by ~30%:
  'sitk' against ANTsPy: TPTBox test MRI, 5 orientations (float32 and its uint16): 0 (bit for bit); smoke
    phantom with a synthetic bias field, PIR: 3.2e-5, LPS: 9.7e-6;
  'numpy' against ANTsPy: test MRI (float32) 4.0e-7 to 6.7e-7, its uint16 1.4e-4 (8 voxels differ by 1:
    truncation, where the float outputs straddle an integer); the phantom, PIR: 2.9e-5, LPS: 2.2e-5;
  'numpy' against 'sitk': test MRI in 3 orientations 3.6e-7 to 6.7e-7, after the cast to its uint16 6.5e-5 to
    1.4e-4 (2 to 8 voxels differ, by 1); the phantom as uint16, PIR and LPS: 5.6e-5 and 3.9e-5, after the
    cast 3.2e-4 (about 5000 of 491520 voxels differ, by 1).
ANTsPy differs from itself by 2.2e-5 to 5.6e-5 on that phantom across 1, 2 and 3 ITK threads, SimpleITK by
9e-6 to 1.5e-4 on a larger one (the B-spline fits' float32 sums are split per work unit and 200 iterations that
do not converge amplify round-off); the numpy backend sums those in float64 and sits in that spread. The
tolerances sit a few times above the largest figure.
"""
import functools
import importlib.util
import sys

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from spine_jax.data import bias_field
from spine_jax.data import itk_geometry
from spine_jax.data import n4_filter
from spine_jax.data import nifti
from spine_jax.data import spineps_preprocess
from spine_jax.data.phantoms import mri as mri_phantoms
from tests import spineps_oracle

# 'sitk' against ANTsPy.
TEST_MRI_REL_L2 = 1e-5  # measured 0
TEST_MRI_MAX_REL = 1e-5  # measured 0
PHANTOM_REL_L2 = 2e-4  # measured 3.2e-5; ANTsPy against itself up to 5.6e-5
PHANTOM_MAX_REL = 5e-4  # measured 6.2e-5
# 'numpy' against 'sitk' (and against ANTsPy).
NUMPY_FLOAT_REL_L2 = 3e-4  # phantom: measured up to 5.6e-5; SimpleITK against itself up to 1.5e-4
NUMPY_CAST_REL_L2 = 1.5e-3  # after the cast to the integer dtype: measured up to 3.2e-4
NUMPY_CAST_MAX = 1  # after the cast: truncation moves a voxel by 1 where the float outputs straddle an integer
NUMPY_TEST_MRI_FLOAT_REL_L2 = 1e-5  # measured up to 6.7e-7
NUMPY_TEST_MRI_MAX_REL = 1e-5  # max |difference| / range against ANTsPy, float32: measured up to 2.1e-6
# One fitting iteration (little round-off to amplify): the log fields agree to float32 precision.
ONE_ITERATION_FIELD_ATOL = 2e-7  # measured 6.5e-9 after 1 iteration, 2.8e-8 after 3 + 2 (field ~0.3)


def _has_sitk() -> bool:
  return importlib.util.find_spec("SimpleITK") is not None


needs_sitk = pytest.mark.skipif(not _has_sitk(), reason="SimpleITK is not installed (pip install 'spine_jax[n4]')")


@pytest.fixture(scope='module')
def oracle():
  reason = spineps_oracle.available()
  if reason:
    pytest.skip(reason)


@functools.lru_cache(maxsize=None)
def _test_mri(orientation=None) -> tuple[np.ndarray, np.ndarray]:
  mri = spineps_oracle.call('worker.test_mri', {}, orientation=orientation)
  return mri['image'], mri['affine']


def _phantom(axcodes, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """A smoke phantom (96 x 160 x 32) with a synthetic bias field along I, on SPINEPS' 0-1500 scale."""
  v = mri_phantoms.make_volume(mri_phantoms.smoke_config(), 'train', seed)
  field = np.exp(0.5 * np.linspace(-1, 1, v['image'].shape[1]))[None, :, None].astype(np.float32)
  image, affine, _ = nifti.reorient(spineps_preprocess.normalize_to_range(v['image'] * field), v['affine'], axcodes)
  return image, affine


def _relative_l2(ours: np.ndarray, ref: np.ndarray) -> float:
  ours, ref = ours.astype(np.float64), ref.astype(np.float64)
  return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def test_the_config_field_defaults_to_none_and_is_checked():
  assert bias_field.bias_field_of({}) == 'none'
  assert bias_field.bias_field_of({'bias_field': 'n4'}) == 'n4'
  with pytest.raises(ValueError, match='bias_field'):
    bias_field.bias_field_of({'bias_field': 'n3'})


def _small_scan() -> tuple[np.ndarray, np.ndarray]:
  """32 x 32 x 16 voxels of 4 mm with a smooth bias: a shrunk grid of 12 x 12 x 6."""
  rng = np.random.default_rng(3)
  grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in (32, 32, 16)], indexing='ij')
  image = (600 + 200 * rng.random((32, 32, 16))) * np.exp(0.3 * grid[0] - 0.2 * grid[2])
  return image.astype(np.float32), np.diag([4.0, 4.0, 4.0, 1.0])


def test_without_simpleitk_numpy_runs_and_sitk_names_the_extra(monkeypatch):
  image, affine = _small_scan()
  monkeypatch.setitem(sys.modules, 'SimpleITK', None)
  out = bias_field.spineps_n4(image, affine)
  assert out.shape == image.shape and out.dtype == image.dtype and np.isfinite(out).all()
  assert not np.array_equal(out, image)
  with pytest.raises(bias_field.MissingExtraError, match=r"spine_jax\[n4\]"):
    bias_field.spineps_n4(image, affine, backend='sitk')


def test_an_unknown_backend_is_named():
  with pytest.raises(ValueError, match="'ants'.*numpy, sitk"):
    bias_field.n4_correct(*_small_scan(), np.ones((32, 32, 16), np.uint8), backend='ants')


def test_the_mask_is_the_box_of_the_voxels_at_the_threshold():
  image = np.zeros((6, 7, 8), np.uint16)
  image[1, 2, 3] = 60
  image[4, 5, 6] = 200
  image[0, 0, 0] = 59
  mask = bias_field.box_mask(image)
  assert mask.dtype == np.uint8 and mask.sum() == 4 * 4 * 4 and mask[1:5, 2:6, 3:7].all()
  with pytest.raises(ValueError, match='60'):
    bias_field.box_mask(np.full((3, 3, 3), 59.0))


@pytest.mark.parametrize('shape, spacing, padded, points', [
    # ANTs' own report (N4BiasFieldCorrection verbose: "padded image size", "number of control points").
    ((68, 52, 67), (1.5, 1.5, 1.5), (134, 68, 68), (5, 4, 4)),
    ((83, 63, 55), (3.0337101978436176, 2.480163993203081, 3.0354427351088753), (100, 82, 67), (6, 5, 5)),
])
def test_spline_distance_padding_is_ants(shape, spacing, padded, points):
  lower, upper, got_points = bias_field.spline_padding(shape, spacing)
  assert tuple(n + lo + up for n, lo, up in zip(shape, lower, upper)) == padded
  assert tuple(got_points) == points
  assert all(up - lo in (0, 1) for lo, up in zip(lower, upper))


def _random_affines(n: int, seed: int):
  """Oblique, axis-aligned (permuted, flipped) and nearly axis-aligned affines with random spacing and origin."""
  rng = np.random.default_rng(seed)
  for k in range(n):
    if k % 3 == 0:
      rotation = Rotation.random(random_state=rng).as_matrix()
    else:
      rotation = np.zeros((3, 3))
      rotation[np.arange(3), rng.permutation(3)] = rng.choice([-1.0, 1.0], 3)
      if k % 3 == 2:
        rotation = rotation @ Rotation.from_rotvec(rng.normal(0, 10.0 ** rng.uniform(-13, -3), 3)).as_matrix()
    affine = np.eye(4)
    affine[:3, :3] = rotation * rng.uniform(0.3, 5.0, 3)
    affine[:3, 3] = rng.uniform(-200, 200, 3)
    yield affine, tuple(int(s) for s in rng.integers(30, 300, 3))


@needs_sitk
def test_the_svd_inverse_is_itks_bit_for_bit():
  import SimpleITK as sitk
  for affine, _ in _random_affines(300, seed=1):
    _, spacing, direction = bias_field.ants_geometry(affine)
    image = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    image.SetSpacing(spacing)
    image.SetDirection(direction.ravel().tolist())
    # With origin 0, the continuous index of a unit vector is a column of ITK's inverse, exactly.
    itk = np.array([image.TransformPhysicalPointToContinuousIndex(list(e)) for e in np.eye(3)]).T
    np.testing.assert_array_equal(itk_geometry.svd_inverse(direction * np.asarray(spacing)[None, :]), itk)


@needs_sitk
def test_the_shrink_keeps_itks_voxels_in_numpy():
  """On even axes the first kept voxel is a tie that ITK's round-off breaks; data/itk_geometry.py breaks it
  the same way (numpy's LU inverse instead of vnl's SVD picks another voxel in 9 of these 300 geometries)."""
  for affine, shape in _random_affines(300, seed=0):
    geometry = bias_field.ants_geometry(affine)
    lower, upper, _ = bias_field.spline_padding(shape, geometry[1])
    padded = [n + lo + up for n, lo, up in zip(shape, lower, upper)]
    ours = bias_field.shrink_grid(padded, lower, geometry, backend='numpy')
    itk = bias_field.shrink_grid(padded, lower, geometry, backend='sitk')
    assert ours[:2] == itk[:2] and ours[2] == list(itk[2])


def test_refinement_keeps_the_field():
  rng = np.random.default_rng(0)
  lattice = rng.normal(size=(5, 6, 4)).astype(np.float32)
  refined = n4_filter.refine(lattice)
  assert refined.shape == (7, 9, 5)
  shape = (33, 41, 17)
  np.testing.assert_allclose(n4_filter.log_field(refined, shape), n4_filter.log_field(lattice, shape), atol=2e-6)


def test_n4_flattens_a_smooth_field_and_keeps_the_outside_of_the_mask():
  v = mri_phantoms.make_volume(mri_phantoms.smoke_config(), 'train', 1)
  field = np.exp(0.5 * np.linspace(-1, 1, v['image'].shape[1]))[None, :, None].astype(np.float32)
  image = spineps_preprocess.normalize_to_range(v['image'] * field)
  mask = bias_field.box_mask(image)
  mask[:4] = 0
  out = bias_field.n4_correct(image, v['affine'], mask)
  assert out.dtype == np.float32 and out.shape == image.shape
  np.testing.assert_array_equal(out[:4], image[:4])
  # The log-intensity trend along the biased axis mostly goes away.
  rows = lambda x: np.log(np.maximum(x[4:], 1e-3)).mean(axis=(0, 2))  # noqa: E731
  slope = lambda x: np.polyfit(np.arange(x.size), x, 1)[0]  # noqa: E731
  assert abs(slope(rows(out))) < 0.5 * abs(slope(rows(image)))


def _sitk_log_field(setup: bias_field.N4Setup, iterations) -> np.ndarray:
  import SimpleITK as sitk
  n4 = sitk.N4BiasFieldCorrectionImageFilter()
  n4.SetMaximumNumberOfIterations(list(iterations))
  n4.SetConvergenceThreshold(bias_field.N4_CONVERGENCE)
  n4.SetNumberOfControlPoints(setup.points)
  n4.SetSplineOrder(bias_field.SPLINE_ORDER)
  small = [np.ascontiguousarray(np.transpose(a[setup.kept])) for a in (setup.padded, setup.padded_mask)]
  images = [sitk.GetImageFromArray(a) for a in small]
  for image in images:
    image.SetSpacing(setup.spacing)
    image.SetOrigin(setup.origin)
  n4.Execute(*images)
  return np.transpose(sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(images[0])))


@needs_sitk
@pytest.mark.parametrize('iterations', [(1,), (3, 2)])
def test_few_iterations_match_simpleitk_to_float32_precision(iterations):
  """Each step (sharpening, fit, refinement, evaluation) is ITK's: before round-off has iterations to grow,
  the log fields on the shrunk grid agree to a few float32 ulps."""
  image, affine = _phantom(('L', 'P', 'S'))
  setup = bias_field.n4_setup(image, affine, bias_field.box_mask(image))
  lattice = n4_filter.n4_lattice(setup.padded[setup.kept], setup.padded_mask[setup.kept], setup.spacing,
                                 setup.origin, setup.points, iterations, bias_field.N4_CONVERGENCE)
  ours = n4_filter.log_field(lattice, setup.padded[setup.kept].shape)
  worst = float(np.abs(ours - _sitk_log_field(setup, iterations)).max())
  print(f'{iterations} iterations: max |log field difference| {worst:.3g}')
  assert worst <= ONE_ITERATION_FIELD_ATOL


def _both_backends(image, affine) -> tuple[float, float, float, int]:
  """(relative L2 of the float outputs, after the cast to the input's dtype, largest |difference| after it,
  voxels that differ after it) of 'numpy' against 'sitk'."""
  mask = bias_field.box_mask(image)
  ours, ref = (bias_field.n4_correct(image, affine, mask, backend=b) for b in (bias_field.NUMPY, bias_field.SITK))
  cast_ours, cast_ref = ours.astype(image.dtype), ref.astype(image.dtype)
  difference = np.abs(cast_ours.astype(np.float64) - cast_ref)
  return (_relative_l2(ours, ref), _relative_l2(cast_ours, cast_ref), float(difference.max()),
          int((difference > 0).sum()))


@needs_sitk
@pytest.mark.parametrize('orientation', [None, ('L', 'P', 'S'), ('S', 'L', 'A')])
def test_numpy_matches_simpleitk_on_the_tptbox_mri(oracle, orientation):
  image, affine = _test_mri(orientation)
  rel, cast_rel, worst, voxels = _both_backends(image, affine)
  print(f'test MRI {orientation}: relative L2 {rel:.3g}, after the cast {cast_rel:.3g}, max {worst:g} '
        f'({voxels} voxels)')
  assert rel <= NUMPY_TEST_MRI_FLOAT_REL_L2 and cast_rel <= NUMPY_CAST_REL_L2 and worst <= NUMPY_CAST_MAX


@needs_sitk
@pytest.mark.parametrize('axcodes', [('P', 'I', 'R'), ('L', 'P', 'S')])
def test_numpy_matches_simpleitk_on_a_phantom(axcodes):
  image, affine = _phantom(axcodes)
  rel, cast_rel, worst, voxels = _both_backends(image.astype(np.uint16), affine)
  print(f'phantom {axcodes}: relative L2 {rel:.3g}, after the cast {cast_rel:.3g}, max {worst:g} '
        f'({voxels} voxels)')
  assert rel <= NUMPY_FLOAT_REL_L2 and cast_rel <= NUMPY_CAST_REL_L2 and worst <= NUMPY_CAST_MAX


def _against_spineps(image, affine) -> dict[str, tuple[float, float, float]]:
  """Per backend (numpy, and sitk when installed): relative L2, max |difference| and that / range of SPINEPS'."""
  ref = spineps_oracle.call('worker.n4_bias', {'image': image, 'affine': affine})
  np.testing.assert_array_equal(ref['mask'], bias_field.box_mask(image))
  out = {}
  for backend in bias_field.N4_BACKENDS if _has_sitk() else (bias_field.NUMPY,):
    ours = bias_field.spineps_n4(image, affine, backend=backend)
    assert ours.dtype == ref['corrected'].dtype == image.dtype
    r, o = ref['corrected'].astype(np.float64), ours.astype(np.float64)
    worst = float(np.abs(o - r).max())
    out[backend] = _relative_l2(o, r), worst, worst / float(np.ptp(r))
  return out


@pytest.mark.parametrize('orientation, dtype', [(None, np.float32), (None, np.uint16), (('L', 'P', 'S'), np.float32)])
def test_matches_spineps_n4_on_the_tptbox_mri(oracle, orientation, dtype):
  image, affine = _test_mri(orientation)
  found = _against_spineps(image.astype(dtype), affine)
  print(f'test MRI {orientation} {np.dtype(dtype)}: ' + ', '.join(
      f'{b}: relative L2 {r:.3g}, max |diff| {w:.3g} ({w_rel:.3g} of the range)' for b, (r, w, w_rel) in found.items()))
  if bias_field.SITK in found:
    assert found[bias_field.SITK][0] <= TEST_MRI_REL_L2 and found[bias_field.SITK][2] <= TEST_MRI_MAX_REL
  rel, worst, worst_rel = found[bias_field.NUMPY]
  if np.issubdtype(dtype, np.integer):
    assert rel <= NUMPY_CAST_REL_L2 and worst <= NUMPY_CAST_MAX
  else:
    assert rel <= NUMPY_TEST_MRI_FLOAT_REL_L2 and worst_rel <= NUMPY_TEST_MRI_MAX_REL


@pytest.mark.parametrize('axcodes', [('P', 'I', 'R'), ('L', 'P', 'S')])
def test_matches_spineps_n4_on_a_biased_phantom(oracle, axcodes):
  image, affine = _phantom(axcodes)
  found = _against_spineps(image, affine)
  print(f'phantom {axcodes}: ' + ', '.join(
      f'{b}: relative L2 {r:.3g}, max |diff| {w:.3g} ({w_rel:.3g} of the range)' for b, (r, w, w_rel) in found.items()))
  for rel, _, worst_rel in found.values():
    assert rel <= PHANTOM_REL_L2 and worst_rel <= PHANTOM_MAX_REL
