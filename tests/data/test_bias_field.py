"""SimpleITK's N4 (data/bias_field.py) against SPINEPS' own `n4_bias` (ANTsPy) through the SPINEPS oracle
(tests/spineps_worker.py: `n4_bias`), and the steps that need neither.

Measured on this machine (2 cores; ANTsPy 0.6.3 and SimpleITK 2.5.7, both ITK 5.4), relative L2 of the
difference and largest |difference| / range of SPINEPS' output, where N4 itself changes the image by ~30%:
  TPTBox test MRI, 5 orientations (float32 and its uint16): 0 and 0 (bit for bit);
  smoke phantom with a synthetic bias field, PIR: 3.2e-5 and 5.9e-5; reoriented to LPS: 9.7e-6 and 6.2e-5.
ANTsPy differs from itself by 2.2e-5 to 5.6e-5 (relative L2) on that phantom across 1, 2 and 3 ITK threads
(the B-spline fits' float32 sums are split per work unit and 200 iterations that do not converge amplify
round-off); the tolerances sit a few times above the larger figure.
"""
import importlib.util
import sys

import numpy as np
import pytest

from spine_jax.data import bias_field
from spine_jax.data import nifti
from spine_jax.data import spineps_preprocess
from spine_jax.data.phantoms import mri as mri_phantoms
from tests import spineps_oracle

TEST_MRI_REL_L2 = 1e-5  # measured 0
TEST_MRI_MAX_REL = 1e-5  # measured 0
PHANTOM_REL_L2 = 2e-4  # measured 3.2e-5; ANTsPy against itself up to 5.6e-5
PHANTOM_MAX_REL = 5e-4  # measured 6.2e-5


def _has_sitk() -> bool:
  return importlib.util.find_spec("SimpleITK") is not None


needs_sitk = pytest.mark.skipif(not _has_sitk(), reason="SimpleITK is not installed (pip install 'spine_jax[n4]')")


@pytest.fixture(scope='module')
def oracle():
  reason = spineps_oracle.available()
  if reason:
    pytest.skip(reason)


def test_the_config_field_defaults_to_none_and_is_checked():
  assert bias_field.bias_field_of({}) == 'none'
  assert bias_field.bias_field_of({'bias_field': 'n4'}) == 'n4'
  with pytest.raises(ValueError, match='bias_field'):
    bias_field.bias_field_of({'bias_field': 'n3'})


def test_a_missing_simpleitk_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, 'SimpleITK', None)
  with pytest.raises(bias_field.MissingExtraError, match=r"spine_jax\[n4\]"):
    bias_field.n4_correct(np.ones((4, 4, 4), np.float32), np.eye(4), np.ones((4, 4, 4), np.uint8))


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


@needs_sitk
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


def _agreement(image, affine):
  ref = spineps_oracle.call('worker.n4_bias', {'image': image, 'affine': affine})
  np.testing.assert_array_equal(ref['mask'], bias_field.box_mask(image))
  ours = bias_field.spineps_n4(image, affine)
  assert ours.dtype == ref['corrected'].dtype == image.dtype
  r, o = ref['corrected'].astype(np.float64), ours.astype(np.float64)
  return float(np.linalg.norm(o - r) / np.linalg.norm(r)), float(np.abs(o - r).max() / np.ptp(r))


@needs_sitk
@pytest.mark.parametrize('orientation, dtype', [(None, np.float32), (None, np.uint16), (('L', 'P', 'S'), np.float32)])
def test_matches_spineps_n4_on_the_tptbox_mri(oracle, orientation, dtype):
  mri = spineps_oracle.call('worker.test_mri', {}, orientation=orientation)
  rel, worst = _agreement(mri['image'].astype(dtype), mri['affine'])
  print(f'test MRI {orientation} {np.dtype(dtype)}: relative L2 {rel:.3g}, max |diff| / range {worst:.3g}')
  assert rel <= TEST_MRI_REL_L2 and worst <= TEST_MRI_MAX_REL


@needs_sitk
@pytest.mark.parametrize('axcodes', [('P', 'I', 'R'), ('L', 'P', 'S')])
def test_matches_spineps_n4_on_a_biased_phantom(oracle, axcodes):
  v = mri_phantoms.make_volume(mri_phantoms.smoke_config(), 'train', 0)
  field = np.exp(0.5 * np.linspace(-1, 1, v['image'].shape[1]))[None, :, None].astype(np.float32)
  image, affine, _ = nifti.reorient(spineps_preprocess.normalize_to_range(v['image'] * field), v['affine'], axcodes)
  rel, worst = _agreement(image, affine)
  print(f'phantom {axcodes}: relative L2 {rel:.3g}, max |diff| / range {worst:.3g}')
  assert rel <= PHANTOM_REL_L2 and worst <= PHANTOM_MAX_REL
