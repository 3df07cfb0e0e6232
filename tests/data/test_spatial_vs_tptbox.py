"""spine_jax's 'spineps' grid against TPTBox 1.1.0 itself, as SPINEPS 2.1.3 calls it (tests/spineps_worker.py:
`rescale_to` reorients and rescales like SegmentationModel.segment_scan, `resample_back` puts a mask on the
input grid like seg_run.py). Skips when the SPINEPS reference environment is absent (scripts/spineps_env.sh).
"""
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from spine_jax.data import nifti
from spine_jax.data import spatial
from tests import spineps_oracle

# Order-3 images: largest difference from TPTBox relative to the image's range (measured: 0, bit for bit).
IMAGE_RTOL = 1e-4
AFFINE_ATOL_MM = 1e-6


@pytest.fixture(scope="module", autouse=True)
def oracle():
  reason = spineps_oracle.available()
  if reason:
    pytest.skip(reason)


def _affine(axcodes, spacing, origin, rotation_deg=(0.0, 0.0, 0.0)):
  """Array axis i runs along world direction axcodes[i] (RAS+ world) with spacing[i] mm, then rotated."""
  ornt = nib.orientations.axcodes2ornt(tuple(axcodes))
  columns = np.zeros((3, 3))
  for i, (world_axis, sign) in enumerate(ornt):
    columns[int(world_axis), i] = sign * spacing[i]
  affine = np.eye(4)
  affine[:3, :3] = Rotation.from_euler('xyz', rotation_deg, degrees=True).as_matrix() @ columns
  affine[:3, 3] = origin
  return affine


# (axcodes, shape, spacing mm, rotation): 3.3 mm slices in three orientations, an oblique scan, one within
# 0.001 mm of the model's spacing (TPTBox keeps its grid), and one at half the model's spacing.
CASES = {
    'LPS': (('L', 'P', 'S'), (40, 64, 15), (0.9, 0.9, 3.3), (0.0, 0.0, 0.0)),
    'RAS': (('R', 'A', 'S'), (15, 48, 40), (3.3, 0.9, 0.9), (0.0, 0.0, 0.0)),
    'PIR': (('P', 'I', 'R'), (64, 40, 15), (0.9, 0.9, 3.3), (0.0, 0.0, 0.0)),
    'oblique SLP': (('S', 'L', 'P'), (30, 20, 36), (1.1, 3.0, 0.6), (8.0, -12.0, 5.0)),
    'kept PIR': (('P', 'I', 'R'), (24, 30, 10), (0.7505, 0.75, 1.65), (0.0, 0.0, 0.0)),
    # every other input voxel lies exactly halfway between two model voxels: ties decided by the affines' last bits
    'halved PIR': (('P', 'I', 'R'), (64, 40, 12), (0.375, 0.75, 1.65), (0.0, 0.0, 0.0)),
}


def _scan(case: str):
  axcodes, shape, spacing, rotation = CASES[case]
  # As a NIfTI file stores it (float32): origins then sit off TPTBox's 7-decimal grid (spatial.tptbox_grid_affine).
  affine = _affine(axcodes, spacing, origin=(-31.7, 18.2, 102.4), rotation_deg=rotation).astype(np.float32)
  affine = affine.astype(np.float64)
  rng = np.random.default_rng(sorted(CASES).index(case))
  image = (ndimage.gaussian_filter(rng.normal(size=shape), 1.5) * 3000 + 700).astype(np.float32)
  mask = rng.choice(np.array([0, 41, 49, 60, 61, 100], np.uint8), size=shape)
  return image, mask, affine


@pytest.mark.parametrize('case', sorted(CASES))
def test_model_space_matches_tptbox_rescale(case):
  image, mask, affine = _scan(case)
  spacing = list(spatial.REFERENCE_SPACING)
  ref = spineps_oracle.call('worker.rescale_to', {'arr': image, 'affine': affine}, voxel_spacing=spacing)
  model, space = spatial.to_model_space(image, affine, grid='spineps')
  # Reorientation: nibabel's axis permutation and flips are TPTBox's reorient.
  reoriented, reoriented_affine, _ = nifti.reorient(image, affine, spatial.PIR)
  np.testing.assert_array_equal(reoriented, ref['reoriented'])
  np.testing.assert_allclose(reoriented_affine, ref['reoriented_affine'], rtol=0, atol=AFFINE_ATOL_MM)
  assert model.shape == ref['array'].shape
  np.testing.assert_allclose(space.model_affine, ref['affine'], rtol=0, atol=AFFINE_ATOL_MM)
  value_range = float(ref['array'].max() - ref['array'].min())
  worst = float(np.abs(model - ref['array']).max()) / value_range
  print(f'{case}: {image.shape} -> {model.shape}, image max |diff| / range {worst:.3g}, affine max |diff| '
        f'{float(np.abs(space.model_affine - ref["affine"]).max()):.3g} mm')
  assert worst <= IMAGE_RTOL
  # A mask on the input grid, into the same model space (order 0).
  ref_mask = spineps_oracle.call('worker.rescale_to', {'arr': mask, 'affine': affine}, voxel_spacing=spacing, seg=True)
  np.testing.assert_array_equal(spatial.apply_model_space(mask, space, is_mask=True), ref_mask['array'])


@pytest.mark.parametrize('case', sorted(CASES))
def test_mask_back_to_the_input_grid_matches_tptbox_resample_from_to(case):
  image, _, affine = _scan(case)
  _, space = spatial.to_model_space(image, affine, grid='spineps')
  rng = np.random.default_rng(100 + sorted(CASES).index(case))
  model_mask = rng.choice(np.array([0, 41, 49, 60, 61, 100], np.uint8), size=space.target_shape)
  ref = spineps_oracle.call('worker.resample_back', {'mask': model_mask, 'mask_affine': space.model_affine,
                                                      'target': image, 'target_affine': affine})
  back = spatial.from_model_space(model_mask, space)
  assert back.shape == image.shape == ref['array'].shape
  np.testing.assert_allclose(ref['affine'], affine, rtol=0, atol=AFFINE_ATOL_MM)
  np.testing.assert_array_equal(back, ref['array'])
