"""Model space (PIR, reference spacing) and back; MRI intensity normalisation."""
import nibabel as nib
import numpy as np
import pytest

from spine_jax.data import nifti
from spine_jax.data import spatial


def _affine(columns, spacing, origin=(-40.0, 25.0, 60.0)):
  """Rotation-free affine: array axis i runs along world direction columns[i] (a signed unit axis)."""
  affine = np.eye(4)
  affine[:3, :3] = np.stack([np.asarray(c, np.float64) * s for c, s in zip(columns, spacing)], axis=1)
  affine[:3, 3] = origin
  return affine


RAS_AXES = ((1, 0, 0), (0, 1, 0), (0, 0, 1))
# axis 0 -> superior, axis 1 -> left, axis 2 -> posterior: an 'SLP' array, neither RAS nor PIR.
SLP_AXES = ((0, 0, 1), (-1, 0, 0), (0, -1, 0))


def _blobs(shape, affine, centres_mm_and_labels, radius_mm):
  """Label ellipsoids (balls in mm) placed in world coordinates."""
  idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing='ij'), -1).astype(np.float64)
  world = idx @ affine[:3, :3].T + affine[:3, 3]
  mask = np.zeros(shape, np.int16)
  for centre, label in centres_mm_and_labels:
    mask[np.linalg.norm(world - np.asarray(centre), axis=-1) <= radius_mm] = label
  return mask


def _world_centroid(mask, affine, label):
  return (np.argwhere(mask == label).mean(0) @ affine[:3, :3].T) + affine[:3, 3]


def test_nearest_resampling_is_centre_aligned():
  column = np.arange(4).reshape(4, 1, 1)
  assert spatial.resample(column, (8, 1, 1), order=0).ravel().tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
  assert spatial.resample(np.arange(8).reshape(8, 1, 1), (4, 1, 1), order=0).ravel().tolist() == [1, 3, 5, 7]
  # Linear: output centres at input coordinates -0.25, 0.25, 0.75, 1.25; beyond the edge repeats it.
  got = spatial.resample(np.array([0.0, 1.0]).reshape(2, 1, 1), (4, 1, 1), order=1).ravel()
  assert np.allclose(got, [0.0, 0.25, 0.75, 1.0])
  assert spatial.resampled_shape((100, 33, 7), (1.5, 0.6, 3.3), (0.75, 0.75, 1.65)) == (200, 26, 14)


def test_mask_round_trip_is_exact_when_spacing_is_a_multiple():
  # RAS spacing (3.3, 1.5, 0.75): R, A, S are 2x, 2x, 1x the model's R, P, I spacing.
  affine = _affine(RAS_AXES, (3.3, 1.5, 0.75))
  rng = np.random.default_rng(0)
  mask = rng.choice(np.array([0, 41, 49, 61, 100], np.int16), size=(8, 20, 30))
  model, space = spatial.mask_to_model_space(mask, affine)
  assert model.shape == space.target_shape == (40, 30, 16) and model.dtype == mask.dtype
  assert np.allclose(space.model_spacing, spatial.REFERENCE_SPACING)
  assert nib.aff2axcodes(space.model_affine) == spatial.PIR
  back = spatial.from_model_space(model, space)
  assert back.shape == mask.shape and np.array_equal(back, mask)
  assert np.array_equal(space.input_affine, affine)


def test_mask_round_trip_generic_spacing_and_orientation_keeps_blobs():
  affine = _affine(SLP_AXES, (1.3, 0.55, 1.1))
  shape = (40, 60, 44)
  centre = affine[:3, :3] @ (np.asarray(shape) / 2) + affine[:3, 3]
  labels = [(centre + np.array([0, 0, -10.0]), 49), (centre + np.array([0, 0, 10.0]), 100),
            (centre + np.array([0.0, 15.0, 0.0]), 61)]
  mask = _blobs(shape, affine, labels, radius_mm=8.0)
  model, space = spatial.mask_to_model_space(mask, affine, name='sub-01_T2w.nii.gz')
  assert space.input_shape == shape and np.array_equal(space.input_affine, affine)
  assert nib.aff2axcodes(space.model_affine) == spatial.PIR
  for _, label in labels:  # the model grid's affine puts every structure where it was in the world
    assert np.allclose(_world_centroid(model, space.model_affine, label), _world_centroid(mask, affine, label),
                       atol=0.5)
  back = spatial.from_model_space(model, space)
  assert back.shape == shape
  for _, label in labels:
    a, b = back == label, mask == label
    assert 2 * np.count_nonzero(a & b) / (a.sum() + b.sum()) >= 0.95, label


def test_image_on_the_reference_grid_only_changes_orientation():
  rng = np.random.default_rng(1)
  image = rng.normal(size=(6, 7, 8)).astype(np.float32)
  affine = _affine(SLP_AXES, (0.75, 1.65, 0.75))  # S, L, P axes carry the model's I, R, P spacing
  model, space = spatial.to_model_space(image, affine)
  assert model.shape == (8, 6, 7) and model.dtype == np.float32
  assert np.allclose(model, np.transpose(image, (2, 0, 1))[:, ::-1, ::-1], atol=1e-5)
  back = spatial.from_model_space(model, space, is_mask=False)
  assert np.allclose(back, image, atol=1e-5)


def test_probabilities_come_back_on_the_input_grid():
  affine = _affine(RAS_AXES, (0.9, 0.6, 2.0))
  image = np.zeros((12, 25, 9), np.float32)
  _, space = spatial.to_model_space(image, affine, order=1)
  rng = np.random.default_rng(2)
  logits = rng.normal(size=space.target_shape + (4,))
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  back = spatial.from_model_space(probs, space, is_mask=False)
  assert back.shape == image.shape + (4,) and back.dtype == np.float32
  assert np.allclose(back.sum(-1), 1.0, atol=1e-5) and back.min() >= 0.0
  mask = spatial.apply_model_space(np.ones(image.shape, np.uint8), space, is_mask=True)
  assert mask.shape == space.target_shape and np.all(mask == 1)


def test_validation_names_the_file():
  affine = _affine(RAS_AXES, (1.0, 1.0, 1.0))
  with pytest.raises(spatial.VolumeError, match=r'scan\.nii\.gz: expected a 3D volume'):
    spatial.to_model_space(np.zeros((4, 4, 4, 2)), affine, name='scan.nii.gz')
  bad = np.zeros((4, 4, 4), np.float32)
  bad[1, 2, 3] = np.nan
  with pytest.raises(nifti.NiftiError, match=r'scan\.nii\.gz: 1 NaN or infinite'):
    spatial.to_model_space(bad, affine, name='scan.nii.gz')
  flat = affine.copy()
  flat[:3, 1] = 0.0
  with pytest.raises(nifti.NiftiError, match='spacing'):
    spatial.to_model_space(np.zeros((4, 4, 4)), flat, name='scan.nii.gz')
  with pytest.raises(ValueError, match='spacing'):
    spatial.to_model_space(np.zeros((4, 4, 4)), affine, spacing=(0.75, 0.0, 1.65))
  too_large = r'big\.nii: volume of shape \(10, 10, 10\) has 1,000 voxels, more than the limit of 100'
  with pytest.raises(spatial.VolumeTooLargeError, match=too_large):
    spatial.to_model_space(np.zeros((10, 10, 10)), affine, max_voxels=100, name='big.nii')
  # Small on disk, too large once resampled from 1 mm to 0.1 mm.
  with pytest.raises(spatial.VolumeTooLargeError, match='resampled'):
    spatial.to_model_space(np.zeros((10, 10, 10)), affine, spacing=(0.1, 0.1, 0.1), max_voxels=10**5)
  with pytest.raises(ValueError, match='model grid'):
    _, space = spatial.to_model_space(np.zeros((4, 4, 4)), affine)
    spatial.from_model_space(np.zeros((3, 3, 3)), space)


def test_shift_and_cap_intensity():
  got = spatial.shift_and_cap_intensity(np.array([-100.0, 0.0, 1900.0]))
  assert np.allclose(got, [0.0, 75.0, 1500.0]) and got.dtype == np.float32
  assert np.allclose(spatial.shift_and_cap_intensity(np.array([10.0, 20.0, 30.0])), [0.0, 10.0, 20.0])
  assert np.allclose(spatial.shift_and_cap_intensity(np.array([0.0, 1500.0])), [0.0, 1500.0])


def test_zscore_and_full_normalisation():
  x = np.array([1.0, 2.0, 3.0, 4.0])
  z = spatial.zscore(x)
  assert np.allclose(z, (x - 2.5) / np.std(x)) and z.dtype == np.float32
  assert np.array_equal(spatial.zscore(np.full((3, 3), 7.0)), np.zeros((3, 3), np.float32))
  image = np.array([-500.0, 500.0, 3500.0])
  assert np.allclose(spatial.normalise_mri(image, standardise=False), [0.0, 375.0, 1500.0])
  assert np.allclose(spatial.normalise_mri(image), spatial.zscore([0.0, 375.0, 1500.0]))


# SPINEPS' grid (TPTBox's `rescale` / `resample_from_to`); tests/data/test_spatial_vs_tptbox.py checks the numbers
# against TPTBox itself.
LPS_AXES = ((-1, 0, 0), (0, -1, 0), (0, 0, 1))
PIR_AXES = ((0, -1, 0), (0, 0, -1), (1, 0, 0))


def test_spineps_grid_shape_rule_spacing_and_voxel_0():
  affine = _affine(LPS_AXES, (0.9, 0.9, 3.3), origin=(12.5, -30.0, 41.0))
  image = np.zeros((40, 64, 15), np.float32)
  model, space = spatial.to_model_space(image, affine, grid='spineps')
  # PIR axes of the LPS scan: P is axis 1 (64 x 0.9 mm), I is axis 2 flipped (15 x 3.3), R is axis 0 flipped.
  expected = tuple(int(n) for n in np.rint(np.array([64, 15, 40]) * [0.9, 3.3, 0.9] / spatial.REFERENCE_SPACING))
  assert space.grid == 'spineps' and model.shape == space.target_shape == expected == (77, 66, 22)
  assert np.array_equal(space.model_spacing, spatial.REFERENCE_SPACING)
  assert np.allclose(nifti.spacing_from_affine(space.model_affine), spatial.REFERENCE_SPACING, rtol=0, atol=1e-12)
  assert nib.aff2axcodes(space.model_affine) == spatial.PIR
  # Voxel 0 stays where the reoriented grid's voxel 0 is (the scan's far L, inferior corner); directions are kept.
  assert np.array_equal(space.model_affine[:3, 3], space.reoriented_affine[:3, 3])
  world_0 = affine @ np.array([39, 0, 14, 1.0])
  assert np.allclose(space.model_affine[:3, 3], world_0[:3])
  directions = space.model_affine[:3, :3] / nifti.spacing_from_affine(space.model_affine)
  assert np.allclose(directions, space.reoriented_affine[:3, :3] / space.source_spacing)


def test_spineps_grid_sits_half_a_voxel_difference_from_centre():
  # 3.3 mm sagittal slices to 1.65 mm: the centre-aligned grid's voxel 0 lies 0.5 * (1.65 - 3.3) mm along R from
  # SPINEPS' (the shapes are exact multiples here, so the other axes and the spacings agree).
  affine = _affine(PIR_AXES, (0.75, 0.75, 3.3), origin=(-20.0, 10.0, 5.0))
  image = np.zeros((30, 40, 12), np.float32)
  _, centre = spatial.to_model_space(image, affine)
  _, spineps = spatial.to_model_space(image, affine, grid='spineps')
  assert centre.target_shape == spineps.target_shape == (30, 40, 24)
  assert np.allclose(centre.model_affine[:3, :3], spineps.model_affine[:3, :3])
  shift = centre.model_affine[:3, 3] - spineps.model_affine[:3, 3]
  assert np.allclose(shift, [0.5 * (1.65 - 3.3), 0.0, 0.0])


def test_spineps_grid_image_samples_the_world_position():
  # A field linear in world coordinates: cubic splines reproduce it away from the edges, so every model
  # voxel must hold the field's value at its own world position (model_affine), as TPTBox's grid puts it.
  affine = _affine(SLP_AXES, (1.3, 0.55, 1.1), origin=(3.0, -7.0, 11.0))
  shape = (20, 30, 24)
  idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing='ij'), -1).astype(np.float64)
  gradient = np.array([0.3, -0.2, 0.5])
  field = lambda world: world @ gradient  # noqa: E731
  image = field(idx @ affine[:3, :3].T + affine[:3, 3]).astype(np.float32)
  model, space = spatial.to_model_space(image, affine, grid='spineps')
  model_idx = np.stack(np.meshgrid(*[np.arange(n) for n in model.shape], indexing='ij'), -1).astype(np.float64)
  expected = field(model_idx @ space.model_affine[:3, :3].T + space.model_affine[:3, 3])
  inner = tuple(slice(6, n - 6) for n in model.shape)
  assert np.allclose(model[inner], expected[inner], atol=1e-3)


def test_spineps_grid_mask_round_trip():
  # Spacings that are multiples of the model's come back exactly (every input voxel centre is a model voxel centre).
  affine = _affine(RAS_AXES, (3.3, 1.5, 0.75))
  rng = np.random.default_rng(3)
  mask = rng.choice(np.array([0, 41, 49, 61, 100], np.int16), size=(8, 20, 30))
  model, space = spatial.mask_to_model_space(mask, affine, grid='spineps')
  assert model.shape == space.target_shape == (40, 30, 16) and model.dtype == mask.dtype
  back = spatial.from_model_space(model, space)
  assert back.dtype == mask.dtype and np.array_equal(back, mask)
  # A generic grid and orientation: structures keep their place in the world and come back whole.
  affine = _affine(SLP_AXES, (1.3, 0.55, 1.1))
  shape = (40, 60, 44)
  centre = affine[:3, :3] @ (np.asarray(shape) / 2) + affine[:3, 3]
  labels = [(centre + np.array([0, 0, -10.0]), 49), (centre + np.array([0, 0, 10.0]), 100),
            (centre + np.array([0.0, 15.0, 0.0]), 61)]
  mask = _blobs(shape, affine, labels, radius_mm=8.0)
  model, space = spatial.mask_to_model_space(mask, affine, grid='spineps')
  back = spatial.from_model_space(model, space)
  assert back.shape == shape
  for _, label in labels:
    assert np.allclose(_world_centroid(model, space.model_affine, label), _world_centroid(mask, affine, label),
                       atol=0.5)
    a, b = back == label, mask == label
    assert 2 * np.count_nonzero(a & b) / (a.sum() + b.sum()) >= 0.95, label


def test_spineps_grid_keeps_a_scan_already_at_the_target_spacing():
  # Within 0.001 mm on every axis TPTBox does not resample: the model grid is the reoriented scan.
  affine = _affine(SLP_AXES, (0.7505, 1.65, 0.75))
  rng = np.random.default_rng(4)
  image = rng.normal(size=(6, 7, 8)).astype(np.float32)
  model, space = spatial.to_model_space(image, affine, grid='spineps')
  reoriented, reoriented_affine, _ = nifti.reorient(image, affine, spatial.PIR)
  assert not space.resampled and np.array_equal(model, reoriented)
  assert np.array_equal(space.model_affine, reoriented_affine)
  assert np.allclose(space.model_spacing, (0.75, 0.7505, 1.65))
  assert np.array_equal(spatial.from_model_space(model, space, is_mask=False), image)
  # 0.002 mm off is resampled (to the same shape here, but a grid of exactly 0.75 mm).
  _, space = spatial.to_model_space(image, _affine(SLP_AXES, (0.752, 1.65, 0.75)), grid='spineps')
  assert space.resampled and space.target_shape == (8, 6, 7)
  assert np.array_equal(space.model_spacing, spatial.REFERENCE_SPACING)


def test_spineps_grid_probabilities_and_other_arrays():
  affine = _affine(RAS_AXES, (0.9, 0.6, 2.0))
  image = np.zeros((12, 25, 9), np.float32)
  _, space = spatial.to_model_space(image, affine, order=1, grid='spineps')
  rng = np.random.default_rng(5)
  logits = rng.normal(size=space.target_shape + (4,))
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  back = spatial.from_model_space(probs, space, is_mask=False)
  assert back.shape == image.shape + (4,) and back.dtype == np.float32
  assert np.allclose(back.sum(-1), 1.0, atol=1e-5) and back.min() >= 0.0
  mask = spatial.apply_model_space(np.ones(image.shape, np.uint8), space, is_mask=True)
  assert mask.shape == space.target_shape and mask.dtype == np.uint8 and np.all(mask == 1)


def test_centre_stays_the_default_grid():
  affine = _affine(SLP_AXES, (1.3, 0.55, 1.1))
  rng = np.random.default_rng(6)
  image = rng.normal(size=(10, 12, 9)).astype(np.float32)
  default, default_space = spatial.to_model_space(image, affine)
  centre, centre_space = spatial.to_model_space(image, affine, grid='centre')
  assert default_space.grid == centre_space.grid == spatial.DEFAULT_GRID == 'centre'
  assert default_space.target_shape == centre_space.target_shape
  assert np.array_equal(default, centre) and np.array_equal(default_space.model_affine, centre_space.model_affine)
  # The centre-aligned affine: model voxel j at reoriented coordinate (j + 0.5) * n_in / n_out - 0.5.
  scale = np.asarray(centre_space.reoriented_shape) / np.asarray(centre_space.target_shape)
  assert np.allclose(np.linalg.solve(centre_space.reoriented_affine, centre_space.model_affine)[:3, 3],
                     0.5 * scale - 0.5)


def test_grid_is_read_from_the_preprocess_config():
  ml_collections = pytest.importorskip('ml_collections')
  prep = ml_collections.ConfigDict(dict(axcodes=spatial.PIR, spacing=spatial.REFERENCE_SPACING))
  assert spatial.grid_of(prep) == 'centre'  # configs written before the field existed
  prep.grid = 'spineps'
  assert spatial.grid_of(prep) == 'spineps'
  prep.grid = 'corner'
  with pytest.raises(ValueError, match=r"config\.data\.preprocess\.grid: unknown resampling grid 'corner'"):
    spatial.grid_of(prep)
  with pytest.raises(ValueError, match='centre, spineps'):
    spatial.to_model_space(np.zeros((4, 4, 4)), np.eye(4), grid='nearest')


def test_prepare_scan_follows_the_config_grid():
  ml_collections = pytest.importorskip('ml_collections')
  from spine_jax.data import volumes
  affine = _affine(LPS_AXES, (0.9, 0.9, 3.3), origin=(12.5, -30.0, 41.0))
  rng = np.random.default_rng(7)
  image = rng.uniform(0, 1000, size=(20, 24, 8)).astype(np.float32)
  semantic = np.zeros(image.shape, np.uint8)
  semantic[5:15, 6:18, 2:6] = 41
  prep = ml_collections.ConfigDict(dict(axcodes=spatial.PIR, spacing=spatial.REFERENCE_SPACING, image_order=3,
                                        max_intensity=spatial.SPINEPS_MAX_INTENSITY,
                                        max_voxels=spatial.DEFAULT_MAX_VOXELS))
  assert volumes.prepare_scan(image, affine, prep, semantic=semantic).model_space.grid == 'centre'
  prep.grid = 'spineps'
  vol = volumes.prepare_scan(image, affine, prep, semantic=semantic)
  model, space = spatial.to_model_space(image, affine, grid='spineps')
  assert vol.model_space.grid == 'spineps' and vol.model_space.target_shape == space.target_shape
  assert np.array_equal(vol.model_space.model_affine, space.model_affine)
  assert np.array_equal(vol.spacing, np.float32(spatial.REFERENCE_SPACING))
  assert np.array_equal(vol.image, spatial.normalise_mri(model))
  assert vol.labels.shape == model.shape and vol.labels.any()
