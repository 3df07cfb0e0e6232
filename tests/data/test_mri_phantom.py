"""Procedural sagittal T2w spines: determinism, PIR geometry, SPINEPS labels, anatomy, intensities, NIfTI files."""
import csv
import pickle

import nibabel as nib
import numpy as np
import pytest

from spine_jax.data import levels
from spine_jax.data import nifti
from spine_jax.data import spatial
from spine_jax.data import spine_labels
from spine_jax.data.phantoms import mri
from spine_jax.data.phantoms import mri_anatomy

BODY_LIKE = (spine_labels.CORPUS, spine_labels.ENDPLATE)
VERTEBRA_SEMANTICS = (41, 42, 43, 44, 45, 46, 47, 48, spine_labels.CORPUS)
VERTEBRA_IDS = set(levels.scheme_labels('spineps'))


def _cfg(**overrides):
  cfg = mri.default_mri_phantom_config()
  for key, value in overrides.items():
    setattr(cfg, key, value)
  return cfg


@pytest.fixture(scope='module')
def default_volumes():
  cfg = _cfg(num_train_volumes=6)
  return [mri.make_volume(cfg, 'train', i) for i in range(6)]


@pytest.fixture(scope='module')
def lumbar():
  """T11 down to the sacrum: the conus, the lumbar spine, S1."""
  return mri.make_spine(np.random.default_rng(7), _cfg(top_level_choices=('T11',), num_vertebrae_range=(9, 9)))


@pytest.fixture(scope='module')
def cervical():
  return mri.make_spine(np.random.default_rng(8), _cfg(top_level_choices=('C2',), num_vertebrae_range=(8, 8)))


@pytest.fixture(scope='module')
def whole():
  return mri.make_spine(np.random.default_rng(3), mri.whole_spine_config())


@pytest.fixture(scope='module')
def all_volumes(default_volumes, lumbar, cervical, whole):
  return default_volumes + [lumbar, cervical, whole]


def _world_pi(volume, mask):
  """(p, i) mm of a mask's voxels: RAS y = -p, z = -i through the PIR affine."""
  idx = np.argwhere(mask).astype(np.float64)
  ras = idx @ volume['affine'][:3, :3].T + volume['affine'][:3, 3]
  return -ras[:, 1], -ras[:, 2]


def _vertebra(volume, level):
  return next(v for v in volume['vertebrae'] if v['level'] == level)


def _axis_mean(volume, label, axis):
  return float(np.argwhere(volume['semantic'] == label)[:, axis].mean())


def test_default_config():
  cfg = mri.default_mri_phantom_config()
  assert tuple(cfg.spacing_mm) == (0.75, 0.75, 1.65) == spatial.REFERENCE_SPACING
  assert tuple(cfg.shape) == (0, 0, 32) and cfg.shape_multiple == 16
  assert tuple(cfg.num_vertebrae_range) == (6, 9)
  # Cervical to lumbar fields; lumbar studies (from T12 or L1, reaching the sacrum) weighted up.
  assert cfg.top_level_choices[0] == 'C2'
  assert sum(c in ('T12', 'L1') for c in cfg.top_level_choices) / len(cfg.top_level_choices) > 0.25
  assert (cfg.num_train_volumes, cfg.num_test_volumes, cfg.train_seed, cfg.test_seed) == (64, 8, 0, 1)
  assert tuple(cfg.cervical_lordosis_deg) == (20.0, 40.0) and tuple(cfg.thoracic_kyphosis_deg) == (20.0, 50.0)
  assert tuple(cfg.lumbar_lordosis_deg) == (40.0, 60.0)
  assert tuple(cfg.slice_thickness_mm_range) == (3.0, 4.0)
  assert mri.whole_spine_config().top_level_choices == ('C2',)


def test_determinism_and_splits():
  cfg = _cfg(num_train_volumes=4, num_test_volumes=2)
  a, b = mri.make_volume(cfg, 'train', 3), mri.make_volume(cfg, 'train', 3)
  for key in ('image', 'semantic', 'instance', 'affine'):
    assert np.array_equal(a[key], b[key])
  assert a['levels'] == b['levels'] and a['centroids'] == b['centroids']
  other, test = mri.make_volume(cfg, 'train', 2), mri.make_volume(cfg, 'test', 1)
  for c in (other, test):
    assert c['image'].shape != a['image'].shape or not np.array_equal(c['image'], a['image'])
  source = pickle.loads(pickle.dumps(mri.MriPhantomSource(cfg, 'test')))
  assert len(source) == 2 == mri.split_size(cfg, 'test')
  assert np.array_equal(source[1]['semantic'], test['semantic'])


def test_bad_requests():
  cfg = _cfg(num_train_volumes=2)
  with pytest.raises(ValueError, match='split'):
    mri.make_volume(cfg, 'val', 0)
  with pytest.raises(IndexError):
    mri.make_volume(cfg, 'train', 2)
  with pytest.raises(ValueError, match='top level'):
    mri.make_spine(np.random.default_rng(0), _cfg(top_level_choices=('T13',), t13_probability=0.0))


def test_geometry_is_pir(all_volumes):
  for v in all_volumes:
    assert nib.aff2axcodes(v['affine']) == spatial.PIR
    assert np.allclose(nifti.spacing_from_affine(v['affine']), spatial.REFERENCE_SPACING)
    assert np.allclose(v['spacing'], spatial.REFERENCE_SPACING)
    shape = v['image'].shape
    assert v['semantic'].shape == v['instance'].shape == shape and shape[2] == 32
    assert shape[0] % 16 == 0 and shape[1] % 16 == 0
    assert v['image'].dtype == np.float32 and v['semantic'].dtype == np.uint8 and v['instance'].dtype == np.int16
    assert np.all(np.isfinite(v['image'])) and v['image'].min() >= 0 and v['image'].max() > 100
    # Axis 0 runs posterior: bodies in front of the canal, the canal in front of the spinous processes.
    assert _axis_mean(v, spine_labels.CORPUS, 0) < _axis_mean(v, spine_labels.CANAL, 0) < _axis_mean(v, spine_labels.SPINOUS, 0)


def test_fixed_shape():
  v = mri.make_spine(np.random.default_rng(1), _cfg(shape=(128, 256, 24)))
  assert v['image'].shape == (128, 256, 24)
  assert {spine_labels.CORPUS, spine_labels.DISC, spine_labels.CANAL} <= set(np.unique(v['semantic']).tolist())


def test_labels_and_instances_agree(all_volumes):
  for v in all_volumes:
    sem, inst = v['semantic'], v['instance']
    assert set(np.unique(sem).tolist()) <= {0, *spine_labels.SEMANTIC_IDS}
    for label in VERTEBRA_SEMANTICS:
      assert set(np.unique(inst[sem == label]).tolist()) <= VERTEBRA_IDS - {26}
    assert set(np.unique(inst[sem == spine_labels.SACRUM]).tolist()) <= {26}
    discs = np.unique(inst[sem == spine_labels.DISC])
    plates = np.unique(inst[sem == spine_labels.ENDPLATE])
    assert discs.size and plates.size
    assert set((discs - spine_labels.DISC_OFFSET).tolist()) <= VERTEBRA_IDS
    assert set((plates - spine_labels.ENDPLATE_OFFSET).tolist()) <= VERTEBRA_IDS
    for label in (0, spine_labels.CORD, spine_labels.CANAL):
      assert not inst[sem == label].any()
    # Every endplate belongs to a vertebra whose body is in the field.
    body_ids = set(np.unique(inst[sem == spine_labels.CORPUS]).tolist())
    assert set((plates - spine_labels.ENDPLATE_OFFSET).tolist()) <= body_ids
    assert v['levels'] == levels.sort_levels(v['levels'])
    assert set(v['full_levels']) <= set(v['levels'])


def test_vertebrae_run_top_to_bottom(all_volumes):
  for v in all_volumes:
    ids = [levels.level_to_label(level, 'spineps') for level in v['levels']]
    rows = [v['body_centroids'][k][1] for k in ids if k in v['body_centroids']]
    assert len(rows) >= 4 and np.all(np.diff(rows) > 0)


def test_disc_lies_between_its_vertebrae(all_volumes):
  checked = 0
  for v in all_volumes:
    ids = [levels.level_to_label(level, 'spineps') for level in v['levels']]
    for upper, lower in zip(ids[:-1], ids[1:]):
      disc = spine_labels.DISC_OFFSET + upper
      if disc in v['centroids'] and upper in v['body_centroids'] and lower in v['body_centroids']:
        assert v['body_centroids'][upper][1] < v['centroids'][disc][1] < v['body_centroids'][lower][1]
        checked += 1
    # No disc below the sacrum, none between the atlas and the axis.
    assert spine_labels.DISC_OFFSET + 26 not in v['centroids'] and spine_labels.DISC_OFFSET + 1 not in v['centroids']
  assert checked >= 40


def test_left_structures_lie_on_the_low_r_side(all_volumes):
  """PIR axis 2 points to the patient's right: left (43, 45, 47) has the smaller index, per vertebra too."""
  for v in all_volumes:
    sem, inst = v['semantic'], v['instance']
    for left, right in spine_labels.LEFT_RIGHT_PAIRS:
      assert _axis_mean(v, left, 2) + 3 < _axis_mean(v, right, 2)
    for level in v['full_levels']:
      x = levels.level_to_label(level, 'spineps')
      if x == 26:
        continue
      body_r = v['body_centroids'][x][2]
      for left, right in spine_labels.LEFT_RIGHT_PAIRS:
        lz = np.argwhere((sem == left) & (inst == x))[:, 2]
        rz = np.argwhere((sem == right) & (inst == x))[:, 2]
        if lz.size > 20 and rz.size > 20:
          assert lz.mean() < body_r < rz.mean()
  # Mirroring along R (augmentation) must swap the pairs to stay correct.
  flipped = all_volumes[0]['semantic'][:, :, ::-1]
  assert np.argwhere(flipped == 43)[:, 2].mean() > np.argwhere(flipped == 44)[:, 2].mean()


def test_cord_ends_at_l1_l2(lumbar, whole):
  for v in (lumbar, whole):
    assert {'T12', 'L1', 'L2', 'L3'} <= set(v['full_levels'])
    assert v['cord_end_level'] in ('L1', 'L2')
    cord_rows = np.argwhere(v['semantic'] == spine_labels.CORD)[:, 1]
    l1, l2 = v['body_centroids'][20][1], v['body_centroids'][21][1]
    t12 = v['body_centroids'][19][1]
    assert cord_rows.min() < t12 and l1 - 2 <= cord_rows.max() <= l2
    # Below the conus the canal goes on with CSF and roots only.
    canal_rows = np.argwhere(v['semantic'] == spine_labels.CANAL)[:, 1]
    assert canal_rows.max() > v['body_centroids'][22][1]


def test_sacrum_when_the_field_reaches_it(lumbar):
  sem, inst = lumbar['semantic'], lumbar['instance']
  assert lumbar['levels'][-1] == 'S1' and (sem == spine_labels.SACRUM).sum() > 1000
  assert set(np.unique(inst[sem == spine_labels.SACRUM]).tolist()) == {26}
  l5 = levels.level_to_label('L5', 'spineps')
  assert lumbar['body_centroids'][l5][1] < lumbar['centroids'][spine_labels.DISC_OFFSET + l5][1] < \
      lumbar['body_centroids'][26][1]


def test_body_heights_follow_spec(lumbar, cervical, default_volumes):
  measured = {'cervical': 0, 'thoracic': 0, 'lumbar': 0}
  for v in [lumbar, cervical] + default_volumes:
    sem, inst = v['semantic'], v['instance']
    for level in v['full_levels']:
      region = levels.level_region(level)
      if level in ('C2', 'S1') or region == 'sacral':
        continue
      x = levels.level_to_label(level, 'spineps')
      meta = _vertebra(v, level)
      lo, hi = mri_anatomy.SPEC_RANGES[region]['height']
      assert lo <= meta['dims']['height'] <= hi
      dlo, dhi = mri_anatomy.SPEC_RANGES[region]['disc']
      assert dlo <= meta['dims']['disc'] <= dhi
      body = np.isin(sem, BODY_LIKE) & ((inst == x) | (inst == spine_labels.ENDPLATE_OFFSET + x))
      p, i = _world_pi(v, body)
      phi = np.deg2rad(meta['angle_deg'])
      w = -(p - meta['centre_mm'][0]) * np.sin(phi) - (i - meta['centre_mm'][1]) * np.cos(phi)
      height = w.max() - w.min()  # the outermost voxel centres lie within a fraction of a voxel of the plates
      assert lo - 1.0 <= height <= hi + 1.0, (level, height)
      # Endplates: thin layers at the top and the bottom of the body.
      plate = (sem == spine_labels.ENDPLATE) & (inst == spine_labels.ENDPLATE_OFFSET + x)
      rows = np.argwhere(plate)[:, 1]
      centre = v['body_centroids'][x][1]
      assert rows.min() < centre < rows.max()
      assert plate.sum() < 0.2 * body.sum()
      measured[region] += 1
  assert all(n >= 2 for n in measured.values()), measured


def test_discs_brighter_than_bodies(all_volumes):
  for v in all_volumes:
    image, sem = v['image'], v['semantic']
    assert image[sem == spine_labels.DISC].mean() > 1.05 * image[sem == spine_labels.CORPUS].mean()
    assert image[sem == spine_labels.CANAL].mean() > image[sem == spine_labels.CORD].mean()


def test_curvature_directions(whole):
  """Lordosis bulges anteriorly (smaller axis-0 index), kyphosis posteriorly: mid vertebra against its chord."""
  def bulge(top, mid, bottom):
    p = {lv: whole['body_centroids'][levels.level_to_label(lv, 'spineps')][0] for lv in (top, mid, bottom)}
    return p[mid] - (p[top] + p[bottom]) / 2
  assert bulge('C3', 'C5', 'C7') < -1.0
  assert bulge('T2', 'T6', 'T10') > 2.0
  assert bulge('L1', 'L3', 'L5') < -2.0


def test_whole_spine(whole):
  expected = [f'C{i}' for i in range(2, 8)] + [f'T{i}' for i in range(1, 13)] + [f'L{i}' for i in range(1, 6)]
  assert whole['full_levels'] == expected + ['S1']
  assert whole['levels'][0] == 'C1' and whole['image'].shape[1] * 0.75 > 550


def test_transitional_vertebrae():
  v = mri.make_spine(np.random.default_rng(4), _cfg(top_level_choices=('T11',), num_vertebrae_range=(5, 5),
                                                    t13_probability=1.0, l6_probability=1.0))
  assert v['full_levels'][:4] == ['T11', 'T12', 'T13', 'L1']
  ids = set(v['centroids'])
  assert {28, 128, 228} <= ids  # T13, the disc below it, its endplates
  assert mri_anatomy.spine_levels(np.random.default_rng(0), 0.0, 1.0)[-3:] == ['L5', 'L6', 'S1']


def test_nifti_round_trip(tmp_path):
  cfg = _cfg(shape=(96, 160, 16))
  out = mri.write_mri_phantom_nifti(tmp_path, 2, seed=5, axcodes=('L', 'P', 'S'), cfg=cfg, split='test')
  with open(out['manifest'], newline='') as f:
    rows = list(csv.DictReader(f))
  assert [list(r) for r in rows] == [list(mri.MANIFEST_COLUMNS)] * 2 and {r['split'] for r in rows} == {'test'}
  for row, vol in zip(rows, out['volumes']):
    again = mri.make_spine(np.random.default_rng([5, out['volumes'].index(vol)]), cfg)
    assert np.array_equal(vol['semantic_pir'], again['semantic'])
    for key, kind in (('image', 'image_pir'), ('semantic', 'semantic_pir'), ('instance', 'instance_pir')):
      img = nib.load(str(tmp_path / row[key]))
      assert nib.aff2axcodes(img.affine) == ('L', 'P', 'S')
      array = np.asarray(img.dataobj)
      back, affine, _ = nifti.reorient(array, img.affine, spatial.PIR)
      assert np.array_equal(back, vol[kind]) and back.dtype == vol[kind].dtype
      assert np.allclose(affine, vol['affine_pir'])
    assert np.allclose(vol['image_pir'], np.rint(again['image']), atol=0.5)
