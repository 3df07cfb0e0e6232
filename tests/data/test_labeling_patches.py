"""The labelling phase's patches (data/labeling_patches.py) against SPINEPS 2.1.3's own labelling step, and the
training samples cut from them (data/labeling_samples.py, the `labeling_train_iterator` of data/pipelines.py).

The worker's `labeling_patches` runs phase_labeling.perform_labeling_step with a classifier whose predictor
records its input tensors (tests/spineps_worker.py), in one call for all cases: the TPTBox test MRI (1.5 mm, uint16)
with and without the corpus masking and with patch rotation, at SPINEPS' default patch size; an MRI phantom
(float32) written in LPS with a float32 affine, a dens painted on C2 and some on C3, with rotation and C1 enabled
(the C2 rule), and the same phantom's whole instance mask (discs, endplates, the sacrum) without a semantic mask.
Skips when the SPINEPS environment is absent."""
import numpy as np
import pytest

from spine_jax.data import labeling_patches as lp
from spine_jax.data import labeling_samples as ls
from spine_jax.data import level_classes as lc
from spine_jax.data import levels as levels_lib
from spine_jax.data import nifti
from spine_jax.data import pipelines
from spine_jax.data.phantoms import mri
from spine_jax.data.spine_labels import CORPUS, DENS
from tests import spineps_oracle

ZOOM = (0.75, 0.75, 1.65)  # mm, P, I, R: the labelling grid of the MRI cases
PHANTOM_ZOOM = (0.9, 0.8, 1.65)  # in-plane rescaling of the phantom's 0.75 mm grid
SMALL = (48, 56, 16)  # voxels: where the geometry is not about the size
PATCH_ATOL = 1e-5  # z-score units: float32 round-off of MONAI's statistics
HEADS = tuple((name, len(classes)) for name, classes in lc.HEAD_CLASSES.items())


def _phantom_config():
  cfg = mri.smoke_config()
  cfg.top_level_choices = ('C2',)
  cfg.shape = (0, 160, 32)  # P fitted to the anatomy: a fixed 96 voxels leave the neck's bodies outside
  return cfg


def dens_phantom() -> dict:
  """A smoke phantom from C2 down, with the upper 40% of C2's body relabelled dens and 20 voxels of C3's."""
  volume = mri.make_spine(np.random.default_rng(5), _phantom_config())
  semantic, instance = volume['semantic'].copy(), volume['instance']
  c2 = np.argwhere((instance == 2) & (semantic == CORPUS))
  top = c2[c2[:, 1] <= np.quantile(c2[:, 1], 0.4)]
  semantic[tuple(top.T)] = DENS
  semantic[tuple(np.argwhere((instance == 3) & (semantic == CORPUS))[:20].T)] = DENS
  return dict(volume, semantic=semantic)


def _lps(volume: dict) -> dict:
  """The phantom as a user's LPS file holds it: arrays reoriented, the affine stored as float32."""
  out = {}
  for key in ('image', 'semantic', 'instance'):
    out[key], affine, _ = nifti.reorient(volume[key], volume['affine'], ('L', 'P', 'S'))
  out['affine'] = affine.astype(np.float32).astype(np.float64)
  return out


def cases() -> tuple[dict, dict]:
  """(arrays NAME/KEY, settings per NAME) for the worker; our call takes the same."""
  test_mri = spineps_oracle.call('worker.test_mri', {})
  phantom = _lps(dens_phantom())
  settings = {
      'mri_corpus': dict(source=test_mri, semantic=True, zoom=ZOOM, patch_size=lp.DEFAULT_PATCH_SIZE),
      'mri_whole': dict(source=test_mri, semantic=False, zoom=ZOOM, patch_size=lp.DEFAULT_PATCH_SIZE),
      'mri_rotated': dict(source=test_mri, semantic=True, zoom=ZOOM, patch_size=lp.DEFAULT_PATCH_SIZE,
                          patch_rotation=True),
      'phantom_lps': dict(source=phantom, semantic=True, zoom=PHANTOM_ZOOM, patch_size=(64, 96, 16),
                          patch_rotation=True, disable_c1=False),
      'phantom_lps_whole': dict(source=phantom, semantic=False, zoom=PHANTOM_ZOOM, patch_size=SMALL),
  }
  arrays = {}
  for name, s in settings.items():
    for key in ('image', 'affine', 'instance') + (('semantic',) if s['semantic'] else ()):
      arrays[f'{name}/{key}'] = s['source'][key]
  return arrays, settings


@pytest.fixture(scope='module')
def spineps_and_cases():
  reason = spineps_oracle.available()
  if reason:
    pytest.skip(reason)
  arrays, settings = cases()
  worker_cases = {name: {k: v for k, v in s.items() if k not in ('source', 'semantic')}
                  for name, s in settings.items()}
  return spineps_oracle.call('worker.labeling_patches', arrays, cases=worker_cases), arrays, settings


@pytest.mark.parametrize('name', ['mri_corpus', 'mri_whole', 'mri_rotated', 'phantom_lps', 'phantom_lps_whole'])
def test_patches_equal_spineps(spineps_and_cases, name):
  ref, arrays, settings = spineps_and_cases
  s = settings[name]
  rotate = s.get('patch_rotation', False)
  args = (arrays[f'{name}/image'], arrays[f'{name}/affine'], arrays[f'{name}/instance'], arrays.get(f'{name}/semantic'))
  geometry = lp.patch_geometry(*args, zoom=s['zoom'], rotate=rotate)
  ours = lp.cut_patches(*args, zoom=s['zoom'], patch_size=s['patch_size'], rotate=rotate)
  assert len(ours.ids) >= 3
  assert list(ours.ids) == ref[f'{name}/ids'].tolist() == sorted(ours.ids)
  np.testing.assert_array_equal(geometry.centres, ref[f'{name}/centres'])
  np.testing.assert_allclose(geometry.affine, ref[f'{name}/grid_affine'], atol=1e-9)
  if rotate:
    np.testing.assert_allclose(geometry.angles_deg, ref[f'{name}/angles'], atol=1e-9)
    assert np.all(np.abs(geometry.angles_deg) > 0.1)
  else:
    assert geometry.angles_deg is None and np.all(np.isnan(ref[f'{name}/angles']))
  assert ours.patches.dtype == np.float32 and ours.patches.shape == ref[f'{name}/patches'].shape
  difference = float(np.abs(ours.patches - ref[f'{name}/patches']).max())
  print(f'{name}: {len(ours.ids)} patches of {s["patch_size"]}, max |ours - SPINEPS| {difference:.2e}, '
        f'SPINEPS {float(ref[f"{name}/seconds"]):.2f} s')
  assert difference <= PATCH_ATOL
  # The centres map back onto the input grid inside the scan.
  assert np.all((ours.centres >= -0.5) & (ours.centres <= np.asarray(arrays[f'{name}/image'].shape) - 0.5))
  if s['semantic']:
    dens = dict(zip(ref[f'{name}/dens_ids'].tolist(), ref[f'{name}/dens_mm3'].tolist()))
    assert ours.dens_volumes_mm3.keys() == dens.keys()
    np.testing.assert_allclose([ours.dens_volumes_mm3[k] for k in dens], list(dens.values()), rtol=1e-12)
  if not s.get('disable_c1', True):
    forced = lp.dens_instance(ours.dens_volumes_mm3)
    assert forced == int(ref[f'{name}/force_c2']) == 2
    assert list(ours.ids).index(forced) == int(ref[f'{name}/force_c2_instance'])


def test_dens_rule_and_bad_sizes():
  assert lp.dens_instance({}) is None
  assert lp.dens_instance({2: 300.0, 3: 20.0}) == 2
  assert lp.dens_instance({2: 250.0}) is None  # SPINEPS: strictly above 250 mm³
  assert lp.dens_instance({4: 400.0, 3: 400.0}) == 3
  with pytest.raises(ValueError, match='patch_size: expected three positive even'):
    lp.check_size((47, 56, 16), 'patch_size')


def test_no_vertebra_gives_no_patch():
  image = np.ones((20, 30, 10), np.float32)
  instances = np.zeros(image.shape, np.int16)
  instances[5:10, 5:10, 3:6] = 26  # the sacrum only: not a vertebra the classifier sees
  out = lp.cut_patches(image, np.diag([0.75, 0.75, 1.65, 1.0]), instances, zoom=ZOOM, patch_size=SMALL)
  assert out.ids == () and out.patches.shape == (0, *SMALL) and out.centres.shape == (0, 3)


# --- The training samples --------------------------------------------------------------------------------------


def _sampler_config():
  cfg = ls.default_sampler_config()
  cfg.patch_size = SMALL
  return cfg


@pytest.fixture(scope='module')
def phantom_and_record():
  volume = mri.make_spine(np.random.default_rng(0), mri.smoke_config())  # 2 of 6 bodies cut
  return volume, ls.phantom_record(volume, _sampler_config())


def test_samples_carry_the_targets_of_their_levels(phantom_and_record):
  volume, record = phantom_and_record
  cfg = _sampler_config()
  anatomy = lc.Anatomy.of([v['id'] for v in volume['vertebrae']])
  full = {levels_lib.level_to_label(level, 'spineps') for level in volume['full_levels']}
  exact = lp.cut_patches(volume['image'], volume['affine'], lp.vertebra_instances(volume['instance']),
                         volume['semantic'], zoom=cfg.zoom, patch_size=SMALL)
  assert len(exact.ids) >= 2 and list(record['levels']) == list(exact.ids)
  assert any(record['fully_visible']) and not all(record['fully_visible'])
  for k, level in enumerate(exact.ids):
    sample = ls.sample_vertebra(record, k, None, cfg, HEADS)
    assert sample['targets'] == lc.targets(level, anatomy, level in full, HEADS)
    assert sample['level'] == level and sample['fully_visible'] == int(level in full)
    np.testing.assert_array_equal(sample['patch'], exact.patches[k])  # no generator: inference's patch


def test_augmentation_keeps_shape_and_reproduces(phantom_and_record):
  _, record = phantom_and_record
  cfg = _sampler_config()
  cfg.augment.update(p_rotation=1.0, p_gamma=1.0, p_noise=1.0, p_scale=1.0)
  exact = ls.sample_vertebra(record, 1, None, cfg, HEADS)['patch']
  first = ls.sample_vertebra(record, 1, np.random.default_rng(7), cfg, HEADS)
  again = ls.sample_vertebra(record, 1, np.random.default_rng(7), cfg, HEADS)
  other = ls.sample_vertebra(record, 1, np.random.default_rng(8), cfg, HEADS)
  assert first['patch'].shape == SMALL and first['patch'].dtype == np.float32
  np.testing.assert_array_equal(first['patch'], again['patch'])
  assert not np.array_equal(first['patch'], exact) and not np.array_equal(first['patch'], other['patch'])
  assert first['targets'] == other['targets']
  assert np.all(np.isfinite(first['patch']))


def test_augmentation_functions():
  rng = np.random.default_rng(0)
  block = np.zeros((6, 6, 4), np.float32)
  block[1:5, 1:5, 1:3] = rng.uniform(1.0, 100.0, (4, 4, 2))
  for out in (ls.gamma(block, 1.4), ls.add_noise(block, 0.1, rng)):
    assert out.dtype == np.float32 and out.shape == block.shape
    np.testing.assert_array_equal(out == 0, block == 0)  # beyond the scan stays 0
  assert ls.gamma(block, 1.4).max() == pytest.approx(block.max())
  assert set(np.unique(ls.jitter_centre((10, 10, 10), rng, (2, 2, 0))[2:])) == {10}


def test_pipeline_yields_batches_of_the_configured_shape(phantom_and_record):
  _, record = phantom_and_record
  it = pipelines.labeling_train_iterator([record, record], _sampler_config(), HEADS, global_batch=4, seed=0,
                                         process_index=0, process_count=1)
  batch = next(it)
  assert batch['patch'].shape == (4, *SMALL) and batch['patch'].dtype == np.float32
  assert set(batch['targets']) == {name for name, _ in HEADS}
  assert all(v.shape == (4,) for v in batch['targets'].values())
  assert batch['fully_visible'].shape == (4,) and batch['level'].shape == (4,)
  shard = pipelines.labeling_train_iterator([record, record], _sampler_config(), HEADS, global_batch=4, seed=0,
                                            process_index=1, process_count=2)
  np.testing.assert_array_equal(next(shard)['patch'], batch['patch'][2:])
