"""`normalisation='spineps'` (data/spineps_preprocess.py) against the array SPINEPS 2.1.3 hands its semantic
nnU-Net, made by SPINEPS', TPTBox's and nnU-Net's own code (tests/spineps_worker.py: `network_input`), and
the steps and the placement back that need no oracle.

Measured on this machine: without N4, bit for bit on the TPTBox test MRI (uint16), a float32 phantom on
the model grid, a uint16 copy of it, and a thick-slice LPS copy that is resampled; with N4 (data/n4_filter.py
here, ANTsPy there; tests/data/test_bias_field.py) within 0.0078 z-score units on the phantom (1-2 float16
steps, after N4 outputs that differ by 3e-5) and 0.035 on the test MRI (8240 of 1081410 voxels differ: its
uint16 N4 output differs from ANTsPy's by 1 in 8 voxels, and one intensity unit is 0.022 z-score units
there, spread by the cubic resampling; SimpleITK's N4, bit for bit with ANTsPy there, gave 0).
"""
import ml_collections
import nibabel as nib
import numpy as np
import pytest

from spine_jax.data import nifti
from spine_jax.data import spatial
from spine_jax.data import spine_labels
from spine_jax.data import spineps_preprocess
from spine_jax.data import volumes
from spine_jax.data.phantoms import mri as mri_phantoms
from spine_jax.inference import semantic
from tests import spineps_oracle

N4_ATOL = 0.08  # z-score units; measured 0.0078 on the phantom, 0.035 on the test MRI (one intensity unit)


@pytest.fixture(scope='module')
def oracle():
  reason = spineps_oracle.available()
  if reason:
    pytest.skip(reason)


def _prep(normalisation='spineps', bias='none'):
  return ml_collections.ConfigDict(dict(
      axcodes=spatial.PIR, spacing=spatial.REFERENCE_SPACING, image_order=3, max_intensity=spatial.SPINEPS_MAX_INTENSITY,
      max_voxels=spatial.DEFAULT_MAX_VOXELS, grid=spatial.SPINEPS_GRID, normalisation=normalisation, bias_field=bias))


@pytest.fixture(scope='module')
def phantom():
  return mri_phantoms.make_volume(mri_phantoms.smoke_config(), 'train', 0)


def test_the_config_field_defaults_to_spine_jax_and_is_checked():
  assert spineps_preprocess.normalisation_of({}) == 'spine_jax' and spineps_preprocess.input_pad_of({}) == 0
  assert spineps_preprocess.input_pad_of({'normalisation': 'spineps'}) == spineps_preprocess.INPUT_PAD_VOXELS == 4
  assert not spineps_preprocess.runs_on_input_grid({})
  assert spineps_preprocess.runs_on_input_grid({'bias_field': 'n4'})
  with pytest.raises(ValueError, match='normalisation'):
    spineps_preprocess.normalisation_of({'normalisation': 'nnunet'})


def test_normalize_to_range_keeps_tptbox_dtypes():
  ints = np.array([5, 1005, 3005], np.uint16).reshape(3, 1, 1)
  out = spineps_preprocess.normalize_to_range(ints)
  assert out.dtype == np.uint16 and out.ravel().tolist() == [0, 500, 1500]
  odd = np.array([5, 1006, 3006], np.uint16).reshape(3, 1, 1)  # 1001 * 1500 / 3001 = 500.33: truncated
  assert spineps_preprocess.normalize_to_range(odd).ravel().tolist() == [0, 500, 1500]
  floats = np.array([-10.0, 20.0], np.float32).reshape(2, 1, 1)
  out = spineps_preprocess.normalize_to_range(floats)
  assert out.dtype == np.float32 and out.ravel().tolist() == [0.0, 30.0]  # below 1500: shifted only


def test_files_of_integers_keep_their_integer_dtype():
  image = np.array([1.0, 2.0, 300.0], np.float32).reshape(3, 1, 1)
  stored = nib.Nifti1Image(image.astype(np.int16), np.eye(4))
  assert spineps_preprocess.stored_dtype(image, stored.header).dtype == np.int16
  stored.header.set_slope_inter(2.0, 0.0)
  assert spineps_preprocess.stored_dtype(image, stored.header).dtype == np.float32
  assert spineps_preprocess.stored_dtype(image, nib.Nifti1Image(image, np.eye(4)).header).dtype == np.float32


def test_empty_images_are_refused_as_spineps_does():
  with pytest.raises(spatial.VolumeError, match='empty'):
    spineps_preprocess.prepare_input(np.full((4, 4, 4), 7.0, np.float32), np.eye(4), name='blank')


def test_network_input_is_float16_z_scores_in_the_nonzero_box():
  rng = np.random.default_rng(0)
  model = np.zeros((10, 12, 8), np.float32)
  model[2:7, 3:11, 1:5] = rng.uniform(1, 1500, (5, 8, 4))
  out, box = spineps_preprocess.network_input(model)
  assert box == (slice(2, 7), slice(3, 11), slice(1, 5))
  inside = out[box]
  assert np.array_equal(inside, inside.astype(np.float16).astype(np.float32))
  assert abs(float(inside.mean())) < 1e-2 and abs(float(inside.std()) - 1) < 1e-2
  out[box] = 0
  assert not out.any()


def test_prepare_scan_pads_the_input_and_comes_back_to_it(phantom):
  image, affine, sem = phantom['image'], phantom['affine'], phantom['semantic']
  vol = volumes.prepare_scan(image, affine, _prep(), semantic=sem)
  space = vol.model_space
  assert space.input_pad == 4 and space.input_shape == image.shape
  # The phantom is on the model grid already, so SPINEPS' grid keeps it: the model grid is the padded input.
  assert not space.resampled and space.target_shape == tuple(n + 8 for n in image.shape)
  np.testing.assert_allclose(space.model_affine, spatial.pad_grid(image, affine, 4)[1], atol=1e-9)
  np.testing.assert_array_equal(spatial.from_model_space(spine_labels.indices_to_ids(vol.labels), space), sem)
  assert vol.network_box is not None and not vol.image[:4].any()
  default = volumes.prepare_scan(image, affine, _prep('spine_jax'))
  assert default.network_box is None and default.model_space.input_pad == 0


def test_prediction_is_background_outside_the_network_box(phantom):
  cfg = ml_collections.ConfigDict(dict(
      data=dict(preprocess=_prep(), patch=dict(patch_size=(32, 32, 16))),
      inference=dict(step_size=0.5, batch_size=2, mirror_axes=())))
  vol = volumes.prepare_scan(phantom['image'], phantom['affine'], cfg.data.preprocess)
  seen = []

  def logits_fn(batch):
    seen.append(batch.shape)
    out = np.zeros(batch.shape[:4] + (15,), np.float32)
    out[..., 1] = 1.0
    return out

  indices = semantic.predict_prepared(logits_fn, vol, cfg)
  assert indices.shape == vol.image.shape and seen
  assert (indices[vol.network_box] == 1).all()
  indices[vol.network_box] = 0
  assert not indices.any()


def _cases(phantom):
  image, affine = phantom['image'], phantom['affine']
  lps, lps_affine, _ = nifti.reorient(image, affine, ('L', 'P', 'S'))
  thick = lps_affine.copy()
  thick[:3, :3] = lps_affine[:3, :3] * np.array([1.0, 1.0, 3.3 / 0.75])  # every 4th sagittal slice, resampled back
  thick_image = lps[:, :, ::4].copy()
  return {'phantom': (image, affine), 'phantom uint16': (np.round(image).astype(np.uint16), affine),
          'phantom LPS thick slices': (thick_image, thick),
          'phantom LPS thick slices uint16': (np.round(thick_image).astype(np.uint16), thick)}


def _compare(image, affine, n4):
  ref = spineps_oracle.call('worker.network_input', {'image': image, 'affine': affine},
                            voxel_spacing=list(spatial.REFERENCE_SPACING), n4=n4)
  vol = volumes.prepare_scan(image, affine, _prep(bias='n4' if n4 else 'none'))
  np.testing.assert_allclose(vol.model_space.model_affine, ref['model_affine'], rtol=0, atol=1e-9)
  assert [[s.start, s.stop] for s in vol.network_box][::-1] == ref['bbox'].tolist()
  data = ref['data'][0].astype(np.float32)  # nnU-Net's axis order: the model grid's reversed
  ours = np.transpose(vol.image[vol.network_box])
  assert ours.shape == data.shape
  return float(np.abs(ours - data).max()), int((ours != data).sum()), data.size


@pytest.mark.parametrize('n4', [False, True])
def test_network_input_matches_spineps_on_the_tptbox_mri(oracle, n4):
  mri = spineps_oracle.call('worker.test_mri', {})
  worst, differing, size = _compare(mri['image'], mri['affine'], n4)
  print(f'test MRI n4={n4}: max |diff| {worst:.3g}, {differing} of {size} voxels differ')
  assert worst <= (N4_ATOL if n4 else 0.0)


@pytest.mark.parametrize('case', ['phantom', 'phantom uint16', 'phantom LPS thick slices',
                                  'phantom LPS thick slices uint16'])
def test_network_input_matches_spineps_on_phantoms(oracle, phantom, case):
  image, affine = _cases(phantom)[case]
  worst, differing, size = _compare(image, affine, n4=False)
  print(f'{case}: max |diff| {worst:.3g}, {differing} of {size} voxels differ')
  assert worst == 0.0


def test_network_input_with_n4_matches_spineps_on_a_phantom(oracle, phantom):
  worst, differing, size = _compare(phantom['image'], phantom['affine'], n4=True)
  print(f'phantom with N4: max |diff| {worst:.3g}, {differing} of {size} voxels differ')
  assert worst <= N4_ATOL


def test_masks_return_to_the_unpadded_input_as_tptbox_puts_them(oracle, phantom):
  image, affine = _cases(phantom)['phantom LPS thick slices']
  vol = volumes.prepare_scan(image, affine, _prep())
  rng = np.random.default_rng(5)
  model_mask = rng.choice(np.array([0, 41, 49, 60, 100], np.uint8), size=vol.model_space.target_shape)
  ref = spineps_oracle.call('worker.resample_back', {'mask': model_mask, 'mask_affine': vol.model_space.model_affine,
                                                      'target': image, 'target_affine': affine})
  np.testing.assert_array_equal(spatial.from_model_space(model_mask, vol.model_space), ref['array'])
