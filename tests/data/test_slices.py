"""The one slice extraction: geometry, orientation, bone isolation, normalisation, the real CT."""
import numpy as np
import pytest

from spine_jax.data import nifti
from spine_jax.data import slices

SPACING = (1.0, 1.0, 2.0)
BOX = (slice(30, 50), slice(22, 38), slice(3, 9))  # i (x), j (y), k (z): 20 x 16 mm, 6 slices


def _box_volume():
  """RAS volume with a box vertebra (label 5, 300 HU), a dense marker in its anterior-right corner,
  and another label (7, 900 HU) 3 mm to its left."""
  volume = np.full((80, 60, 12), 40.0, np.float32)
  mask = np.zeros(volume.shape, np.int16)
  volume[BOX] = 300.0
  mask[BOX] = 5
  volume[45:50, 33:38, 3:9] = 1200.0  # high x = patient's right, high y = anterior
  volume[24:27, 22:38, 3:9] = 900.0
  mask[24:27, 22:38, 3:9] = 7
  return volume, mask


def _cfg(**overrides):
  cfg = slices.default_slice_config()
  cfg.image_size = 32
  cfg.field_of_view_mm = 64.0  # 2 mm pixels
  cfg.update(overrides)
  return cfg


def _pixel_positions(cfg, center_i, center_j):
  """Physical offsets (mm, RAS) of output pixel centres under the documented convention."""
  d = cfg.field_of_view_mm / cfg.image_size
  offsets = (np.arange(cfg.image_size) + 0.5) * d - cfg.field_of_view_mm / 2
  x = center_i - offsets[None, :]  # columns run right -> left
  y = center_j - offsets[:, None]  # rows run anterior -> posterior
  return np.broadcast_to(x, (cfg.image_size,) * 2), np.broadcast_to(y, (cfg.image_size,) * 2)


def test_default_config():
  cfg = slices.default_slice_config()
  assert (cfg.image_size, cfg.field_of_view_mm, tuple(cfg.hu_window)) == (64, 112.0, (-200.0, 1500.0))
  assert (cfg.hu_mean, cfg.hu_std, cfg.mask_margin_mm, cfg.background_hu, cfg.min_slice_voxels) == (
      69.9, 182.3, 4.0, -200.0, 20)
  assert slices.background_value(cfg) == pytest.approx((-200 - 69.9) / 182.3)


def test_box_vertebra_geometry_and_isolation():
  volume, mask = _box_volume()
  cfg = _cfg()
  images, z = slices.extract_vertebra_slices(volume, mask, 5, SPACING, cfg)
  assert images.shape == (6, 32, 32) and images.dtype == np.float32
  assert np.array_equal(z, np.arange(3, 9))
  x, y = _pixel_positions(cfg, (30 + 49) / 2, (22 + 37) / 2)
  # Exact in-plane distance (mm) of each pixel centre to the box of voxel centres.
  dx = np.maximum(np.maximum(30 - x, x - 49), 0)
  dy = np.maximum(np.maximum(22 - y, y - 37), 0)
  dist = np.hypot(dx, dy)
  background = slices.background_value(cfg)
  far, near = dist > cfg.mask_margin_mm + 1.0, dist < cfg.mask_margin_mm - 1.0
  assert np.all(images[:, far] == background)
  # Label 7 (900 HU) lies 3 mm from the box, inside the margin, but none of its bone shows:
  # the pixel between it and the soft tissue blends background with 40 HU.
  beside = (x > 26) & (x < 27) & (y > 23) & (y < 36)
  assert beside.sum() == 6 and np.allclose(images[:, beside] * 182.3 + 69.9, (-200 + 40) / 2, atol=1e-3)
  soft = near & (dist > 0) & ~((x < 27.5) & (y > 21) & (y < 38))
  assert soft.sum() >= 40 and np.allclose(images[:, soft], (40 - 69.9) / 182.3)
  inside = (dist == 0) & (x > 31) & (x < 43) & (y > 23) & (y < 32)  # away from the marker and the edges
  assert inside.sum() > 10 and np.allclose(images[:, inside], (300 - 69.9) / 182.3)


def test_orientation_marker_is_top_left():
  """The anterior-right marker appears in the top rows (anterior) and left columns (patient's right)."""
  volume, mask = _box_volume()
  images, _ = slices.extract_vertebra_slices(volume, mask, 5, SPACING, _cfg())
  bright = np.argwhere(images[2] > (1000 - 69.9) / 182.3)
  assert bright.size and bright[:, 0].max() < 16 and bright[:, 1].max() < 16


def test_clipping_and_normalisation():
  volume, mask = _box_volume()
  volume[BOX] = 3000.0
  images, _ = slices.extract_vertebra_slices(volume, mask, 5, SPACING, _cfg())
  assert images.max() == pytest.approx((1500 - 69.9) / 182.3)


def test_same_image_from_ras_or_lps_input():
  volume, mask = _box_volume()
  affine = np.diag([*SPACING, 1.0])
  ras_images, ras_z = slices.extract_vertebra_slices(volume, mask, 5, SPACING, _cfg())
  lps_volume, lps_affine, _ = nifti.reorient(volume, affine, ('L', 'P', 'S'))
  lps_mask, _, _ = nifti.reorient(mask, affine, ('L', 'P', 'S'))
  assert not np.array_equal(lps_volume, volume)
  canon_volume, canon_affine, _ = nifti.to_canonical(lps_volume, lps_affine)
  canon_mask, _, _ = nifti.to_canonical(lps_mask, lps_affine)
  images, z = slices.extract_vertebra_slices(canon_volume, canon_mask, 5,
                                             nifti.spacing_from_affine(canon_affine), _cfg())
  assert np.array_equal(images, ras_images) and np.array_equal(z, ras_z)


def test_min_slice_voxels_skips_grazing_slices():
  volume, mask = _box_volume()
  mask[40:43, 30:33, 9] = 5  # 9 voxels in slice 9
  assert slices.extract_vertebra_slices(volume, mask, 5, SPACING, _cfg())[1].tolist() == list(range(3, 9))
  assert slices.extract_vertebra_slices(volume, mask, 5, SPACING, _cfg(min_slice_voxels=1))[1].tolist() == list(
      range(3, 10))


def test_anisotropic_spacing_keeps_millimetres():
  """Half the voxel size with twice the voxels gives the same picture."""
  volume, mask = _box_volume()
  fine_volume = np.repeat(volume, 2, axis=1)
  fine_mask = np.repeat(mask, 2, axis=1)
  coarse, _ = slices.extract_vertebra_slices(volume, mask, 5, SPACING, _cfg(mask_margin_mm=0.0))
  fine, _ = slices.extract_vertebra_slices(fine_volume, fine_mask, 5, (1.0, 0.5, 2.0), _cfg(mask_margin_mm=0.0))
  assert np.mean(np.abs(coarse - fine) > 0.1) < 0.03


def test_errors_name_the_label():
  volume, mask = _box_volume()
  with pytest.raises(slices.SliceError, match=r'label 9 is absent from the mask \(labels present: 5, 7\)'):
    slices.extract_vertebra_slices(volume, mask, 9, SPACING, _cfg())
  with pytest.raises(slices.SliceError, match='label 5: its largest axial cross-section has 320 voxels'):
    slices.extract_vertebra_slices(volume, mask, 5, SPACING, _cfg(min_slice_voxels=1000))
  with pytest.raises(ValueError, match='label 5: spacing_mm'):
    slices.extract_vertebra_slices(volume, mask, 5, (1.0, 0.0, 1.0), _cfg())
  with pytest.raises(ValueError, match='same shape'):
    slices.extract_vertebra_slices(volume, mask[:, :, :5], 5, SPACING, _cfg())


def test_real_ct_l3(example_ct_dir):
  pair = nifti.load_image_and_mask(example_ct_dir / 'example_ct.nii.gz', example_ct_dir / 'totalseg.nii.gz')
  cfg = slices.default_slice_config()
  images, z = slices.extract_vertebra_slices(pair.image, pair.mask, 29, pair.spacing, cfg)  # L3
  # L3 spans 15 planes at 3 mm; 12 hold at least 20 voxels (body ~9 plus the posterior elements below it).
  assert images.shape == (12, 64, 64) and np.array_equal(z, np.arange(67, 79))
  background = slices.background_value(cfg)
  hu = images * cfg.hu_std + cfg.hu_mean
  shown = images != background
  assert 0.05 < shown.mean() < 0.4
  assert 100 < np.median(hu[shown]) < 400  # trabecular bone and soft tissue at the margin
  assert hu.max() > 700  # cortex
  mid = images[6]
  top, bottom = mid[:32][mid[:32] != background].size, mid[32:][mid[32:] != background].size
  assert top > 0 and bottom > 0
  # Anterior at the top: the body (large, round) lies above the centre row, the spinous process below.
  rows = np.nonzero(mid != background)[0]
  assert rows.min() < 20 and rows.max() > 40
